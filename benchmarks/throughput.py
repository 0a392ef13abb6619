"""Meta-training throughput: this project's engine against a Betty reference and a plain loop.

    python -m benchmarks.throughput                      # the full table (docs/performance.md)
    python -m benchmarks.throughput --quick              # a tiny smoke run (seconds)
    python -m benchmarks.throughput --device cuda

For every size (input shape × ways × meta-batch) and algorithm (iMAML with CG, MAML) it runs,
each in a fresh process, on the same synthetic tasks with the same θ₀ and task stream:

- ``engine``: this project's engine (``engines.build_engine``) in one process, per task and
  task-vectorized, and as ``python run.py`` runs it on a CPU by default: one single-thread
  process per core sharing each meta-batch (``engine processes``, CPU only); the
  ``run.py default`` column repeats the one ``run.py`` would use;
- ``betty``: ``benchmarks.betty_reference``, a meta-learner written as Betty's examples are;
- ``plain``: ``benchmarks.plain_loop``, the same math as a hand-written PyTorch loop;

and prints tasks/s (meta-batch size / the fastest wall-clock meta-step after warm-up: every
step does the same work on same-shaped tasks, and other work on the machine only ever slows
one down), peak memory (summed over processes), and two ratios from this one invocation:
run.py default / Betty reference, and engine per-task / plain loop (the engine's overhead on
the same math in one process). The CG runs without the trust region and with a tolerance it
cannot reach, so every implementation does exactly ``--cg-steps`` Hessian-vector products per
task (the engine's count is checked and shown).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from typing import Dict, List

import torch

from benchmarks.measure import ROOT, machine, run_isolated, time_steps
from benchmarks.synthetic import SHAPES, register_synthetic_tasks, synthetic_source

IMPLS = ("engine-per-task", "engine-vectorized", "engine-processes", "betty", "plain")
MODULE = "benchmarks.throughput"


def _engine_config(spec: dict):
    from imaml.config import RunConfig

    register_synthetic_tasks()
    return RunConfig(
        task=f"synthetic-{spec['shape']}", algo=spec["algo"], ways=spec["ways"], shots=spec["shots"],
        query_shots=spec["query_shots"], channels=SHAPES[spec["shape"]].channels,
        meta_batch_size=spec["meta_batch_size"], inner_steps=spec["inner_steps"], inner_lr=spec["inner_lr"],
        meta_lr=spec["meta_lr"], lam=spec["lam"], hypergrad="cg", cg_steps=spec["cg_steps"], cg_tol=1e-30,
        cg_trust_region=False, device=spec["device"], seed=spec["seed"],
        execution=spec.get("execution", "auto"), grad_checkpoint=spec.get("grad_checkpoint", False),
    ).validate()


def measure_one(spec: dict) -> dict:
    """Build one implementation for ``spec`` and time it (runs inside the fresh process)."""
    if spec["impl"] == "engine-processes":
        return _measure_processes(spec) if "rank" not in spec else _measure_worker(spec)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    impl = spec["impl"]
    extra: Dict[str, object] = {}
    if impl.startswith("engine"):
        from engines import build_engine

        engine = build_engine(_engine_config(spec))
        engine.train()
        step = engine.train_step
        extra["execution"] = "vectorized" if engine.vectorized else "per-task"
    else:
        from imaml.models import build_model

        source = synthetic_source(spec["shape"], spec["ways"], spec["shots"], spec["query_shots"], spec["seed"])
        torch.manual_seed(spec["seed"])  # the engine's θ₀
        model = build_model("conv4", source.input_shape, spec["ways"], SHAPES[spec["shape"]].channels).to(device)
        if impl == "betty":
            from benchmarks.betty_reference import BettyReference as Impl
        else:
            from benchmarks.plain_loop import PlainLoop as Impl
        runner = Impl(spec["algo"], model, source, spec["meta_batch_size"], spec["inner_steps"], spec["inner_lr"],
                      spec["meta_lr"], spec["lam"], spec["cg_steps"], spec["seed"], device)
        step = runner.meta_step
    times, cpu, peak = time_steps(step, spec["warmup"], spec["meta_steps"], device)
    if impl.startswith("engine") and spec["algo"] == "imaml":
        iterations = [info.iterations for info in engine.solves]
        extra["cg_iterations"] = sum(iterations) / len(iterations)
    return {"tasks_per_s": spec["meta_batch_size"] / min(times), "step_seconds": times,
            "step_cpu_seconds": cpu,
            "peak_mib": peak, **extra}


def _measure_processes(spec: dict) -> dict:
    """The engine as ``python run.py`` runs on a CPU by default: one single-thread process per
    core (at most one per task), sharing each meta-batch (``engines.distributed``). Rank 0's
    step times (every step ends in the all-reduce that waits for all of them); peak memory
    summed over the processes."""
    from engines.distributed import local_job_environment, local_processes

    processes = local_processes(_engine_config(spec))
    env = local_job_environment(processes)
    workers = [subprocess.Popen([sys.executable, "-m", MODULE, "--one", json.dumps({**spec, "rank": rank})],
                                cwd=ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(processes)]
    outputs = [worker.communicate() for worker in workers]
    if any(worker.returncode for worker in workers):
        failed = next(err for worker, (_, err) in zip(workers, outputs) if worker.returncode)
        raise RuntimeError((failed.strip().splitlines() or ["a worker failed"])[-1])
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    return {**results[0], "peak_mib": sum(r["peak_mib"] for r in results), "processes": processes}


def _measure_worker(spec: dict) -> dict:
    from engines import build_engine, distributed

    config = _engine_config(spec)
    with distributed.process_group(config):
        engine = build_engine(config)
        engine.train()
        times, cpu, peak = time_steps(engine.train_step, spec["warmup"], spec["meta_steps"], torch.device("cpu"))
    return {"tasks_per_s": spec["meta_batch_size"] / min(times), "step_seconds": times, "step_cpu_seconds": cpu,
            "peak_mib": peak, "execution": "vectorized" if engine.vectorized else "per-task"}


def _sizes(args) -> List[dict]:
    return [dict(shape=shape, ways=ways, meta_batch_size=batch, algo=algo)
            for shape, ways, batch, algo in itertools.product(args.shapes, args.ways, args.meta_batch_sizes, args.algos)]


def _fmt(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one spec (JSON)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [all cores]")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ways", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--meta-batch-sizes", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--algos", nargs="+", default=["imaml", "maml"], choices=["imaml", "maml"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--cg-steps", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.05)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=20.0,
                        help="proximal λ; with --inner-lr, large enough that H + λI stays positive definite, "
                             "so no CG stops early and every implementation does the same work")
    parser.add_argument("--warmup", type=int, default=1, help="meta-steps before timing")
    parser.add_argument("--meta-steps", type=int, default=3, help="timed meta-steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every implementation this many times, interleaved, and keep each one's best "
                             "(other work on the machine only ever slows a run down)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one tiny size, one timed step: a smoke run")
    parser.add_argument("--json", help="also write all results to this file")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return 0
    if args.quick:
        args.shapes, args.ways, args.meta_batch_sizes, args.meta_steps = ["omniglot"], [5], [4], 1

    device = torch.device(args.device)
    common = dict(device=args.device, threads=args.threads, shots=args.shots, query_shots=args.query_shots,
                  inner_steps=args.inner_steps, cg_steps=args.cg_steps, inner_lr=args.inner_lr,
                  meta_lr=args.meta_lr, lam=args.lam, warmup=args.warmup, meta_steps=args.meta_steps,
                  seed=args.seed)
    print(f"# meta-training throughput on {machine(device, args.threads)}")
    print(f"# {args.shots}-shot, {args.query_shots} query examples per class, {args.inner_steps} inner steps, "
          f"CG {args.cg_steps} steps (iMAML), {args.warmup} warm-up + {args.meta_steps} timed meta-steps, "
          f"best of {args.rounds} interleaved round(s)")
    columns = {"engine-per-task": "engine per-task", "engine-vectorized": "engine vectorized",
               "engine-processes": "engine processes", "betty": "Betty ref.", "plain": "plain loop"}
    print("| input | ways | meta-batch | algo | engine, run.py default | " + " | ".join(columns.values())
          + " | default / Betty | per-task / plain | peak MiB: " + " / ".join(columns.values()) + " |")
    print("|---" * (9 + len(columns)) + "|")
    records = []
    for size in _sizes(args):
        runs: Dict[str, List[dict]] = {impl: [] for impl in args.impls}
        for _ in range(args.rounds):
            for impl in args.impls:
                spec = {**common, **size, "impl": impl}
                if impl in ("engine-per-task", "engine-vectorized"):
                    spec["execution"] = impl.split("-", 1)[1]
                per_task = _best(runs.get("engine-per-task", []))
                skip = (_vectorized_too_big(per_task, size, device) if impl == "engine-vectorized" else
                        "skipped: one process is the default on a GPU" if impl == "engine-processes"
                        and device.type != "cpu" else None)
                result = {"error": skip} if skip else run_isolated(MODULE, spec)
                records.append({**spec, **result})
                runs[impl].append(result)
        results = {impl: _best(rounds) for impl, rounds in runs.items()}
        default = _default_impl({**common, **size})
        rate = {impl: results[impl].get("tasks_per_s") for impl in results}
        versus_betty = _ratio(rate.get(default), rate.get("betty"))
        overhead = _ratio(rate.get("engine-per-task"), rate.get("plain"))
        peaks = " / ".join(_fmt(results.get(i, {}).get("peak_mib"), 0) for i in columns)
        cg = [results[i].get("cg_iterations") for i in results if results[i].get("cg_iterations") is not None]
        note = f" (CG iterations {min(cg):.2f})" if cg and min(cg) < args.cg_steps else ""
        shape = "×".join(map(str, SHAPES[size["shape"]].input_shape))
        print(f"| {shape} | {size['ways']} | {size['meta_batch_size']} | {size['algo']} "
              f"| {_fmt(rate.get(default))} ({columns[default].split(' ', 1)[1]}) | "
              + " | ".join(_fmt(rate.get(i)) for i in columns)
              + f" | {_fmt(versus_betty)} | {_fmt(overhead)} | {peaks} |{note}", flush=True)
        for impl, result in results.items():
            if "error" in result:
                print(f"#   {impl}: {result['error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(device, args.threads), "results": records}, out, indent=1)
    return 0


def _best(rounds: List[dict]) -> dict:
    """The fastest round (with the largest peak memory of all rounds), or the last error."""
    done = [r for r in rounds if "tasks_per_s" in r]
    if not done:
        return rounds[-1] if rounds else {}
    return {**max(done, key=lambda r: r["tasks_per_s"]), "peak_mib": max(r["peak_mib"] for r in done)}


def _vectorized_too_big(per_task: dict, size: dict, device: torch.device):
    """A reason to skip the vectorized run if T tasks' working memory at once (T × the
    per-task peak) would take more than half of the memory there is; else None."""
    if not per_task or "peak_mib" not in per_task:
        return None
    need = per_task["peak_mib"] * 2**20 * size["meta_batch_size"]
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        have = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    if need > have / 2:
        return f"skipped: needs about {need / 2**30:.1f} GiB (T × the per-task peak), {have / 2**30:.1f} GiB available"
    return None


def _ratio(a, b):
    return a / b if a and b else None


def _default_impl(spec: dict) -> str:
    """What ``python run.py`` does for this run: several processes on a CPU with more than
    one core, else one process with the execution ``--execution auto`` chooses."""
    from engines.build import use_vectorized
    from engines.distributed import local_processes
    from imaml.models import build_model

    config = _engine_config(spec)
    if local_processes(config) > 1:
        return "engine-processes"
    source = synthetic_source(spec["shape"], spec["ways"], spec["shots"], spec["query_shots"])
    model = build_model("conv4", source.input_shape, spec["ways"], config.channels)
    chosen = use_vectorized(config, model, torch.device(spec["device"]), source.input_shape)
    return "engine-vectorized" if chosen else "engine-per-task"


if __name__ == "__main__":
    sys.exit(main())
