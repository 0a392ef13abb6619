"""Implicit hypergradients: linear solvers for x ≈ A⁻¹∇φ L_query and their Betty adapter.

One module per solver, as TorchOpt's ``linear_solve``: ``cg``, ``minres``, ``normal_cg``,
``damped`` (damped CG), ``neumann`` (with power iteration), ``dense`` (exact) and ``darts``
(finite differences); ``base`` holds ``SolveInfo`` and the per-system helpers, ``implicit`` the
adapter that turns a solver into a Betty hypergradient function (the implicit function
theorem's cross term included) and ``registry`` the names ``--hypergrad`` takes.

The linear solvers know nothing of Betty or of models, so they can be tested on plain dense
matrices (``tests/test_solvers.py``, ``tests/test_vectorized.py``).
"""

from imaml.solvers.base import MatVec, SolveInfo
from imaml.solvers.cg import conjugate_gradient
from imaml.solvers.damped import damped_cg
from imaml.solvers.darts import darts
from imaml.solvers.dense import EXACT_MAX_PARAMS, dense_solve
from imaml.solvers.implicit import implicit_gradient
from imaml.solvers.minres import minres
from imaml.solvers.neumann import largest_eigenvalue, neumann_series
from imaml.solvers.normal_cg import normal_cg
from imaml.solvers.registry import SOLVERS, install, register_solver, solver_key, trust_radius

__all__ = ["MatVec", "SolveInfo", "conjugate_gradient", "minres", "normal_cg", "damped_cg", "neumann_series",
           "largest_eigenvalue", "dense_solve", "EXACT_MAX_PARAMS", "darts", "implicit_gradient", "SOLVERS",
           "install", "register_solver", "solver_key", "trust_radius"]
