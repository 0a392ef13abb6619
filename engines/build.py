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
from engines import distributed
from engines.meta_engine import MetaEngine
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.models import build_model
from imaml.reporting import RunLog
from problems import ImplicitLower, LowerConfig, MetaInit, UnrolledLower

__all__ = ["build_engine", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    name = distributed.process_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def build_lower(config: RunConfig, model: torch.nn.Module, device: torch.device):
    """The Lower problem for ``config.algo``: implicit (iMAML) or unrolled (MAML, FOMAML)."""
    module = copy.deepcopy(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=config.inner_lr)
    if config.algo == "imaml":
        lower_config = LowerConfig(
            type=f"imaml_{config.hypergrad}", unroll_steps=config.inner_steps, lam=config.lam,
            cg_iterations=config.cg_steps, cg_tol=config.cg_tol, cg_trust_region=config.cg_trust_region,
            neumann_iterations=config.neumann_terms, neumann_alpha=config.neumann_alpha,
            darts_alpha=config.darts_radius)
        return ImplicitLower("lower", lower_config, module, optimizer, device=device)
    lower_config = LowerConfig(unroll_steps=config.inner_steps, first_order=config.algo == "fomaml",
                               retain_graph=config.algo == "maml")
    return UnrolledLower("lower", lower_config, module=module, optimizer=optimizer, device=device)


def build_engine(config: RunConfig, log: Optional[RunLog] = None,
                 dtype: torch.dtype = torch.float32, checkpoint_dir: Optional[Path] = None) -> MetaEngine:
    """Env + model + Upper/Lower problems + engine for ``config`` (already validated).

    ``dtype=torch.float64`` is for exactness tests and diagnostics."""
    device = resolve_device(config.device)
    with distributed.node_main_first():  # one download / generation per node
        sources = build_task_sources(config)
    torch.manual_seed(config.seed)
    env = FewShotEnv(sources, config.meta_batch_size, config.seed, device, dtype)
    train = sources["train"]
    model = build_model(config.model, train.input_shape, train.num_outputs, config.channels).to(device, dtype)

    # The Upper config decides how Betty differentiates through the Lower problem:
    # first_order=True runs the implicit path (our solver); False leaves the gradient to
    # flow through the unrolled inner steps. gradient_accumulation averages over the tasks
    # this process adapts (all of the meta-batch, or its shard: engines/distributed.py).
    implicit = config.algo == "imaml"
    upper_config = Config(first_order=implicit, retain_graph=implicit,
                          gradient_accumulation=len(distributed.shard(config.meta_batch_size)),
                          gradient_clipping=config.meta_grad_clip)
    upper = MetaInit("upper", upper_config, module=model,
                     optimizer=torch.optim.Adam(model.parameters(), lr=config.meta_lr), device=device)
    lower = build_lower(config, model, device)

    get_betty_logger().setLevel(logging.WARNING)  # Betty prints its problem graph at INFO
    return MetaEngine(upper, lower, env, config, log=log, checkpoint_dir=checkpoint_dir)
