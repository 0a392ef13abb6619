"""The benchmark's reference implementations compute what the engine computes (float64), so
its timings compare the same math. No timings are asserted here."""

import pytest
import torch

from benchmarks.betty_reference import BettyReference
from benchmarks.plain_loop import PlainLoop
from benchmarks.synthetic import synthetic_source
from engines import build_engine
from imaml.config import RunConfig
from imaml.models import build_model
from tests.reference import engine_meta_gradient, relative_error

F64 = torch.float64
SIZE = dict(ways=3, shots=1, query_shots=2, meta_batch_size=3, inner_steps=3, inner_lr=0.3, meta_lr=1e-3,
            lam=20.0, cg_steps=3, seed=0)


def _engine_gradient(algo, cg_steps):
    config = RunConfig(task="synthetic-omniglot", algo=algo, channels=4, hypergrad="cg", cg_tol=1e-30,
                       cg_trust_region=False, execution="per-task",
                       **{**SIZE, "cg_steps": cg_steps}).validate()
    source = synthetic_source("omniglot", config.ways, config.shots, config.query_shots, config.seed)
    sources = {split: source for split in ("train", "val", "test")}
    grads, _ = engine_meta_gradient(build_engine(config, dtype=F64, sources=sources))
    return grads


def _runner_gradient(kind, algo, cg_steps):
    source = synthetic_source("omniglot", SIZE["ways"], SIZE["shots"], SIZE["query_shots"], SIZE["seed"])
    torch.manual_seed(SIZE["seed"])  # the engine's θ₀
    model = build_model("conv4", source.input_shape, SIZE["ways"], channels=4).to(F64)
    cls = BettyReference if kind == "betty" else PlainLoop
    settings = {k: v for k, v in SIZE.items() if k not in ("ways", "shots", "query_shots")}
    runner = cls(algo, model, source, **{**settings, "cg_steps": cg_steps}, device="cpu", dtype=F64)
    captured = {}
    optimizer = runner.outer.optimizer if kind == "betty" else runner.optimizer
    optimizer.step = lambda *a, **k: captured.setdefault("grads", [p.grad.clone() for p in model.parameters()])
    runner.meta_step()
    return captured["grads"]


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_plain_loop_computes_the_engine_meta_gradient(algo):
    assert relative_error(_runner_gradient("plain", algo, 3), _engine_gradient(algo, 3)) < 1e-9


@pytest.mark.parametrize("algo,cg_steps", [("maml", 3), ("imaml", 1)])
def test_betty_reference_computes_the_engine_meta_gradient(algo, cg_steps):
    # betty-ml 0.1.1's CG agrees with a correct CG only in its first iteration
    assert relative_error(_runner_gradient("betty", algo, cg_steps), _engine_gradient(algo, cg_steps)) < 1e-9


def test_betty_reference_cg_is_betty_0_1_1s():
    """From the second CG iteration on, betty-ml 0.1.1's CG gives other numbers (its defect)."""
    assert relative_error(_runner_gradient("betty", "imaml", 3), _engine_gradient("imaml", 3)) > 1e-6


def test_channels_last_loop_computes_the_plain_loop_meta_gradient():
    """benchmarks.variants compares layouts of the same math."""
    from benchmarks.variants import ChannelsLastLoop

    source = synthetic_source("omniglot", SIZE["ways"], SIZE["shots"], SIZE["query_shots"], SIZE["seed"])
    settings = {k: v for k, v in SIZE.items() if k not in ("ways", "shots", "query_shots")}
    grads = []
    for cls, layout in ((PlainLoop, torch.contiguous_format), (ChannelsLastLoop, torch.channels_last)):
        torch.manual_seed(SIZE["seed"])
        model = build_model("conv4", source.input_shape, SIZE["ways"], channels=4).to(F64, memory_format=layout)
        runner = cls("maml", model, source, **settings, device="cpu", dtype=F64)
        runner.optimizer.step = lambda: grads.append([p.grad.clone() for p in model.parameters()])
        runner.meta_step()
    assert relative_error(grads[1], grads[0]) < 1e-10


TINY = dict(device="cpu", threads=1, shape="omniglot", ways=2, shots=1, query_shots=1, meta_batch_size=2,
            inner_steps=2, cg_steps=2, inner_lr=0.05, meta_lr=1e-3, lam=20.0, warmup=0, meta_steps=1, seed=0)


def test_memory_benchmark_measures():
    from benchmarks.memory import measure_one

    result = measure_one({**TINY, "algo": "maml", "grad_checkpoint": True, "execution": "per-task"})
    assert "error" not in result, result
    assert result["peak_mib"] >= 0 and result["seconds"] > 0


@pytest.mark.parametrize("loop,variants", [("plain", ["eager", "channels-last", "keep-freed-memory"]),
                                           ("engine", ["eager", "keep-freed-memory", "compile"])])
def test_variants_take_turns_in_their_own_processes(loop, variants):
    from benchmarks.variants import measure_variants

    results = measure_variants({**TINY, "loop": loop, "algo": "imaml", "warmup": 1, "meta_steps": 2}, variants)
    for variant in variants[:2] if loop == "engine" else variants:
        assert "error" not in results[variant], (variant, results[variant])
        assert len(results[variant]["seconds"]) == 2 and results[variant]["tasks_per_s"] > 0
    if loop == "engine":  # not built into the engine: says so, and the others still ran
        assert "not built into the engine" in results["compile"]["error"]


def test_throughput_times_every_implementation_interleaved():
    from benchmarks.throughput import IMPLS, measure_memory, measure_size

    results = measure_size({**TINY, "algo": "imaml", "impls": list(IMPLS), "warmup": 1, "rounds": 2, "processes": 2})
    assert set(results) == set(IMPLS)
    for impl, result in results.items():
        assert "error" not in result, (impl, result)
        assert len(result["step_seconds"]) == 2 and result["tasks_per_s"] > 0
    assert results["engine-processes"]["processes"] == 2 and results["engine-processes"]["peak_mib"] >= 0
    assert results["engine-vectorized"]["execution"] == "vectorized"
    assert results["engine-per-task"]["cg_iterations"] == TINY["cg_steps"]  # every CG ran all its iterations
    assert measure_memory({**TINY, "algo": "maml", "impl": "betty"})["peak_mib"] >= 0


@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_engine_dispatches_few_operations_beyond_the_math(algo):
    """Counted, not timed (timings here vary by ±15–20%): per meta-step, the engine dispatches at
    most 8% more ATen operations than the plain loop doing the same math (its diagnostics:
    norms, solver masks) and fewer than the Betty reference. Betty's own differentiable SGD
    alone put MAML at 13% over."""
    from benchmarks.op_counts import count_ops

    spec = {**TINY, "ways": 5, "query_shots": 5, "meta_batch_size": 4, "inner_steps": 5, "cg_steps": 3,
            "algo": algo}
    totals = {impl: sum(c.values()) for impl, c in count_ops(spec, ["engine-per-task", "betty", "plain"]).items()}
    assert totals["engine-per-task"] <= 1.08 * totals["plain"], totals
    assert totals["engine-per-task"] < totals["betty"], totals


def test_paired_speedup_compares_steps_of_the_same_round():
    from benchmarks.measure import format_speedup, paired_speedup, taking_turns

    # the machine slows down 2× in the second round: both steps of a round see it
    own, reference = [1.0, 2.0, 1.1], [1.1, 2.2, 1.1]
    median, low, high = paired_speedup(own, reference)
    assert (median, low, high) == pytest.approx((1.1, 1.0, 1.1))
    assert paired_speedup([1.0, 2.0], [3.0, 2.0]) == pytest.approx((2.0, 1.0, 3.0))  # even: the middle two
    assert format_speedup((1.1, 1.0, 1.1)) == "1.10 (1.00–1.10)" and format_speedup((0.5, 0.5, 0.5)) == "0.50"
    assert paired_speedup([], []) is None and format_speedup(None) == "—"
    assert taking_turns(["a", "b", "c"], 0) == ["a", "b", "c"] and taking_turns(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_throughput_cli_with_run_py_malloc_setting():
    """The one-process implementations can be measured as run.py sets a CPU process up."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--quick", "--algos", "maml",
                           "--impls", "engine-per-task", "plain", "--keep-freed-memory",
                           "--no-peak-memory"],  # peak memory: test_throughput_times_every_implementation_interleaved
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run.py's malloc setting" in done.stdout
    row = [line for line in done.stdout.splitlines() if line.startswith("| 1×28×28 | 5 | 4 | maml")]
    assert len(row) == 1 and "—" not in row[0].split("|")[12], row  # engine per-task / plain measured
