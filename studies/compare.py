"""The methods side by side on the same test tasks, over seeds, with paired differences.

    python -m studies.compare --task glyphs --out runs/compare-glyphs --seeds 0 1 2
    python -m studies.compare --task omniglot-lake --out runs/compare-lake --methods maml anil imaml-head \\
        --config imaml-head=configs/omniglot-lake-imaml-head-cpu.yaml --config maml=configs/omniglot-lake-maml-cpu.yaml \\
        -- --data-root data/lake-proxy-korean --meta-steps 200

The rows (``--methods``): MAML, first-order MAML, ANIL (``--algo maml --adapt head``, its
``<task>-anil.yaml`` or else MAML's preset), the
paper's iMAML with GD and with Hessian-free inner steps (``configs/<task>-imaml.yaml`` and
``-imaml-hf.yaml``, or the GD preset with Hessian-free flags where the task has no ``-hf``
preset), iMAML over a zero-started head (``-imaml-head.yaml``) and the pretrain baseline. Each
(method, seed) is one ``run.py`` in its own process: its preset (or ``--config METHOD=FILE``),
the method's own flags, the flags after ``--`` (shared by all), ``--set METHOD:FLAG=VALUE``,
then ``--seed``. Within a seed every run must agree on everything the meta-test tasks depend
on (the script refuses otherwise), so the rows are scored on identical tasks and compared
task by task: the table gives each row's accuracy over seeds and its paired difference from
the first row (``studies.paired``), with tasks/s, times, and for implicit rows how many
inner loops and solves met their tolerances. Under ``-- --time-budget S`` every row meta-trains
for the same seconds (``--jobs 2``: two runs side by side, each ``OMP_NUM_THREADS=1``), and with
``--test-also-at S/2`` the table also gives each row's accuracy at half the budget. Writes ``<out>/comparison.md``,
``<out>/comparison.json``, ``<out>/comparison.png`` and ``<out>/comparison_time.png`` (meta-validation
accuracy against meta-training seconds, ``studies.curves``; ``--name`` for another set of rows of
the same runs, e.g. a peer against ours at its settings); each run stays in
``<out>/<method>/seed-<s>/``.

Peer rows, chosen by name with ``--methods`` (not run by default): ``l2l-maml``, learn2learn's
MAML, and ``torchopt-imaml``, TorchOpt's implicit iMAML (``studies/peers``). Each runs in its own
process like a run.py row, with the same flags and seed, the preset of its algorithm, on run.py's
tasks and network; TorchOpt runs in its own venv (``bash studies/peers/setup_torchopt.sh``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from imaml.metrics import mean_ci95
from studies.curves import plot_against_time, validation_curve
from studies.paired import paired_difference

__all__ = ["METHODS", "PEERS", "PROTOCOL_KEYS", "run_one", "read_run", "check_protocol", "table", "plot", "main"]

ROOT = Path(__file__).resolve().parents[1]
HESSIAN_FREE = ("--inner-optimizer", "hessian-free", "--inner-cg-steps", "5", "--inner-lr", "1.0")
# TorchOpt's iMAML Omniglot example: λ = 2, 5 plain SGD steps of 0.1 (5 at test too), normal-equation CG, 5 steps
TORCHOPT_EXAMPLE = ("--inner-optimizer", "sgd", "--inner-steps", "5", "--test-inner-steps", "5", "--inner-lr", "0.1",
                    "--lam", "2", "--hypergrad", "normal-cg", "--cg-steps", "5")
# name: (label, --algo, preset by name (None: the task's own for the method, <task>-<method>), the method's own flags);
# ANIL runs MAML's preset with the head alone adapted
METHODS = {
    "maml": ("MAML", "maml", None, ()),
    "fomaml": ("first-order MAML", "fomaml", None, ()),
    "anil": ("ANIL (MAML, head alone)", "maml", "{task}-anil", ("--adapt", "head")),
    "imaml": ("iMAML, paper (GD)", "imaml", None, ()),
    "imaml-hf": ("iMAML, paper (Hessian-free)", "imaml", "{task}-imaml-hf", ()),
    "imaml-head": ("iMAML, zero-started head", "imaml", "{task}-imaml-head", ()),
    "imaml-converged": ("iMAML, whole network after a head warm-up (converged)", "imaml", "{task}-imaml-converged", ()),
    "pretrain": ("pretrain + fine-tune", "pretrain", None, ()),
    "protonet": ("ProtoNet", "protonet", None, ()),
    "imaml-torchopt": ("iMAML at TorchOpt's example settings", "imaml", None, TORCHOPT_EXAMPLE),
}
# peer rows (studies/peers): another library's implementation on run.py's tasks, network and flags
# name: (label, the --algo whose preset it reads, its module, its interpreter: None for this one,
# else a path from the repository root, its own flags). TorchOpt's row runs its example's settings,
# beside the imaml-torchopt row (ours at the same settings)
PEERS = {
    "l2l-maml": ("learn2learn MAML", "maml", "studies.peers.l2l_maml", None, ()),
    "torchopt-imaml": ("TorchOpt iMAML (its example's settings)", "imaml", "studies.peers.torchopt_imaml",
                       ".venv-peers/bin/python", TORCHOPT_EXAMPLE),
}
LABELS = {name: row[0] for name, row in {**METHODS, **PEERS}.items()}
# what the meta-test tasks (and their scoring) depend on: equal in every run of a seed, or no table
PROTOCOL_KEYS = ("task", "test_ways", "shots", "seed")
PROTOCOL_ENTRIES = ("test_tasks", "test_query_shots", "bn_mode", "model", "channels")


def command_for(method: str, task: str, seed: int, out: Path, shared: Sequence[str], own: Sequence[str],
                config: Optional[str]) -> List[str]:
    """The run.py command of one (method, seed), or its peer script's."""
    out_flags = ["--seed", str(seed), "--output-dir", str(out / method / f"seed-{seed}"), "--overwrite"]  # reuse: finished_as
    if method in PEERS:
        _, algo, module, _, flags = PEERS[method]
        return [peer_python(method), "-m", module, "--task", task, "--algo", algo,
                *(["--config", config] if config else []), *flags, *shared, *own, *out_flags]
    _, algo, preset, flags = METHODS[method]
    if config is None and preset is not None:
        named = ROOT / "configs" / f"{preset.format(task=task)}.yaml"
        config = str(named) if named.is_file() else None
        if config is None and method == "imaml-hf" and (ROOT / "configs" / f"{task}-imaml.yaml").is_file():
            flags = HESSIAN_FREE  # the task's GD preset, with Hessian-free inner steps
            config = str(ROOT / "configs" / f"{task}-imaml.yaml")
        elif config is None and method == "anil" and (ROOT / "configs" / f"{task}-maml.yaml").is_file():
            config = str(ROOT / "configs" / f"{task}-maml.yaml")  # MAML's preset, the head alone adapted
        elif config is None:
            raise SystemExit(f"error: {method}: no preset {named.name}; give one with --config {method}=FILE")
    return [sys.executable, str(ROOT / "run.py"), "--task", task, "--algo", algo,
            *(["--config", config] if config else []), *flags, *shared, *own, *out_flags]


def peer_python(method: str) -> str:
    """The interpreter a peer row runs in, or a SystemExit saying how to make its venv."""
    venv = PEERS[method][3]
    if venv is None:
        return sys.executable
    python = ROOT / venv
    if not python.is_file():
        raise SystemExit(f"error: {method} runs in its own venv and {venv} is missing; create it with: "
                         f"bash studies/peers/setup_torchopt.sh")
    return str(python)


def finished_as(command: List[str], method: str, folder: Path) -> bool:
    """Whether ``folder`` holds a finished run of exactly the settings ``command`` asks for, so a
    stopped comparison (or one given more rows or seeds) runs only what is missing."""
    results = folder / "results.json"
    if not results.is_file():
        return False
    from imaml.app.cli import load_config
    from imaml.config import RunConfig

    flags = command[2:] if method in METHODS else command[3:]  # after run.py, or after -m module
    try:
        saved = {**RunConfig().to_dict(), **json.loads(results.read_text())["config"]}  # a newer option: its default
        expected = load_config(flags).to_dict()
        return all(saved[k] == v for k, v in expected.items() if k not in ("output_dir", "overwrite"))  # a moved run counts too
    except Exception:  # unreadable results or flags: run it again
        return False


def run_one(method: str, task: str, seed: int, out: Path, shared: Sequence[str], own: Sequence[str],
            config: Optional[str], rerun: bool = False) -> dict:
    """One run.py (or peer) run; returns its results.json plus the wall time of the whole process.
    A finished run with the same settings in its folder is reused unless ``rerun``."""
    command = command_for(method, task, seed, out, shared, own, config)
    print("$ " + " ".join(command[1:] if method in METHODS else command), flush=True)  # a peer: its interpreter
    if not rerun and finished_as(command, method, out / method / f"seed-{seed}"):
        print(f"  (finished with these settings in {out / method}/seed-{seed}: reused)", flush=True)
        return read_run(method, seed, out)
    (out / method).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / method / f"seed-{seed}.log", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: {method} (seed {seed}) exited with status {code}; see {out / method}/seed-{seed}.log")
    (out / method / f"seed-{seed}.wall.json").write_text(json.dumps({"wall_seconds": wall}))
    return read_run(method, seed, out)


def read_run(method: str, seed: int, out: Path) -> dict:
    """A finished run's results.json, with the wall time ``run_one`` measured (else its total)."""
    folder = out / method / f"seed-{seed}"
    if not (folder / "results.json").is_file():
        raise SystemExit(f"error: {folder / 'results.json'} is missing: {method} (seed {seed}) has not finished; "
                         f"run the comparison without --table-only to run it")
    results = json.loads((folder / "results.json").read_text())
    wall = out / method / f"seed-{seed}.wall.json"
    results["wall_seconds"] = (json.loads(wall.read_text())["wall_seconds"] if wall.is_file()
                               else results["total_seconds"])
    results["output_dir"] = str(folder)
    return results


def check_protocol(runs: Dict[str, dict]) -> dict:
    """The meta-test protocol the runs of one seed share ({method: results}), or a SystemExit
    naming what differs."""
    shared = {}
    for key in PROTOCOL_KEYS + PROTOCOL_ENTRIES:
        values = {m: (r[key] if key in PROTOCOL_KEYS else r["protocol"][key]) for m, r in runs.items()}
        if len(set(map(json.dumps, values.values()))) > 1:
            raise SystemExit(f"error: the runs differ in {key} ({values}): their meta-test tasks are not the "
                             f"same; give it once, after --")
        shared[key] = next(iter(values.values()))
    shared["query_shots_train"] = {m: r["query_shots"] for m, r in runs.items()}
    return shared


def summarize(runs: Dict[str, Dict[int, dict]], reference: str) -> Dict[str, dict]:
    """Per method: accuracy over seeds, the paired difference from ``reference``, speed, times,
    and the implicit rows' convergence."""
    rows = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        mean, ci = mean_ci95([by_seed[s]["test"]["mean"] for s in seeds], student=True)
        row = {"seeds": seeds, "mean": mean, "ci95_seeds": ci,
               "per_seed": [by_seed[s]["test"]["mean"] for s in seeds],
               "meta_steps": _average(by_seed, "meta_steps_done"),
               "tasks_per_second": _average(by_seed, "tasks_per_second"),
               "train_seconds": _average(by_seed, "train_seconds"), "wall_seconds": _average(by_seed, "wall_seconds"),
               "config": by_seed[seeds[0]]["config"]}
        if method != reference:
            row["difference"] = paired_difference({s: by_seed[s]["test"]["scores"] for s in seeds},
                                                  {s: r["test"]["scores"] for s, r in runs[reference].items()})
        early = _early(by_seed, runs[reference], method != reference)
        if early:
            row["test_also_at"] = early
        health = [by_seed[s].get("meta_gradient") or {} for s in seeds]
        if any("inner_converged" in h for h in health):
            row["inner_converged"] = sum(h.get("inner_converged", float("nan")) for h in health) / len(health)
            row["solver_converged"] = sum(h.get("solver_converged", float("nan")) for h in health) / len(health)
            row["solver_residual_mean"] = sum(h.get("solver_residual_mean", float("nan")) for h in health) / len(health)
        rows[method] = row
    return rows


def _early(by_seed: Dict[int, dict], reference: Dict[int, dict], paired: bool) -> Optional[dict]:
    """The meta-test at ``--test-also-at`` seconds (e.g. half the budget) over seeds, with its
    paired difference from the reference row's at the same seconds; None where a run lacks it."""
    early = {s: r.get("test_also_at") for s, r in by_seed.items()}
    if not all(early.values()):
        return None
    mean, ci = mean_ci95([e["test"]["mean"] for e in early.values()], student=True)
    row = {"seconds": next(iter(by_seed.values()))["config"]["test_also_at"], "mean": mean, "ci95_seeds": ci,
           "meta_steps": sum(e["meta_steps_done"] for e in early.values()) / len(early)}
    if paired and all(r.get("test_also_at") for r in reference.values()):
        row["difference"] = paired_difference({s: e["test"]["scores"] for s, e in early.items()},
                                              {s: r["test_also_at"]["test"]["scores"] for s, r in reference.items()})
    return row


def _average(by_seed: Dict[int, dict], key: str) -> Optional[float]:
    values = [r[key] for r in by_seed.values() if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _minutes(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def _delta(d: Optional[dict]) -> str:
    return "—" if d is None else f"{100 * d['mean']:+.2f} (± {100 * d['ci95_seeds']:.2f}; ± {100 * d['ci95_tasks']:.2f})"


def table(rows: Dict[str, dict], reference: str) -> str:
    """The markdown table: one row per method, accuracy in %, differences in points; with the
    meta-test at ``--test-also-at`` seconds, its accuracy and difference too."""
    early = all("test_also_at" in r for r in rows.values())
    at = f"at {next(iter(rows.values()))['test_also_at']['seconds']:g} s: " if early else ""
    head = ["method", "seeds", "**test accuracy** (mean over seeds, 95% CI)", f"paired Δ vs {LABELS[reference]} "
            "(± over seeds; ± over tasks)", *([f"{at}accuracy", f"{at}paired Δ"] if early else []), "meta-steps",
            "inner loops / solves within tol.", "tasks/s", "meta-training", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
        delta = _delta(r.get("difference"))
        if early:
            e = r["test_also_at"]
            delta += f" | {100 * e['mean']:.2f}% (± {100 * e['ci95_seeds']:.2f}) | {_delta(e.get('difference'))}"
        steps = "—" if r.get("meta_steps") is None else f"{r['meta_steps']:.0f}"
        health = (f"{100 * r['inner_converged']:.0f}% / {100 * r['solver_converged']:.0f}% "
                  f"(residual {r['solver_residual_mean']:.3f})" if "inner_converged" in r else "—")
        speed = "—" if r["tasks_per_second"] is None else f"{r['tasks_per_second']:.1f}"
        lines.append("| " + " | ".join([LABELS[method], str(len(r["seeds"])),
                                        f"**{100 * r['mean']:.2f}%** (± {100 * r['ci95_seeds']:.2f})", delta, steps,
                                        health, speed, _minutes(r["train_seconds"]), _minutes(r["wall_seconds"])]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Dict[str, dict], path: Path, title: str) -> None:
    """Each method's test accuracy per seed and its mean, with the interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (method, r) in enumerate(rows.items()):
        ax.scatter([i] * len(r["per_seed"]), [100 * v for v in r["per_seed"]], color="gray", s=12, zorder=3)
        ax.errorbar([i], [100 * r["mean"]], yerr=[100 * r["ci95_seeds"]] if r["ci95_seeds"] == r["ci95_seeds"] else None,
                    fmt="o", capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), [LABELS[m] for m in rows], rotation=15, fontsize=8)
    ax.set(ylabel="meta-test accuracy (%)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: Optional[List[str]]) -> tuple:
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m studies.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="glyphs")
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the plot")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(LABELS),
                        help="the rows; the first is the reference of the paired differences (default: "
                             "every run.py method; the peer rows l2l-maml and torchopt-imaml by name)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--config", action="append", default=[], metavar="METHOD=FILE",
                        help="the preset of one method (default: its own, see METHODS)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:FLAG=VALUE",
                        help="a run.py flag for one method only, e.g. pretrain:inner-lr=0.01")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process (with "
                        "OMP_NUM_THREADS=1, one core each: --jobs 2 on two cores)")
    parser.add_argument("--table-only", action="store_true", help="tabulate the runs already in --out")
    parser.add_argument("--name", default="comparison", help="the table's files in --out: NAME.md, NAME.json, "
                        "NAME.png, NAME_time.png (another name tabulates other rows of the same runs beside it)")
    parser.add_argument("--rerun", action="store_true",
                        help="run every (method, seed) again, even where a finished run with the same settings is in --out")
    return parser.parse_args(ours), shared


def main(argv: Optional[List[str]] = None) -> int:
    args, shared = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = dict(item.split("=", 1) for item in args.config)
    own: Dict[str, List[str]] = {m: [] for m in args.methods}
    for item in args.set:
        method, flag = item.split(":", 1)
        name, value = flag.split("=", 1)
        own.setdefault(method, []).extend([f"--{name.lstrip('-')}", value])
    if not args.table_only:  # a missing venv stops the comparison before any run, not midway
        for m in args.methods:
            if m in PEERS:
                peer_python(m)
    runs: Dict[str, Dict[int, dict]] = {m: {} for m in args.methods}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # seed by seed, so a stopped comparison has whole seeds
        pending = {(m, seed): pool.submit(read_run, m, seed, out) if args.table_only
                   else pool.submit(run_one, m, args.task, seed, out, shared, own[m], configs.get(m), args.rerun)
                   for seed in args.seeds for m in args.methods}
        for (m, seed), result in pending.items():
            runs[m][seed] = result.result()
    protocols = {seed: check_protocol({m: runs[m][seed] for m in args.methods}) for seed in args.seeds}
    protocol = {k: v for k, v in protocols[args.seeds[0]].items() if k != "seed"}
    rows = summarize(runs, args.methods[0])
    text = table(rows, args.methods[0])
    (out / f"{args.name}.md").write_text(f"protocol: {json.dumps(protocol)}; seeds {args.seeds}\n\n{text}")
    (out / f"{args.name}.json").write_text(json.dumps({"protocol": protocol, "seeds": args.seeds, "rows": rows},
                                                      indent=2, default=str))
    plot(rows, out / f"{args.name}.png", f"{args.task}: {protocol['test_ways']}-way {protocol['shots']}-shot, "
                                         f"{protocol['test_tasks']} test tasks, seeds {args.seeds}")
    curves = {m: {seed: validation_curve(out / m / f"seed-{seed}") for seed in args.seeds} for m in args.methods}
    plot_against_time(curves, LABELS, out / f"{args.name}_time.png", f"{args.task}: meta-validation against compute")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
