"""The custom Betty Engine: meta-training, periodic meta-validation and the final meta-test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from betty.configs import EngineConfig
from betty.engine import Engine

from engines import distributed
from engines.divergence import DivergenceGuard, Diverged
from engines.progress import describe_result, peak_memory_mb, progress_bar
from engines.records import TaskRecords, summarize_evaluation
from engines.run_control import RunControl, engine_state, restore_engine_state
from imaml.config import RunConfig
from imaml.errors import RunStopped
from imaml.reporting import RunLog
from engines.test_time import MetaTestLevers
from envs.registry import omniglot_jitter

__all__ = ["MetaEngine"]


class MetaEngine(Engine):
    """Runs the bilevel problem ``upper`` (θ) over ``lower`` (task adaptation) on an Env.

    One meta-step = ``env.step()`` (a fresh meta-batch), then one inner loop per group of tasks
    the Lower problem adapts at once (``tasks_at_once``: one task, or the whole meta-batch):
    ``inner_steps`` Betty steps of the Lower problem, the last of which hands over to the Upper
    problem (Betty's unroll trigger), which accumulates the group's meta-gradient and updates θ
    once per meta-batch. Whether that meta-gradient is implicit (iMAML) or unrolled (MAML) is
    decided by the problem classes and configs the builder chose; the engine is the same for
    both, and everything it reads of the Lower problem is per task ([T]).

    Meta-validation and meta-test run the very same adaptation (``adapt``) with the problems in
    eval mode, where Betty never calls the Upper problem, so θ is never touched.

    The pieces beside the loop are objects of their own, built by the builder: the divergence
    guard (the Upper problem's ``divergence_guard``, which it asks before each meta-update;
    ``guard`` here), the training records (``records``) and checkpoints and stop signals
    (``control``).

    Under ``torchrun`` each process adapts its shard of every meta-batch and of the
    evaluation tasks (``engines.distributed``); meta-gradients, logged statistics, evaluation
    scores and stop decisions are combined across processes, so all processes apply the same
    meta-update and reach the same results. Only the main process gets a log and checkpoints.
    """

    def __init__(self, upper, lower, env, run_config: RunConfig, log: Optional[RunLog] = None,
                 control: Optional[RunControl] = None, records: Optional[TaskRecords] = None):
        self.run_config = run_config
        self.run_log = log
        dependencies = {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}
        config = EngineConfig(train_iters=run_config.meta_steps, valid_step=run_config.val_every)
        super().__init__(problems=[upper, lower], config=config, dependencies=dependencies, env=env)
        self.upper, self.lower = upper, lower  # Betty also sets them by name; roles are explicit here
        self.control = control or RunControl()
        self.guard: DivergenceGuard = upper.divergence_guard  # the Upper problem's, given by the builder
        self.records = records or TaskRecords(run_config)
        self.tasks_seen = 0
        self.train_seconds = 0.0
        self.before: Optional[dict] = None  # meta-test of θ₀
        self.best: Optional[dict] = None  # best meta-validation so far, with its step
        self.last_validation: Optional[dict] = None
        self.test_also: Optional[dict] = None  # the meta-test at --test-also-at seconds, with its step
        self.probed: List[dict] = []  # per-step support/query losses of the last evaluation's probed tasks
        self.meta_lr = run_config.meta_lr
        self.test_time = MetaTestLevers(run_config.test_augment, run_config.query_assignment, env.kind, run_config.seed,
                                        omniglot_jitter(run_config))
        if distributed.world_size() > 1:
            distributed.broadcast_module(self.upper.module)

    @property
    def vectorized(self) -> bool:
        """Whether the Lower problem adapts a whole meta-batch at once (its stacked mode)."""
        return self.lower.tasks_at_once is None

    # -------------------------------------------------------------------- the one adaptation routine
    def task_groups(self, tasks: range) -> List[range]:
        """``tasks`` of the current meta-batch in the groups the Lower problem adapts at once."""
        size = self.lower.tasks_at_once or len(tasks)
        return [tasks[i:i + size] for i in range(0, len(tasks), size)]

    def adapt(self, group: range, steps: int, probe: bool = False) -> Optional[List[dict]]:
        """Make the tasks ``group`` of the current meta-batch current and adapt to them (see
        ``inner_loop``): in training, the group's last step hands over to the Upper problem."""
        if self.lower.tasks_at_once is None:
            self.env.select_all()  # the whole meta-batch, stacked
        else:
            self.env.select(group[0])
        self.guard.adapting(group[0])
        return self.inner_loop(steps, probe)

    def inner_loop(self, steps: int, probe: bool = False) -> Optional[List[dict]]:
        """Adapt to the Env's current task(s): reset to θ, then ``steps`` Lower steps.

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
        task, lower = self.env.current, self.lower
        with torch.no_grad():
            return tuple(lower.task_losses(lower.predict(x), y).tolist()
                         for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)))

    # -------------------------------------------------------------------- meta-training
    def train_step(self) -> None:
        batch = self.env.step()
        self.guard.start_meta_batch(self.upper, self.global_step)
        groups = self.task_groups(distributed.shard(batch.num_tasks))  # all, unless sharded across processes
        for position, group in enumerate(groups):
            self.adapt(group, self.run_config.inner_steps)  # the last group's ends in the meta-update
            self.lower.finish_task()
            if position < len(groups) - 1:  # the last is checked before the meta-update, by the guard
                self.guard.check(self.lower, self.upper)
            self.records.add(self.lower, self.upper)
        self.tasks_seen += batch.num_tasks
        distributed.average_buffers(self.upper.module)  # running statistics, from every process's tasks
        self.meta_lr = self.upper.optimizer.param_groups[0]["lr"]  # the rate this step used
        if self.upper.lr_schedule is not None:
            self.upper.lr_schedule.step()

    def _train_record(self) -> Dict[str, float]:
        return self.records.record(self.upper, self.env.kind, self.meta_lr, self.global_step)

    # -------------------------------------------------------------------- evaluation
    def evaluate(self, split: str, num_tasks: int, probe: bool = False) -> Dict[str, float]:
        """Adapt to ``num_tasks`` fixed tasks of ``split`` and score the query sets.

        Returns the mean and 95% CI over tasks of query accuracy (classification) or MSE.
        Sharded across processes, the scores are gathered in task order, so the numbers are
        those of one process. With ``probe``, the tasks of the first batch (one meta-batch)
        also record their per-step support and query losses, left in ``self.probed``."""
        self.eval()
        try:
            mine = self._evaluate_tasks(split, num_tasks, probe)
        finally:
            self.train()
        tasks = sorted((t for part in distributed.gather_objects(mine) for t in part), key=lambda t: t[0])
        self.probed = [t[3] for t in tasks if t[3] is not None]
        return summarize_evaluation(tasks, self.env.kind, self.run_config.inner_tol, self.env.sources[split])

    def _evaluate_tasks(self, split: str, num_tasks: int, probe: bool) -> list:
        """(index, score, inner curve, probe or None, stationarity) of this process's tasks."""
        indices, scores, curves, probes, stationarity = [], [], [], [], []
        bar = progress_bar(len(distributed.shard(num_tasks)), f"meta-test ({split})", unit="task")
        try:
            start = 0
            for batch in self.env.episodes(split, num_tasks):
                self.env.load(self.test_time.support(batch, split, start))
                for group in self.task_groups(distributed.shard(batch.num_tasks, start)):
                    measured = self.adapt(group, self.run_config.test_inner_steps, probe=probe and start == 0)
                    tasks = self.lower.num_tasks
                    probes.extend(measured or [None] * tasks)
                    curves.extend([self.lower.inner_losses] * tasks)
                    measured = self.lower.stationarity()
                    stationarity.extend(measured.tolist() if measured is not None else [])
                    query = self.env.current
                    with torch.no_grad():
                        output = self.test_time.predict(self.lower.predict, query.query_x, split,
                                                        [start + index for index in group])
                        scores.extend(self.lower.task_scores(output, query.query_y).unbind())
                    indices.extend(start + index for index in group)
                    bar.update(tasks)
                start += batch.num_tasks
                self._stop_if_signalled()  # once per batch: the same number of times in every process
        finally:
            bar.close()
        stationarity = stationarity or [float("nan")] * len(indices)  # nan: not measured (MAML)
        return list(zip(indices, torch.stack(scores).tolist() if scores else [], curves, probes, stationarity))

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
    def state_dict(self, step: Optional[int] = None) -> dict:
        """Everything a resumed run needs to continue exactly as an uninterrupted one (``step``:
        the meta-step to record, if not the current one); ``engines.run_control.engine_state``."""
        return engine_state(self, step)

    def load_state_dict(self, state: dict) -> None:
        restore_engine_state(self, state)

    def save(self, name: str, step: Optional[int] = None) -> Optional[Path]:
        return self.control.save(name, self.state_dict(step))

    def _better(self, validation: Dict[str, float]) -> bool:
        if self.best is None:
            return True
        if validation["metric"] == "accuracy":
            return validation["mean"] > self.best["mean"]
        return validation["mean"] < self.best["mean"]

    def _stop_if_signalled(self) -> None:
        """After a SIGTERM/SIGINT (to any process of a job): save the checkpoint, then stop
        with a clear message."""
        self.control.stop_if_signalled(lambda: self.save("latest"), self.global_step, self.run_config.output_dir)

    # -------------------------------------------------------------------- the whole run
    def run(self) -> Dict[str, object]:
        """Meta-test θ₀, meta-train (from the last saved step, if resumed), meta-test θ;
        return the numbers for results.json. Checkpoints: ``latest`` at every validation and
        at the end, ``best`` whenever meta-validation improves."""
        with self.control.watching():
            return self._run()

    def _run(self) -> Dict[str, object]:
        cfg = self.run_config
        say = self.run_log.say if self.run_log else (lambda line: None)
        started = time.perf_counter()
        if self.before is None:
            say(f"meta-test before meta-training on {cfg.test_tasks} tasks ...")
            self.before = self.evaluate("test", cfg.test_tasks)
            say(f"before meta-training: {describe_result(self.before)}")
            self.evaluate("val", min(cfg.meta_batch_size, cfg.val_tasks), probe=True)  # the grid's first row
            self._record_inner_curves(0)
        elif self.global_step:
            say(getattr(self, "start_note", None) or f"resuming after meta-step {self.global_step}")
        self.train()
        bar = progress_bar(cfg.meta_steps, "meta-training", unit="step", initial=self.global_step)
        try:
            if not self.budget_spent():  # else a resumed run whose budget was spent before it stopped
                for step in range(self.global_step + 1, cfg.meta_steps + 1):
                    if self._meta_step(step, bar):  # the last: --meta-steps, or the budget spent
                        break
        finally:
            bar.close()
        if self.budget_spent():
            say(f"time budget of {cfg.time_budget:g} s of meta-training spent after meta-step {self.global_step}")
        say(f"meta-test after meta-training on {cfg.test_tasks} tasks ...")
        test = self.evaluate("test", cfg.test_tasks)
        say(f"after meta-training: {describe_result(test)}")
        return {
            "test": test,
            "before_meta_training": self.before,
            "validation": self.last_validation,
            "best_validation": self.best,
            "meta_gradient": self.records.health.summary(),
            "train_seconds": self.train_seconds,
            "meta_steps_done": self.global_step,
            "time_budget": cfg.time_budget,
            "test_also_at": self.test_also,
            "tasks_per_second": self.tasks_seen / self.train_seconds if self.train_seconds else None,
            "total_seconds": time.perf_counter() - started,
        }

    def budget_spent(self) -> bool:
        """Whether ``--time-budget`` seconds of meta-training have run."""
        return self._ran(self.run_config.time_budget)

    def _ran(self, seconds: Optional[float]) -> bool:
        """Whether ``seconds`` of meta-training (``train_seconds``: the meta-steps alone, not
        validation or logging) have run, in any process of a job (they act on it together)."""
        return seconds is not None and bool(distributed.max_over_ranks(float(self.train_seconds >= seconds)))

    def _meta_step(self, step: int, bar) -> bool:
        """Meta-step ``step``, then its log record, validation and checkpoints as they fall due;
        True if it was the last (``--time-budget`` spent), which logs, validates and saves as the
        last of ``--meta-steps`` does."""
        cfg = self.run_config
        self.global_step = step
        tick = time.perf_counter()
        try:
            self.train_step()
        except Diverged as stop:  # θ was not updated: the last good state is the last step's
            where = self.save("latest", step=step - 1)
            raise RunStopped(f"{stop}" + (f". The last good state is in {where}" if where else ""), exit_code=3) from None
        self.train_seconds += time.perf_counter() - tick
        bar.update()
        bar.set_postfix(tasks_per_s=f"{self.tasks_seen / self.train_seconds:.1f}")
        if self.test_also is None and self._ran(cfg.test_also_at):  # θ as it stood at those seconds
            self.test_also = {"meta_steps_done": step, "train_seconds": self.train_seconds,
                              "test": self.evaluate("test", cfg.test_tasks)}
        last = step == cfg.meta_steps or self.budget_spent()
        record: Dict[str, float] = {}
        if step % cfg.log_every == 0 or last:
            record.update(self._train_record())
            record["train/tasks_per_second"] = self.tasks_seen / self.train_seconds
            record["sys/peak_memory_mb"] = peak_memory_mb(self.env.device)
            record["train/skipped_meta_batches"] = self.guard.skipped
        if step % cfg.val_every == 0 or last:
            self.last_validation = validation = self.validation()
            record.update({f"val/{validation['metric']}": validation["mean"],
                           f"val/{validation['metric']}_ci95": validation["ci95"]})
            self._record_inner_curves(step)
            if self._better(validation):
                self.best = {**validation, "step": step}
                self.save("best")
            self.save("latest")
        if record:  # the x-axis of accuracy against compute (--time-budget's seconds)
            record["sys/meta_training_seconds"] = self.train_seconds
        if record and self.run_log:
            self.run_log.log(step, record)  # one record per step, train and validation together
        self._stop_if_signalled()
        return last
