"""Build a ready-to-run engine from a validated RunConfig: the one place that wires
Env, model, problems and engine together."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from betty.configs import Config
from betty.logging.logger_base import get_logger as get_betty_logger

from envs import FewShotEnv, build_task_sources
from engines.meta_engine import MetaEngine
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.models import build_model
from imaml.reporting import RunLog
from imaml.vectorize import why_not_vectorizable
from problems import (ImplicitLower, LowerConfig, MetaInit, UnrolledLower, VectorizedImplicitLower,
                      VectorizedUnrolledLower)

__all__ = ["build_engine", "resolve_device", "use_vectorized"]


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


# Task-vectorized conv nets on CPU won only while one task's first-layer activations were
# small (docs/performance.md: 1.3x at 5-way 1-shot Omniglot, 1.5 M values per task; 0.5-0.7x
# at 20-way Omniglot and 5-way mini-ImageNet, 6-7 M): beyond that the meta-batch's
# activations leave the caches and grouped convolutions are slower than T separate ones.
CPU_VECTORIZE_MAX_ACTIVATIONS = 2_000_000


def use_vectorized(config: RunConfig, model: torch.nn.Module, device: torch.device, input_shape: tuple) -> bool:
    """Whether to run each meta-batch task-vectorized (``--execution``), or a UsageError if
    ``vectorized`` was asked for and this run cannot have it. ``auto`` vectorizes where the
    benchmarks found it faster: on CUDA, for MLPs, and for conv nets on CPU while a task's
    first-layer activations stay below ``CPU_VECTORIZE_MAX_ACTIVATIONS``."""
    reason = why_not_vectorizable(model)
    if reason is None and config.algo == "imaml" and config.hypergrad == "darts":
        reason = "the darts solver perturbs one task's weights at a time"
    if config.execution == "per-task":
        return False
    if config.execution == "vectorized":
        if reason is not None:
            raise UsageError(f"--execution vectorized: this run cannot be task-vectorized ({reason}); "
                             f"use --execution per-task or auto")
        return True
    if reason is not None:
        return False
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if device.type == "cuda" or conv is None:
        return True
    examples = (config.ways or 1) * (config.shots + config.query_shots)
    activations = examples * conv.out_channels * input_shape[-2] * input_shape[-1]
    return activations <= CPU_VECTORIZE_MAX_ACTIVATIONS


def build_lower(config: RunConfig, model: torch.nn.Module, device: torch.device, vectorized: bool = False):
    """The Lower problem for ``config.algo``: implicit (iMAML) or unrolled (MAML, FOMAML),
    per task or task-vectorized."""
    module = copy.deepcopy(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=config.inner_lr)
    if config.algo == "imaml":
        lower_config = LowerConfig(
            type=f"imaml_{config.hypergrad}", unroll_steps=config.inner_steps, lam=config.lam,
            cg_iterations=config.cg_steps, cg_tol=config.cg_tol, cg_trust_region=config.cg_trust_region,
            neumann_iterations=config.neumann_terms, neumann_alpha=config.neumann_alpha,
            darts_alpha=config.darts_radius)
        implicit = VectorizedImplicitLower if vectorized else ImplicitLower
        return implicit("lower", lower_config, module, optimizer, device=device)
    lower_config = LowerConfig(unroll_steps=config.inner_steps, first_order=config.algo == "fomaml",
                               retain_graph=config.algo == "maml", grad_checkpoint=config.grad_checkpoint)
    unrolled = VectorizedUnrolledLower if vectorized else UnrolledLower
    return unrolled("lower", lower_config, module=module, optimizer=optimizer, device=device)


def build_engine(config: RunConfig, log: Optional[RunLog] = None,
                 dtype: torch.dtype = torch.float32, checkpoint_dir: Optional[Path] = None) -> MetaEngine:
    """Env + model + Upper/Lower problems + engine for ``config`` (already validated).

    ``dtype=torch.float64`` is for exactness tests and diagnostics."""
    device = resolve_device(config.device)
    sources = build_task_sources(config)
    torch.manual_seed(config.seed)
    env = FewShotEnv(sources, config.meta_batch_size, config.seed, device, dtype)
    train = sources["train"]
    model = build_model(config.model, train.input_shape, train.num_outputs, config.channels).to(device, dtype)

    # The Upper config decides how Betty differentiates through the Lower problem:
    # first_order=True runs the implicit path (our solver); False leaves the gradient to
    # flow through the unrolled inner steps. gradient_accumulation averages over tasks (a
    # task-vectorized Lower problem hands over all of them at once, already averaged).
    implicit = config.algo == "imaml"
    vectorized = use_vectorized(config, model, device, train.input_shape)
    upper_config = Config(first_order=implicit, retain_graph=implicit,
                          gradient_accumulation=1 if vectorized else config.meta_batch_size,
                          gradient_clipping=config.meta_grad_clip)
    upper = MetaInit("upper", upper_config, module=model,
                     optimizer=torch.optim.Adam(model.parameters(), lr=config.meta_lr), device=device)
    lower = build_lower(config, model, device, vectorized)

    get_betty_logger().setLevel(logging.WARNING)  # Betty prints its problem graph at INFO
    return MetaEngine(upper, lower, env, config, log=log, checkpoint_dir=checkpoint_dir)
