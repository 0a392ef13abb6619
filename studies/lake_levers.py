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
from imaml import checkpoint
from imaml.config import RunConfig

__all__ = ["main", "score"]


def score(run_dir: Path, views: int, assignment: str, split: str = "test") -> dict:
    """The error on ``split`` (the 20 runs, or the validation tasks) with these levers, for the θ
    the run in ``run_dir`` ended with."""
    state = checkpoint.load(run_dir / "checkpoints" / "latest.pt")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    saved = {k: v for k, v in state["config"].items() if k in fields}
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(**{**saved, "test_augment": views, "query_assignment": assignment, "output_dir": out,
                              "resume": None, "eval_only": False, "checkpoint": None}).validate()
        engine = build_engine(config)
        engine.load_state_dict(state)
        result = engine.evaluate(split, config.test_tasks if split == "test" else config.val_tasks)
    return {"error_rate": 1.0 - result["mean"], "per_run_error": result.get("per_run_error"),
            "step": engine.global_step}


def main(argv: List[str] | None = None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of finished omniglot-lake runs")
    parser.add_argument("--views", nargs="+", type=int, default=[0, 8])
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = [(v, a) for a in ("independent", "balanced") for v in args.views]
    table: Dict[str, dict] = {}
    for views, assignment in settings:
        name = f"--test-augment {views} --query-assignment {assignment}"
        table[name] = {run: score(Path(run), views, assignment, args.split) for run in args.runs}
        errors = [r["error_rate"] for r in table[name].values()]
        spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
        print(f"{name:52s} " + " ".join(f"{100 * e:6.2f}%" for e in errors)
              + f" | mean {100 * statistics.mean(errors):.2f}% (sd {100 * spread:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
