"""The custom Betty Engine: meta-training, periodic meta-validation and the final meta-test."""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from betty.engine import Engine
from betty.configs import EngineConfig
from tqdm import tqdm

from engines import distributed
from envs.omniglot import OneShotRuns
from imaml import checkpoint
from imaml.config import RunConfig
from imaml.errors import RunStopped
from imaml.health import MetaGradientHealth
from imaml.metrics import global_norm, mean_ci95, metric_name, task_loss, task_losses, task_score, task_scores
from imaml.reporting import RunLog

__all__ = ["MetaEngine"]


class MetaEngine(Engine):
    """Runs the bilevel problem ``upper`` (θ) over ``lower`` (task adaptation) on an Env.

    One meta-step = ``env.step()`` (a fresh meta-batch), then for each task the inner loop:
    ``inner_steps`` Betty steps of the Lower problem, the last of which hands over to the
    Upper problem (Betty's unroll trigger), which accumulates the task's meta-gradient and
    updates θ once per meta-batch. Whether that meta-gradient is implicit (iMAML) or
    unrolled (MAML) is decided by the problem classes and configs the builder chose; the
    engine is the same for both.

    Meta-validation and meta-test run the very same inner loop (``inner_loop``) with the
    problems in eval mode, where Betty never calls the Upper problem, so θ is never touched.

    Under ``torchrun`` each process adapts its shard of every meta-batch and of the
    evaluation tasks (``engines.distributed``); meta-gradients, logged statistics, evaluation
    scores and stop decisions are combined across processes, so all processes apply the same
    meta-update and reach the same results. Only the main process gets a log and checkpoints.
    """

    def __init__(self, upper, lower, env, run_config: RunConfig, log: Optional[RunLog] = None,
                 checkpoint_dir: Optional[Path] = None):
        self.run_config = run_config
        self.run_log = log
        dependencies = {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}
        config = EngineConfig(train_iters=run_config.meta_steps, valid_step=run_config.val_every)
        super().__init__(problems=[upper, lower], config=config, dependencies=dependencies, env=env)
        self.upper, self.lower = upper, lower  # Betty also sets them by name; roles are explicit here
        self.tasks_seen = 0
        self.solves: list = []  # the hypergradient solver's SolveInfo for each task since the last log
        self.stationarity: list = []  # ‖∇g(φ_K)‖/‖∇g(θ)‖ of each iMAML training task since the last log
        self.health = MetaGradientHealth(run_config.inner_tol, run_config.cg_tol)
        self.train_seconds = 0.0
        self.before: Optional[dict] = None  # meta-test of θ₀
        self.best: Optional[dict] = None  # best meta-validation so far, with its step
        self.last_validation: Optional[dict] = None
        self.inner_curves: list = []  # the inner objective at each step, per training task since the last log
        self.probed: List[dict] = []  # per-step support/query losses of the last evaluation's probed tasks
        self.skipped = 0  # meta-batches skipped by the divergence guard
        self.meta_lr = run_config.meta_lr
        self._batch_problem: Optional[tuple] = None  # (task index, what diverged) in this meta-batch
        self._task_index = 0
        self._theta_norm = 1.0
        self._signal: Optional[int] = None
        self.upper.update_guard = self._guard_update
        self.checkpoint_dir = checkpoint_dir  # None: no checkpoints (library use, tests)
        if distributed.world_size() > 1:
            distributed.broadcast_module(self.upper.module)
            share = self.upper.gas / run_config.meta_batch_size  # this process's tasks per meta-batch
            self.upper.gradient_sync = functools.partial(distributed.all_reduce_gradients, scale=share)

    @property
    def vectorized(self) -> bool:
        """Whether the Lower problem adapts a whole meta-batch at once (problems.vectorized)."""
        return getattr(self.lower, "vectorized", False)

    # -------------------------------------------------------------------- the shared inner loop
    def inner_loop(self, steps: int, probe: bool = False) -> Optional[List[dict]]:
        """Adapt to the Env's current task: reset to θ, then ``steps`` Lower steps.

        With ``probe`` (evaluation only) also measure, at φ₀, φ₁, …, φ_steps, each current
        task's support and query loss: one ``{"support": [...], "query": [...]}`` per task,
        the cells of plots/inner_loop_grid.png. The measurements are no-grad forward passes in
        eval mode, so they change nothing the evaluation computes."""
        self.lower.begin_task()
        if not probe:
            for _ in range(steps):
                self.lower.step(global_step=self.global_step)
            return None
        self.lower.on_inner_loop_start()  # φ₀ now, to measure it; the first step sets it again, alike
        measured = [self._current_losses()]
        for _ in range(steps):
            self.lower.step(global_step=self.global_step)
            measured.append(self._current_losses())
        return [{"support": [m[0][t] for m in measured], "query": [m[1][t] for m in measured]}
                for t in range(len(measured[0][0]))]

    def _current_losses(self) -> tuple:
        """(support losses, query losses) of the current task(s) at the current φ, one per task."""
        task, kind = self.env.current, self.env.kind
        with torch.no_grad():
            if self.vectorized:
                return tuple(task_losses(kind, self.lower.predict(x), y).tolist()
                             for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)))
            return tuple([task_loss(kind, self.lower.predict(x), y).item()]
                         for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)))

    # -------------------------------------------------------------------- meta-training
    def train_step(self) -> None:
        batch = self.env.step()
        self._batch_problem = None
        self._theta_norm = max(float(global_norm(self.upper.trainable_parameters())), 1e-12)
        if self.vectorized:  # the whole meta-batch in one inner loop, ending in the meta-update
            self.env.select_all()
            self._task_index = 0
            self.inner_loop(self.run_config.inner_steps)
            self.lower.finish_task()
            self.inner_curves.extend([self.lower.inner_losses] * batch.num_tasks)
            self.solves.extend(getattr(self.lower, "hypergrad_infos", []))
            self.stationarity.extend(self._stationarity())
        else:
            self._adapt_tasks(distributed.shard(batch.num_tasks))  # all, unless sharded across processes
        self.tasks_seen += batch.num_tasks
        distributed.average_buffers(self.upper.module)  # running statistics, from every process's tasks
        self.meta_lr = self.upper.optimizer.param_groups[0]["lr"]  # the rate this step used
        if self.upper.lr_schedule is not None:
            self.upper.lr_schedule.step()

    def _adapt_tasks(self, mine: range) -> None:
        """Adapt to tasks ``mine`` of the meta-batch one at a time; the last one's inner loop
        ends in the meta-update (Betty's gradient accumulation)."""
        for position, index in enumerate(mine):
            self.env.select(index)
            self._task_index = index
            self.inner_loop(self.run_config.inner_steps)
            self.lower.finish_task()
            if position < len(mine) - 1:
                self._note_problem(self._check_task())
            self.inner_curves.append(self.lower.inner_losses)
            self.stationarity.extend(self._stationarity())
            self.solves.extend(getattr(self.lower, "hypergrad_infos", []))

    def _stationarity(self) -> list:
        """The inner loop's stationarity per task just adapted (iMAML's Lower problems measure it)."""
        measure = getattr(self.lower, "stationarity", None)
        return measure().tolist() if measure else []

    def _drain_task_records(self) -> tuple:
        """(query stats [tasks, 2], inner curves, solver infos, stationarity) of every task since
        the last log, from all processes; hypergradient norms per task (Betty hands the solver
        ∇φ(L_query / tasks this process runs), so undo that here, where the count is known)."""
        per_loss = self.run_config.meta_batch_size if self.vectorized else self.upper.gas  # tasks in the mean
        solves = [dataclasses.replace(i, norm=per_loss * i.norm) for i in self.solves]
        mine = (self.upper.drain_task_stats().cpu(), self.inner_curves, solves, self.stationarity)
        self.inner_curves, self.solves, self.stationarity = [], [], []
        parts = distributed.gather_objects(mine)
        return (torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]],
                [i for p in parts for i in p[2]], [s for p in parts for s in p[3]])

    def _train_record(self) -> Dict[str, float]:
        stats, curves, solves, stationarity = self._drain_task_records()
        kind = self.env.kind
        record = {"train/query_loss": stats[:, 0].mean().item(),
                  f"train/query_{metric_name(kind)}": stats[:, 1].mean().item()}
        if self.upper.meta_grad_norm is not None:
            record["train/meta_grad_norm"] = float(self.upper.meta_grad_norm)
        record["train/meta_lr"] = self.meta_lr
        for k, value in enumerate(_mean_curve(curves), start=1):
            record[f"inner/objective_step_{k:02d}"] = value
        record.update(self.health.window(stationarity, solves))
        for line in self.health.warnings(stationarity, solves, self.global_step, self.run_config):
            if self.run_log:
                self.run_log.say(line)
        return record

    # -------------------------------------------------------------------- divergence guard
    def _check_task(self) -> Optional[str]:
        """What, if anything, diverged while adapting to the task(s) just adapted (when a
        whole meta-batch was adapted at once, ``_task_index`` is moved to the first such task)."""
        losses = self.lower.inner_losses
        if not all(math.isfinite(v) for v in losses):
            return f"the inner-loop loss became {next(v for v in losses if not math.isfinite(v))}"
        ratios = self.lower.adapted_norms() / self._theta_norm
        over = ~(ratios <= self.run_config.divergence_factor)  # NaN counts as over
        if bool(over.any()):
            first = int(over.nonzero()[0])
            self._task_index += first
            return f"the adapted weights grew to {float(ratios[first]):.3g}× the norm of θ"
        for stats in self.upper.task_stats[-self.lower.num_tasks:]:
            if not torch.isfinite(stats[0]):
                return f"the query loss is {stats[0].item()}"
        return None

    def _note_problem(self, problem: Optional[str]) -> None:
        if problem and self._batch_problem is None:
            self._batch_problem = (self._task_index, problem)

    def _guard_update(self, meta_grad_norm) -> bool:
        """Called by the Upper problem before each meta-update: False skips it."""
        self._note_problem(self._check_task())  # the meta-batch's last task, adapted just now
        if meta_grad_norm is not None and not math.isfinite(float(meta_grad_norm)):
            self._note_problem("the meta-gradient is not finite")
        if distributed.max_over_ranks(self._batch_problem is not None):  # every process decides alike
            self._batch_problem = min(p for p in distributed.gather_objects(self._batch_problem) if p)
        if self._batch_problem is None:
            return True
        index, problem = self._batch_problem
        cfg = self.run_config
        message = (f"diverged at meta-step {self.global_step}, task {index} of the meta-batch: {problem}. "
                   f"Likely cause: an inner learning rate too large for this model (--inner-lr {cfg.inner_lr})"
                   + (f" or a proximal term too weak to hold the inner loop (--lam {cfg.lam})" if cfg.algo == "imaml" else "")
                   + "; lower it, or pass --on-divergence skip")
        if cfg.on_divergence == "skip":
            self.skipped += 1
            if self.run_log:
                self.run_log.say(f"warning: {message} (meta-batch skipped)")
            return False
        where = self._save_good_state()
        raise RunStopped(message + (f". The last good state is in {where}" if where else ""), exit_code=3)

    def _save_good_state(self) -> Optional[Path]:
        """Checkpoint θ as it was before this meta-step (it has not been updated)."""
        if self.checkpoint_dir is None:
            return None
        step, self.global_step = self.global_step, self.global_step - 1
        try:
            self.save("latest")
        finally:
            self.global_step = step
        return self.checkpoint_dir / "latest.pt"

    # -------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt  # a second signal: stop at once
        self._signal = signum

    def _stop_if_signalled(self) -> None:
        """After a SIGTERM/SIGINT (to any process of a job): save the checkpoint, then stop
        with a clear message."""
        signum = int(distributed.max_over_ranks(self._signal or 0))
        if not signum:
            return
        self.save("latest")
        name = signal.Signals(signum).name
        where = (f"; checkpoint {self.checkpoint_dir / 'latest.pt'}, continue with --resume "
                 f"{self.run_config.output_dir}") if self.checkpoint_dir else ""
        raise RunStopped(f"{name} after meta-step {self.global_step}{where}", exit_code=128 + signum)

    # -------------------------------------------------------------------- evaluation
    def evaluate(self, split: str, num_tasks: int, probe: bool = False) -> Dict[str, float]:
        """Adapt to ``num_tasks`` fixed tasks of ``split`` and score the query sets.

        Returns the mean and 95% CI over tasks of query accuracy (classification) or MSE.
        Sharded across processes, the scores are gathered in task order, so the numbers are
        those of one process. With ``probe``, the tasks of the first batch (one meta-batch)
        also record their per-step support and query losses, left in ``self.probed``."""
        kind = self.env.kind
        indices, scores, curves, probes, stationarity = [], [], [], [], []
        self.eval()
        bar = _progress(len(distributed.shard(num_tasks)), f"meta-test ({split})", unit="task")
        try:
            start = 0
            for batch in self.env.episodes(split, num_tasks):
                self.env.load(batch)
                watch = probe and start == 0
                if self.vectorized:  # all tasks of the batch at once (one process: never sharded)
                    task = self.env.select_all()
                    measured = self.inner_loop(self.run_config.test_inner_steps, probe=watch)
                    probes.extend(measured or [None] * batch.num_tasks)
                    curves.extend([self.lower.inner_losses] * batch.num_tasks)
                    stationarity.extend(self._stationarity())
                    with torch.no_grad():
                        scores.extend(task_scores(kind, self.lower.predict(task.query_x), task.query_y).unbind())
                    indices.extend(range(start, start + batch.num_tasks))
                    bar.update(batch.num_tasks)
                for index in ([] if self.vectorized else distributed.shard(batch.num_tasks, start)):
                    task = self.env.select(index)
                    measured = self.inner_loop(self.run_config.test_inner_steps, probe=watch)
                    probes.append(measured[0] if measured else None)
                    curves.append(self.lower.inner_losses)
                    stationarity.extend(self._stationarity())
                    with torch.no_grad():
                        scores.append(task_score(kind, self.lower.predict(task.query_x), task.query_y))
                    indices.append(start + index)
                    bar.update()
                start += batch.num_tasks
                self._stop_if_signalled()  # once per batch: the same number of times in every process
        finally:
            bar.close()
            self.train()
        stationarity = stationarity or [float("nan")] * len(indices)  # nan: not measured (MAML)
        mine = list(zip(indices, torch.stack(scores).tolist() if scores else [], curves, probes, stationarity))
        tasks = sorted((t for part in distributed.gather_objects(mine) for t in part), key=lambda t: t[0])
        values, curves = [t[1] for t in tasks], [t[2] for t in tasks]
        self.probed = [t[3] for t in tasks if t[3] is not None]
        mean, ci95 = mean_ci95(values)
        result = {"metric": metric_name(kind), "mean": mean, "ci95": ci95, "num_tasks": len(values),
                  "inner_curve": _mean_curve(curves)}
        measured = [t[4] for t in tasks if math.isfinite(t[4])]
        if measured:  # iMAML: how close each task's inner loop came to a stationary point
            result.update(inner_stationarity_mean=sum(measured) / len(measured),
                          inner_converged=sum(v <= self.run_config.inner_tol for v in measured) / len(measured))
        source = self.env.sources[split]
        if isinstance(source, OneShotRuns):  # Lake's runs: the error rate of each run
            result.update(source.report(values))
        return result

    def validation(self) -> Dict[str, float]:
        """Betty's validation hook: meta-validation on the fixed validation tasks (the first
        meta-batch of them probed for the inner-loop grid)."""
        return self.evaluate("val", self.run_config.val_tasks, probe=True)

    def _record_inner_curves(self, step: int) -> None:
        """One row of plots/inner_loop_grid.png: the probed validation tasks' curves at ``step``
        (the same fixed tasks in every row), in <output-dir>/inner_curves.jsonl."""
        if self.run_log is not None and self.probed:
            self.run_log.log_curves(step, {"split": "val", "inner_steps": self.run_config.test_inner_steps,
                                           "tasks": self.probed})

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly as an uninterrupted one."""
        return {
            "step": self.global_step,
            "config": self.run_config.to_dict(),
            "upper": self.upper.state_dict(),
            "env": self.env.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "tasks_seen": self.tasks_seen,
            "train_seconds": self.train_seconds,
            "before_meta_training": self.before,
            "best_validation": self.best,
            "validation": self.last_validation,
            "skipped_meta_batches": self.skipped,
            "meta_gradient_health": self.health.state_dict(),
            "lr_schedule": self.upper.lr_schedule.state_dict() if self.upper.lr_schedule else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["step"]
        self.upper.load_state_dict(state["upper"])
        self.env.load_state_dict(state["env"])
        torch.set_rng_state(state["torch_rng"])
        self.tasks_seen = state["tasks_seen"]
        self.train_seconds = state["train_seconds"]
        self.before = state["before_meta_training"]
        self.best = state["best_validation"]
        self.last_validation = state["validation"]
        self.skipped = state.get("skipped_meta_batches", 0)
        self.health.load_state_dict(state.get("meta_gradient_health"))
        if self.upper.lr_schedule is not None and state.get("lr_schedule"):
            self.upper.lr_schedule.load_state_dict(state["lr_schedule"])

    def save(self, name: str) -> None:
        if self.checkpoint_dir is not None:
            checkpoint.save(self.checkpoint_dir / f"{name}.pt", self.state_dict())

    def _better(self, validation: Dict[str, float]) -> bool:
        if self.best is None:
            return True
        if validation["metric"] == "accuracy":
            return validation["mean"] > self.best["mean"]
        return validation["mean"] < self.best["mean"]

    # -------------------------------------------------------------------- the whole run
    def run(self) -> Dict[str, object]:
        """Meta-test θ₀, meta-train (from the last saved step, if resumed), meta-test θ;
        return the numbers for results.json. Checkpoints: ``latest`` at every validation and
        at the end, ``best`` whenever meta-validation improves."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _run(self) -> Dict[str, object]:
        cfg, log = self.run_config, self.run_log
        say = log.say if log else (lambda line: None)
        started = time.perf_counter()
        if self.before is None:
            say(f"meta-test before meta-training on {cfg.test_tasks} tasks ...")
            self.before = self.evaluate("test", cfg.test_tasks)
            say(f"before meta-training: {_fmt(self.before)}")
            self.evaluate("val", min(cfg.meta_batch_size, cfg.val_tasks), probe=True)  # the grid's first row
            self._record_inner_curves(0)
        elif self.global_step:
            say(f"resuming after meta-step {self.global_step}")

        self.train()
        bar = _progress(cfg.meta_steps, "meta-training", unit="step", initial=self.global_step)
        try:
            for step in range(self.global_step + 1, cfg.meta_steps + 1):
                self.global_step = step
                tick = time.perf_counter()
                self.train_step()
                self.train_seconds += time.perf_counter() - tick
                bar.update()
                bar.set_postfix(tasks_per_s=f"{self.tasks_seen / self.train_seconds:.1f}")
                record: Dict[str, float] = {}
                if step % cfg.log_every == 0 or step == cfg.meta_steps:
                    record.update(self._train_record())
                    record["train/tasks_per_second"] = self.tasks_seen / self.train_seconds
                    record["sys/peak_memory_mb"] = peak_memory_mb(self.env.device)
                    record["train/skipped_meta_batches"] = self.skipped
                if step % cfg.val_every == 0 or step == cfg.meta_steps:
                    self.last_validation = validation = self.validation()
                    record.update({f"val/{validation['metric']}": validation["mean"],
                                   f"val/{validation['metric']}_ci95": validation["ci95"]})
                    self._record_inner_curves(step)
                    if self._better(validation):
                        self.best = {**validation, "step": step}
                        self.save("best")
                    self.save("latest")
                if record and log:
                    log.log(step, record)  # one record per step, train and validation together
                self._stop_if_signalled()
        finally:
            bar.close()

        say(f"meta-test after meta-training on {cfg.test_tasks} tasks ...")
        test = self.evaluate("test", cfg.test_tasks)
        say(f"after meta-training: {_fmt(test)}")
        return {
            "test": test,
            "before_meta_training": self.before,
            "validation": self.last_validation,
            "best_validation": self.best,
            "meta_gradient": self.health.summary(),
            "train_seconds": self.train_seconds,
            "tasks_per_second": self.tasks_seen / self.train_seconds if self.train_seconds else None,
            "total_seconds": time.perf_counter() - started,
        }


def _mean_curve(curves: list) -> list:
    """Mean over tasks of the inner objective at each inner step."""
    return [sum(values) / len(values) for values in zip(*curves)] if curves else []


def _progress(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar with tasks/s and ETA on a terminal; silent when stdout is not one."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not sys.stdout.isatty() or not distributed.is_main())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fmt(result: Dict[str, float]) -> str:
    scale, unit = (100.0, "%") if result["metric"] == "accuracy" else (1.0, "")
    error = f"; error rate {result['error_rate'] * 100:.2f}% over the runs" if "error_rate" in result else ""
    return (f"{result['metric']} {result['mean'] * scale:.2f}{unit} "
            f"± {result['ci95'] * scale:.2f}{unit} (95% CI, {result['num_tasks']} tasks){error}")
