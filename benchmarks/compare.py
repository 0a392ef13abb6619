"""What meta-learning bought: MAML, first-order MAML, iMAML and the pretrain-and-fine-tune
baseline on one task under one meta-test protocol, as one table and one plot.

    python -m benchmarks.compare --task glyphs --out runs/compare-glyphs
    python -m benchmarks.compare --task omniglot-lake --out runs/compare-lake \\
        --config imaml=configs/omniglot-lake-imaml-head-cpu.yaml --config maml=configs/omniglot-lake-maml-cpu.yaml \\
        -- --data-root data/lake-proxy-korean --meta-steps 200

Each algorithm is one ``run.py`` in its own process: its preset (``configs/<task>-<algo>.yaml``,
or ``--config ALGO=FILE``), then the flags after ``--`` (shared by all), then ``--set
ALGO:FLAG=VALUE`` (one algorithm's own). The runs' ``results.json`` must agree on everything
the meta-test tasks depend on (task, ways, shots, test queries, test tasks, BatchNorm mode,
seed): the fixed test tasks are then identical across algorithms (docs/benchmarks.md), and
the script refuses to tabulate runs that differ. Writes ``<out>/comparison.md`` (the table),
``<out>/comparison.json`` and ``<out>/comparison.png``; each run stays in ``<out>/<algo>/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["ALGOS", "PROTOCOL_KEYS", "run_one", "read_run", "check_protocol", "table", "plot", "main"]

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("maml", "fomaml", "imaml", "pretrain")
NAMES = {"maml": "MAML", "fomaml": "first-order MAML", "imaml": "iMAML", "pretrain": "pretrain + fine-tune"}
# what the meta-test tasks (and their scoring) depend on: equal in every run, or no table
PROTOCOL_KEYS = ("task", "test_ways", "shots", "seed")
PROTOCOL_ENTRIES = ("test_tasks", "test_query_shots", "bn_mode", "model", "channels")


def run_one(algo: str, task: str, out: Path, shared: Sequence[str], own: Sequence[str],
            config: Optional[str]) -> dict:
    """One run.py run; returns its results.json plus the wall time of the whole process."""
    command = [sys.executable, str(ROOT / "run.py"), "--task", task, "--algo", algo,
               *(["--config", config] if config else []), *shared, *own, "--output-dir", str(out / algo)]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    with open(out / f"{algo}.log", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: {algo} exited with status {code}; see {out / f'{algo}.log'}")
    (out / f"{algo}.wall.json").write_text(json.dumps({"wall_seconds": wall}))
    return read_run(algo, out)


def read_run(algo: str, out: Path) -> dict:
    """A finished run's results.json, with the wall time ``run_one`` measured (else its total)."""
    results = json.loads((out / algo / "results.json").read_text())
    wall = out / f"{algo}.wall.json"
    results["wall_seconds"] = (json.loads(wall.read_text())["wall_seconds"] if wall.is_file()
                               else results["total_seconds"])
    results["output_dir"] = str(out / algo)
    return results


def check_protocol(runs: Dict[str, dict]) -> dict:
    """The shared meta-test protocol of ``runs``, or a SystemExit naming what differs."""
    shared = {}
    for key in PROTOCOL_KEYS + PROTOCOL_ENTRIES:
        values = {algo: (r[key] if key in PROTOCOL_KEYS else r["protocol"][key]) for algo, r in runs.items()}
        if len(set(map(json.dumps, values.values()))) > 1:
            raise SystemExit(f"error: the runs differ in {key} ({values}): their meta-test tasks are not the "
                             f"same; give it once, after --")
        shared[key] = next(iter(values.values()))
    shared["query_shots_train"] = {algo: r["query_shots"] for algo, r in runs.items()}
    return shared


def _pct(result: dict, key: str = "mean") -> float:
    return 100.0 * result[key]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def table(runs: Dict[str, dict]) -> str:
    """The markdown table: one row per algorithm."""
    lake = any("error_rate" in r["test"] for r in runs.values())
    head = ["method", "meta-steps", "inner steps (test)", "best val. accuracy", "test accuracy before",
            "**test accuracy after** (95% CI)"]
    if lake:
        head.append("error after")
    head += ["training time", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, r in runs.items():
        config, test, before, best = r["config"], r["test"], r["before_meta_training"], r["best_validation"]
        inner = (f"— ({config['test_inner_steps']})" if algo == "pretrain"
                 else f"{config['inner_steps']} ({config['test_inner_steps']})")
        row = [NAMES.get(algo, algo), f"{config['meta_steps']:,}", inner,
               f"{_pct(best):.1f}% (step {best['step']:,})" if best else "—", f"{_pct(before):.2f}%",
               f"**{_pct(test):.2f}%** (± {_pct(test, 'ci95'):.2f})"]
        if lake:
            row.append(f"{100 * test['error_rate']:.2f}%" if "error_rate" in test else "—")
        row += [_minutes(r["train_seconds"]), _minutes(r["wall_seconds"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, dict], path: Path, title: str) -> None:
    """Test accuracy after (with its 95% CI) and before training, per algorithm; beside it the
    meta-validation accuracy against the step, from each run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [NAMES.get(a, a) for a in runs]
    after = [_pct(r["test"]) for r in runs.values()]
    ci = [_pct(r["test"], "ci95") for r in runs.values()]
    bars.bar(range(len(runs)), after, yerr=ci, capsize=4, color="tab:blue", alpha=0.8, label="after training")
    bars.scatter(range(len(runs)), [_pct(r["before_meta_training"]) for r in runs.values()], color="black",
                 marker="_", s=300, zorder=3, label="before training (θ₀)")
    bars.set_xticks(range(len(runs)), names, rotation=15, fontsize=8)
    bars.set(ylabel="meta-test accuracy (%)", title="meta-test, 95% CI")
    bars.legend(fontsize=8, loc="lower right")
    for algo, r in runs.items():
        out = Path(r["output_dir"])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        points = [(rec["step"], 100 * rec["val/accuracy"]) for rec in records if "val/accuracy" in rec]
        if points:
            curves.plot(*zip(*points), marker="o", label=NAMES.get(algo, algo))
    curves.set(xlabel="meta-step (pretrain: mini-batch step)", ylabel="meta-validation accuracy (%)",
               title="meta-validation")
    curves.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: Optional[List[str]]) -> tuple:
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="glyphs")
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the plot")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--config", action="append", default=[], metavar="ALGO=FILE",
                        help="the preset of one algorithm (default: configs/<task>-<algo>.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="ALGO:FLAG=VALUE",
                        help="a run.py flag for one algorithm only, e.g. pretrain:inner-lr=0.01")
    parser.add_argument("--table-only", action="store_true", help="tabulate the runs already in --out")
    return parser.parse_args(ours), shared


def main(argv: Optional[List[str]] = None) -> int:
    args, shared = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = dict(item.split("=", 1) for item in args.config)
    own: Dict[str, List[str]] = {algo: [] for algo in args.algos}
    for item in args.set:
        algo, flag = item.split(":", 1)
        name, value = flag.split("=", 1)
        own.setdefault(algo, []).extend([f"--{name.lstrip('-')}", value])
    runs = {}
    for algo in args.algos:
        runs[algo] = (read_run(algo, out) if args.table_only
                      else run_one(algo, args.task, out, shared, own[algo], configs.get(algo)))
    protocol = check_protocol(runs)
    text = table(runs)
    (out / "comparison.md").write_text(f"protocol: {json.dumps(protocol)}\n\n{text}")
    (out / "comparison.json").write_text(json.dumps(
        {"protocol": protocol, "runs": {a: {k: r[k] for k in ("test", "before_meta_training", "best_validation",
                                                             "train_seconds", "wall_seconds", "config")}
                                        for a, r in runs.items()}}, indent=2, default=str))
    plot(runs, out / "comparison.png", f"{args.task}: {protocol['test_ways']}-way {protocol['shots']}-shot, "
                                       f"{protocol['test_tasks']} test tasks, BatchNorm {protocol['bn_mode']}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
