"""The contract between Lower problems and the implicit-gradient solvers (imaml/solvers/contract.py):
a minimal Lower problem of a user's, a plain object with the contract's members and nothing else,
gets the exact implicit meta-gradient from every solver, and the adapter touches nothing outside
the contract; a built Lower problem that lacks a member is refused in one line when the run is
built."""

import pytest
import torch

from imaml.errors import UsageError
from imaml.solvers.contract import MEMBERS, ImplicitLowerProblem, missing_members
from imaml.solvers.registry import SOLVERS
from problems.lower import ImplicitLower, LowerConfig

LAM = 2.0


class MinimalLower:
    """Logistic regression adapted under λ/2‖φ − θ‖²: g(φ, θ) = mean log(1 + exp(−y·Xφ)) + λ/2‖φ − θ‖²,
    one task, the contract's members only."""

    def __init__(self, theta: torch.Tensor, config):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 5, generator=generator, dtype=torch.float64)
        self.y = torch.randn(12, generator=generator, dtype=torch.float64).sign()
        self.theta = theta
        self.phi = (theta.detach() + 0.3 * torch.randn(5, generator=generator, dtype=torch.float64)).requires_grad_()
        self.config = config
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
    config = LowerConfig(lam=LAM, cg_iterations=40, cg_tol=1e-12, neumann_iterations=400, darts_alpha=1e-3)
    lower = MinimalLower(theta, config)
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

    lower = build_engine(make_config(task="glyphs", algo="imaml", adapt=adapt, head_init="zero")).lower
    assert not missing_members(lower) and isinstance(lower, ImplicitLowerProblem)
    has_closed_form = type(lower).solve_exactly is not ImplicitLower.solve_exactly  # the head's system has one
    assert has_closed_form == (adapt == "head")


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
