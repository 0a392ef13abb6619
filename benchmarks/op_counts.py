"""Operations per meta-step: the engine against the Betty reference and the plain loop, counted.

    python -m benchmarks.op_counts                    # Omniglot-shaped 5-way, meta-batch 4
    python -m benchmarks.op_counts --ways 20 --shape miniimagenet

Timings on a shared CPU vary by ±15–20% between identical steps; the number of ATen operations
a meta-step dispatches does not. Every implementation of ``benchmarks.throughput`` that runs in
one process is built on the same tasks, takes one meta-step (one-time set-up), then one
counted meta-step (a ``TorchDispatchMode`` sees every operation, the backward pass's too).
Prints the totals, their ratio to the plain loop, and each operation whose count differs between
the per-task implementations — the work a framework adds on top of the math (or saves); the
task-vectorized engine runs each operation once for the whole meta-batch. Counts say nothing of an
operation's size: the convolutions, which dominate the time, are the same in all of them
(they are in the table only if their count differs).
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.flags import add_run_flags
from benchmarks.synthetic import SHAPES
from benchmarks.shared import InProcess

IMPLS = ("engine-per-task", "engine-vectorized", "betty", "plain")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(spec: dict, impls=IMPLS) -> Dict[str, collections.Counter]:
    """{implementation: Counter of ATen operations in one meta-step after a first one}."""
    torch.set_num_threads(spec["threads"])
    counts = {}
    for impl in impls:
        runner = InProcess(impl, spec)
        runner.step()
        with _CountOps() as counter:
            runner.step()
        counts[impl] = counter.counts
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="omniglot", choices=list(SHAPES))
    add_run_flags(parser, ways=5, meta_batch_size=4)
    parser.add_argument("--algos", nargs="+", default=["imaml", "maml"], choices=["imaml", "maml"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    args = parser.parse_args(argv)
    for algo in args.algos:
        spec = dict(device="cpu", threads=1, shots=1, query_shots=5, inner_steps=5, cg_steps=3, inner_lr=0.05,
                    meta_lr=1e-3, lam=20.0, seed=0, shape=args.shape, ways=args.ways,
                    meta_batch_size=args.meta_batch_size, algo=algo)
        counts = count_ops(spec, args.impls)
        plain = sum(counts["plain"].values()) if "plain" in counts else None
        print(f"\n{algo}, {args.shape}-shaped {args.ways}-way, meta-batch {args.meta_batch_size}: "
              "ATen operations in one meta-step")
        print("| operation | " + " | ".join(counts) + " |")
        print("|---|" + "---|" * len(counts))
        per_task = [impl for impl in counts if impl != "engine-vectorized"]  # it runs every op fewer times
        for op in sorted(set().union(*counts.values())):
            if len({counts[impl][op] for impl in per_task}) > 1:
                print(f"| {op} | " + " | ".join(str(counts[impl][op]) for impl in counts) + " |")
        totals = [sum(c.values()) for c in counts.values()]
        print("| **total** | " + " | ".join(f"**{t}**" + (f" ({t / plain:.3f}×)" if plain else "") for t in totals)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
