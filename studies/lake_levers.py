"""What each meta-test lever buys on Lake's runs: one trained θ, scored with every combination.

    python run.py --config configs/omniglot-lake-cpu.yaml --data-root data/lake-proxy-korean --output-dir runs/lake-korean
    OMP_NUM_THREADS=1 python -m studies.lake_levers runs/lake-korean runs/lake-latin runs/lake-greek

For each run folder, the θ its run meta-tested (``checkpoints/latest.pt``, saved at the last
meta-step) meta-tests its 20 runs again with ``--test-augment`` in ``--views`` and
``--query-assignment`` independent and balanced, everything else as the run had it. The meta-test
levers change only how a trained θ is scored, so this measures each on the same θ. Prints the
table (error per fold, their mean) and writes ``--json``. ``--split val`` scores the run's
meta-validation tasks instead (background characters held out of meta-training): the split to
choose the levers on, the runs being the test.

``--fine-tune STEPS:LR`` scores ProtoNet runs after STEPS SGD steps of the whole network at
learning rate LR on each task's support set and views, from the prototype head
(``engines.protonet``); 0:0 is the prototypes alone.

A run written as ``A,B,...`` is an ensemble: each member's θ scores the same tasks with the same
views (the first member's: its seed draws the validation tasks and the views), each query's
log-probabilities are averaged over the members, then assigned as asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from engines import build_engine
from engines.records import summarize_evaluation
from engines.test_time import assign_balanced
from imaml import checkpoint
from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["main", "score"]


def score(run_dir: str, views: int, assignment: str, split: str = "test", fine_tune: str = "0:0") -> dict:
    """The error on ``split`` (the 20 runs, or the validation tasks) with these levers, for the θ
    the run in ``run_dir`` ended with, or for the ensemble ``A,B,...`` of several runs' θ."""
    states = [checkpoint.load(Path(member) / "checkpoints" / "latest.pt") for member in run_dir.split(",")]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    saved = {k: v for k, v in states[0]["config"].items() if k in fields}
    alone = len(states) == 1
    steps, lr = fine_tune.split(":")
    if int(steps):
        if saved["algo"] != "protonet":
            raise UsageError(f"--fine-tune {fine_tune}: for ProtoNet runs ({run_dir} is {saved['algo']})")
        saved["inner_lr"] = float(lr)
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(**{**saved, "test_augment": views, "output_dir": out, "resume": None, "eval_only": False,
                              "query_assignment": assignment if alone else "independent",
                              "checkpoint": None}).validate()
        engine = build_engine(config)
        engine.fine_tune_steps = int(steps)
        num_tasks = config.test_tasks if split == "test" else config.val_tasks
        if alone:
            engine.load_state_dict(states[0])
            result = engine.evaluate(split, num_tasks)
        else:
            result = _ensemble(engine, states, split, num_tasks, assignment)
    return {"error_rate": 1.0 - result["mean"], "per_run_error": result.get("per_run_error"),
            "step": engine.global_step}


def _ensemble(engine, states: List[dict], split: str, num_tasks: int, assignment: str) -> dict:
    """Each state's θ scores the tasks; the log-probabilities are averaged over them, then each
    group of tasks is scored as the engine scores it (after the balanced assignment if asked)."""
    score_group = engine.lower.task_scores
    members: List[list] = []
    try:
        for state in states:
            engine.load_state_dict(state)
            groups: list = []

            def recorded(output, target, groups=groups):
                groups.append((output.log_softmax(-1), target))
                return score_group(output, target)
            engine.lower.task_scores = recorded
            engine.evaluate(split, num_tasks)
            members.append(groups)
    finally:
        engine.lower.task_scores = score_group
    scores = []
    for outputs in zip(*members):
        log_probs, target = torch.stack([o for o, _ in outputs]).mean(0), outputs[0][1]
        if assignment == "balanced":
            log_probs = assign_balanced(log_probs)
        scores.extend(score_group(log_probs, target).tolist())
    tasks = [(i, value, [], None, float("nan")) for i, value in enumerate(scores)]
    return summarize_evaluation(tasks, engine.env.kind, engine.run_config.inner_tol, engine.env.sources[split])


def _fine_tune(text: str) -> str:
    """--fine-tune's STEPS:LR, checked (argparse turns the error into one line)."""
    steps, _, lr = text.partition(":")
    try:
        if int(steps) < 0 or float(lr) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give STEPS:LR, e.g. 10:0.2 (0:0: no fine-tuning)") from None
    return text


def main(argv: List[str] | None = None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of finished omniglot-lake runs; A,B,...: their ensemble")
    parser.add_argument("--views", nargs="+", type=int, default=[0, 8])
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--assignment", choices=("independent", "balanced", "both"), default="both")
    parser.add_argument("--fine-tune", nargs="+", default=["0:0"], metavar="STEPS:LR", type=_fine_tune,
                        help="ProtoNet runs: SGD steps of the whole network at meta-test and their rate")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    assignments = ("independent", "balanced") if args.assignment == "both" else (args.assignment,)
    settings = [(v, a, f) for f in args.fine_tune for a in assignments for v in args.views]
    table: Dict[str, dict] = {}
    for views, assignment, fine_tune in settings:
        name = f"--test-augment {views} --query-assignment {assignment}" + (
            f" --fine-tune {fine_tune}" if fine_tune != "0:0" else "")
        try:
            table[name] = {run: score(run, views, assignment, args.split, fine_tune) for run in args.runs}
        except UsageError as error:
            parser.error(str(error))
        errors = [r["error_rate"] for r in table[name].values()]
        spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
        print(f"{name:52s} " + " ".join(f"{100 * e:6.2f}%" for e in errors)
              + f" | mean {100 * statistics.mean(errors):.2f}% (sd {100 * spread:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
