"""Speed-ups tried on the same math before building them into the engine: a channels-last
memory layout for the convolutions, ``torch.compile``, and a malloc that keeps freed memory.

    python -m benchmarks.variants                     # CPU: the table in docs/performance.md
    python -m benchmarks.variants --device cuda

Each variant runs ``benchmarks.plain_loop`` (the engine's per-task math without the engine)
on the synthetic tasks of ``benchmarks.throughput``, each in a fresh process, and prints
tasks/s and the ratio to the plain eager loop from this one invocation. The engine takes a
variant only where it wins here: a variant that fails (``torch.compile`` cannot differentiate
its compiled graphs twice, which MAML's meta-gradient and iMAML's Hessian-vector products
need) prints its one-line error instead. ``keep-freed-memory`` sets glibc's malloc to serve
every block from its heap and never give memory back (``mallopt``: no mmap, no trimming), so
the activations every inner step frees are not faulted in again by the next one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from benchmarks.measure import describe_error, machine, run_isolated, time_steps
from benchmarks.plain_loop import PlainLoop
from benchmarks.synthetic import SHAPES
from benchmarks.throughput import build_reference

MODULE = "benchmarks.variants"
VARIANTS = ("eager", "channels-last", "compile", "keep-freed-memory")


class ChannelsLastLoop(PlainLoop):
    """The plain loop with the network and every input in channels-last layout."""

    def loss(self, params, x, y):
        return super().loss(params, x.contiguous(memory_format=torch.channels_last), y)


def _keep_freed_memory() -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc's malloc.h
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
            and libc.mallopt(m_top_pad, 256 << 20)):
        raise RuntimeError("mallopt refused the settings (not glibc?)")


def measure_one(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["variant"] == "channels-last":
        runner = build_reference(ChannelsLastLoop, spec, lambda model: model.to(memory_format=torch.channels_last))
    elif spec["variant"] == "compile":
        runner = build_reference(PlainLoop, spec, torch.compile)
    else:
        if spec["variant"] == "keep-freed-memory":
            _keep_freed_memory()
        runner = build_reference(PlainLoop, spec)
    try:
        times, _, peak = time_steps(runner.meta_step, spec["warmup"], spec["meta_steps"], device)
    except Exception as error:  # a variant that cannot run this math is a result, not a crash
        return {"error": describe_error(error)}
    return {"tasks_per_s": spec["meta_batch_size"] / min(times), "peak_mib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one spec (JSON)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads [all cores]")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ways", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--meta-batch-size", type=int, default=8,
                        help="tasks per meta-step (per-task math: its size does not change the comparison)")
    parser.add_argument("--algos", nargs="+", default=["imaml", "maml"], choices=["imaml", "maml"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1, help="meta-steps before timing (compilation happens here)")
    parser.add_argument("--meta-steps", type=int, default=2, help="timed meta-steps; tasks/s from the fastest")
    parser.add_argument("--quick", action="store_true", help="one tiny size, one timed step: a smoke run")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return 0
    if args.quick:
        args.shapes, args.ways, args.meta_batch_size, args.meta_steps = ["omniglot"], [5], 2, 1

    common = dict(device=args.device, threads=args.threads, shots=1, query_shots=5, inner_steps=5, cg_steps=3,
                  inner_lr=0.05, meta_lr=1e-3, lam=20.0, warmup=args.warmup, meta_steps=args.meta_steps, seed=0,
                  meta_batch_size=args.meta_batch_size)
    print(f"# plain per-task loop, tasks/s (ratio to eager); on {machine(torch.device(args.device), args.threads)}")
    print(f"# 1-shot, 5 query examples per class, 5 inner steps, CG 3 steps, meta-batch {args.meta_batch_size}")
    print("| input | ways | algo | " + " | ".join(args.variants) + " |")
    print("|---|---|---|" + "---|" * len(args.variants))
    errors = set()
    for shape, ways, algo in itertools.product(args.shapes, args.ways, args.algos):
        results = {v: run_isolated(MODULE, {**common, "shape": shape, "ways": ways, "algo": algo, "variant": v})
                   for v in args.variants}
        base = results.get("eager", {}).get("tasks_per_s")
        cells = []
        for variant, result in results.items():
            if "tasks_per_s" not in result:
                errors.add(f"{variant}: {result['error']}")
                cells.append("fails")
            else:
                ratio = f" ({result['tasks_per_s'] / base:.2f}×)" if base else ""
                cells.append(f"{result['tasks_per_s']:.2f}{ratio}")
        dims = "×".join(map(str, SHAPES[shape].input_shape))
        print(f"| {dims} | {ways} | {algo} | " + " | ".join(cells) + " |", flush=True)
    for error in sorted(errors):
        print(f"# {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
