"""Every --algo × --adapt × --head-init: one task at a time equals the whole meta-batch at once
(float64), and the meta-gradient equals an independent reference (plain autograd through the
unrolled steps; the dense implicit solve), on a regressor and on a conv net. And the head's
closed-form system solve (both of its branches) against the dense autograd Hessian."""

import pytest
import torch

from engines import build_engine
from imaml.choices import HYPERGRADS
from imaml.models import MLP
from problems.head import head_names
from problems.head_solve import solve_head_system
from tests.reference import engine_meta_gradient, implicit_general, relative_error, unrolled_general

F64 = torch.float64
STEPS = 3


def _meta_gradient(make_config, task, execution, **settings):
    torch.manual_seed(0)  # the same θ for both executions
    model = MLP(1, 1, hidden=(16,)) if task == "sinusoid" else None
    engine = build_engine(make_config(task=task, execution=execution, inner_steps=STEPS, meta_batch_size=3,
                                      inner_lr=0.05 if task == "sinusoid" else 0.4, **settings), dtype=F64, model=model)
    grads, tasks = engine_meta_gradient(engine)
    return grads, tasks, engine


@pytest.mark.device
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
@pytest.mark.parametrize("head_init", ["theta", "zero"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("algo", ["maml", "fomaml", "imaml"])
def test_every_setting_per_task_equals_vectorized_and_its_reference(make_config, algo, adapt, head_init, task):
    settings = dict(algo=algo, adapt=adapt, head_init=head_init)
    if algo == "imaml":
        settings.update(hypergrad="exact", lam=2.0)
        if task == "glyphs":  # a dense A over every adapted entry, per task: a 2-channel conv net keeps it small
            settings.update(channels=2)
    per_task, tasks, engine = _meta_gradient(make_config, task, "per-task", **settings)
    vectorized, same_tasks, vector_engine = _meta_gradient(make_config, task, "vectorized", **settings)
    assert engine.lower.tasks_at_once == 1 and vector_engine.lower.tasks_at_once is None
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, same_tasks))
    assert relative_error(vectorized, per_task) <= 1e-9

    model, kind, lr = engine.upper.module, engine.env.kind, engine.run_config.inner_lr
    head = head_names(model)
    options = dict(adapted=head if adapt == "head" else None, zero_head=head if head_init == "zero" else ())
    if algo == "imaml":
        reference = implicit_general(model, tasks, lr, STEPS, 2.0, kind, **options)
    else:
        reference = unrolled_general(model, tasks, STEPS, kind, lr, first_order=algo == "fomaml", **options)
    assert relative_error(per_task, reference) < 1e-9
    # the settings change the meta-gradient: none of the other starts or adapted sets gives this one
    other = dict(options, zero_head=() if head_init == "zero" else head)
    if algo == "imaml":
        assert relative_error(implicit_general(model, tasks, lr, STEPS, 2.0, kind, **other), reference) > 1e-3
    else:
        assert relative_error(unrolled_general(model, tasks, STEPS, kind, lr, first_order=algo == "fomaml", **other),
                              reference) > 1e-3


@pytest.mark.parametrize("kind,examples,outputs,bias", [("classification", 4, 3, True),  # Woodbury: 12 < 3·6
                                                         ("classification", 9, 3, False),  # dense: 27 > 3·5
                                                         ("regression", 5, 1, True)])
def test_the_head_system_in_closed_form_is_the_dense_hessian_solve(kind, examples, outputs, bias):
    gen = torch.Generator().manual_seed(0)
    tasks, width, mu = 2, 5, 0.3
    features = torch.randn(tasks, examples, width, generator=gen, dtype=F64)
    head = [torch.randn(tasks, outputs, width, generator=gen, dtype=F64)]
    if bias:
        head.append(torch.randn(tasks, outputs, generator=gen, dtype=F64))
    targets = (torch.randint(outputs, (tasks, examples), generator=gen) if kind == "classification"
               else torch.randn(tasks, examples, outputs, generator=gen, dtype=F64))
    n = sum(p[0].numel() for p in head)
    b = torch.randn(tasks, n, generator=gen, dtype=F64)
    got = solve_head_system(features, head, kind, mu, b)
    for t in range(tasks):
        def loss(flat):
            weight = flat[:outputs * width].view(outputs, width)
            out = features[t] @ weight.T + (flat[outputs * width:] if bias else 0)
            if kind == "classification":
                return torch.nn.functional.cross_entropy(out, targets[t])
            return torch.nn.functional.mse_loss(out, targets[t])
        flat = torch.cat([p[t].reshape(-1) for p in head])
        a = torch.autograd.functional.hessian(loss, flat) + mu * torch.eye(n, dtype=F64)
        assert torch.allclose(got[t], torch.linalg.solve(a, b[t]), rtol=0, atol=1e-12)


def _head_preset_gradient(make_config, inner_tol, cg_tol, hypergrad="cg"):
    """configs/glyphs-imaml-head.yaml's algorithm (λ = 0.1, Hessian-free to --inner-tol, CG to --cg-tol)
    on a small glyphs net, float64: the meta-gradient and the engine."""
    torch.manual_seed(0)
    config = make_config(task="glyphs", algo="imaml", adapt="head", head_init="zero", lam=0.1, inner_optimizer="hessian-free",
                         inner_cg_steps=10, inner_lr=1.0, inner_steps=15, inner_tol=inner_tol, hypergrad=hypergrad,
                         cg_steps=30, cg_tol=cg_tol, cg_trust_region=True, meta_batch_size=3)
    engine = build_engine(config, dtype=F64)
    return engine_meta_gradient(engine)[0], engine


def test_the_head_presets_tolerances_bound_their_meta_gradient_error(make_config):
    """At the presets' tolerances (stationarity and CG residual 1e-2) the meta-gradient is within
    a stated bound of the converged one (stationarity 1e-12, the closed-form solve), and the error
    is first order in the tolerances: ‖φ − φ*‖ ≤ ‖∇g(φ)‖/λ (g is λ-strongly convex) and
    ‖x − x*‖ ≤ ‖r‖/λ, both linear in the tolerance, so the meta-gradient's error is at most
    c·tol with c the problem's constant; here c ≤ 2 (measured: 0.9), and a tenfold tighter
    tolerance cuts the error at least fivefold."""
    exact, engine = _head_preset_gradient(make_config, 1e-12, 1e-12, hypergrad="exact")
    assert float(engine.lower.stationarity().max()) <= 1e-12
    errors = {}
    for tol in (1e-2, 1e-3):
        got, engine = _head_preset_gradient(make_config, tol, tol)
        assert float(engine.lower.stationarity().max()) <= tol
        assert all(info.converged for info in engine.lower.hypergrad_infos)
        errors[tol] = relative_error(got, exact)
    assert errors[1e-2] <= 2 * 1e-2, errors
    assert errors[1e-3] <= errors[1e-2] / 5 or errors[1e-3] <= 1e-6, errors


@pytest.mark.parametrize("hypergrad", HYPERGRADS)
def test_every_solver_runs_on_the_head_and_vectorized_equals_per_task(make_config, hypergrad):
    """--adapt head with each --hypergrad: a meta-step runs and the whole meta-batch at once gives
    the per-task meta-gradient (darts perturbs one task's weights at a time: per task only)."""
    settings = dict(algo="imaml", adapt="head", head_init="zero", hypergrad=hypergrad, lam=1.0, cg_steps=10)
    per_task, _, engine = _meta_gradient(make_config, "glyphs", "per-task", **settings)
    auto, _, auto_engine = _meta_gradient(make_config, "glyphs", "auto", **settings)
    assert auto_engine.vectorized == (hypergrad != "darts")
    assert relative_error(auto, per_task) <= 1e-9
    assert len(auto_engine.lower.hypergrad_infos) == (1 if hypergrad == "darts" else 3)  # one per task adapted
    if hypergrad in ("cg", "minres", "normal-cg", "exact"):  # solvers of the exact system, to 1e-5
        exact, _, _ = _meta_gradient(make_config, "glyphs", "per-task", **dict(settings, hypergrad="exact"))
        assert relative_error(per_task, exact) < 1e-4


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_test_lam_zero_adapts_at_meta_test_as_plain_gradient_descent(make_config, adapt):
    """--test-lam 0 (the official iMAML code's meta-test): the evaluation inner loop is plain SGD
    on the support loss, step for step MAML's evaluation from the same θ; meta-training keeps λ."""
    results = {}
    for algo, extra in (("imaml", dict(lam=2.0, test_lam=0.0)), ("maml", {})):
        engine = build_engine(make_config(task="glyphs", algo=algo, adapt=adapt, inner_steps=STEPS, test_inner_steps=4,
                                          **extra), dtype=F64)
        results[algo] = engine.evaluate("test", 4)
        if algo == "imaml":
            assert engine.lower.plan.lam == 0.0  # meta-test adapted without the proximal term
            engine_meta_gradient(engine)
            assert engine.lower.plan.lam == 2.0  # meta-training keeps λ
    assert results["imaml"]["mean"] == pytest.approx(results["maml"]["mean"], abs=1e-12)
    assert results["imaml"]["inner_curve"] == pytest.approx(results["maml"]["inner_curve"], rel=1e-10)
    with_lam = build_engine(make_config(task="glyphs", algo="imaml", adapt=adapt, lam=2.0, test_inner_steps=4), dtype=F64)
    assert with_lam.evaluate("test", 4)["inner_curve"][-1] != pytest.approx(results["maml"]["inner_curve"][-1], rel=1e-6)
