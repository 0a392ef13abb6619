"""Peak memory of one meta-step against the number of inner steps.

    python -m benchmarks.memory                  # iMAML, MAML, MAML --grad-checkpoint; 1-50 steps
    python -m benchmarks.memory --quick          # 1 and 5 steps only
    python -m benchmarks.memory --device cuda

iMAML's meta-gradient needs only the adapted φ, so its memory should not depend on the
number of inner steps; second-order MAML keeps every step's graph until the meta-gradient
is taken, so it grows linearly, unless ``--grad-checkpoint`` keeps only each step's input
and recomputes the step in the backward pass. Each configuration runs in a fresh process
(``benchmarks.measure``), after a warm-up forward/backward pass at the run's shapes
(one-time allocations such as convolution primitives are not counted). On CPU, allocations
of 64 KiB and more are returned to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so
the resident set tracks live tensors. A second column counts exactly the bytes autograd
graphs hold at their peak (``benchmarks.measure.SavedTensorPeak``), whatever the allocator does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.flags import add_run_flags
from benchmarks.measure import PeakMemory, SavedTensorPeak, machine, run_isolated
from benchmarks.synthetic import SHAPES
from benchmarks.shared import build_benchmark_engine

MODULE = "benchmarks.memory"
VARIANTS = {  # column -> engine settings
    "iMAML": dict(algo="imaml"),
    "MAML": dict(algo="maml"),
    "MAML --grad-checkpoint": dict(algo="maml", grad_checkpoint=True),
}


def measure_one(spec: dict) -> dict:
    import time

    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    engine = build_benchmark_engine(spec)
    engine.train()
    batch = engine.env.step()
    model = engine.upper.module
    for x, y in ((batch.support_x[0], batch.support_y[0]), (batch.query_x[0], batch.query_y[0])):
        F.cross_entropy(model(x), y).backward()  # warm-up at the run's shapes
    model.zero_grad(set_to_none=True)
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    engine.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, peak = time.perf_counter() - start, memory.mib()
    with SavedTensorPeak() as saved:  # a second meta-step, counting what the graphs hold
        engine.train_step()
    return {"peak_mib": peak, "graph_mib": saved.peak / 2**20, "seconds": seconds,
            "execution": "vectorized" if engine.vectorized else "per-task"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", default="omniglot", choices=list(SHAPES))
    add_run_flags(parser, several=["inner_steps"], device="cpu", ways=5, shots=1, query_shots=5, meta_batch_size=4,
                  inner_steps=[1, 5, 10, 25, 50], execution="per-task", inner_lr=0.05, lam=20.0, cg_steps=3)
    parser.add_argument("--quick", action="store_true", help="1 and 5 inner steps only")
    parser.add_argument("--json", help="also write all results to this file")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return 0
    if args.quick:
        args.inner_steps = [1, 5]

    device = torch.device(args.device)
    common = dict(device=args.device, threads=args.threads, shape=args.shape, ways=args.ways, shots=args.shots,
                  query_shots=args.query_shots, meta_batch_size=args.meta_batch_size, inner_lr=args.inner_lr,
                  meta_lr=1e-3, lam=args.lam, cg_steps=args.cg_steps, seed=0, execution=args.execution)
    print(f"# peak memory of one meta-step, MiB above the state before it "
          f"({'CUDA allocations' if device.type == 'cuda' else 'resident set'}) / MiB held by autograd graphs "
          f"at their peak; seconds per meta-step; on {machine(device, args.threads)}")
    print(f"# {args.shape}-shaped {args.ways}-way {args.shots}-shot, {args.query_shots} query examples per class, "
          f"meta-batch {args.meta_batch_size}, execution {args.execution}")
    print("| inner steps | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    table = {}
    for steps in args.inner_steps:
        row = {name: run_isolated(MODULE, {**common, **settings, "inner_steps": steps},
                                  env={"MALLOC_MMAP_THRESHOLD_": "65536"}) for name, settings in VARIANTS.items()}
        table[steps] = row
        cells = [f"{r['peak_mib']:.0f} / {r['graph_mib']:.1f} ({r['seconds']:.1f} s)" if "peak_mib" in r
                 else f"error: {r['error']}"
                 for r in row.values()]
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)
    _print_ratios(table, args.inner_steps)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(device, args.threads), "settings": common, "results": table}, out, indent=1)
    return 0


def _print_ratios(table: dict, steps: list) -> None:
    """The done-when ratios: iMAML peak(most)/peak(5); MAML peak(most)/peak(1), with and without
    checkpointing."""
    def peak(k, name):
        return table.get(k, {}).get(name, {}).get("peak_mib")

    most = max(steps)
    checks = [("iMAML", 5), ("MAML", 1), ("MAML --grad-checkpoint", 1)]
    for name, base in checks:
        top, low = peak(most, name), peak(base, name)
        if top is not None and low and most > base:  # one step count: no growth to show
            print(f"# {name}: peak at {most} inner steps / peak at {base} = {top / low:.2f}")


if __name__ == "__main__":
    sys.exit(main())
