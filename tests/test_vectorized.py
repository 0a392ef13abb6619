"""The task-vectorized meta-batch and gradient checkpointing give the per-task meta-gradients.

All in float64 on tiny models. The per-task path is itself tied to independent references in
test_meta_gradients.py, so equality here carries those checks over.
"""

import dataclasses

import pytest
import torch
from torch.func import functional_call

from engines import build_engine
from imaml.errors import UsageError
from imaml.solvers import conjugate_gradient, dense_solve, neumann_series
from imaml.models import MLP, Conv4
from imaml.vectorize import TaskGroupedModel, why_not_vectorizable
from problems import ImplicitLower
from tests.reference import engine_meta_gradient, relative_error

F64 = torch.float64


def _pair(make_config, **overrides):
    """The same run built per task and task-vectorized (same θ₀, same task stream)."""
    per_task = build_engine(make_config(execution="per-task", **overrides), dtype=F64)
    vectorized = build_engine(make_config(execution="vectorized", **overrides), dtype=F64)
    assert vectorized.vectorized and not per_task.vectorized
    return per_task, vectorized


def _glyphs(**overrides):
    return {**dict(task="glyphs", meta_batch_size=3, inner_steps=3, inner_lr=0.3), **overrides}


def _sinusoid(**overrides):
    return {**dict(task="sinusoid", meta_batch_size=3, inner_steps=3, inner_lr=0.05), **overrides}


# ----------------------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("model,shape", [(Conv4(3, 5, channels=4, image_size=28), (6, 3, 28, 28)),
                                         (Conv4(3, 5, channels=4, image_size=28, activation="silu"), (6, 3, 28, 28)),
                                         (MLP(1, 1), (7, 1)), (MLP(1, 1, activation="silu"), (7, 1))])
def test_grouped_forward_equals_each_task_alone(model, shape):
    """Each task gets its own parameters and its own BatchNorm batch statistics."""
    model = model.to(F64)
    tasks = 4
    params = [torch.randn(tasks, *p.shape, dtype=F64) for p in model.parameters()]
    x = torch.randn(tasks, *shape, dtype=F64)
    x[1] *= 10  # very different batch statistics per task
    names = [name for name, _ in model.named_parameters()]
    alone = torch.stack([functional_call(model, dict(zip(names, [p[t] for p in params])), (x[t],))
                         for t in range(tasks)])
    assert torch.allclose(TaskGroupedModel(model)(params, x), alone, rtol=1e-12, atol=1e-12)


def test_models_with_shared_state_or_unknown_layers_are_not_vectorizable():
    assert why_not_vectorizable(Conv4(1, 5, channels=4)) is None
    assert why_not_vectorizable(MLP()) is None
    assert "buffers" in why_not_vectorizable(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    assert "Dropout" in why_not_vectorizable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()))


# ----------------------------------------------------------------------------- batched solvers


def _systems(tasks=5, n=12, seed=0):
    """T symmetric systems, some indefinite, one with a zero right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for t in range(tasks):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        eigs = torch.logspace(-1, 1.5, n, dtype=F64)
        if t % 2:
            eigs[:2] = torch.tensor([-2.0, -0.5], dtype=F64)
        mats.append(q @ torch.diag(eigs + 0.5) @ q.T)
    a = torch.stack(mats)
    b = torch.randn(tasks, n, generator=gen, dtype=F64)
    b[2] = 0.0
    return a, b


def _matvec(a):
    return lambda u: (a @ u.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("steps,tol,with_radius", [(3, 1e-12, True), (40, 1e-10, True), (40, 1e-10, False),
                                                   (200, 1e-3, False)])
def test_batched_cg_equals_separate_solves(steps, tol, with_radius):
    a, b = _systems()
    radius = b.norm(dim=1) / 0.5 if with_radius else None
    x, infos = conjugate_gradient(_matvec(a), b, steps, tol, radius=radius)
    for t in range(len(b)):
        alone, info = conjugate_gradient(lambda u: a[t] @ u, b[t], steps, tol,
                                         radius=None if radius is None else radius[t].item())
        # the same iterates up to rounding (a batched product sums in another order; CG
        # amplifies that to ~1e-10 over its iterations on these condition-~100 systems)
        assert (x[t] - alone).norm() <= 1e-8 * alone.norm()
        assert (infos[t].iterations, infos[t].converged, infos[t].boundary) == \
               (info.iterations, info.converged, info.boundary)
        assert infos[t].residual == pytest.approx(info.residual, rel=1e-6, abs=1e-9)
    assert any(i.boundary for i in infos) and any(not i.boundary for i in infos)


def test_batched_neumann_and_dense_equal_separate_solves():
    a, b = _systems()
    a = a @ a.transpose(1, 2) + torch.eye(a.shape[1], dtype=F64)  # positive definite
    for solve in (lambda mv, rhs: neumann_series(mv, rhs, terms=30), dense_solve):
        x, infos = solve(_matvec(a), b)
        for t in range(len(b)):
            alone, info = solve(lambda u: a[t] @ u, b[t])
            assert torch.allclose(x[t], alone, rtol=1e-10, atol=1e-14)
            assert infos[t].residual == pytest.approx(info.residual, rel=1e-6, abs=1e-14)


# ----------------------------------------------------------------------------- meta-gradients


@pytest.mark.device
@pytest.mark.parametrize("task", [_glyphs, _sinusoid])
@pytest.mark.parametrize("options", [
    dict(algo="imaml", hypergrad="cg", cg_steps=3, lam=2.0),  # trust region on: some solves truncate
    dict(algo="imaml", hypergrad="cg", cg_steps=100, cg_tol=1e-12, lam=50.0, cg_trust_region=False),
    dict(algo="imaml", hypergrad="exact", lam=50.0),
    dict(algo="imaml", hypergrad="neumann", neumann_terms=10, lam=50.0),
    # indefinite systems (few steps: unconverged Lanczos iterates amplify the two paths' different
    # rounding of the Hessian products, as CG's do), and converged ones, where the tasks stop apart
    dict(algo="imaml", hypergrad="minres", cg_steps=8, lam=2.0),
    dict(algo="imaml", hypergrad="minres", cg_steps=200, cg_tol=1e-12, lam=50.0),
    # the line-search inner optimizers (per-task step sizes and damping) and per-task early stopping
    dict(algo="imaml", hypergrad="cg", cg_steps=100, cg_tol=1e-12, lam=50.0, cg_trust_region=False,
         inner_optimizer="armijo", inner_lr=1.0, inner_steps=4),
    dict(algo="imaml", hypergrad="cg", cg_steps=100, cg_tol=1e-12, lam=50.0, cg_trust_region=False,
         inner_optimizer="hessian-free", inner_steps=4),
    dict(algo="imaml", hypergrad="exact", lam=5.0, inner_lr=0.02, inner_tol=0.2, inner_steps=40),  # tasks stop apart
    dict(algo="imaml", hypergrad="minres", cg_steps=200, cg_tol=1e-12, lam=10.0, activation="silu",
         inner_optimizer="hessian-free", inner_steps=4),  # the smooth network of docs/meta-gradients.md
    dict(algo="maml"),
    dict(algo="fomaml"),
], ids=["imaml-cg3", "imaml-cg-converged", "imaml-exact", "imaml-neumann", "imaml-minres8", "imaml-minres-converged",
        "imaml-armijo", "imaml-hessian-free", "imaml-inner-tol", "imaml-silu", "maml", "fomaml"])
def test_vectorized_meta_gradient_equals_per_task(make_config, task, options):
    if options.get("hypergrad") == "exact" and task is _glyphs:
        options = dict(options, channels=2)  # keep the dense solve small
    per_task, vectorized = _pair(make_config, **task(**options))
    expected, tasks = engine_meta_gradient(per_task)
    got, same_tasks = engine_meta_gradient(vectorized)
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, same_tasks))
    assert relative_error(got, expected) < 1e-10
    # and so do the logged numbers (query loss and score, inner curves, per-task solver outcomes)
    record_p, record_v = per_task._train_record(), vectorized._train_record()
    assert record_p.keys() == record_v.keys()
    for key in record_p:
        assert record_v[key] == pytest.approx(record_p[key], rel=1e-8, abs=1e-12), key


@pytest.mark.device
def test_each_task_adapts_as_the_proximal_reference_does(make_config):
    from tests.reference import proximal_adapt

    engine = build_engine(make_config(**_glyphs(algo="imaml", lam=2.0, execution="vectorized")), dtype=F64)
    _, tasks = engine_meta_gradient(engine)
    for t, task in enumerate(tasks):
        phi = proximal_adapt(engine.upper.module, task, 0.3, 3, 2.0, "classification")
        assert relative_error([p[t] for p in engine.lower.trainable_parameters()], phi) < 1e-12


@pytest.mark.device
def test_solver_decisions_match_task_by_task(make_config):
    """Per-task CG outcomes (iterations, truncation) are the same in both paths."""
    per_task, vectorized = _pair(make_config, **_glyphs(algo="imaml", hypergrad="cg", cg_steps=4, lam=0.5,
                                                        meta_batch_size=4))
    engine_meta_gradient(per_task)
    engine_meta_gradient(vectorized)
    p, v = per_task.records.solves, vectorized.records.solves
    assert [(i.iterations, i.boundary, i.converged) for i in p] == [(i.iterations, i.boundary, i.converged) for i in v]
    assert [i.norm for i in v] == pytest.approx([i.norm for i in p], rel=1e-8)
    assert any(i.boundary for i in p)  # the truncated path is exercised


@pytest.mark.device
@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_vectorized_evaluation_equals_per_task(make_config, algo):
    per_task, vectorized = _pair(make_config, **_glyphs(algo=algo, test_tasks=5, meta_batch_size=2))
    expected, got = per_task.evaluate("test", 5), vectorized.evaluate("test", 5)  # batches of 2, 2, 1
    assert got["num_tasks"] == expected["num_tasks"] == 5
    assert got["mean"] == pytest.approx(expected["mean"], abs=1e-12)
    assert got["inner_curve"] == pytest.approx(expected["inner_curve"], rel=1e-10)


def test_vectorized_training_runs_and_logs(make_config):
    engine = build_engine(make_config(**_sinusoid(algo="imaml", meta_steps=3, execution="vectorized")))
    result = engine.run()
    assert result["tasks_per_second"] > 0 and result["test"]["num_tasks"] == 4


def test_auto_vectorizes_only_where_it_was_faster(make_config):
    assert build_engine(make_config(task="sinusoid")).vectorized  # the MLP, on CPU
    # conv nets on CPU: only while a task's first-layer activations are small
    assert build_engine(make_config(task="glyphs", ways=5, query_shots=5, channels=64)).vectorized
    assert not build_engine(make_config(task="glyphs", ways=20, query_shots=5, channels=64)).vectorized
    assert not build_engine(make_config(task="sinusoid", algo="imaml", hypergrad="darts")).vectorized


def test_vectorized_refuses_what_it_cannot_do(make_config):
    with pytest.raises(UsageError, match="darts"):
        build_engine(make_config(task="sinusoid", algo="imaml", hypergrad="darts", execution="vectorized"))


class _ScaledProximal(ImplicitLower):
    """An extension whose hook reads only what every mode has: a 3× proximal term."""

    def regularizer(self):
        return 3.0 * super().regularizer()


class _StackedScaledProximal(_ScaledProximal):
    stackable = True  # its regularizer works on [T, ...] parameters as well


def test_an_extension_runs_stacked_only_if_its_own_class_says_so(make_config):
    config = make_config(**_sinusoid(algo="imaml", hypergrad="cg", cg_steps=100, cg_tol=1e-12, lam=5.0,
                                     cg_trust_region=False))
    with pytest.raises(UsageError, match="_ScaledProximal does not declare stackable = True"):
        build_engine(dataclasses.replace(config, execution="vectorized"), lower_cls=_ScaledProximal)
    assert not build_engine(config, lower_cls=_ScaledProximal).vectorized  # auto: per task
    per_task = build_engine(dataclasses.replace(config, execution="per-task"), lower_cls=_StackedScaledProximal,
                            dtype=F64)
    stacked = build_engine(dataclasses.replace(config, execution="vectorized"), lower_cls=_StackedScaledProximal,
                           dtype=F64)
    assert stacked.vectorized and type(stacked.lower) is _StackedScaledProximal  # the same class, stacked
    expected, _ = engine_meta_gradient(per_task)
    got, _ = engine_meta_gradient(stacked)
    assert relative_error(got, expected) < 1e-10
    plain, _ = engine_meta_gradient(build_engine(dataclasses.replace(config, execution="per-task"), dtype=F64))
    assert relative_error(plain, expected) > 1e-3  # the hook is in force


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.device
@pytest.mark.parametrize("task", [_glyphs, _sinusoid])
@pytest.mark.parametrize("execution", ["per-task", "vectorized"])
def test_grad_checkpoint_gives_the_same_maml_meta_gradient(make_config, task, execution):
    settings = task(algo="maml", execution=execution, inner_steps=4)
    plain = build_engine(make_config(**settings), dtype=F64)
    checkpointed = build_engine(make_config(grad_checkpoint=True, **settings), dtype=F64)
    expected, _ = engine_meta_gradient(plain)
    got, _ = engine_meta_gradient(checkpointed)
    assert relative_error(got, expected) < 1e-12
    # the adapted weights survive the recomputation in the backward pass
    assert relative_error(list(checkpointed.lower.params), list(plain.lower.params)) < 1e-12
    assert checkpointed.lower.inner_losses == pytest.approx(plain.lower.inner_losses, rel=1e-12)


def test_grad_checkpoint_is_for_unrolled_maml_only(make_config):
    with pytest.raises(UsageError, match="--grad-checkpoint"):
        make_config(algo="imaml", grad_checkpoint=True)
