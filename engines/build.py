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


def use_vectorized(config: RunConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether to run each meta-batch task-vectorized (``--execution``), or a UsageError if
    ``vectorized`` was asked for and this run cannot have it. ``auto`` vectorizes where the
    benchmarks (docs/performance.md) found it faster: on CUDA, and for the MLP on CPU; conv
    nets on CPU run per task (grouped convolutions are slower there than T separate ones)."""
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
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return reason is None and (device.type == "cuda" or not conv)


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
    vectorized = use_vectorized(config, model, device)
    upper_config = Config(first_order=implicit, retain_graph=implicit,
                          gradient_accumulation=1 if vectorized else config.meta_batch_size,
                          gradient_clipping=config.meta_grad_clip)
    upper = MetaInit("upper", upper_config, module=model,
                     optimizer=torch.optim.Adam(model.parameters(), lr=config.meta_lr), device=device)
    lower = build_lower(config, model, device, vectorized)

    get_betty_logger().setLevel(logging.WARNING)  # Betty prints its problem graph at INFO
    return MetaEngine(upper, lower, env, config, log=log, checkpoint_dir=checkpoint_dir)
