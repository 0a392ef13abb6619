"""The hypergradient solvers against a dense reference, and against betty-ml 0.1.1's defects.

The lower problem is a tiny logistic regression (13 parameters, float64) coupled to θ both
proximally and through a nonlinear term, with features scaled so that its Hessian has a
condition number of about 100. Inputs are fresh random draws on every run.
"""

from types import SimpleNamespace

import pytest
import torch

from imaml.hypergrad import (SOLVERS, conjugate_gradient, dense_solve, neumann_series,
                             register_with_betty)
from problems import LowerConfig

F64 = torch.float64


class _Lower:
    """Just what a Betty jvp function touches on the lower problem."""

    def __init__(self, phi, theta, x, y, lam, config):
        self.phi, self.theta, self.x, self.y, self.lam = phi, theta, x, y, lam
        self.config = config
        self.cur_batch = (x, y)
        self.paths = []  # betty-ml's own cg asserts on it

    def trainable_parameters(self):
        return [self.phi]

    parameters = trainable_parameters

    def training_step_exec(self, batch):
        x, y = batch
        logits = x @ self.phi[:-1] + self.phi[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        # a convex-in-φ coupling that makes ∂²g/∂θ∂φ depend on φ (nonlinearly, so that finite
        # differences are not exact)
        coupling = (self.phi.pow(4) * torch.sigmoid(self.theta)).sum()
        return loss + 0.5 * self.lam * (self.phi - self.theta).pow(2).sum() + 0.025 * coupling


def _problem(seed=None, lam=0.05, **config):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    scales = torch.logspace(0, 1, 12, dtype=F64)  # feature scales 1..10 -> ill-conditioned Hessian
    x = torch.randn(64, 12, generator=gen, dtype=F64) * scales
    y = (torch.rand(64, generator=gen, dtype=F64) < 0.5).to(F64)
    theta = torch.randn(13, generator=gen, dtype=F64).requires_grad_()
    phi = (theta.detach() + 0.1 * torch.randn(13, generator=gen, dtype=F64)).requires_grad_()
    # the trust radius ‖v‖/λ assumes a purely proximal coupling; this objective has more
    config.setdefault("cg_trust_region", False)
    lower = _Lower(phi, theta, x, y, lam, LowerConfig(**config))
    upper = SimpleNamespace(trainable_parameters=lambda: [theta])
    v = [torch.randn(13, generator=gen, dtype=F64)]
    return lower, upper, v


def _exact(lower, v):
    """−(∂²g/∂θ∂φ)ᵀ A⁻¹ v with A and the cross derivative formed densely."""
    phi, theta = lower.phi.detach(), lower.theta.detach()

    def g(p, t):
        saved = lower.phi, lower.theta
        lower.phi, lower.theta = p, t
        try:
            return lower.training_step_exec(lower.cur_batch)
        finally:
            lower.phi, lower.theta = saved

    a = torch.autograd.functional.hessian(lambda p: g(p, theta), phi)
    cross = torch.autograd.functional.jacobian(
        lambda t: torch.autograd.functional.jacobian(lambda p: g(p, t), phi, create_graph=True), theta)
    # cross[i, j] = ∂²g / ∂φ_i ∂θ_j
    return -cross.T @ torch.linalg.solve(a, v[0]), torch.linalg.cond(a).item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_problem_is_ill_conditioned():
    lower, _, v = _problem(seed=0)
    _, cond = _exact(lower, v)
    assert 30 < cond < 1000


def test_cg_converges_to_the_dense_solution_without_diverging():
    lower, upper, v = _problem()
    exact, _ = _exact(lower, v)
    errors = []
    for steps in (1, 5, 10, 13, 50):
        lower.config = LowerConfig(cg_iterations=steps, cg_tol=1e-14, cg_trust_region=False)
        got = SOLVERS["cg"](v, lower, upper)[0]
        errors.append(_rel(got, exact))
    assert errors[-1] <= 1e-6
    assert errors[3] <= 1e-2  # 13 steps solve a 13-dimensional system, up to lost orthogonality
    assert all(later <= earlier * 1.5 for earlier, later in zip(errors, errors[1:])), errors
    assert lower.hypergrad_info.converged


def test_betty_cg_is_defective_and_replaced():
    """betty-ml 0.1.1's CG (direction updated with the old residual) diverges on this problem;
    after registration, Betty's own name 'cg' dispatches to the corrected solver."""
    from betty import hypergradient
    from betty.hypergradient.cg import cg as betty_cg

    lower, upper, v = _problem()
    exact, _ = _exact(lower, v)
    lower.config = LowerConfig(cg_iterations=50, cg_tol=1e-14, cg_trust_region=False)
    assert _rel(betty_cg(v, lower, upper)[0], exact) > 0.1
    register_with_betty()
    assert hypergradient.jvp_fn_mapping["cg"] is SOLVERS["cg"]
    assert hypergradient.jvp_fn_mapping["darts"] is SOLVERS["darts"]
    assert _rel(hypergradient.jvp_fn_mapping["cg"](v, lower, upper)[0], exact) < 1e-6


def test_cg_core_on_random_spd_systems():
    gen = torch.Generator().manual_seed(torch.seed())
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(0, 2, 40, dtype=F64)) @ q.T
    b = torch.randn(40, generator=gen, dtype=F64)
    x, info = conjugate_gradient(lambda u: a @ u, b, max_steps=200, tol=1e-12)
    assert _rel(x, torch.linalg.solve(a, b)) < 1e-9 and info.converged
    x, info = conjugate_gradient(lambda u: a @ u, b, max_steps=3, tol=1e-12)
    assert not info.converged and info.iterations == 3 and info.residual > 1e-6


def test_cg_stops_on_negative_curvature_and_says_so():
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=F64))
    x, info = conjugate_gradient(lambda u: a @ u, torch.ones(3, dtype=F64), max_steps=10, tol=1e-10)
    assert not info.converged and torch.isfinite(x).all()


def test_neumann_converges_to_the_dense_solution():
    lower, upper, v = _problem(lam=2.0)  # a better-conditioned system: Neumann converges linearly
    exact, _ = _exact(lower, v)
    errors = []
    for terms in (2, 5, 10, 20, 400):
        lower.config = LowerConfig(neumann_iterations=terms)
        errors.append(_rel(SOLVERS["neumann"](v, lower, upper)[0], exact))
    assert all(later < earlier for earlier, later in zip(errors[:-1], errors[1:-1])), errors
    assert errors[-1] < 1e-6


def test_neumann_with_an_invalid_step_diverges_and_reports_it():
    a = torch.diag(torch.tensor([1.0, 10.0], dtype=F64))
    _, info = neumann_series(lambda u: a @ u, torch.ones(2, dtype=F64), terms=50, alpha=0.5)  # > 2/10
    assert not info.converged


def test_dense_solve_matches_linalg():
    gen = torch.Generator().manual_seed(torch.seed())
    m = torch.randn(6, 6, generator=gen, dtype=F64)
    a = m @ m.T + torch.eye(6, dtype=F64)
    b = torch.randn(6, generator=gen, dtype=F64)
    x, _ = dense_solve(lambda u: a @ u, b)
    assert _rel(x, torch.linalg.solve(a, b)) < 1e-12


def test_darts_matches_its_definition_and_restores_weights_bit_for_bit():
    lower, upper, v = _problem(darts_alpha=1e-3)
    before = lower.phi.detach().clone()
    got = SOLVERS["darts"](v, lower, upper)[0]
    assert torch.equal(lower.phi.detach(), before)
    # definition: −(∂²g/∂θ∂φ) v, i.e. the implicit gradient with A ≈ I
    grad_phi = torch.autograd.grad(lower.training_step_exec(lower.cur_batch), lower.phi, create_graph=True)[0]
    definition = -torch.autograd.grad(grad_phi, lower.theta, grad_outputs=v[0])[0]
    assert _rel(got, definition) < 1e-6  # central differences: O(ε²)
    for _ in range(3):
        SOLVERS["darts"](v, lower, upper)
    assert torch.equal(lower.phi.detach(), before)


def test_betty_darts_leaves_weights_shifted():
    """The defect the replacement fixes (betty-ml 0.1.1 restores with a non-in-place add)."""
    from betty.hypergradient.darts import darts as betty_darts

    lower, upper, v = _problem(darts_alpha=0.01)
    before = lower.phi.detach().clone()
    betty_darts(v, lower, upper)
    assert (lower.phi.detach() - before).norm().item() == pytest.approx(0.01, rel=1e-6)


def _shifted(h_eigs, lam, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(h_eigs), len(h_eigs), generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(h_eigs, dtype=F64) + lam) @ q.T, gen


def test_trust_region_never_binds_when_the_support_hessian_is_psd():
    lam = 0.5
    a, gen = _shifted(list(torch.logspace(-3, 2, 30).tolist()), lam)  # A = H + λI, H ⪰ 0
    b = torch.randn(30, generator=gen, dtype=F64)
    x, info = conjugate_gradient(lambda u: a @ u, b, max_steps=300, tol=1e-12, radius=b.norm().item() / lam)
    assert info.converged and not info.boundary
    assert _rel(x, torch.linalg.solve(a, b)) < 1e-9


def test_trust_region_bounds_the_solution_when_the_system_is_indefinite():
    lam = 0.5
    a, gen = _shifted([-3.0, -1.0] + torch.logspace(-2, 1, 18).tolist(), lam)
    b = torch.randn(20, generator=gen, dtype=F64)
    radius = b.norm().item() / lam
    x, info = conjugate_gradient(lambda u: a @ u, b, max_steps=100, tol=1e-12, radius=radius)
    assert info.boundary and not info.converged
    assert x.norm().item() == pytest.approx(radius, rel=1e-9)
    # negative curvature along b itself: the step goes straight to the boundary along b
    a1 = torch.diag(torch.tensor([-1.0, -2.0], dtype=F64))
    b1 = torch.tensor([1.0, 1.0], dtype=F64)
    x1, info1 = conjugate_gradient(lambda u: a1 @ u, b1, max_steps=5, tol=1e-12, radius=2.0)
    assert info1.boundary and torch.allclose(x1, 2.0 * b1 / b1.norm())
