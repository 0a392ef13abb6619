"""The benchmark's reference implementations compute what the engine computes (float64), so
its timings compare the same math. No timings are asserted here."""

import pytest
import torch

from benchmarks.betty_reference import BettyReference
from benchmarks.plain_loop import PlainLoop
from benchmarks.synthetic import register_synthetic_tasks, synthetic_source
from engines import build_engine
from imaml.config import RunConfig
from imaml.models import build_model
from tests.reference import engine_meta_gradient, relative_error

F64 = torch.float64
SIZE = dict(ways=3, shots=1, query_shots=2, meta_batch_size=3, inner_steps=3, inner_lr=0.3, meta_lr=1e-3,
            lam=20.0, cg_steps=3, seed=0)


def _engine_gradient(algo, cg_steps):
    register_synthetic_tasks()
    config = RunConfig(task="synthetic-omniglot", algo=algo, channels=4, hypergrad="cg", cg_tol=1e-30,
                       cg_trust_region=False, execution="per-task",
                       **{**SIZE, "cg_steps": cg_steps}).validate()
    grads, _ = engine_meta_gradient(build_engine(config, dtype=F64))
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
