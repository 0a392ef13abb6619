"""The training records: what each inner loop's tasks leave for the logs, per task.

After every inner loop of meta-training the engine hands ``TaskRecords.add`` the Lower problem;
every entry is per task ([T] of them: the inner-loop curve, the solver's ``SolveInfo``, the
inner stationarity), whether the loop adapted one task or a whole meta-batch. At each log step
``record`` drains them (gathered from all processes) into one log record.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict

import torch

from engines import distributed
from imaml import betty_glue
from imaml.config import RunConfig
from imaml.health import MetaGradientHealth
from envs.omniglot import OneShotRuns
from imaml.metrics import mean_ci95, metric_name

__all__ = ["TaskRecords", "mean_curve", "summarize_evaluation"]


class TaskRecords:
    """Per-task records of meta-training since the last log, and the run's meta-gradient health."""

    def __init__(self, config: RunConfig, say: Callable[[str], None] = lambda line: None):
        self.config = config
        self.say = say
        self.health = MetaGradientHealth(config.inner_tol, config.cg_tol)
        self.curves: list = []  # the inner objective at each step, per task
        self.solves: list = []  # the hypergradient solver's SolveInfo, per task
        self.stationarity: list = []  # ‖∇g(φ_K)‖/‖∇g(θ)‖, per iMAML task

    def add(self, lower, upper) -> None:
        """The tasks of the inner loop ``lower`` just ran. Betty hands the solver ∇φ of the query
        loss divided by the tasks averaged into the meta-update, so each solve's hypergradient
        norm is scaled back by that count here, where it is known."""
        tasks = lower.num_tasks
        averaged = betty_glue.tasks_per_meta_update(upper) * tasks
        self.curves.extend([lower.inner_losses] * tasks)
        self.solves.extend(dataclasses.replace(i, norm=averaged * i.norm) for i in lower.hypergrad_infos)
        measured = lower.stationarity()
        if measured is not None:
            self.stationarity.extend(measured.tolist())

    def drain(self, upper) -> tuple:
        """(query stats [tasks, 2], inner curves, solver infos, stationarity) of every task since
        the last log, from all processes."""
        mine = (upper.drain_task_stats().cpu(), self.curves, self.solves, self.stationarity)
        self.curves, self.solves, self.stationarity = [], [], []
        parts = distributed.gather_objects(mine)
        return (torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]],
                [i for p in parts for i in p[2]], [s for p in parts for s in p[3]])

    def record(self, upper, kind: str, meta_lr: float, step: int) -> Dict[str, float]:
        """The log record of the tasks since the last log (warnings said once per run)."""
        stats, curves, solves, stationarity = self.drain(upper)
        record = {"train/query_loss": stats[:, 0].mean().item(),
                  f"train/query_{metric_name(kind)}": stats[:, 1].mean().item()}
        if upper.meta_grad_norm is not None:
            record["train/meta_grad_norm"] = float(upper.meta_grad_norm)
        record["train/meta_lr"] = meta_lr
        for k, value in enumerate(mean_curve(curves), start=1):
            record[f"inner/objective_step_{k:02d}"] = value
        record.update(self.health.window(stationarity, solves))
        for line in self.health.warnings(stationarity, solves, step, self.config):
            self.say(line)
        return record


def mean_curve(curves: list) -> list:
    """Mean over tasks of the inner objective at each inner step."""
    return [sum(values) / len(values) for values in zip(*curves)] if curves else []


def summarize_evaluation(tasks: list, kind: str, inner_tol: float, source) -> dict:
    """An evaluation's result from its tasks' (index, score, inner curve, probe, stationarity):
    the mean and 95% CI of the scores, the mean inner curve, for iMAML how close each inner loop
    came to a stationary point, and for Lake's runs the error rate of each run."""
    values, curves = [t[1] for t in tasks], [t[2] for t in tasks]
    mean, ci95 = mean_ci95(values)
    result = {"metric": metric_name(kind), "mean": mean, "ci95": ci95, "num_tasks": len(values),
              "inner_curve": mean_curve(curves), "scores": values}  # per task, in task order: paired comparisons
    measured = [t[4] for t in tasks if math.isfinite(t[4])]
    if measured:
        result.update(inner_stationarity_mean=sum(measured) / len(measured),
                      inner_converged=sum(v <= inner_tol for v in measured) / len(measured))
    if isinstance(source, OneShotRuns):
        result.update(source.report(values))
    return result
