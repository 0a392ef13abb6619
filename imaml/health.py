"""Evidence for each implicit meta-gradient: was the inner solution stationary, did the solve converge?

The implicit function theorem gives iMAML's meta-gradient only at a stationary point φ* of the
proximal objective g, and the linear solve only approximates A⁻¹∇φL_query. ``MetaGradientHealth``
turns what the Lower problem and the solver report per task into the logged window statistics
(``train/inner_*``, ``train/solver_*``), a one-time warning that names the fix, and the run's
totals in ``results.json`` (``meta_gradient``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

__all__ = ["MetaGradientHealth"]


class MetaGradientHealth:
    """Per-window records and run totals of inner stationarity and linear-solve residuals."""

    def __init__(self, inner_tol: float, cg_tol: float):
        self.inner_tol, self.cg_tol = inner_tol, cg_tol
        self.totals = {"tasks": 0, "stationary": 0, "stationarity_sum": 0.0, "stationarity_max": 0.0,
                       "solves": 0, "solves_converged": 0, "measured": 0, "residual_sum": 0.0, "residual_max": 0.0}
        self.warned: set = set()

    def window(self, stationarity: Sequence[float], solves: Sequence) -> Dict[str, float]:
        """The log record of the tasks since the last log; adds them to the run's totals."""
        record: Dict[str, float] = {}
        t = self.totals
        finite = [s for s in stationarity if math.isfinite(s)]
        if finite:
            reached = sum(s <= self.inner_tol for s in finite)
            record["train/inner_stationarity"] = sum(finite) / len(finite)
            record["train/inner_stationarity_max"] = max(finite)
            record["train/inner_converged"] = reached / len(finite)
            t["tasks"] += len(finite)
            t["stationary"] += reached
            t["stationarity_sum"] += sum(finite)
            t["stationarity_max"] = max(t["stationarity_max"], max(finite))
        if solves:
            residuals = [i.residual for i in solves if math.isfinite(i.residual)]
            record["train/hypergrad_norm"] = sum(i.norm for i in solves) / len(solves)
            record["train/solver_iterations"] = sum(i.iterations for i in solves) / len(solves)
            record["train/solver_converged"] = sum(i.converged for i in solves) / len(solves)
            record["train/solver_truncated"] = sum(i.boundary for i in solves) / len(solves)
            t["solves"] += len(solves)
            t["solves_converged"] += sum(i.converged for i in solves)
            if residuals:
                record["train/solver_residual"] = sum(residuals) / len(residuals)
                record["train/solver_residual_max"] = max(residuals)
                t["measured"] += len(residuals)
                t["residual_sum"] += sum(residuals)
                t["residual_max"] = max(t["residual_max"], max(residuals))
        return record

    def warnings(self, stationarity: Sequence[float], solves: Sequence, step: int, config) -> List[str]:
        """Each kind of warning once per run: the inner loop short of stationarity, the solve
        above tolerance."""
        out = []
        far = [s for s in stationarity if not s <= self.inner_tol]
        if far and "inner" not in self.warned:
            self.warned.add("inner")
            fix = ("--inner-optimizer hessian-free or armijo, more --inner-steps" if config.inner_optimizer == "sgd"
                   else "more --inner-steps or --inner-cg-steps")
            out.append(f"warning: the inner loop stopped short of stationarity on {len(far)}/{len(stationarity)} "
                       f"tasks by step {step} (worst ‖∇g(φ)‖/‖∇g(θ)‖ {max(far):.3g}, --inner-tol {self.inner_tol:g}); "
                       f"the implicit meta-gradient assumes a minimizer of the inner objective. {fix}, or a larger "
                       f"--lam get there. Logged as train/inner_stationarity from now on.")
        bad = [i for i in solves if not i.converged]
        if bad and "solve" not in self.warned:
            self.warned.add("solve")
            out.append(f"warning: the {bad[0].solver} hypergradient solve ended above tolerance on {len(bad)}/"
                       f"{len(solves)} tasks by step {step} (worst relative residual "
                       f"{max(i.residual for i in bad):.3g}, tolerance {self.cg_tol:g}); the meta-gradient is "
                       f"approximate. More --cg-steps, a converged inner loop (train/inner_stationarity) or a larger "
                       f"--lam make it more exact. Logged as train/solver_residual from now on.")
        return out

    def summary(self) -> Optional[dict]:
        """The run's totals for results.json (None when nothing was recorded: MAML)."""
        t = self.totals
        if not t["tasks"] and not t["solves"]:
            return None
        out: dict = {"inner_tol": self.inner_tol, "tasks": t["tasks"]}
        if t["tasks"]:
            out.update(inner_converged=t["stationary"] / t["tasks"],
                       inner_stationarity_mean=t["stationarity_sum"] / t["tasks"],
                       inner_stationarity_max=t["stationarity_max"])
        if t["solves"]:
            out.update(solves=t["solves"], solver_tol=self.cg_tol, solver_converged=t["solves_converged"] / t["solves"])
        if t["measured"]:
            out.update(solver_residual_mean=t["residual_sum"] / t["measured"], solver_residual_max=t["residual_max"])
        return out

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals), "warned": sorted(self.warned)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.totals.update(state["totals"])
            self.warned = set(state["warned"])
