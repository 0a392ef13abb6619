"""The contract between Lower problems and the implicit-gradient solvers (imaml/solvers/contract.py):
a minimal Lower problem of a user's, a plain object with the contract's members and nothing else,
gets the exact implicit meta-gradient from every solver, and the adapter touches nothing outside
the contract; a built Lower problem that lacks a member is refused in one line when the run is
built."""

import pytest
import torch

from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.solvers.contract import MEMBERS, ImplicitLowerProblem, missing_members
from imaml.solvers.registry import SOLVERS
from problems.lower import ImplicitLower

LAM = 2.0


class MinimalLower:
    """Logistic regression adapted under λ/2‖φ − θ‖²: g(φ, θ) = mean log(1 + exp(−y·Xφ)) + λ/2‖φ − θ‖²,
    one task, the contract's members only."""

    def __init__(self, theta: torch.Tensor, settings):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 5, generator=generator, dtype=torch.float64)
        self.y = torch.randn(12, generator=generator, dtype=torch.float64).sign()
        self.theta = theta
        self.phi = (theta.detach() + 0.3 * torch.randn(5, generator=generator, dtype=torch.float64)).requires_grad_()
        self.settings = settings
        self.num_tasks = 1
        self.task_meta_parameters = None
        self.hypergrad_infos = []
        self.final_gradient = None

    def trainable_parameters(self):
        return [self.phi]

    def inner_objective(self):
        loss = torch.nn.functional.softplus(-self.y * (self.x @ self.phi)).mean()
        return loss + 0.5 * LAM * (self.phi - self.theta).pow(2).sum()

    def record_final_gradient(self, grad_rows):
        self.final_gradient = grad_rows

    def proximal_diagonal(self):
        return None

    def solve_exactly(self, b):
        return None

    def dense_implicit(self, v: torch.Tensor) -> torch.Tensor:
        """−(∂²g/∂θ∂φ) A⁻¹ v = λ (H + λI)⁻¹ v, from the dense Hessian."""
        p = torch.sigmoid(-self.y * (self.x @ self.phi.detach()))
        hessian = (self.x.T * (p * (1 - p))) @ self.x / len(self.y) + LAM * torch.eye(5, dtype=torch.float64)
        return LAM * torch.linalg.solve(hessian, v)


class OnlyTheContract:
    """The Lower problem as the adapter sees it: reading or setting anything outside the contract fails."""

    def __init__(self, lower):
        object.__setattr__(self, "_lower", lower)

    def __getattr__(self, name):
        assert name in MEMBERS, f"the adapter read {name!r}, which the contract does not declare"
        return getattr(self._lower, name)

    def __setattr__(self, name, value):
        assert name in MEMBERS, f"the adapter set {name!r}, which the contract does not declare"
        setattr(self._lower, name, value)


class Theta:
    def __init__(self, theta):
        self.theta = theta

    def trainable_parameters(self):
        return [self.theta]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_meta_trains_a_lower_problem_that_has_just_the_contract(name):
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    settings = RunConfig(lam=LAM, cg_steps=40, cg_tol=1e-12, neumann_terms=400, darts_radius=1e-3)
    lower = MinimalLower(theta, settings)
    assert isinstance(lower, ImplicitLowerProblem) and not missing_members(lower)
    v = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (meta_gradient,) = SOLVERS[name]([v], OnlyTheContract(lower), Theta(theta))
    if name == "darts":  # A ≈ I: the cross term alone, −(∂²g/∂θ∂φ) v = λv for the proximal g
        expected = LAM * v
    else:
        expected = lower.dense_implicit(v)
        assert lower.final_gradient is not None and lower.final_gradient.shape == (1, 5)
    assert torch.allclose(meta_gradient, expected, rtol=1e-6, atol=1e-9), (name, meta_gradient, expected)
    assert len(lower.hypergrad_infos) == 1 and lower.hypergrad_infos[0].norm == pytest.approx(float(expected.norm()),
                                                                                               rel=1e-6)


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_the_built_in_lower_problems_meet_the_contract(make_config, adapt):
    from engines import build_engine

    from tests.reference import engine_meta_gradient

    engine = build_engine(make_config(task="glyphs", algo="imaml", adapt=adapt, head_init="zero"))
    lower = engine.lower
    assert not missing_members(lower) and isinstance(lower, ImplicitLowerProblem)
    engine_meta_gradient(engine)  # one inner loop: φ and the features exist
    n = sum(p[0].numel() if adapt == "head" else p.numel() for p in lower.trainable_parameters())
    closed = lower.solve_exactly(torch.ones(lower.num_tasks, n))
    assert (closed is not None) == (adapt == "head")  # the head's system has a closed form


def test_a_lower_problem_without_a_contract_member_is_refused_when_the_run_is_built(make_config):
    from engines import build_engine

    class NoClosedFormHook(ImplicitLower):
        solve_exactly = None  # stands in for a member a user's class lacks

    NoClosedFormHook.__getattribute__ = _hide("solve_exactly")
    with pytest.raises(UsageError, match=r"lacks solve_exactly of the contract .*imaml/solvers/contract.py") as err:
        build_engine(make_config(algo="imaml"), lower_cls=NoClosedFormHook)
    assert "\n" not in str(err.value)


def _hide(member: str):
    def get(self, name):
        if name == member:
            raise AttributeError(name)
        return object.__getattribute__(self, name)
    return get


class UsersLower(ImplicitLower):
    """A user's Lower problem as docs/extending.md has one write it: the contract's members in its
    own plain code (g from the module's parameters and θ, one task at a time; no closed form, one
    λ), the built-in class supplying only Betty's plumbing and the engine's per-task numbers."""

    def inner_objective(self):
        x, y = self.env.support
        loss = torch.nn.functional.mse_loss(self.module(x), y)
        theta = self.meta_problem.initial_parameters()
        return loss + 0.5 * self.settings.lam * sum((p - t).pow(2).sum() for p, t in zip(self.module.parameters(), theta))

    def task_objectives(self, batch):
        return self.inner_objective().reshape(1)

    def record_final_gradient(self, grad_rows):
        self.final_rows = grad_rows

    def proximal_diagonal(self):
        return None

    def solve_exactly(self, b):
        return None


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_meta_trains_a_users_lower_problem_through_the_engine(make_config, name):
    """Built by the engine from ``lower_cls=``, the user's class gets the dense implicit
    meta-gradient from every solver (darts: its A ≈ I approximation, so only its direction), and
    a whole meta-training run of it moves θ and records a solve per task."""
    from engines import build_engine
    from imaml.models import MLP
    from tests.reference import engine_meta_gradient, implicit_general, relative_error

    lam = 20.0  # A = H + λI positive definite here, as CG and Neumann need
    settings = dict(task="sinusoid", algo="imaml", hypergrad=name, lam=lam, inner_lr=0.02, inner_steps=20,
                    meta_batch_size=2, execution="per-task", cg_steps=200, cg_tol=1e-12, neumann_terms=2000,
                    cg_trust_region=False, inner_optimizer="sgd", inner_tol=1e-14)  # all 20 steps, as the reference
    torch.manual_seed(0)
    engine = build_engine(make_config(**settings), dtype=torch.float64, model=MLP(1, 1, hidden=(8,)),
                          lower_cls=UsersLower)
    assert type(engine.lower) is UsersLower
    got, tasks = engine_meta_gradient(engine)
    expected = implicit_general(engine.upper.module, tasks, 0.02, 20, lam, "regression")
    if name == "darts":
        cosine = torch.nn.functional.cosine_similarity(torch.cat([g.reshape(-1) for g in got]),
                                                       torch.cat([e.reshape(-1) for e in expected]), dim=0)
        assert cosine > 0.5
    else:
        assert relative_error(got, expected) < 1e-6
        assert engine.lower.final_rows.shape[0] == 1  # ∇g(φ_K) of the one task, handed over by the solve
    assert len(engine.lower.hypergrad_infos) == 1
    before = [p.detach().clone() for p in engine.upper.module.parameters()]
    engine.train()
    for _ in range(2):
        engine.train_step()
    after = list(engine.upper.module.parameters())
    assert all(torch.isfinite(p).all() for p in after) and relative_error(after, before) > 0
