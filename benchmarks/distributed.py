#!/usr/bin/env python
"""Meta-training throughput (tasks/s) with one process vs several under torchrun.

CPU: one process using all ``--cores`` threads against ``--cores`` single-thread processes
(``torchrun --nproc_per_node <cores>``), the fast path on CPU at few-shot sizes.
GPU (when CUDA is present): 1, 2, … ``--gpus`` processes, one GPU each.

Every configuration is a real ``run.py`` run; its tasks/s come from its ``metrics.jsonl``
between the end of ``--warmup`` meta-steps and the last step, so start-up and first-call
costs are left out. Flags after ``--`` go to run.py (they override the workload below).

    python benchmarks/distributed.py                      # glyphs iMAML, 2 cores
    python benchmarks/distributed.py --cores 4 -- --algo maml
    python benchmarks/distributed.py --meta-steps 3 --warmup 1 -- --channels 8 --meta-batch-size 4   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from benchmarks.flags import add_run_flags

ROOT = Path(__file__).resolve().parents[1]

# the default glyphs preset's workload, minus evaluation (which the rate leaves out anyway)
WORKLOAD = ["--task", "glyphs", "--algo", "imaml", "--meta-batch-size", "16", "--test-tasks", "2",
            "--val-tasks", "2", "--wandb-mode", "disabled"]


def steady_rate(metrics: Path, warmup: int, meta_batch_size: int) -> float:
    """tasks/s between step ``warmup`` and the last step, from the cumulative rates logged."""
    records = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines())
               if "train/tasks_per_second" in r}
    last = max(records)
    seconds = {s: s * meta_batch_size / records[s]["train/tasks_per_second"] for s in (warmup, last)}
    return (last - warmup) * meta_batch_size / (seconds[last] - seconds[warmup])


def launch(processes: int, threads: int, device: str, args: list, out: Path) -> tuple:
    """The command for one configuration and its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "run.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "run.py")]
    return cmd + ["--device", device, *args, "--output-dir", str(out)], env


def measure(name: str, processes: int, threads: int, device: str, args: list, warmup: int,
            meta_batch_size: int, workdir: Path) -> float:
    out = workdir / name.replace(" ", "_")
    cmd, env = launch(processes, threads, device, args, out)
    done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return steady_rate(out / "metrics.jsonl", warmup, meta_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to use: threads of the one process, "
                        "number of single-thread processes [2]")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to scale over [all visible, if any]")
    add_run_flags(parser, meta_steps=12)  # per configuration
    parser.add_argument("--warmup", type=int, default=2, help="first meta-steps left out of the rate [2]")
    add_run_flags(parser, data_root=str(ROOT / "data"))
    ours, run_args = parser.parse_known_args()
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    if not 1 <= ours.warmup < ours.meta_steps:
        parser.error("need 1 <= --warmup < --meta-steps")
    args = WORKLOAD + ["--meta-steps", str(ours.meta_steps), "--log-every", "1",
                       "--val-every", str(ours.meta_steps), "--data-root", ours.data_root] + run_args
    batch_flag = argparse.ArgumentParser(add_help=False)
    batch_flag.add_argument("--meta-batch-size", type=int)
    batch = batch_flag.parse_known_args(args)[0].meta_batch_size  # the last one given wins, as in run.py

    import torch  # only to see what hardware there is

    gpus = ours.gpus if ours.gpus is not None else torch.cuda.device_count()
    # (name, processes, threads per process, device, the row its ratio is taken against)
    all_cores = f"cpu 1 process x {ours.cores} threads"
    configs = [("cpu 1 process x 1 thread", 1, 1, "cpu", all_cores),
               (all_cores, 1, ours.cores, "cpu", all_cores),
               (f"cpu {ours.cores} processes x 1 thread", ours.cores, 1, "cpu", all_cores)]
    configs += [(f"cuda {k} gpu{'s' if k > 1 else ''}", k, 1, "cuda", "cuda 1 gpu") for k in range(1, gpus + 1)]

    print(f"run.py {' '.join(args)}")
    print(f"{'configuration':<34} {'tasks/s':>9}   ratio")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, processes, threads, device, _ in configs:
            rates[name] = measure(name, processes, threads, device, args, ours.warmup, batch, Path(tmp))
        for name, _, _, _, base in configs:
            print(f"{name:<34} {rates[name]:>9.2f}   {rates[name] / rates[base]:.2f}x vs {base}")


if __name__ == "__main__":
    main()
