"""The hypergradient solvers against a dense reference, and against betty-ml 0.1.1's defects.

The lower problem is a tiny logistic regression (13 parameters, float64) coupled to θ both
proximally and through a nonlinear term, with features scaled so that its Hessian has a
condition number of about 100. Inputs are fresh random draws on every run.
"""

from types import SimpleNamespace

import pytest
import torch

from imaml.solvers import (SOLVERS, conjugate_gradient, damped_cg, dense_solve, install, minres, neumann_series,
                           normal_cg)
from betty.configs import Config

from imaml.config import RunConfig

F64 = torch.float64


class _Lower:
    """Just what a Betty jvp function touches on the lower problem: Betty's own solvers
    (``training_step_exec``, ``cur_batch``, ``paths``, their settings in ``config``) and ours
    (imaml/solvers/contract.py: the run's settings in ``settings``)."""

    num_tasks = 1
    task_meta_parameters = None

    def __init__(self, phi, theta, x, y, lam, settings):
        self.phi, self.theta, self.x, self.y, self.lam = phi, theta, x, y, lam
        self.settings = settings
        self.config = Config()
        self.cur_batch = (x, y)
        self.paths = []  # betty-ml's own cg asserts on it
        self.hypergrad_infos = []

    def trainable_parameters(self):
        return [self.phi]

    parameters = trainable_parameters

    def inner_objective(self):
        return self.training_step_exec(self.cur_batch)

    def record_final_gradient(self, grad_rows):
        pass

    def proximal_diagonal(self):
        return None

    def solve_exactly(self, b):
        return None

    def training_step_exec(self, batch):
        x, y = batch
        logits = x @ self.phi[:-1] + self.phi[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        # a convex-in-φ coupling that makes ∂²g/∂θ∂φ depend on φ (nonlinearly, so that finite
        # differences are not exact)
        coupling = (self.phi.pow(4) * torch.sigmoid(self.theta)).sum()
        return loss + 0.5 * self.lam * (self.phi - self.theta).pow(2).sum() + 0.025 * coupling


def _problem(seed=None, lam=0.05, **settings):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    scales = torch.logspace(0, 1, 12, dtype=F64)  # feature scales 1..10 -> ill-conditioned Hessian
    x = torch.randn(64, 12, generator=gen, dtype=F64) * scales
    y = (torch.rand(64, generator=gen, dtype=F64) < 0.5).to(F64)
    theta = torch.randn(13, generator=gen, dtype=F64).requires_grad_()
    phi = (theta.detach() + 0.1 * torch.randn(13, generator=gen, dtype=F64)).requires_grad_()
    # the trust radius ‖v‖/λ assumes a purely proximal coupling; this objective has more
    settings.setdefault("cg_trust_region", False)
    lower = _Lower(phi, theta, x, y, lam, RunConfig(**settings))
    upper = SimpleNamespace(trainable_parameters=lambda: [theta])
    v = [torch.randn(13, generator=gen, dtype=F64)]
    return lower, upper, v


def _exact(lower, v, damping=0.0):
    """−(∂²g/∂θ∂φ)ᵀ A⁻¹ v with A and the cross derivative formed densely (A + μI with a damping μ)."""
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
    eye = torch.eye(len(phi), dtype=F64)
    return -cross.T @ torch.linalg.solve(a + damping * eye, v[0]), torch.linalg.cond(a).item()


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
        lower.settings = RunConfig(cg_steps=steps, cg_tol=1e-14, cg_trust_region=False)
        got = SOLVERS["cg"](v, lower, upper)[0]
        errors.append(_rel(got, exact))
    assert errors[-1] <= 1e-6
    assert errors[3] <= 1e-2  # 13 steps solve a 13-dimensional system, up to lost orthogonality
    assert all(later <= earlier * 1.5 for earlier, later in zip(errors, errors[1:])), errors
    assert lower.hypergrad_infos[0].converged


def test_betty_cg_is_defective_and_ours_is_registered_beside_it():
    """betty-ml 0.1.1's CG (direction updated with the old residual) diverges on this problem;
    after registration, our key 'imaml_cg' dispatches to the corrected solver and Betty's own
    'cg' and 'darts' stay Betty's (issue 19: the table as Betty ships it)."""
    from betty import hypergradient
    from betty.hypergradient.cg import cg as betty_cg

    lower, upper, v = _problem()
    exact, _ = _exact(lower, v)
    lower.config = Config(cg_iterations=50)  # Betty's cg reads its own settings
    lower.settings = RunConfig(cg_steps=50, cg_tol=1e-14, cg_trust_region=False)
    assert _rel(betty_cg(v, lower, upper)[0], exact) > 0.1
    install()
    assert hypergradient.jvp_fn_mapping["imaml_cg"] is SOLVERS["cg"]
    assert hypergradient.jvp_fn_mapping["imaml_darts"] is SOLVERS["darts"]
    assert hypergradient.jvp_fn_mapping["cg"] is betty_cg
    assert _rel(hypergradient.jvp_fn_mapping["imaml_cg"](v, lower, upper)[0], exact) < 1e-6


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
        lower.settings = RunConfig(neumann_terms=terms)
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
    lower, upper, v = _problem(darts_radius=1e-3)
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

    lower, upper, v = _problem()
    lower.config = Config(darts_alpha=0.01)  # Betty's darts reads its own settings
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


# ----------------------------------------------------------------------------- indefinite systems


def _symmetric(eigs, seed):
    """Q diag(eigs) Qᵀ for a random orthogonal Q, and a random right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    eigs = torch.as_tensor(eigs, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=F64))
    a = q @ torch.diag(eigs) @ q.T
    return 0.5 * (a + a.T), torch.randn(len(eigs), generator=gen, dtype=F64)


SPECTRA = {  # 30 eigenvalues each; condition numbers 10³–10⁴
    "indefinite": torch.cat([-torch.logspace(-1, 1, 10), torch.logspace(-1.5, 1.5, 20)]).tolist(),
    "ill-conditioned": torch.logspace(-3, 1, 30).tolist(),
    "indefinite, ill-conditioned": torch.cat([-torch.logspace(-2, 1, 10), torch.logspace(-2.5, 1.5, 20)]).tolist(),
}


def _fresh():
    return torch.seed() % 2**31


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("solve", [minres, normal_cg], ids=["minres", "normal_cg"])
def test_indefinite_solvers_match_the_dense_solve(solve, spectrum):
    a, b = _symmetric(SPECTRA[spectrum], _fresh())
    x, info = solve(lambda u: a @ u, b, max_steps=5000, tol=1e-10)
    assert _rel(x, torch.linalg.solve(a, b)) <= 1e-8
    # the recurrences stop at tol; the residual measured at the end is within rounding of it
    assert info.converged and info.residual <= 2e-10
    assert info.residual == pytest.approx(((a @ x - b).norm() / b.norm()).item(), rel=1e-9)
    if spectrum.startswith("indefinite"):  # where CG is the wrong method
        _, cg_info = conjugate_gradient(lambda u: a @ u, b, max_steps=5000, tol=1e-10)
        assert not cg_info.converged and cg_info.boundary


def test_minres_residual_never_grows_and_never_exceeds_one():
    a, b = _symmetric(SPECTRA["indefinite"], _fresh())
    residuals = [minres(lambda u: a @ u, b, max_steps=k, tol=0.0)[1].residual for k in range(13)]
    assert residuals[0] == 1.0  # x₀ = 0
    assert all(later <= earlier * (1 + 1e-10) for earlier, later in zip(residuals, residuals[1:])), residuals
    assert residuals[-1] < 0.99 * residuals[0]  # and it does make progress


def test_normal_cg_costs_two_products_a_step_and_minres_does_as_well_with_them():
    """k normal-CG steps search K_k(A², Ab) ⊂ K_2k(A, b), MINRES's space after as many products."""
    a, b = _symmetric(SPECTRA["indefinite"], _fresh())
    calls = []

    def counted(u):
        calls.append(1)
        return a @ u

    for k in range(1, 6):
        calls.clear()
        _, info = normal_cg(counted, b, max_steps=k, tol=0.0)
        assert info.iterations == k and len(calls) <= 2 * k + 2  # one to start, one to measure
        assert minres(lambda u: a @ u, b, max_steps=2 * k, tol=0.0)[1].residual <= info.residual * (1 + 1e-9)


def test_damped_cg_solves_the_damped_system_and_reports_the_undamped_residual():
    a, b = _symmetric(SPECTRA["indefinite"], _fresh())  # λ_min(A) = −10
    mu = 12.0
    x, info = damped_cg(lambda u: a @ u, b, max_steps=500, tol=1e-11, damping=mu)
    eye = torch.eye(len(b), dtype=F64)
    assert _rel(x, torch.linalg.solve(a + mu * eye, b)) <= 1e-8
    assert info.converged and not info.boundary and info.damped_residual <= 1e-11
    # the residual against A itself, the bias the damping brings: A x − b = −μx at the damped solution
    assert info.residual == pytest.approx(((a @ x - b).norm() / b.norm()).item(), rel=1e-9)
    assert info.residual == pytest.approx(mu * x.norm().item() / b.norm().item(), rel=1e-6)
    assert info.residual > 0.1
    # μ = 0 is plain CG
    spd, c = _symmetric(SPECTRA["ill-conditioned"], _fresh())
    x0, info0 = damped_cg(lambda u: spd @ u, c, max_steps=500, tol=1e-10, damping=0.0)
    x_cg, _ = conjugate_gradient(lambda u: spd @ u, c, max_steps=500, tol=1e-10)
    assert torch.equal(x0, x_cg) and info0.residual == info0.damped_residual
    with pytest.raises(ValueError, match="damping"):
        damped_cg(lambda u: a @ u, b, max_steps=5, tol=1e-10, damping=-1.0)


def _batch(tasks=5, n=12):
    """T symmetric systems (alternately indefinite, differently conditioned), one with b = 0."""
    mats, rhs = [], []
    for t in range(tasks):
        eigs = torch.logspace(-1, 1 + 0.3 * t, n)
        if t % 2:
            eigs[:3] = -eigs[:3]
        a, b = _symmetric(eigs.tolist(), _fresh())
        mats.append(a)
        rhs.append(b * 10.0 ** (t - 2))
    b = torch.stack(rhs)
    b[2] = 0.0
    return torch.stack(mats), b


DAMPING = torch.tensor([0.0, 8.0, 3.0, 15.0, 0.5], dtype=F64)  # one per system; makes the indefinite ones definite
BATCHED = {  # solve(matvec, b, steps, tol, t): t picks system t's damping (all of them for the batch)
    "minres": lambda mv, b, steps, tol, t=slice(None): minres(mv, b, steps, tol),
    "normal_cg": lambda mv, b, steps, tol, t=slice(None): normal_cg(mv, b, steps, tol),
    "damped_cg": lambda mv, b, steps, tol, t=slice(None): damped_cg(mv, b, steps, tol, damping=DAMPING[t]),
}


@pytest.mark.parametrize("steps,tol", [(4, 1e-10), (400, 1e-10), (400, 1e-4)])
@pytest.mark.parametrize("name", BATCHED)
def test_batched_indefinite_solvers_equal_separate_solves(name, steps, tol):
    a, b = _batch()
    solve = BATCHED[name]
    x, infos = solve(lambda u: (a @ u.unsqueeze(-1)).squeeze(-1), b, steps, tol)
    for t in range(len(b)):
        # the same product kernel as the batch's, so that only the solver's own bookkeeping
        # could tell the two apart (Lanczos amplifies a kernel's different rounding)
        alone, info = solve(lambda u: (a[t:t + 1] @ u.reshape(1, -1, 1)).reshape(-1), b[t], steps, tol, t)
        assert (x[t] - alone).norm() <= 1e-12 * alone.norm()
        assert (infos[t].solver, infos[t].iterations, infos[t].converged) == (info.solver, info.iterations, info.converged)
        assert infos[t].residual == pytest.approx(info.residual, rel=1e-9, abs=1e-15)
    assert infos[2].iterations == 0 and infos[2].residual == 0.0 and infos[2].converged and not x[2].any()
    if steps > 4:  # each system stops when it is done, not when the last one is
        assert len({i.iterations for i, rhs in zip(infos, b) if rhs.any()}) > 1
        assert all(i.converged for i in infos)


@pytest.mark.parametrize("name", ["minres", "normal-cg", "cg-damped"])
def test_indefinite_solvers_give_the_dense_implicit_gradient_through_betty(name):
    from betty import hypergradient

    lower, upper, v = _problem()
    lower.settings = RunConfig(cg_steps=3000, cg_tol=1e-11, cg_trust_region=False)
    exact, _ = _exact(lower, v)
    got = SOLVERS[name](v, lower, upper)[0]
    assert _rel(got, exact) < 1e-8
    assert lower.hypergrad_infos[0].solver == name and lower.hypergrad_infos[0].converged
    install()
    assert hypergradient.jvp_fn_mapping[f"imaml_{name}"] is SOLVERS[name]


def test_cg_damped_reads_the_damping_from_the_run_settings():
    lower, upper, v = _problem()
    lower.settings = RunConfig(cg_steps=3000, cg_tol=1e-11, cg_trust_region=False, cg_damping=0.5)  # --cg-damping 0.5
    damped, _ = _exact(lower, v, damping=0.5)
    undamped, _ = _exact(lower, v)
    got = SOLVERS["cg-damped"](v, lower, upper)[0]
    assert _rel(got, damped) < 1e-8 and _rel(got, undamped) > 1e-3
    info = lower.hypergrad_infos[0]
    assert info.converged and info.damped_residual <= 1e-11 and info.residual > 1e-3  # the bias, in the logs


def test_singular_systems_stop_at_a_least_squares_solution():
    """b outside A's range: no solution; MINRES stops at the least-squares residual rather than
    growing x along the null space, and normal-CG reaches the minimum-norm least-squares x."""
    gen = torch.Generator().manual_seed(_fresh())
    eigs = torch.cat([-torch.logspace(-1, 1, 6), torch.zeros(2), torch.logspace(-1, 1, 12)]).to(F64)
    a = torch.diag(eigs[torch.randperm(20, generator=gen)])  # exact zeros: exactly singular
    b = torch.randn(20, generator=gen, dtype=F64)
    least_squares = torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution[:, 0]
    best = ((a @ least_squares - b).norm() / b.norm()).item()
    _, info = minres(lambda u: a @ u, b, max_steps=500, tol=1e-6)
    assert info.residual == pytest.approx(best, rel=1e-6) and not info.converged and info.iterations < 500
    x, info = normal_cg(lambda u: a @ u, b, max_steps=500, tol=1e-10)
    assert _rel(x, least_squares) <= 1e-8 and info.residual == pytest.approx(best, rel=1e-8) and not info.converged
