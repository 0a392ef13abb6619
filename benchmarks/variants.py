"""Speed-ups tried on the same math before (or after) building them in: a channels-last memory
layout for the convolutions, ``torch.compile``, and a malloc that keeps freed memory.

    python -m benchmarks.variants                      # CPU, the plain loop: docs/performance.md
    python -m benchmarks.variants --loop engine --variants eager keep-freed-memory
    python -m benchmarks.variants --device cuda

Each variant runs in a worker process of its own, started fresh with that variant (a malloc
setting is process-wide), on the synthetic tasks of ``benchmarks.throughput``; after a warm-up
the workers take turns, one meta-step each (A B C, C B A …), so a slow spell of the machine falls
on all of them alike. Prints tasks/s (from each variant's fastest step) and the speed-up over
eager from this one invocation (the median over turns of the two step times, the range in
brackets: ``benchmarks.measure.paired_speedup``). ``--loop plain`` runs
``benchmarks.plain_loop`` (the engine's per-task math without the engine); ``--loop engine``
the engine per task, where only ``eager`` and ``keep-freed-memory`` apply. A variant that
fails prints its one-line error instead (``torch.compile`` cannot differentiate its compiled
graphs twice, which MAML's meta-gradient and iMAML's Hessian-vector products need).
``keep-freed-memory`` is ``imaml.allocator``, which ``python run.py`` applies on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from benchmarks.flags import add_run_flags
from benchmarks.measure import (StepWorker, describe_error, format_speedup, keep_freed_memory, machine, paired_speedup,
                                serve_steps, taking_turns)
from benchmarks.plain_loop import PlainLoop
from benchmarks.synthetic import SHAPES
from benchmarks.shared import InProcess, build_reference

MODULE = "benchmarks.variants"
VARIANTS = ("eager", "channels-last", "compile", "keep-freed-memory")
ENGINE_VARIANTS = ("eager", "keep-freed-memory")


class ChannelsLastLoop(PlainLoop):
    """The plain loop with the network and every input in channels-last layout."""

    def loss(self, params, x, y):
        return super().loss(params, x.contiguous(memory_format=torch.channels_last), y)


def build_variant(spec: dict):
    """The meta-step function of ``spec["loop"]`` with ``spec["variant"]`` applied."""
    variant = spec["variant"]
    if spec["loop"] == "engine" and variant not in ENGINE_VARIANTS:
        raise ValueError(f"{variant} is not built into the engine (try it with --loop plain)")
    if variant == "keep-freed-memory":
        keep_freed_memory()
    if spec["loop"] == "engine":
        return InProcess("engine-per-task", spec).step
    if variant == "channels-last":
        return build_reference(ChannelsLastLoop, spec, lambda model: model.to(memory_format=torch.channels_last)).meta_step
    if variant == "compile":
        return build_reference(PlainLoop, spec, torch.compile).meta_step
    return build_reference(PlainLoop, spec).meta_step


def serve_variant(spec: dict) -> None:
    """A worker: build the variant (a build error is answered to the first request), then
    one meta-step per request."""
    torch.set_num_threads(spec["threads"])
    try:
        step = build_variant(spec)
    except Exception as error:
        failure = error

        def step():
            raise failure
    serve_steps(step, torch.device(spec["device"]))


def measure_variants(spec: dict, variants) -> dict:
    """Every variant at one size: a worker each, ``warmup`` then ``meta_steps`` turns each."""
    workers = {v: StepWorker(MODULE, {**spec, "variant": v}) for v in variants}
    times = {v: [] for v in variants}
    results = {}
    for turn in range(spec["warmup"] + spec["meta_steps"]):
        for variant in taking_turns(workers, turn):
            if variant not in workers:
                continue
            worker = workers[variant]
            try:
                worker.request()
                seconds = worker.reply()["seconds"]
            except Exception as error:  # a variant that cannot run this math is a result, not a crash
                results[variant] = {"error": describe_error(error)}
                workers.pop(variant).close()
                continue
            if turn >= spec["warmup"]:
                times[variant].append(seconds)
    for variant, worker in workers.items():
        worker.close()
        results[variant] = {"tasks_per_s": spec["meta_batch_size"] / min(times[variant]), "seconds": times[variant]}
    return {v: results[v] for v in variants}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one variant's process (JSON)
    parser.add_argument("--loop", default="plain", choices=["plain", "engine"],
                        help="plain: benchmarks.plain_loop; engine: the engine per task")
    add_run_flags(parser, device="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [all cores]")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    add_run_flags(parser, several=["ways"], ways=[5, 20])
    parser.add_argument("--meta-batch-size", type=int, default=8,
                        help="tasks per meta-step (per-task math: its size does not change the comparison)")
    parser.add_argument("--algos", nargs="+", default=["imaml", "maml"], choices=["imaml", "maml"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1, help="meta-steps before timing (compilation happens here)")
    parser.add_argument("--meta-steps", type=int, default=3, help="timed meta-steps of each, taking turns; "
                                                                 "tasks/s from the fastest")
    parser.add_argument("--quick", action="store_true", help="one tiny size, one timed step: a smoke run")
    args = parser.parse_args(argv)
    if args.worker:
        serve_variant(json.loads(args.worker))
        return 0
    if args.quick:
        args.shapes, args.ways, args.meta_batch_size, args.meta_steps = ["omniglot"], [5], 2, 1

    common = dict(loop=args.loop, device=args.device, threads=args.threads, shots=1, query_shots=5, inner_steps=5,
                  cg_steps=3, inner_lr=0.05, meta_lr=1e-3, lam=20.0, warmup=args.warmup,
                  meta_steps=args.meta_steps, seed=0, meta_batch_size=args.meta_batch_size)
    loop = "plain per-task loop" if args.loop == "plain" else "engine, per task"
    print(f"# {loop}, tasks/s (speed-up over eager); on {machine(torch.device(args.device), args.threads)}")
    print(f"# 1-shot, 5 query examples per class, 5 inner steps, CG 3 steps, meta-batch {args.meta_batch_size}; "
          f"{args.warmup} warm-up + {args.meta_steps} timed meta-step(s) per variant, taking turns")
    print("| input | ways | algo | " + " | ".join(args.variants) + " |")
    print("|---|---|---|" + "---|" * len(args.variants))
    errors = set()
    for shape, ways, algo in itertools.product(args.shapes, args.ways, args.algos):
        results = measure_variants({**common, "shape": shape, "ways": ways, "algo": algo}, args.variants)
        base = results.get("eager", {}).get("seconds")
        cells = []
        for variant, result in results.items():
            if "tasks_per_s" not in result:
                errors.add(f"{variant}: {result['error']}")
                cells.append("fails")
            else:
                ratio = f" ({format_speedup(paired_speedup(result['seconds'], base))}×)" if base else ""
                cells.append(f"{result['tasks_per_s']:.2f}{ratio}")
        dims = "×".join(map(str, SHAPES[shape].input_shape))
        print(f"| {dims} | {ways} | {algo} | " + " | ".join(cells) + " |", flush=True)
    for error in sorted(errors):
        print(f"# {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
