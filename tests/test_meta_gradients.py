"""Every meta-gradient path against an independent reference (float64, tiny models)."""

import pytest
import torch

from engines import build_engine
from tests.reference import (engine_meta_gradient, implicit_maml, proximal_adapt,
                             relative_error, unrolled_maml)

F64 = torch.float64


def _engine(make_config, **overrides):
    return build_engine(make_config(**overrides), dtype=F64)


@pytest.mark.device
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_maml_equals_plain_autograd_second_order_unroll(make_config, task):
    engine = _engine(make_config, task=task, algo="maml", inner_steps=3, meta_batch_size=3,
                     inner_lr=0.05 if task == "sinusoid" else 0.4)
    got, tasks = engine_meta_gradient(engine)
    kind = engine.env.kind
    second = unrolled_maml(engine.upper.module, tasks, engine.run_config.inner_lr, 3, kind)
    first = unrolled_maml(engine.upper.module, tasks, engine.run_config.inner_lr, 3, kind, first_order=True)
    assert relative_error(got, second) < 1e-10
    # and it is not the first-order gradient: the second-order terms are really there
    assert relative_error(first, second) > 1e-3


@pytest.mark.device
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_fomaml_equals_query_gradient_at_adapted_parameters(make_config, task):
    engine = _engine(make_config, task=task, algo="fomaml", inner_steps=3, meta_batch_size=2,
                     inner_lr=0.05 if task == "sinusoid" else 0.4)
    got, tasks = engine_meta_gradient(engine)
    first = unrolled_maml(engine.upper.module, tasks, engine.run_config.inner_lr, 3, engine.env.kind,
                          first_order=True)
    assert relative_error(got, first) < 1e-10


def test_maml_equals_learn2learn(make_config):
    import learn2learn as l2l

    engine = _engine(make_config, task="glyphs", algo="maml", inner_steps=2, meta_batch_size=2, inner_lr=0.3)
    got, tasks = engine_meta_gradient(engine)
    model = engine.upper.module
    maml = l2l.algorithms.MAML(model, lr=0.3, first_order=False)
    maml.zero_grad()
    for task in tasks:
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(torch.nn.functional.cross_entropy(learner(task.support_x), task.support_y))
        (torch.nn.functional.cross_entropy(learner(task.query_x), task.query_y) / len(tasks)).backward()
    reference = [p.grad for p in model.parameters()]
    assert relative_error(got, reference) < 1e-10


SOLVE = {"cg_steps": 3000, "cg_tol": 1e-10}  # to convergence (measured residual ≤ 1e-10)
# λ per task: positive-definite H + λI after 4 inner steps (CG needs it; the tiny BatchNorm conv
# net has Hessian eigenvalues down to about −30 here), or indefinite (minimum eigenvalue about
# −2 for the MLP, −40 for the conv net), where CG's meta-gradient is off by about 100%
LAMS = {("sinusoid", True): 20.0, ("glyphs", True): 50.0, ("sinusoid", False): 1.0, ("glyphs", False): 5.0}


@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
@pytest.mark.parametrize("solver,options,definite", [
    ("exact", {}, True),
    # the exact solve of A x = v: no trust-region truncation (tested in test_solvers.py)
    ("cg", {"cg_steps": 500, "cg_tol": 1e-13, "cg_trust_region": False}, True),
    ("exact", {}, False),
    ("minres", SOLVE, True),
    ("minres", SOLVE, False),
    ("normal-cg", SOLVE, True),
    ("normal-cg", SOLVE, False),
    ("cg-damped", {**SOLVE, "cg_trust_region": False}, True),  # --cg-damping 0: the plain operator
    ("cg-damped", {**SOLVE, "cg_trust_region": False, "cg_damping": 5.0}, True),
])
def test_imaml_equals_dense_hessian_solve(make_config, task, solver, options, definite):
    engine = _engine(make_config, task=task, algo="imaml", hypergrad=solver, inner_steps=4,
                     lam=LAMS[task, definite], execution="per-task",
                     meta_batch_size=2, inner_lr=0.05 if task == "sinusoid" else 0.3, **options)
    if task == "sinusoid":  # keep the dense reference small: a 1-16-1 regressor
        _shrink_mlp(engine)
    got, tasks = engine_meta_gradient(engine)
    cfg = engine.run_config
    matrices = []  # A = H + λI per task
    reference = implicit_maml(engine.upper.module, tasks, cfg.inner_lr, 4, cfg.lam, engine.env.kind,
                              damping=cfg.cg_damping, matrices=matrices)
    assert relative_error(got, reference) < 1e-6
    assert all(info.converged for info in engine.lower.hypergrad_infos)
    assert all((torch.linalg.eigvalsh(a).min() > 0) == definite for a in matrices)  # the system is as labelled


def test_imaml_is_the_derivative_of_the_query_loss_at_the_proximal_solution(make_config):
    """At a converged inner solution, the implicit gradient equals the gradient through the
    whole (long) unrolled inner optimization: the λ convention and the sign are right."""
    lam, lr, steps = 10.0, 0.01, 400  # lr < 2/(λ + λ_max(H)): proximal GD converges linearly
    engine = _engine(make_config, task="sinusoid", algo="imaml", hypergrad="exact", lam=lam,
                     inner_lr=lr, inner_steps=steps, meta_batch_size=1, execution="per-task",
                     inner_tol=0.0)  # all 400 steps, as the reference takes
    _shrink_mlp(engine)
    got, tasks = engine_meta_gradient(engine)
    model = engine.upper.module
    names, theta = zip(*model.named_parameters())
    task = tasks[0]
    from torch.func import functional_call

    from imaml.metrics import task_loss

    phi = list(theta)
    for _ in range(steps):  # plain autograd through every step of the same proximal GD
        out = functional_call(model, dict(zip(names, phi)), (task.support_x,))
        loss = task_loss("regression", out, task.support_y)
        loss = loss + 0.5 * lam * sum((p - t).pow(2).sum() for p, t in zip(phi, theta))
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        phi = [p - lr * g for p, g in zip(phi, grads)]
    assert torch.cat([g.reshape(-1) for g in grads]).norm() < 1e-8  # precondition: converged
    query = task_loss("regression", functional_call(model, dict(zip(names, phi)), (task.query_x,)), task.query_y)
    unrolled = torch.autograd.grad(query, theta)
    assert relative_error(got, list(unrolled)) < 1e-5


@pytest.mark.device
@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_meta_batch_gradient_is_the_mean_of_per_task_gradients(make_config, algo):
    engine = _engine(make_config, task="glyphs", algo=algo, hypergrad="cg", cg_steps=50, cg_tol=1e-12,
                     inner_steps=2, meta_batch_size=3, inner_lr=0.3)
    batch_grad, tasks = engine_meta_gradient(engine)
    from envs import MetaBatch

    per_task = []
    for task in tasks:
        one = MetaBatch(*(t.unsqueeze(0) for t in (task.support_x, task.support_y, task.query_x, task.query_y)))
        engine.env.step = lambda one=one: engine.env.load(one)
        engine.upper.gas = 1  # one task per meta-update
        grads, _ = engine_meta_gradient(engine)
        per_task.append(grads)
    mean = [torch.stack(parts).mean(0) for parts in zip(*per_task)]
    assert relative_error(batch_grad, mean) < 1e-9


@pytest.mark.device
@pytest.mark.parametrize("bn_mode", ["transductive", "inductive", "episodic"])
def test_meta_test_leaves_parameters_and_buffers_bit_identical(make_config, bn_mode):
    for algo in ("imaml", "maml"):
        engine = build_engine(make_config(task="glyphs", algo=algo, test_tasks=3, bn_mode=bn_mode))
        engine.train()
        engine.train_step()  # running statistics (inductive) are no longer their initial values
        before = {k: v.clone() for k, v in engine.upper.module.state_dict().items()}
        optimizer = repr(engine.upper.optimizer.state_dict())
        engine.evaluate("test", 3)
        after = engine.upper.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert repr(engine.upper.optimizer.state_dict()) == optimizer
        assert all(p.grad is None for p in engine.upper.module.parameters())


def test_proximal_reference_matches_engine_adaptation(make_config):
    """The engine's iMAML inner loop is the proximal SGD the references assume."""
    engine = _engine(make_config, task="glyphs", algo="imaml", lam=2.0, inner_steps=3, inner_lr=0.3,
                     execution="per-task")  # its adapted φ is the last task's
    engine_meta_gradient(engine)
    task = engine.env.current
    phi = proximal_adapt(engine.upper.module, task, 0.3, 3, 2.0, "classification")
    assert relative_error(list(engine.lower.module.parameters()), phi) < 1e-12


def _shrink_mlp(engine):
    """Swap the sinusoid MLP for a 1-16-1 one (same class), re-wiring the Lower copy (per-task
    path only; tests/test_vectorized.py ties the task-vectorized path to it)."""
    assert not engine.vectorized
    from imaml.models import MLP

    small = MLP(1, 1, hidden=(16,)).to(F64)
    engine.upper.module.net = small.net
    engine.upper.optimizer = torch.optim.Adam(engine.upper.module.parameters(), lr=1e-3)
    lower_small = MLP(1, 1, hidden=(16,)).to(F64)
    engine.lower.module.net = lower_small.net
    engine.lower.optimizer = torch.optim.SGD(engine.lower.module.parameters(), lr=engine.run_config.inner_lr)


def test_maml_with_inner_momentum_and_weight_decay_equals_plain_autograd(make_config):
    engine = _engine(make_config, task="glyphs", algo="maml", inner_steps=3, meta_batch_size=2, inner_lr=0.3,
                     inner_momentum=0.9, inner_weight_decay=0.05)
    got, tasks = engine_meta_gradient(engine)
    model, kind = engine.upper.module, engine.env.kind
    reference = unrolled_maml(model, tasks, 0.3, 3, kind, momentum=0.9, weight_decay=0.05)
    assert relative_error(got, reference) < 1e-10
    assert relative_error(unrolled_maml(model, tasks, 0.3, 3, kind), reference) > 1e-3  # the options matter


def test_imaml_with_inner_weight_decay_equals_dense_solve(make_config):
    """Weight decay is part of the inner objective, so the implicit gradient sees it."""
    engine = _engine(make_config, task="sinusoid", algo="imaml", hypergrad="exact", inner_steps=4,
                     inner_lr=0.05, lam=2.0, meta_batch_size=2, inner_weight_decay=0.5)
    got, tasks = engine_meta_gradient(engine)
    model, kind = engine.upper.module, engine.env.kind
    reference = implicit_maml(model, tasks, 0.05, 4, 2.0, kind, weight_decay=0.5)
    assert relative_error(got, reference) < 1e-6
    assert relative_error(implicit_maml(model, tasks, 0.05, 4, 2.0, kind), reference) > 1e-3


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_maml_with_episodic_batchnorm_equals_plain_autograd(make_config, algo):
    """The query loss depends on the support set through its BatchNorm statistics."""
    engine = _engine(make_config, task="glyphs", algo=algo, bn_mode="episodic", inner_steps=2,
                     meta_batch_size=2, inner_lr=0.4)
    got, tasks = engine_meta_gradient(engine)
    model, kind = engine.upper.module, engine.env.kind
    first = algo == "fomaml"
    reference = unrolled_maml(model, tasks, 0.4, 2, kind, first_order=first, episodic=True)
    assert relative_error(got, reference) < 1e-10
    assert relative_error(unrolled_maml(model, tasks, 0.4, 2, kind, first_order=first), reference) > 1e-3
