"""Tune one method's knobs on meta-validation, the same way for every method: a grid of at most six
candidates, each a short run.py run of the same budget, chosen by its best meta-validation; the
test tasks are never read. Issue 40's rule for a comparison whose rows are each at their best.

    python -m studies.tune --task omniglot --method maml --out runs/tune-omniglot \\
        --grid inner-lr=0.1,0.4 --grid inner-steps=1,5 --time-budget 300 -- --data-root ~/data

Each candidate is ``studies.compare``'s run of the method (its preset, the flags after ``--``),
with the candidate's flags, ``--time-budget`` (or the ``--meta-steps`` after ``--``) and two test
tasks (the least a run meta-tests; their score is not read). A finished candidate with the same
settings is reused. Writes ``<out>/<method>/tune.json`` and ``tune.md``: every candidate with
its validation score, steps and seconds, and the choice, whose flags are the method's preset's
values to write down (``configs/<task>-<method>.yaml``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from studies.compare import METHODS, run_one

__all__ = ["candidates", "choose", "main", "MAX_CANDIDATES"]

MAX_CANDIDATES = 6  # the same number for every method (issue 40)


def candidates(grids: Sequence[str], given: Sequence[str] = ()) -> List[List[str]]:
    """The run.py flags of each point of the grids (``FLAG=V1,V2,...``), in order, then each
    candidate ``given`` whole (``"--inner-lr 0.4 --inner-steps 5 --test-inner-steps 5"``: flags
    that go together)."""
    axes = []
    for grid in grids:
        name, _, values = grid.partition("=")
        if not values:
            raise SystemExit(f"error: --grid {grid}: write FLAG=VALUE,VALUE,..., e.g. inner-lr=0.1,0.4")
        axes.append([(f"--{name.lstrip('-')}", value) for value in values.split(",")])
    points = [[part for pair in point for part in pair] for point in itertools.product(*axes)] if axes else []
    points += [flags.split() for flags in given]
    if not points:
        raise SystemExit("error: no candidate: give --grid FLAG=V1,V2 or --candidate \"FLAGS\"")
    if len(points) > MAX_CANDIDATES:
        raise SystemExit(f"error: {len(points)} candidates; every method gets at most {MAX_CANDIDATES}: "
                         f"drop values from a --grid")
    return points


def choose(scores: List[dict]) -> int:
    """The candidate with the best meta-validation: the highest accuracy, or the lowest MSE."""
    metric = scores[0]["metric"]
    better = max if metric == "accuracy" else min
    return scores.index(better(scores, key=lambda s: s["mean"]))


def _table(method: str, rows: List[dict], chosen: int) -> str:
    lines = [f"{METHODS[method][0]}: candidates on meta-validation (the test tasks are not read)", "",
             "| candidate | flags | best meta-validation | at meta-step | meta-steps | meta-training s |",
             "|---|---|---|---|---|---|"]
    for k, row in enumerate(rows):
        best = row["best_validation"]
        mark = " **chosen**" if k == chosen else ""
        lines.append(f"| {k}{mark} | `{' '.join(row['flags'])}` | {100 * best['mean']:.2f}% ± {100 * best['ci95']:.2f} "
                     f"| {best['step']} | {row['meta_steps_done']} | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m studies.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="glyphs")
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--out", required=True, help="folder for the candidates' runs and the record")
    parser.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2", help="a run.py flag's values")
    parser.add_argument("--candidate", action="append", default=[], metavar='"FLAGS"',
                        help="one candidate's run.py flags, whole (flags that go together)")
    parser.add_argument("--time-budget", type=float, help="seconds of meta-training of every candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="the method's preset (default: its own, as studies.compare picks it)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    points = candidates(args.grid, args.candidate)
    budget = ["--time-budget", str(args.time_budget), "--meta-steps", "1000000000"] if args.time_budget else []
    root = Path(args.out) / args.method
    rows: List[Dict] = []
    for k, flags in enumerate(points):
        results = run_one(args.method, args.task, args.seed, root / f"candidate-{k}", [*shared, *budget],
                          [*flags, "--test-tasks", "2"], args.config)
        rows.append({"flags": flags, "best_validation": results["best_validation"],
                     "meta_steps_done": results.get("meta_steps_done", results["meta_steps"]),
                     "train_seconds": results["train_seconds"]})
    chosen = choose([row["best_validation"] for row in rows])
    record = {"method": args.method, "task": args.task, "seed": args.seed, "grid": args.grid,
              "time_budget": args.time_budget, "shared": shared, "candidates": rows, "chosen": chosen}
    (root / "tune.json").write_text(json.dumps(record, indent=2))
    text = _table(args.method, rows, chosen)
    (root / "tune.md").write_text(text)
    print(text + f"chosen: {' '.join(rows[chosen]['flags'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
