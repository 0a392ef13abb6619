"""Build a ready-to-run engine from a validated RunConfig: the one place that wires
Env, model, problems and engine together."""

from __future__ import annotations

import copy
import functools
import logging
import math
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch
from betty.logging.logger_base import get_logger as get_betty_logger

from envs import build_task_sources
from engines import distributed
from engines.extensions import Parts, adapts_head, choose_parts, make_model
from engines.divergence import DivergenceGuard, PretrainDivergenceGuard
from engines.pretrain import PretrainEngine, choose_pretrain_parts
from engines.protonet import ProtoNetEngine, choose_protonet_parts
from engines.meta_engine import MetaEngine
from engines.records import TaskRecords
from engines.run_control import RunControl
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.plugins import qualname
from imaml.reporting import RunLog
from imaml.solvers.contract import missing_members
from imaml.vectorize import why_not_vectorizable
from problems import LowerConfig, UpperConfig

__all__ = ["build_engine", "resolve_device", "use_vectorized", "choose_execution", "build_upper_config", "say_to"]


def resolve_device(name: str) -> torch.device:
    name = distributed.process_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


# Task-vectorized conv nets on CPU won only while one task's first-layer activations were
# small (docs/performance.md: 1.3x at 5-way 1-shot Omniglot, 1.5 M values per task; 0.5-0.7x
# at 20-way Omniglot and 5-way mini-ImageNet, 6-7 M): beyond that the meta-batch's
# activations leave the caches and grouped convolutions are slower than T separate ones.
CPU_VECTORIZE_MAX_ACTIVATIONS = 2_000_000


def use_vectorized(config: RunConfig, model: torch.nn.Module, device: torch.device, input_shape: tuple,
                   parts: Optional[Parts] = None) -> bool:
    """Whether to run each meta-batch task-vectorized: ``choose_execution``'s answer."""
    return choose_execution(config, model, device, input_shape, parts)[0]


def choose_execution(config: RunConfig, model: torch.nn.Module, device: torch.device, input_shape: tuple,
                     parts: Optional[Parts] = None) -> Tuple[bool, str]:
    """(whether to run each meta-batch task-vectorized, why), or a UsageError if ``--execution
    vectorized`` was asked for and this run cannot have it. ``auto`` vectorizes where the
    benchmarks found it faster: the head alone always (its encoder runs per task either way),
    on CUDA, for MLPs, and for conv nets on CPU while a task's first-layer activations stay below
    ``CPU_VECTORIZE_MAX_ACTIVATIONS``."""
    head = parts is not None and adapts_head(parts.lower, config)
    reason = None if head else why_not_vectorizable(model)  # the head alone: any encoder, run per task
    if reason is None and config.algo == "imaml" and config.hypergrad == "darts":
        reason = "the darts solver perturbs one task's weights at a time"
    if reason is None and config.bn_mode != "transductive":
        reason = f"--bn-mode {config.bn_mode} keeps statistics across tasks or needs the support set at prediction"
    if reason is None and parts is not None:
        reason = parts.why_not_stackable()
    if reason is None and distributed.world_size() > 1:
        reason = "the meta-batch is sharded across processes, which adapt their tasks one at a time"
    if config.execution != "auto":
        if config.execution == "vectorized" and reason is not None:
            raise UsageError(f"--execution vectorized: this run cannot be task-vectorized ({reason}); "
                             f"use --execution per-task or auto")
        return config.execution == "vectorized", f"--execution {config.execution}"
    if reason is not None:
        return False, reason
    if head:
        return True, "the head's steps batch over the meta-batch; the encoder runs per task either way"
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if device.type == "cuda" or conv is None:
        return True, "on CUDA" if device.type == "cuda" else "no convolutions"
    examples = (config.ways or 1) * (config.shots + config.query_shots)
    activations = examples * conv.out_channels * input_shape[-2] * input_shape[-1]
    if activations <= CPU_VECTORIZE_MAX_ACTIVATIONS:
        return True, f"a task's first-layer activations ({activations:,}) fit the CPU's caches"
    return False, (f"a task's first-layer activations ({activations:,}) exceed the "
                   f"{CPU_VECTORIZE_MAX_ACTIVATIONS:,} beyond which grouped convolutions were slower on CPU")


def build_lower(config: RunConfig, model: torch.nn.Module, device: torch.device, parts: Optional[Parts] = None,
                vectorized: bool = False):
    """The Lower problem for ``config.algo``: implicit (iMAML), unrolled (MAML, FOMAML) or the
    baseline's fine-tuning, or the extension class ``parts`` names (a subclass of the one the
    algorithm needs); per task or task-vectorized."""
    parts = parts or choose_parts(config)
    module = copy.deepcopy(model)
    implicit = config.algo == "imaml"
    # iMAML's weight decay is a term of the inner objective (the implicit gradient must see
    # the objective the inner loop minimizes); MAML's is part of its differentiable SGD.
    optimizer = torch.optim.SGD(module.parameters(), lr=config.inner_lr, momentum=config.inner_momentum,
                                weight_decay=0.0 if implicit else config.inner_weight_decay)
    # Betty's keys (how it steps and differentiates the problem); the rest is read from the run's settings
    if implicit:
        lower_config = LowerConfig(type=parts.solver, unroll_steps=config.inner_steps, run=config)
    elif config.algo in BASELINES:  # evaluation only: pretrain's --test-inner-steps of plain SGD, protonet's none
        lower_config = LowerConfig(unroll_steps=config.test_inner_steps, first_order=True, run=config)
    else:
        lower_config = LowerConfig(unroll_steps=config.inner_steps, first_order=config.algo == "fomaml",
                                   retain_graph=config.algo == "maml", run=config)
    lower = parts.lower("lower", lower_config, module=module, optimizer=optimizer, device=device)
    missing = missing_members(lower) if implicit else []
    if missing:
        raise UsageError(f"the Lower problem {qualname(parts.lower)} lacks {', '.join(missing)} of the contract "
                         f"with the implicit-gradient solvers (imaml/solvers/contract.py)")
    if vectorized:
        lower.tasks_at_once = None  # the same class, run for the whole meta-batch at once
    return lower


def build_meta_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    """The optimizer of θ (--meta-optimizer)."""
    params = list(params)
    if config.meta_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.meta_lr, momentum=config.meta_momentum,
                               weight_decay=config.meta_weight_decay)
    if config.meta_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.meta_lr, weight_decay=config.meta_weight_decay)
    return torch.optim.Adam(params, lr=config.meta_lr, weight_decay=config.meta_weight_decay)


def build_lr_schedule(config: RunConfig, optimizer: torch.optim.Optimizer):
    """The meta learning-rate schedule over --meta-steps (None for a constant rate).

    Closed forms of the step count, so a run resumed with a larger --meta-steps continues
    on the schedule of its new length (a checkpoint keeps only the step count)."""
    if config.lr_schedule == "none":
        return None
    if config.lr_schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, config.meta_steps) / config.meta_steps))
    else:
        def factor(step: int) -> float:
            return config.lr_gamma ** (step // config.lr_step_every)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# the baselines: no bilevel problem in training; (their parts, their engine)
BASELINES = {"pretrain": (choose_pretrain_parts, PretrainEngine), "protonet": (choose_protonet_parts, ProtoNetEngine)}


def build_engine(config: RunConfig, log: Optional[RunLog] = None,
                 dtype: torch.dtype = torch.float32, checkpoint_dir: Optional[Path] = None, *,
                 lower_cls: Optional[type] = None, upper_cls: Optional[type] = None,
                 env_cls: Optional[type] = None, model: Union[torch.nn.Module, type, None] = None,
                 solver: Optional[Callable] = None, sources: Optional[dict] = None) -> MetaEngine:
    """Env + model + Upper/Lower problems + engine for ``config`` (already validated).

    ``dtype=torch.float64`` is for exactness tests and diagnostics. The keyword arguments
    replace built-in parts from Python (classes, a model or model class, a hypergradient
    solver), as the import paths in ``config`` do from the CLI; see engines/extensions.py.
    ``sources`` (``{"train", "val", "test"}`` task sources) replaces ``config.task``'s, e.g. the
    benchmarks' synthetic tasks."""
    pretrain = config.algo == "pretrain"  # the supervised baseline (engines/pretrain.py)
    choose, engine_class = BASELINES.get(config.algo, (choose_parts, MetaEngine))
    parts = choose(config, lower_cls, upper_cls, env_cls, model, solver)
    device = resolve_device(config.device)
    if sources is None:
        with distributed.node_main_first():  # one download / generation per node
            sources = build_task_sources(config)
    torch.manual_seed(config.seed)
    env = parts.env(sources, config.meta_batch_size, config.seed, device, dtype)
    data = env.pooled if pretrain else sources["train"]  # θ classifies all training classes, or a task's
    outputs = data.num_classes if pretrain else data.num_outputs
    model = make_model(config, parts, data.input_shape, outputs).to(device, dtype)
    if config.algo in BASELINES:  # one step of θ per meta-step, over this process's rows or tasks
        batch = env.batch_size if pretrain else config.meta_batch_size
        vectorized, mine = False, len(distributed.shard(batch))
        upper_config = build_upper_config(config, log, False, tasks_per_update=1, share=mine / batch,
                                          guard_class=PretrainDivergenceGuard)
    else:
        vectorized, why = choose_execution(config, model, device, data.input_shape, parts)
        say_to(log)(f"execution: {'vectorized (the whole meta-batch at once)' if vectorized else 'one task at a time'}: "
                    f"{why}")
        upper_config = _meta_upper_config(config, log, vectorized)
    upper = parts.upper("upper", upper_config, module=model,
                        optimizer=build_meta_optimizer(config, model.parameters()), device=device)
    upper.lr_schedule = build_lr_schedule(config, upper.optimizer)  # over every group (Meta-SGD's rates too)
    lower = build_lower(config, model, device, parts, vectorized)

    get_betty_logger().setLevel(logging.WARNING)  # Betty prints its problem graph at INFO
    return engine_class(upper, lower, env, config, log=log, control=RunControl(checkpoint_dir),
                        records=TaskRecords(config, say_to(log)))


def _meta_upper_config(config: RunConfig, log: Optional[RunLog], vectorized: bool) -> UpperConfig:
    """The Upper config decides how Betty differentiates through the Lower problem:
    first_order=True runs the implicit path (our solver); False leaves the gradient to flow
    through the unrolled inner steps. gradient_accumulation averages over the tasks this process
    adapts (all of the meta-batch, or its shard: engines/distributed.py; a task-vectorized Lower
    problem hands over all of them at once, already averaged)."""
    tasks = len(distributed.shard(config.meta_batch_size))  # this process's tasks per meta-batch
    return build_upper_config(config, log, config.algo == "imaml", tasks_per_update=1 if vectorized else tasks,
                              share=tasks / config.meta_batch_size)


def say_to(log: Optional[RunLog]) -> Callable[[str], None]:
    """Where a run's one-line messages go: its log (which prints them), or nowhere."""
    return log.say if log else (lambda line: None)


def build_upper_config(config: RunConfig, log: Optional[RunLog], first_order: bool, tasks_per_update: int,
                       share: float, guard_class: type = DivergenceGuard) -> UpperConfig:
    """The Upper problem's config: how Betty differentiates through the Lower problem
    (``first_order``: the implicit path, our solver; otherwise through the unrolled steps), the
    inner loops averaged into one meta-update, clipping, the divergence guard, and under
    ``torchrun`` the gradient all-reduce (``share``: this process's part of the mean)."""
    sync = functools.partial(distributed.all_reduce_gradients, scale=share) if distributed.world_size() > 1 else None
    return UpperConfig(first_order=first_order, retain_graph=first_order, gradient_accumulation=tasks_per_update,
                       gradient_clipping=config.meta_grad_clip, divergence_guard=guard_class(config, say_to(log)),
                       gradient_sync=sync)
