"""The solvers by name: ``--hypergrad NAME`` → the Lower config's ``type`` → Betty's dispatch.

Each built-in is ``implicit_gradient`` over a linear solver, reading its settings from the run's
``RunConfig`` (``cg_steps``, ``cg_tol``, ``lam``, ...; ``darts`` is its own Betty function). They are installed in Betty's table as ``imaml_<name>`` only: Betty's own ``cg``,
``neumann`` and ``darts`` (with betty-ml 0.1.1's defects: its CG updates the search direction
with the old residual; its ``cg_alpha`` scales the denominator but not the residual update; its
Neumann series has no step-size control; its DARTS leaves the weights shifted) stay as Betty
ships them. Importing this module changes nothing; ``install()`` does, when a Lower problem is
built.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from imaml import betty_glue
from imaml.config import RunConfig
from imaml.solvers.cg import conjugate_gradient
from imaml.solvers.damped import damped_cg
from imaml.solvers.darts import darts
from imaml.solvers.dense import dense_solve
from imaml.solvers.implicit import implicit_gradient
from imaml.solvers.minres import minres
from imaml.solvers.neumann import neumann_series
from imaml.solvers.normal_cg import normal_cg

__all__ = ["SOLVERS", "solver_key", "install", "register_solver", "trust_radius"]


def trust_radius(b: torch.Tensor, settings: RunConfig) -> Optional[torch.Tensor]:
    """‖b‖/λ for the proximal (iMAML) objective, where A = H + λI: the bound on ‖A⁻¹b‖ that
    holds whenever H ⪰ 0, i.e. whenever the inner solution is a minimizer of a locally convex
    support loss. Keeps the hypergradient λ·x no longer than ∇φ L_query when the system is
    indefinite. None (no bound) unless ``--cg-trust-region`` is on and λ > 0."""
    lams = [lam for lam in (settings.lam, settings.head_lam) if lam]
    if not settings.cg_trust_region or not lams:
        return None
    return b.norm(dim=-1) / min(lams)  # one radius per system; --head-lam: the weaker of the two bounds


def _cg(matvec, b, settings):
    return conjugate_gradient(matvec, b, settings.cg_steps, settings.cg_tol, radius=trust_radius(b, settings))


def _neumann(matvec, b, settings):
    return neumann_series(matvec, b, settings.neumann_terms, settings.neumann_alpha)


def _exact(matvec, b, settings):
    return dense_solve(matvec, b)


def _minres(matvec, b, settings):
    """MINRES for the indefinite A of an inner loop that stopped short of a minimizer."""
    return minres(matvec, b, settings.cg_steps, settings.cg_tol)


def _normal_cg(matvec, b, settings):
    """CG on A² x = A b: positive semi-definite whatever A is, at two products per step."""
    return normal_cg(matvec, b, settings.cg_steps, settings.cg_tol)


def _cg_damped(matvec, b, settings):
    """CG on (A + μI) x = v, μ = ``--cg-damping``, with the trust region as for ``cg``: ‖v‖/λ
    still bounds the damped solution when H ⪰ 0."""
    return damped_cg(matvec, b, settings.cg_steps, settings.cg_tol, settings.cg_damping,
                     radius=trust_radius(b, settings))


SOLVERS = {
    "cg": implicit_gradient(_cg),
    "neumann": implicit_gradient(_neumann),
    "darts": darts,
    "exact": implicit_gradient(_exact, structured=True),
    "minres": implicit_gradient(_minres),
    "normal-cg": implicit_gradient(_normal_cg),
    "cg-damped": implicit_gradient(_cg_damped),
}


def solver_key(name: str) -> str:
    """The Lower config's ``type`` (Betty's dispatch key) for the solver called ``name``."""
    return f"imaml_{name}"


def install() -> None:
    """Install the built-in solvers in Betty's dispatch table under our keys (idempotent)."""
    for name, fn in SOLVERS.items():
        betty_glue.install_solver(solver_key(name), fn)


def register_solver(name: str, solve: Callable) -> str:
    """Install a user's linear solver in Betty's dispatch table; return the key to put in the
    Lower problem's ``config.type``.

    ``solve(matvec, b, settings) -> (x, infos)`` approximates x = A⁻¹b for the Lower objective's
    Hessian A = ∂²g/∂φ², one row per task: b and x are [T, n] (T = 1 when tasks run one at a
    time), ``matvec(u)`` = A u on [T, n], ``infos`` a list of T ``SolveInfo``; ``settings`` is the
    run's ``imaml.config.RunConfig`` (``lam``, ``cg_steps``, ``cg_tol``, ...). The solvers
    of this package (``conjugate_gradient``, ``minres``, ...) take [T, n] as they are. The cross
    term and the bookkeeping are done here, as for the built-in solvers.
    """
    return betty_glue.install_solver(solver_key(name), implicit_gradient(solve))
