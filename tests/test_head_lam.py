"""--head-lam: a second λ on the output layer of a whole network adapted by iMAML. Its
meta-gradient is the dense implicit reference's for that objective (per task and stacked, with
the exact solve and with the preconditioned MINRES), Hessian-free steps preconditioned by the
per-group λ reach the minimizer, and the flag is refused where it has no meaning."""

import pytest
import torch

from engines import build_engine
from imaml.errors import UsageError
from imaml.inner_optimizers import INNER_OPTIMIZERS, InnerLoop, InnerStep, rows
from imaml.models import MLP
from problems.head import head_names
from tests.reference import engine_meta_gradient, implicit_general, relative_error

F64 = torch.float64
STEPS = 3
LAM, HEAD_LAM = 2.0, 0.2


def _engine(make_config, task, **settings):
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(16,), activation=settings.get("activation", "relu")) if task == "sinusoid" else None
    config = dict(task=task, algo="imaml", lam=LAM, head_lam=HEAD_LAM, inner_steps=STEPS, meta_batch_size=3,
                  inner_lr=0.05 if task == "sinusoid" else 0.4)
    config.update(settings)
    return build_engine(make_config(**config), dtype=F64, model=model)


@pytest.mark.parametrize("head_init", ["theta", "zero"])
@pytest.mark.parametrize("task,hypergrad,tol", [("sinusoid", "exact", 1e-9), ("glyphs", "exact", 1e-9),
                                                 # the MLP's A is well conditioned here; the conv net's, three
                                                 # steps from θ, is near singular for MINRES with one λ too
                                                 ("sinusoid", "minres", 1e-7)])
def test_head_lam_meta_gradient_is_the_dense_implicit_one(make_config, task, head_init, hypergrad, tol):
    solver = dict(cg_steps=500, cg_tol=1e-13) if hypergrad == "minres" else {}
    results = {}
    for execution in ("per-task", "vectorized"):
        narrow = dict(channels=2) if task == "glyphs" else {}  # a dense A over the whole conv net: keep it small
        engine = _engine(make_config, task, head_init=head_init, hypergrad=hypergrad, execution=execution, **solver,
                         **narrow)
        results[execution] = engine_meta_gradient(engine)
    (per_task, tasks), (stacked, same_tasks) = results["per-task"], results["vectorized"]
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, same_tasks))
    assert relative_error(stacked, per_task) <= max(tol, 1e-9)

    model, kind = engine.upper.module, engine.env.kind
    lr = engine.run_config.inner_lr
    head = head_names(model)
    zero = head if head_init == "zero" else ()
    reference = implicit_general(model, tasks, lr, STEPS, LAM, kind, zero_head=zero,
                                 lam_by_name={name: HEAD_LAM for name in head})
    assert relative_error(per_task, reference) < tol
    # one λ everywhere is another meta-gradient: the second λ is in the objective, not ignored
    assert relative_error(implicit_general(model, tasks, lr, STEPS, LAM, kind, zero_head=zero), reference) > 1e-3
    infos = engine.lower.hypergrad_infos
    assert infos and all(i.residual <= 1e-9 for i in infos)  # measured on A itself, not the scaled system


def test_converged_hessian_free_with_head_lam_gives_the_dense_implicit_meta_gradient(make_config):
    """Preconditioned Hessian-free steps reach the minimizer of g (stationarity 1e-11), where
    the implicit meta-gradient equals the dense one at the minimizer plain proximal GD reaches."""
    lam, head_lam = 10.0, 1.0
    engine = _engine(make_config, "sinusoid", lam=lam, head_lam=head_lam, inner_steps=60, meta_batch_size=1,
                     execution="per-task", hypergrad="exact", inner_optimizer="hessian-free", inner_tol=1e-11,
                     inner_cg_steps=20, inner_lr=1.0, activation="silu")
    got, tasks = engine_meta_gradient(engine)
    assert float(engine.lower.stationarity()[0]) <= 1e-11
    assert int(engine.lower.inner.moves[0]) < 30
    model = engine.upper.module
    dense = implicit_general(model, tasks, 0.02, 3000, lam, "regression",
                             lam_by_name={name: head_lam for name in head_names(model)})
    assert relative_error(got, dense) < 1e-6


def _two_scale_problem():
    """Logistic regression whose weights are held by λ = 0.01 and bias by λ = 100: κ(A) ≈ 10⁴
    from the proximal term alone."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 10, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=gen)
    theta = [torch.randn(3, 10, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)]
    lams = [0.01, 100.0]

    def g(w, b):
        return (torch.nn.functional.cross_entropy(x @ w.T + b, y)
                + sum(0.5 * lam * (p - t).pow(2).sum() for lam, p, t in zip(lams, (w, b), theta)))

    diagonal = torch.cat([torch.full((30,), lams[0], dtype=F64), torch.full((3,), lams[1], dtype=F64)])
    return g, theta, diagonal


def _hessian_free_moves(preconditioned: bool, steps: int = 40) -> tuple:
    g, theta, diagonal = _two_scale_problem()
    params = [t.clone().requires_grad_() for t in theta]
    loop = InnerLoop(1e-10)
    for _ in range(steps):
        value = g(*params)
        grads = torch.autograd.grad(value, params, create_graph=True)
        grad = rows(grads, 1)
        loop.measure(grad.norm(dim=1))
        if loop.done:
            break
        step = InnerStep(params, value.detach().reshape(1), grad, lambda: g(*params).detach().reshape(1), loop,
                         lr=1.0, lam=float(diagonal.min()), cg_steps=5, grads=list(grads),
                         hvp=lambda u: rows(torch.autograd.grad(grad, params, u, retain_graph=True), 1),
                         proximal_diagonal=diagonal if preconditioned else None)
        INNER_OPTIMIZERS["hessian-free"](step, None)
    return float(loop.relative().detach()), int(loop.moves)


def test_hessian_free_preconditioned_by_the_group_lams_converges_where_plain_cg_crawls():
    stationarity, moves = _hessian_free_moves(preconditioned=True)
    assert stationarity <= 1e-10 and moves <= 25
    plain, plain_moves = _hessian_free_moves(preconditioned=False)
    assert plain > 1e-10 or plain_moves >= 1.5 * moves  # the same 5 CG steps, unscaled: 38 steps against 22


@pytest.mark.parametrize("flags,message", [
    (dict(algo="maml", head_lam=0.1), "--algo imaml --adapt all"),
    (dict(algo="imaml", adapt="head", head_lam=0.1), "--lam is the head's"),
    (dict(algo="imaml", head_lam=0.0), "must be > 0"),
])
def test_head_lam_is_refused_where_it_has_no_meaning(make_config, flags, message):
    with pytest.raises(UsageError, match=message):
        make_config(**flags)
