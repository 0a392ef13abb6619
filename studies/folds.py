"""Rows over proxy folds: each row's error on every fold, the mean and worst fold, and the paired
difference from the first row on the very same runs, with its interval over folds and over runs.

    python -m studies.folds --folds korean latin greek early_aramaic balinese \\
        --row "iMAML head=runs/equal-compute-lake/{fold}/imaml-head/seed-0" \\
        --row "ProtoNet=runs/equal-compute-lake/{fold}/protonet/seed-0" --md runs/equal-compute-lake/folds.md

A row is ``LABEL=FOLDER``, ``{fold}`` standing for each fold's name: the folder of one finished
run.py run (its ``results.json``) per fold. Lake's proxy folds (``studies.lake_proxy``) hold out
one alphabet each and meta-test on its 20 runs, so a fold's error moves in steps of one run's
items; the folds differ far more than that (docs/benchmarks.md, "Five folds"), which is why a
lever is judged by its mean over folds, its worst fold and its paired difference, fold by fold.
``--at-test-also`` reads each run's meta-test at ``--test-also-at`` seconds instead of its end.
A row's folder may instead be ``FILE.json::SETTING``: one setting of a ``studies.lake_levers``
JSON (a meta-test lever scored on the θ of the run whose folder holds the file).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from studies.paired import paired_difference

__all__ = ["read_rows", "tabulate", "main"]


def _lever_scores(path: Path, setting: str) -> dict:
    """A lever's scores from a ``studies.lake_levers`` JSON: the runs' accuracies in run order."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: score the run with studies.lake_levers --json first")
    table = json.loads(path.read_text())
    if setting not in table or len(table[setting]) != 1:
        raise SystemExit(f"error: {path} has no setting {setting!r} of one run; it has: {', '.join(table)}")
    errors = next(iter(table[setting].values()))["per_run_error"]
    return {"scores": [1.0 - errors[run] for run in sorted(errors)], "meta_steps": None, "seconds": None}


def _scores(folder: Path, at_test_also: bool) -> dict:
    if "::" in str(folder):
        path, setting = str(folder).split("::", 1)
        scored = _lever_scores(Path(path), setting)
        run = _scores(Path(path).parent, False)  # the run whose θ was scored: its steps and minutes
        return {**scored, "meta_steps": run["meta_steps"], "seconds": run["seconds"]}
    results_path = folder / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"error: {results_path} is missing: that run has not finished (or the row's folder is wrong)")
    results = json.loads(results_path.read_text())
    test, steps, seconds = results["test"], results.get("meta_steps_done"), results.get("total_seconds")
    if at_test_also:  # θ as it stood at those seconds: its steps; no whole run to time
        if not results.get("test_also_at"):
            raise SystemExit(f"error: {folder} has no meta-test at --test-also-at seconds; drop --at-test-also")
        test, steps, seconds = results["test_also_at"]["test"], results["test_also_at"].get("meta_steps_done"), None
    if test.get("metric") != "accuracy":
        raise SystemExit(f"error: {folder} is scored by {test.get('metric')}, not accuracy: folds compare error rates")
    return {"scores": list(test["scores"]), "meta_steps": steps, "seconds": seconds}


def read_rows(rows: Dict[str, str], folds: List[str], at_test_also: bool = False) -> Dict[str, Dict[str, dict]]:
    """{label: {fold: scores, meta-steps and seconds of that fold's run}}."""
    return {label: {fold: _scores(Path(pattern.format(fold=fold)), at_test_also) for fold in folds}
            for label, pattern in rows.items()}


def tabulate(runs: Dict[str, Dict[str, dict]], folds: List[str]) -> dict:
    """Per row: error per fold, mean, sd over folds, worst fold, and (beyond the first row) the
    paired difference in error from the first row: mean, ± over folds (t), ± over runs."""
    reference = next(iter(runs))
    out = {}
    for label, by_fold in runs.items():
        errors = {fold: 1.0 - sum(r["scores"]) / len(r["scores"]) for fold, r in by_fold.items()}
        row = {"errors": errors, "mean": statistics.fmean(errors.values()),
               "sd": statistics.stdev(errors.values()) if len(folds) > 1 else float("nan"),
               "worst": max(errors.values()),
               "meta_steps": _mean_of(by_fold, "meta_steps"), "seconds": _mean_of(by_fold, "seconds")}
        if label != reference:
            accuracy = paired_difference({f: by_fold[f]["scores"] for f in folds},
                                         {f: runs[reference][f]["scores"] for f in folds})
            row["difference"] = {"mean": -accuracy["mean"], "ci95_folds": accuracy["ci95_seeds"],
                                 "ci95_runs": accuracy["ci95_tasks"], "runs": accuracy["tasks"]}
        out[label] = row
    return out


def _mean_of(by_fold: Dict[str, dict], key: str) -> Optional[float]:
    values = [r[key] for r in by_fold.values() if r[key] is not None]
    return statistics.fmean(values) if values else None


def markdown(table: dict, folds: List[str]) -> str:
    reference = next(iter(table))
    head = ["row", *folds, "**mean error** (sd over folds)", "worst fold",
            f"paired Δ error vs {reference} (± over folds; ± over runs)", "meta-steps", "whole run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table.items():
        d = row.get("difference")
        delta = (f"{100 * d['mean']:+.2f} (± {100 * d['ci95_folds']:.2f}; ± {100 * d['ci95_runs']:.2f})"
                 if d else "—")
        minutes = f"{row['seconds'] / 60:.1f} min" if row["seconds"] else "—"
        steps = f"{row['meta_steps']:.0f}" if row["meta_steps"] else "—"
        lines.append("| " + " | ".join([label, *(f"{100 * row['errors'][f]:.2f}%" for f in folds),
                                         f"**{100 * row['mean']:.2f}%** ({100 * row['sd']:.1f})",
                                         f"{100 * row['worst']:.2f}%", delta, steps, minutes]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", required=True, help="the folds' names, as {fold} is replaced")
    parser.add_argument("--row", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a row: its label and its run folder with {fold} (or FILE.json::SETTING of "
                             "studies.lake_levers); the first is the reference")
    parser.add_argument("--at-test-also", action="store_true", help="read the meta-test at --test-also-at seconds")
    parser.add_argument("--md", help="also write the table to this file")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    rows = {}
    for spec in args.row:
        label, sep, pattern = spec.partition("=")
        if not sep or "{fold}" not in pattern:
            parser.error(f"--row {spec!r}: give LABEL=FOLDER with {{fold}} in the folder")
        rows[label] = pattern
    table = tabulate(read_rows(rows, args.folds, args.at_test_also), args.folds)
    text = markdown(table, args.folds)
    print(text, end="")
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"folds": args.folds, "rows": rows, "table": table}, indent=1))
    return table


if __name__ == "__main__":
    main()
