"""Meta-training and Lake meta-test speed of the adaptation settings, on real Omniglot files.

    python -m studies.lake_proxy --source ../shared/data/omniglot/images_background_small1.zip \\
        --hold-out Korean --out data/lake-proxy-korean
    OMP_NUM_THREADS=1 python -m benchmarks.adaptation_speed --data-root data/lake-proxy-korean

Every row is one engine built as ``run.py`` builds it (``--task omniglot-lake``: meta-training
episodes from the background set, meta-test on the 20 one-shot runs), 5-way 1-shot with 15
queries in meta-training, meta-batch 16, one process, θ₀ and task stream from the same seed;
each task's head starts at zero (``--head-init zero``), so θ meta-tests at the runs' 20 ways.
After one warm-up meta-step each, ``--rounds`` rounds time one meta-step of every row in turn
(the order reversed every other round), so a slow spell of the machine falls on all rows alike:
tasks/s = meta-batch / the row's fastest step, and the speed-up over the first row is the median
over rounds of the paired step-time ratios. Then each row meta-tests the 20 runs once (20-way),
timed.

The last row, ``encoder floor``, is not a method: it runs θ's encoder forward and backward on
each task's support set and query set, nothing else, in plain torch. Every head method must do
at least that per task (the query loss reaches θ through the query features, the implicit term
through the support features), so its speed-up over MAML is the most any head setting can reach
on this machine.

Run on an earlier commit (whose configuration has no ``adapt``), the head rows ask for the same
algorithms by the import paths that commit used, so two checkouts run side by side, one thread
each, compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.flags import add_run_flags
from engines import build_engine
from imaml.config import RunConfig

__all__ = ["ROWS", "main"]

COMMON = dict(task="omniglot-lake", omniglot_background="small1", episodes="within-alphabet", ways=5, test_ways=20,
              head_init="zero", shots=1,
              query_shots=15, model="conv4-strided", channels=64, bn_mode="transductive", meta_batch_size=16,
              meta_lr=1e-3, test_tasks=20, val_tasks=20, val_every=10 ** 6, processes=1, seed=0)
HEAD_IMAML = dict(algo="imaml", adapt="head", inner_optimizer="hessian-free", inner_cg_steps=10,
                  inner_lr=1.0, inner_tol=0.01, lam=0.1, cg_steps=30, cg_tol=0.01, inner_steps=15, test_inner_steps=15)
ROWS: Dict[str, dict] = {  # the first row is the one the others are compared with
    "maml, 1 step": dict(algo="maml", inner_steps=1, inner_lr=0.4, test_inner_steps=10),
    "anil (maml --adapt head), 5 steps": dict(algo="maml", adapt="head", inner_steps=5, inner_lr=0.4,
                                              test_inner_steps=10),
    "imaml --adapt head --head-init zero, cg (the presets)": dict(HEAD_IMAML, hypergrad="cg"),
    "imaml --adapt head --head-init zero, exact": dict(HEAD_IMAML, hypergrad="exact"),
}
FLOOR = "encoder floor (θ's encoder fwd+bwd on support and query)"
# before --adapt and --head-init, the same algorithms by class (None: there was none)
LEGACY_PATHS = {("maml", "all"): "problems.zero_head:ZeroHeadUnrolled", ("maml", "head"): None,
                ("imaml", "head"): "problems.zero_head:ZeroHeadANILImplicit"}


def row_config(settings: dict, data_root: str, output_dir: str) -> Optional[RunConfig]:
    """The row's RunConfig (None where an earlier commit had no class for it)."""
    settings = dict(COMMON, **settings, data_root=data_root, output_dir=output_dir)
    if "adapt" not in {f.name for f in dataclasses.fields(RunConfig)}:
        del settings["head_init"]
        settings["lower_problem"] = LEGACY_PATHS[settings["algo"], settings.pop("adapt", "all")]
        if settings["lower_problem"] is None:
            return None
    return RunConfig(**settings).validate()


def encoder_floor(engine) -> Callable[[], None]:
    """One meta-step's irreducible work for a head method: θ's encoder forward and backward on
    every task's support and query sets of a fresh meta-batch (``env.step``, as ``train_step``)."""
    encoder = engine.upper.module.features

    def step() -> None:
        batch = engine.env.step()
        loss = sum(encoder(batch.support_x[t]).sum() + encoder(batch.query_x[t]).sum()
                   for t in range(batch.num_tasks))
        loss.backward()
        engine.upper.module.zero_grad(set_to_none=True)

    return step


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: List[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_flags(parser, required=["data_root"], data_root=None)  # with omniglot-py/ (studies.lake_proxy writes one)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=5)
    add_run_flags(parser, output_dir="runs/adaptation_speed")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-floor", action="store_true", help="leave out the encoder-floor row")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    engines = {}
    for name in list(args.rows):
        config = row_config(ROWS[name], args.data_root, args.output_dir)
        if config is None:
            args.rows.remove(name)
            continue
        engine = build_engine(config)
        engine.train()
        engine.train_step()  # warm-up: one-time costs
        engines[name] = engine
    steppers = {name: engine.train_step for name, engine in engines.items()}
    head_rows = [name for name in args.rows if ROWS[name].get("adapt") == "head"]
    if head_rows and not args.no_floor:
        steppers[FLOOR] = encoder_floor(engines[head_rows[0]])
        steppers[FLOOR]()  # warm-up
    names = list(steppers)
    steps: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else reversed(names)):
            steps[name].append(_timed(steppers[name]))
    first = args.rows[0]
    results = {}
    for name in names:
        if name == FLOOR:
            results[name] = {"tasks_per_second": COMMON["meta_batch_size"] / min(steps[name]),
                             "speedup_over_first": statistics.median(a / b for a, b in zip(steps[first], steps[name])),
                             "lake_meta_test_seconds": float("nan"), "execution": "per-task, plain torch"}
            continue
        engine = engines[name]
        test_seconds = _timed(lambda: engine.evaluate("test", engine.run_config.test_tasks))
        results[name] = {
            "tasks_per_second": engine.run_config.meta_batch_size / min(steps[name]),
            "speedup_over_first": statistics.median(a / b for a, b in zip(steps[first], steps[name])),
            "lake_meta_test_seconds": test_seconds,
            "execution": "vectorized" if engine.vectorized else "per-task",
        }
    print(f"{'row':58s} {'tasks/s':>8s} {'× ' + first:>16s} {'Lake test s':>11s}  execution")
    for name, row in results.items():
        print(f"{name:58s} {row['tasks_per_second']:8.1f} {row['speedup_over_first']:16.2f} "
              f"{row['lake_meta_test_seconds']:11.1f}  {row['execution']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return results


if __name__ == "__main__":
    main()
