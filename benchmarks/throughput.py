"""Meta-training throughput: this project's engine against a Betty reference and a plain loop.

    python -m benchmarks.throughput                      # the full table (docs/performance.md)
    python -m benchmarks.throughput --quick              # a tiny smoke run
    python -m benchmarks.throughput --device cuda

For every size (input shape × ways × meta-batch) and algorithm (iMAML with CG, MAML), one
fresh process builds every implementation on the same synthetic tasks, θ₀ and task stream:

- ``engine``: this project's engine (``engines.build_engine``), per task and task-vectorized,
  and as ``python run.py`` runs it on a CPU by default: one single-thread process per core
  sharing each meta-batch (``engine processes``: worker processes this one steps in lockstep;
  CPU only); the ``run.py default`` column repeats the one ``run.py`` would use;
- ``betty``: ``benchmarks.betty_reference``, a meta-learner written as Betty's examples are;
- ``plain``: ``benchmarks.plain_loop``, the same math as a hand-written PyTorch loop;

warms each up with ``--warmup`` meta-steps (one-time costs), then times ``--rounds`` meta-steps
of each, interleaved (A B C, C B A, A B C …), so a slow spell of the machine falls on all of them
alike: tasks/s = meta-batch size / the fastest of an implementation's timed steps (every step
does the same work on same-shaped tasks, and other work on the machine only ever slows one
down). Peak memory is what the first meta-step adds, measured for each implementation in a
fresh process of its own (``benchmarks.measure.PeakMemory``; summed over the processes of
``engine processes``, over all their steps); the per-task implementations hold one task at a
time, so theirs is measured at the first meta-batch size and shown for every one.
Two speed-ups, each the median over rounds of the two implementations' step times in that
round (``benchmarks.measure.paired_speedup``; the range over rounds in brackets): run.py
default over the Betty reference, and engine per-task over the plain loop (below 1: the
engine's overhead on the same math in one process). The CG runs without the trust region and
with a tolerance it cannot reach, so every implementation does ``--cg-steps`` Hessian-vector
products per task (the engine's count is checked and shown: its CG still stops on
non-positive curvature).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Dict, List, Optional

import torch

from benchmarks.flags import add_run_flags
from benchmarks.measure import (PeakMemory, describe_error, format_speedup, keep_freed_memory, machine, paired_speedup,
                                run_isolated, taking_turns, timed_step)
from benchmarks.shared import EngineProcesses, InProcess, Skipped, engine_config, serve_engine_worker
from benchmarks.synthetic import SHAPES, synthetic_source

IMPLS = ("engine-per-task", "engine-vectorized", "engine-processes", "betty", "plain")
MODULE = "benchmarks.throughput"


def _set_up_process(spec: dict) -> None:
    """Threads, and with ``--keep-freed-memory`` run.py's CPU malloc setting, for the
    implementations built in this process."""
    torch.set_num_threads(spec["threads"])
    if spec.get("keep_freed_memory"):
        keep_freed_memory()


def measure_memory(spec: dict) -> dict:
    """The memory one meta-step of ``spec["impl"]`` adds (in a fresh process of its own)."""
    _set_up_process(spec)
    runner = InProcess(spec["impl"], spec)
    memory = PeakMemory(torch.device(spec["device"]))
    memory.start()
    runner.step()
    return {"peak_mib": memory.mib()}


def measure_size(spec: dict) -> Dict[str, dict]:
    """Every implementation in ``spec["impls"]`` at one size (in this fresh process): built and
    warmed up in turn, then ``spec["rounds"]`` timed meta-steps each, interleaved. Peak memory only for
    ``engine processes`` (its workers are fresh processes); the others' comes from
    ``measure_memory``."""
    _set_up_process(spec)
    device = torch.device(spec["device"])
    runners: Dict[str, object] = {}
    results: Dict[str, dict] = {}
    times: Dict[str, List[float]] = {}

    def run(impl: str, timed: bool) -> None:
        try:
            seconds = timed_step(runners[impl].step, device)
            if timed:
                times[impl].append(seconds)
        except Exception as error:  # one failing implementation does not stop the others
            results[impl] = {"error": describe_error(error)}
            runners.pop(impl).close()

    for impl in spec["impls"]:
        try:
            runners[impl] = EngineProcesses(spec, MODULE) if impl == "engine-processes" else InProcess(impl, spec)
            times[impl] = []
        except Skipped as skipped:
            results[impl] = {"error": str(skipped)}
        except Exception as error:
            results[impl] = {"error": describe_error(error)}
    for _ in range(spec["warmup"]):
        for impl in list(runners):
            run(impl, timed=False)
    for turn in range(spec["rounds"]):
        for impl in taking_turns(runners, turn):
            if impl in runners:
                run(impl, timed=True)
    for impl, runner in runners.items():
        results[impl] = {"tasks_per_s": spec["meta_batch_size"] / min(times[impl]), "step_seconds": times[impl],
                         **runner.extra()}
        runner.close()
    return results


def _sizes(args) -> List[dict]:
    return [dict(shape=shape, ways=ways, meta_batch_size=batch, algo=algo)
            for shape, ways, batch, algo in itertools.product(args.shapes, args.ways, args.meta_batch_sizes, args.algos)]


def _fmt(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one size (JSON)
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one implementation's memory
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one process of "engine processes"
    add_run_flags(parser, device="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the one-process implementations [all cores]")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    add_run_flags(parser, several=["ways"], ways=[5, 20])
    parser.add_argument("--meta-batch-sizes", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--algos", nargs="+", default=["imaml", "maml"], choices=["imaml", "maml"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    # the engine's settings (the references: the whole network); λ 20 with --inner-lr 0.05 keeps H + λI
    # positive definite, so no CG stops early and every implementation does the same work
    add_run_flags(parser, lower_problem=None, adapt="all", head_init="theta", shots=1, query_shots=5, inner_steps=5,
                  cg_steps=3, inner_lr=0.05, meta_lr=1e-3, lam=20.0)
    parser.add_argument("--warmup", type=int, default=1, help="meta-steps of each implementation before timing")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed meta-steps of each implementation, interleaved; tasks/s from the fastest")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="give the one-process implementations run.py's CPU malloc setting "
                             "(imaml.allocator; the engine's processes always have it)")
    add_run_flags(parser, seed=0)
    parser.add_argument("--quick", action="store_true", help="one tiny size, one timed round: a smoke run")
    parser.add_argument("--no-peak-memory", action="store_true", help="timings only: no peak-memory processes (one "
                        "fresh process per implementation and size; benchmarks/gpu_check.sh's budget)")
    parser.add_argument("--json", help="also write all results to this file")
    return parser


def _measure(spec: dict, impls: List[str], device: torch.device, per_task_memory: Dict[tuple, dict]) -> dict:
    """Every implementation's timing at one size (one fresh process) and its peak memory (a fresh
    process each; the per-task implementations' once per shape, ways and algorithm)."""
    memory, skipped = {}, {}
    for impl in impls:
        if impl == "engine-processes" or spec["no_peak_memory"]:
            continue
        per_task = memory.get("engine-per-task", {}).get("peak_mib")
        skip = _vectorized_too_big(per_task, spec, device) if impl == "engine-vectorized" else None
        if skip:
            skipped[impl] = {"error": skip}
        elif impl == "engine-vectorized":
            memory[impl] = run_isolated(MODULE, {**spec, "impl": impl}, flag="--memory")
        else:
            key = (spec["shape"], spec["ways"], spec["algo"], impl)
            if key not in per_task_memory:
                per_task_memory[key] = run_isolated(MODULE, {**spec, "impl": impl}, flag="--memory")
            memory[impl] = per_task_memory[key]
    timed = [impl for impl in impls if impl not in skipped]
    results = run_isolated(MODULE, {**spec, "impls": timed})
    if "error" in results:  # the measuring process itself failed
        results = {impl: results for impl in timed}
    return {**skipped, **{impl: {**memory.get(impl, {}), **result} for impl, result in results.items()}}


COLUMNS = {"engine-per-task": "engine per-task", "engine-vectorized": "engine vectorized",
           "engine-processes": "engine processes", "betty": "Betty ref.", "plain": "plain loop"}


def _row(spec: dict, results: dict, cg_steps: int) -> str:
    """One size's row of the table."""
    default = _default_impl(spec)
    rate = {impl: results.get(impl, {}).get("tasks_per_s") for impl in COLUMNS}
    versus_betty = _speedup(results, default, "betty")
    overhead = _speedup(results, "engine-per-task", "plain")
    peaks = " / ".join(_fmt(results.get(i, {}).get("peak_mib"), 0) for i in COLUMNS)
    cg = [r["cg_iterations"] for r in results.values() if "cg_iterations" in r]
    note = f" (CG iterations {min(cg):.2f})" if cg and min(cg) < cg_steps else ""
    shape = "×".join(map(str, SHAPES[spec["shape"]].input_shape))
    return (f"| {shape} | {spec['ways']} | {spec['meta_batch_size']} | {spec['algo']} "
            f"| {_fmt(rate[default])} ({COLUMNS[default].split(' ', 1)[1]}) | "
            + " | ".join(_fmt(rate[i]) for i in COLUMNS)
            + f" | {format_speedup(versus_betty)} | {format_speedup(overhead)} | {peaks} |{note}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        serve_engine_worker(json.loads(args.worker))
        return 0
    if args.one:
        print(json.dumps(measure_size(json.loads(args.one))))
        return 0
    if args.memory:
        print(json.dumps(measure_memory(json.loads(args.memory))))
        return 0
    if args.quick:
        args.shapes, args.ways, args.meta_batch_sizes, args.rounds = ["omniglot"], [5], [4], 1
    device = torch.device(args.device)
    common = dict(device=args.device, threads=args.threads, shots=args.shots, query_shots=args.query_shots,
                  inner_steps=args.inner_steps, cg_steps=args.cg_steps, inner_lr=args.inner_lr,
                  meta_lr=args.meta_lr, lam=args.lam, warmup=args.warmup, rounds=args.rounds, seed=args.seed,
                  keep_freed_memory=args.keep_freed_memory, lower_problem=args.lower_problem,
                  adapt=args.adapt, head_init=args.head_init, no_peak_memory=args.no_peak_memory)
    impls = [i for i in IMPLS if i in args.impls and not (i == "engine-processes" and device.type != "cpu")]
    print(f"# meta-training throughput on {machine(device, args.threads)}")
    print(f"# {args.shots}-shot, {args.query_shots} query examples per class, {args.inner_steps} inner steps, "
          f"CG {args.cg_steps} steps (iMAML); per size, in one process, {args.warmup} warm-up + {args.rounds} "
          f"timed meta-step(s) of each implementation, interleaved"
          + ("; run.py's malloc setting in every process" if args.keep_freed_memory else ""))
    if args.lower_problem or args.adapt != "all" or args.head_init != "theta":
        engine = f"--lower-problem {args.lower_problem}" if args.lower_problem else f"--adapt {args.adapt} --head-init {args.head_init}"
        print(f"# engine: {engine}; Betty ref. and plain loop adapt the whole network")
    print("| input | ways | meta-batch | algo | engine, run.py default | " + " | ".join(COLUMNS.values())
          + " | default / Betty | per-task / plain | peak MiB: " + " / ".join(COLUMNS.values()) + " |")
    print("|---" * (9 + len(COLUMNS)) + "|")
    records, per_task_memory = [], {}  # one task at a time: the same memory at every meta-batch size
    for size in _sizes(args):
        spec = {**common, **size}
        results = _measure(spec, impls, device, per_task_memory)
        records.append({**spec, "results": results})
        print(_row(spec, results, args.cg_steps), flush=True)
        for impl, result in results.items():
            if "error" in result:
                print(f"#   {impl}: {result['error']}", file=sys.stderr)
    spread = step_spread(records)
    if spread:
        print(f"# the timed steps of one implementation differed by {spread[0]:.0%} (median), up to {spread[1]:.0%}: "
              f"the machine's noise; ratios closer to 1 than that are ties")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(device, args.threads), "results": records}, out, indent=1)
    return 0


def step_spread(records: List[dict]) -> Optional[tuple]:
    """(median, max) over implementations and sizes of (slowest − fastest) / fastest timed
    step: how much the same work's time varied within one measurement."""
    spreads = sorted(max(r["step_seconds"]) / min(r["step_seconds"]) - 1 for record in records
                     for r in record["results"].values() if len(r.get("step_seconds", [])) > 1)
    return (spreads[len(spreads) // 2], spreads[-1]) if spreads else None


def _vectorized_too_big(per_task_mib: Optional[float], size: dict, device: torch.device):
    """A reason to skip the vectorized run if T tasks' working memory at once (T × the
    per-task peak) would take more than half of the memory there is; else None."""
    if per_task_mib is None:
        return None
    need = per_task_mib * 2**20 * size["meta_batch_size"]
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        have = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    if need > have / 2:
        return f"skipped: needs about {need / 2**30:.1f} GiB (T × the per-task peak), {have / 2**30:.1f} GiB available"
    return None


def _speedup(results: Dict[str, dict], impl: str, reference: str) -> Optional[tuple]:
    """``paired_speedup`` of ``impl`` over ``reference`` from their timed rounds (None if either failed)."""
    own, ref = (results.get(name, {}).get("step_seconds") for name in (impl, reference))
    return paired_speedup(own, ref) if own and ref else None


def _default_impl(spec: dict) -> str:
    """What ``python run.py`` does for this run: several processes on a CPU with more than
    one core, else one process with the execution ``--execution auto`` chooses."""
    from engines.build import use_vectorized
    from engines.distributed import local_processes
    from engines.extensions import choose_parts
    from imaml.models import build_model

    config = engine_config(spec)
    if local_processes(config) > 1:
        return "engine-processes"
    source = synthetic_source(spec["shape"], spec["ways"], spec["shots"], spec["query_shots"])
    model = build_model("conv4", source.input_shape, spec["ways"], config.channels)
    chosen = use_vectorized(config, model, torch.device(spec["device"]), source.input_shape, choose_parts(config))
    return "engine-vectorized" if chosen else "engine-per-task"


if __name__ == "__main__":
    sys.exit(main())
