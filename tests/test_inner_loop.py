"""iMAML's inner loop: its stationarity diagnostic, --inner-tol, and the inner optimizers.

The implicit meta-gradient is the theorem's only at a stationary point of the proximal
objective g; these tests check that the run measures how far it got, says so when it did not
get there, and that every inner optimizer, run to convergence, gives the meta-gradient of
independent references (plain autograd through a long unrolled loop, a dense solve).
"""

import json

import pytest
import torch

from engines import build_engine
from imaml.errors import UsageError
from imaml.inner_optimizers import INNER_OPTIMIZERS, InnerLoop, InnerStep, rows
from imaml.app.cli import main
from tests.reference import engine_meta_gradient, implicit_maml, relative_error, unrolled_general
from tests.test_meta_gradients import _shrink_mlp

F64 = torch.float64


def _convex_problem(seed=0):
    """Multinomial logistic regression plus λ/2‖W − θ‖²: strongly convex, minimizer by Newton."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 10, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=gen)
    theta = torch.randn(3, 10, generator=gen, dtype=F64)
    lam = 0.5

    def g(w):
        return torch.nn.functional.cross_entropy(x @ w.T, y) + 0.5 * lam * (w - theta).pow(2).sum()

    w = theta.clone().requires_grad_()  # the reference minimizer: exact Newton steps on a dense Hessian
    for _ in range(30):
        grad = torch.autograd.grad(g(w), w)[0].reshape(-1)
        hess = torch.autograd.functional.hessian(lambda v: g(v.reshape(3, 10)), w.detach().reshape(-1))
        w = (w.detach().reshape(-1) - torch.linalg.solve(hess, grad)).reshape(3, 10).requires_grad_()
    assert torch.autograd.grad(g(w), w)[0].norm() < 1e-12
    return g, theta, lam, w.detach()


def _run_inner(name, g, theta, lam, steps, lr=0.5, tol=1e-10):
    w = theta.clone().requires_grad_()
    optimizer = torch.optim.SGD([w], lr=lr)
    loop = InnerLoop(tol)
    for _ in range(steps):
        value = g(w)
        grads = torch.autograd.grad(value, [w], create_graph=True)
        grad = rows(grads, 1)
        loop.measure(grad.norm(dim=1))
        if loop.done:
            break
        step = InnerStep([w], value.detach().reshape(1), grad, lambda: g(w).detach().reshape(1), loop, lr=lr,
                         lam=lam, cg_steps=10, grads=list(grads),
                         hvp=lambda u: rows(torch.autograd.grad(grad, [w], u, retain_graph=True), 1))
        INNER_OPTIMIZERS[name](step, optimizer)
    return w.detach(), loop


def test_hessian_free_reaches_the_proximal_minimizer_of_a_convex_problem():
    g, theta, lam, minimizer = _convex_problem()
    w, loop = _run_inner("hessian-free", g, theta, lam, steps=20)
    assert float(loop.relative()) <= 1e-10
    assert (w - minimizer).norm() / minimizer.norm() < 1e-9
    assert int(loop.moves) <= 12  # (damped) Newton-fast: SGD at the same rate is far from it then
    _, sgd = _run_inner("sgd", g, theta, lam, steps=12)
    assert float(sgd.relative()) > 1e-3


def test_armijo_never_increases_the_objective_where_a_fixed_step_does():
    g, theta, lam, minimizer = _convex_problem(seed=1)
    values = []
    w = theta.clone().requires_grad_()
    loop = InnerLoop(0.0)
    for _ in range(15):
        value = g(w)
        values.append(float(value.detach()))
        grad = rows(torch.autograd.grad(value, [w]), 1)
        loop.measure(grad.norm(dim=1))
        INNER_OPTIMIZERS["armijo"](InnerStep([w], value.detach().reshape(1), grad,
                                             lambda: g(w).detach().reshape(1), loop, lr=50.0, lam=lam), None)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert loop.trials > 15  # it had to backtrack from the far too large --inner-lr
    _, fixed = _run_inner("sgd", g, theta, lam, steps=3, lr=50.0, tol=0.0)
    assert float(fixed.relative()) > 1.0  # the same step without the search diverges


@pytest.mark.parametrize("optimizer,activation", [("sgd", "relu"), ("armijo", "relu"), ("hessian-free", "relu"),
                                                  ("hessian-free", "silu")])
def test_converged_inner_loop_gives_the_unrolled_and_the_dense_implicit_meta_gradient(make_config, optimizer,
                                                                                       activation):
    """Whichever optimizer reaches φ*, the implicit meta-gradient there is autograd through
    400 plain proximal GD steps (no implicit algebra) and the dense-Hessian implicit one."""
    lam, lr, steps = 10.0, 0.01, 400
    engine = build_engine(make_config(task="sinusoid", algo="imaml", hypergrad="exact", lam=lam, inner_lr=lr,
                                      inner_steps=steps, meta_batch_size=1, execution="per-task",
                                      inner_optimizer=optimizer, inner_tol=1e-11, activation=activation), dtype=F64)
    _shrink_mlp(engine)  # a ReLU MLP; the smooth case swaps its nonlinearity in both copies
    for net in (engine.upper.module.net, engine.lower.module.net):
        for index, layer in enumerate(net):
            if activation == "silu" and isinstance(layer, torch.nn.ReLU):
                net[index] = torch.nn.SiLU()
    got, tasks = engine_meta_gradient(engine)
    model = engine.upper.module
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules()) == (activation == "silu")
    assert float(engine.lower.stationarity()[0]) <= 1e-11
    if optimizer == "hessian-free":
        assert int(engine.lower.inner.moves[0]) < 20  # it stopped early: the remaining steps were no-ops
    unrolled = unrolled_general(model, tasks, steps, "regression", lr, lam=lam)
    dense = implicit_maml(model, tasks, lr, steps, lam, "regression")
    assert relative_error(got, unrolled) < 1e-6
    assert relative_error(got, dense) < 1e-6


def test_an_inner_loop_stopped_early_is_flagged(make_config, tmp_path, capsys):
    """Two inner steps on a weak proximal term: far from stationary, and the run says so in
    its log, its records and results.json."""
    out = tmp_path / "short"
    code = main(["--task", "glyphs", "--algo", "imaml", "--ways", "3", "--shots", "1", "--query-shots", "2",
                 "--channels", "4", "--meta-batch-size", "2", "--meta-steps", "2", "--inner-steps", "2",
                 "--lam", "0.1", "--inner-tol", "1e-3", "--val-every", "1000", "--val-tasks", "2",
                 "--test-tasks", "4", "--log-every", "1", "--data-root", str(tmp_path / "data"),
                 "--output-dir", str(out),
                 # the whole network adapted by plain SGD, not the preset's convex head-only problem
                 "--lower-problem", "none", "--inner-optimizer", "sgd", "--inner-lr", "0.1"])
    assert code == 0
    said = capsys.readouterr()
    assert "stopped short of stationarity" in said.out + said.err
    assert "--inner-optimizer hessian-free" in said.out + said.err
    results = json.loads((out / "results.json").read_text())
    health = results["meta_gradient"]
    assert health["inner_converged"] == 0.0 and health["tasks"] == 4
    assert health["inner_stationarity_mean"] > 1e-3
    assert 0 <= results["test"]["inner_converged"] < 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/inner_stationarity", 0) > 1e-3 for r in records)


def test_inner_tol_ends_each_task_where_it_is_reached(make_config):
    """A loose tolerance stops tasks after a few steps; their φ then stays put and the rest of
    the loop costs no gradient."""
    engine = build_engine(make_config(task="sinusoid", algo="imaml", lam=5.0, inner_lr=0.05, inner_steps=60,
                                      meta_batch_size=1, execution="per-task", inner_tol=0.2), dtype=F64)
    engine_meta_gradient(engine)
    lower = engine.lower
    moves = int(lower.inner.moves[0])
    assert 0 < moves < 60
    assert float(lower.stationarity()[0]) <= 0.2
    curve = lower.inner_losses
    assert len(curve) == 60 and curve[moves:] == [curve[moves]] * (60 - moves)


def test_vectorized_objectives_are_the_per_task_terms(make_config):
    engine = build_engine(make_config(task="glyphs", algo="imaml", lam=2.0, meta_batch_size=3,
                                      execution="vectorized", inner_weight_decay=0.1), dtype=F64)
    engine_meta_gradient(engine)
    lower = engine.lower
    batch = lower.get_batch()
    values = lower.task_objectives(batch)
    assert values.shape == (3,)
    assert float(values.sum().detach()) == pytest.approx(float(lower.training_step(batch).detach()), rel=1e-12)


@pytest.mark.parametrize("flags,message", [
    (["--algo", "maml", "--inner-optimizer", "armijo"], "--inner-optimizer armijo: only for --algo imaml"),
    (["--algo", "fomaml", "--inner-tol", "0.1"], "--inner-tol 0.1: only for --algo imaml"),
    (["--algo", "imaml", "--inner-optimizer", "hessian-free", "--inner-momentum", "0.9"],
     "--inner-momentum 0.9: only with --inner-optimizer sgd"),
    (["--algo", "imaml", "--inner-tol", "1"], "--inner-tol 1.0: must be in [0, 1)"),
    (["--algo", "imaml", "--inner-cg-steps", "0"], "--inner-cg-steps"),
])
def test_inner_loop_options_are_refused_where_they_do_not_apply(flags, message):
    from imaml.app.arguments import parse_args

    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_args(flags).validate()
