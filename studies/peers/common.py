"""What the peer rows share: run.py's flags, its Env, model and tasks, its scoring and its results.json.

A peer runs another library's implementation of a method on exactly what ``run.py`` runs for the
same flags and seed, so ``studies.compare`` can score it task by task beside our rows:

- the flags are run.py's (``imaml.app.arguments``: same names, the same preset
  ``configs/<task>-<algo>.yaml`` for the peer's algorithm, flags over it), validated the same way;
- the task sources, the Env and θ₀ are built as ``engines.build.build_engine`` builds them
  (``torch.manual_seed(seed)`` right before the model), so the meta-training batches (the Env's
  train stream, one ``env.step()`` per meta-step) and the meta-validation and meta-test tasks
  (``env.episodes``: a fixed stream per split and seed) are run.py's very tasks, and the network
  starts from the same weights;
- each test task is scored as the engine scores it: ``imaml.metrics.task_score`` of the adapted
  model's query predictions (``imaml.models.predict_query``), summarized by the engine's own
  ``summarize_evaluation`` (per-task ``scores`` in task order: what the paired differences read);
- ``train_seconds`` times what run.py's does, each meta-step's task sampling, adaptation and
  meta-update, and nothing else (no evaluation); ``total_seconds`` runs from the meta-test before
  meta-training to the end of the final meta-test, as run.py's.

A peer is a class (``Peer``) built on a ``PeerSetup``: ``meta_gradient(batch)`` leaves the
meta-batch's mean meta-gradient in θ's ``.grad`` (the optimizer, clipping and schedule are run.py's,
applied here), and ``predict(task)`` adapts to a task's support set and predicts its queries.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from imaml.app.arguments import config_from_flags, parse_flags
from imaml.config import RunConfig, flag
from imaml.errors import UsageError

__all__ = ["Peer", "PeerSetup", "load_config", "build", "evaluate", "meta_train", "run", "main"]

# settings a run.py row reads that no peer does: how a meta-batch is computed, not what
NOT_READ = ("execution", "processes", "keep_freed_memory", "on_divergence", "divergence_factor")


@dataclass
class PeerSetup:
    """What a peer runs on: the validated config, run.py's Env (its tasks) and θ₀ (its network)."""

    config: RunConfig
    env: "FewShotEnv"  # noqa: F821 - envs is imported lazily, after the flags are known good
    model: nn.Module

    @property
    def kind(self) -> str:
        return self.env.kind


class Peer:
    """A peer method. Subclasses set the class attributes and implement the two methods.

    Attributes:
        library: the library and version it runs, e.g. ``"learn2learn 0.2.0"`` (results.json's ``peer``).
        algo: run.py's ``--algo`` it is compared with; its preset is the one the peer reads.
        not_read: settings of that algorithm the peer does not read (reported in results.json).
    """

    library: ClassVar[str]
    algo: ClassVar[str]
    not_read: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, setup: PeerSetup):
        self.setup = setup
        self.config = setup.config

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Raise a one-line UsageError for a setting this peer cannot honour."""

    def meta_gradient(self, batch) -> Tuple[float, float]:
        """Add the mean over ``batch``'s tasks of the meta-gradient to θ's ``.grad``; returns the
        mean query loss and score (for the log)."""
        raise NotImplementedError

    def predict(self, task) -> torch.Tensor:
        """Adapt to ``task``'s support set (``--test-inner-steps``) and predict its queries."""
        raise NotImplementedError

    def protocol(self) -> dict:
        """Entries of results.json's ``protocol`` that differ from run.py's for the same flags."""
        return {}


def load_config(argv: Optional[Sequence[str]], peer: type) -> RunConfig:
    """run.py's configuration for these flags, as ``--algo <peer.algo>`` (its preset included),
    or a one-line UsageError for what the peers do not run."""
    cli, preset = parse_flags(list(argv) if argv is not None else None)
    if cli.setdefault("algo", peer.algo) != peer.algo:
        raise UsageError(f"--algo {cli['algo']}: this peer runs {peer.library}'s {peer.algo}; drop the flag")
    config = config_from_flags(cli, preset)
    _check_common(config)
    peer.check(config)
    return config


def _check_common(config: RunConfig) -> None:
    refused = {
        "eval_only": config.eval_only, "resume": config.resume,  # a peer always meta-trains from θ₀
        "lower_problem": config.lower_problem, "upper_problem": config.upper_problem, "env": config.env,
        "adapt": config.adapt != "all", "head_init": config.head_init != "theta",
        "inner_momentum": config.inner_momentum, "inner_weight_decay": config.inner_weight_decay,
        "test_ways": config.test_ways not in (None, config.ways),
        "bn_mode": config.bn_mode == "inductive",  # running statistics carried from task to task
        "wandb_mode": config.wandb_mode != "disabled",
    }
    if config.model is not None and ":" in config.model:
        refused["model"] = True
    for name, value in refused.items():
        if value:
            raise UsageError(f"{flag(name)} {getattr(config, name)}: not run by the peer rows, which adapt the "
                             f"whole network from θ with plain SGD (see studies/peers/common.py)")


def build(config: RunConfig, dtype: torch.dtype = torch.float32) -> PeerSetup:
    """run.py's task sources, Env and θ₀ for ``config``, as ``engines.build.build_engine`` makes them."""
    from engines.build import resolve_device
    from envs import FewShotEnv, build_task_sources
    from imaml.models import build_model

    device = resolve_device(config.device)
    sources = build_task_sources(config)
    torch.manual_seed(config.seed)  # where build_engine seeds: θ₀ is the same tensor
    env = FewShotEnv(sources, config.meta_batch_size, config.seed, device, dtype)
    train = sources["train"]
    model = build_model(config.model, train.input_shape, train.num_outputs, config.channels, config.bn_mode,
                        config.activation).to(device, dtype)
    return PeerSetup(config, env, model)


def evaluate(peer: Peer, split: str, num_tasks: int) -> dict:
    """The engine's evaluation of ``split``'s fixed tasks: adapt to each, score its queries."""
    from engines.records import summarize_evaluation
    from imaml.metrics import task_score

    setup = peer.setup
    env, model = setup.env, setup.model
    scores = []
    model.eval()
    try:
        for batch in env.episodes(split, num_tasks):
            env.load(batch)
            for i in range(env.batch.num_tasks):
                task = env.select(i)
                output = peer.predict(task)
                scores.append(float(task_score(setup.kind, output.detach(), task.query_y)))
    finally:
        model.train()
    tasks = [(i, s, [], None, math.nan) for i, s in enumerate(scores)]
    return summarize_evaluation(tasks, setup.kind, setup.config.inner_tol, env.sources[split])


def meta_train(peer: Peer, log: Optional[Callable[[int, dict], None]] = None) -> dict:
    """``--meta-steps`` meta-updates of θ with run.py's meta-optimizer, clipping and schedule, each
    on the next meta-training batch of run.py's train stream, or fewer where ``--time-budget``
    seconds of meta-training run out first (as run.py stops: after the meta-step that crosses
    them); meta-validation every ``--val-every`` steps and at the end; θ also meta-tested once
    ``--test-also-at`` seconds have run, as run.py does. Returns the timings, validations (and that
    meta-test) for results.json."""
    from engines.build import build_lr_schedule, build_meta_optimizer
    from imaml.metrics import metric_name

    setup, config = peer.setup, peer.config
    params = list(setup.model.parameters())
    optimizer = build_meta_optimizer(config, params)
    schedule = build_lr_schedule(config, optimizer)
    out: Dict[str, object] = {"validation": None, "best_validation": None}
    train_seconds, tasks_seen, window = 0.0, 0, []
    setup.model.train()
    for step in range(1, config.meta_steps + 1):
        tick = time.perf_counter()
        batch = setup.env.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(peer.meta_gradient(batch))
        if config.meta_grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.meta_grad_clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        train_seconds += time.perf_counter() - tick
        tasks_seen += batch.num_tasks
        if "test_also_at" not in out and config.test_also_at is not None and train_seconds >= config.test_also_at:
            out["test_also_at"] = {"meta_steps_done": step, "train_seconds": train_seconds,  # θ as at those seconds
                                   "test": evaluate(peer, "test", config.test_tasks)}
        last = step == config.meta_steps or (config.time_budget is not None and train_seconds >= config.time_budget)
        record = {}
        if step % config.log_every == 0 or last:
            loss, score = (sum(v) / len(v) for v in zip(*window))
            window = []
            record.update({"train/query_loss": loss, f"train/query_{metric_name(setup.kind)}": score,
                           "train/tasks_per_second": tasks_seen / train_seconds})
        if step % config.val_every == 0 or last:
            validation = out["validation"] = evaluate(peer, "val", config.val_tasks)
            record[f"val/{validation['metric']}"] = validation["mean"]
            if _better(validation, out["best_validation"]):
                out["best_validation"] = {**validation, "step": step}
        if record:
            record["sys/meta_training_seconds"] = train_seconds  # accuracy against compute, as run.py's
        if record and log is not None:
            log(step, record)
        if last:
            break
    out.update(train_seconds=train_seconds, meta_steps_done=step, time_budget=config.time_budget,
               tasks_per_second=tasks_seen / train_seconds if train_seconds else None)
    return out


def _better(validation: dict, best: Optional[dict]) -> bool:
    """As the engine decides its best meta-validation: higher accuracy, or lower MSE."""
    if best is None:
        return True
    if validation["metric"] == "accuracy":
        return validation["mean"] > best["mean"]
    return validation["mean"] < best["mean"]


def run(argv: Optional[Sequence[str]], peer_class: type) -> dict:
    """Everything a peer script does: flags, build, meta-test θ₀, meta-train, meta-test, and
    ``<output-dir>/results.json`` with the fields ``studies.compare`` reads."""
    from engines.progress import describe_result, peak_memory_mb
    from imaml.app.results import run_protocol
    from imaml.reporting import RunLog, write_json
    from imaml.app.run_folder import begin_writing, choose_folder, drop_if_empty

    config, new = choose_folder(load_config(argv, peer_class))  # refused as run.py refuses: nothing written yet
    output_dir = Path(config.output_dir)
    try:
        setup = build(config)
    except BaseException:
        if new:
            drop_if_empty(output_dir)
        raise
    begin_writing(output_dir, continuing=False, new=new)
    log = RunLog(output_dir, total_steps=config.meta_steps, time_budget=config.time_budget)
    write_json(output_dir / "config.json", config.to_dict())
    peer = peer_class(setup)
    say = log.say
    say(f"{peer.library} {peer.algo} on {config.task} (run.py's tasks, θ₀ and flags; seed {config.seed})")
    started = time.perf_counter()
    before = evaluate(peer, "test", config.test_tasks)
    say(f"before meta-training: {describe_result(before)}")
    trained = meta_train(peer, log.log)
    test = evaluate(peer, "test", config.test_tasks)
    say(f"after meta-training: {describe_result(test)}")
    kind = setup.kind
    results = {
        "algo": config.algo, "peer": peer.library, "task": config.task,
        "ways": config.ways if kind == "classification" else None,
        "test_ways": (config.test_ways or config.ways) if kind == "classification" else None,
        "shots": config.shots, "query_shots": config.query_shots, "meta_steps": config.meta_steps,
        "seed": config.seed, "test": test, "before_meta_training": before, **trained,
        "total_seconds": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(setup.env.device),
        "protocol": {**run_protocol(config, kind, setup.env.describe()), **peer.protocol()},
        "splits": setup.env.describe(), "processes": 1,
        "not_read": sorted(set(NOT_READ) | set(peer.not_read)), "config": config.to_dict(),
    }
    write_json(output_dir / "results.json", results)
    say(f"wrote {output_dir / 'results.json'}")
    return results


def main(peer_class: type, argv: Optional[Sequence[str]] = None) -> int:
    """A peer script's entry point: run.py's exit codes for a bad flag (2) and an interrupt (130)."""
    try:
        run(argv, peer_class)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
