"""Build a ready-to-run engine from a validated RunConfig: the one place that wires
Env, model, problems and engine together."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from betty.configs import Config
from betty.logging.logger_base import get_logger as get_betty_logger

from envs import build_task_sources
from engines.extensions import Parts, choose_parts, make_model
from engines.meta_engine import MetaEngine
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.reporting import RunLog
from problems import LowerConfig

__all__ = ["build_engine", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def build_lower(config: RunConfig, model: torch.nn.Module, device: torch.device, parts: Optional[Parts] = None):
    """The Lower problem for ``config.algo``: implicit (iMAML) or unrolled (MAML, FOMAML), or
    the extension class ``parts`` names (a subclass of the one the algorithm needs)."""
    parts = parts or choose_parts(config)
    module = copy.deepcopy(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=config.inner_lr)
    if config.algo == "imaml":
        lower_config = LowerConfig(
            type=parts.solver, unroll_steps=config.inner_steps, lam=config.lam,
            cg_iterations=config.cg_steps, cg_tol=config.cg_tol, cg_trust_region=config.cg_trust_region,
            neumann_iterations=config.neumann_terms, neumann_alpha=config.neumann_alpha,
            darts_alpha=config.darts_radius)
        return parts.lower("lower", lower_config, module, optimizer, device=device)
    lower_config = LowerConfig(unroll_steps=config.inner_steps, first_order=config.algo == "fomaml",
                               retain_graph=config.algo == "maml")
    return parts.lower("lower", lower_config, module=module, optimizer=optimizer, device=device)


def build_engine(config: RunConfig, log: Optional[RunLog] = None,
                 dtype: torch.dtype = torch.float32, checkpoint_dir: Optional[Path] = None, *,
                 lower_cls: Optional[type] = None, upper_cls: Optional[type] = None,
                 env_cls: Optional[type] = None, model: Union[torch.nn.Module, type, None] = None,
                 solver: Optional[Callable] = None) -> MetaEngine:
    """Env + model + Upper/Lower problems + engine for ``config`` (already validated).

    ``dtype=torch.float64`` is for exactness tests and diagnostics. The keyword arguments
    replace built-in parts from Python (classes, a model or model class, a hypergradient
    solver), as the import paths in ``config`` do from the CLI; see engines/extensions.py."""
    parts = choose_parts(config, lower_cls, upper_cls, env_cls, model, solver)
    device = resolve_device(config.device)
    sources = build_task_sources(config)
    torch.manual_seed(config.seed)
    env = parts.env(sources, config.meta_batch_size, config.seed, device, dtype)
    train = sources["train"]
    model = make_model(config, parts, train.input_shape, train.num_outputs).to(device, dtype)

    # The Upper config decides how Betty differentiates through the Lower problem:
    # first_order=True runs the implicit path (our solver); False leaves the gradient to
    # flow through the unrolled inner steps. gradient_accumulation averages over tasks.
    implicit = config.algo == "imaml"
    upper_config = Config(first_order=implicit, retain_graph=implicit,
                          gradient_accumulation=config.meta_batch_size,
                          gradient_clipping=config.meta_grad_clip)
    upper = parts.upper("upper", upper_config, module=model,
                        optimizer=torch.optim.Adam(model.parameters(), lr=config.meta_lr), device=device)
    lower = build_lower(config, model, device, parts)

    get_betty_logger().setLevel(logging.WARNING)  # Betty prints its problem graph at INFO
    return MetaEngine(upper, lower, env, config, log=log, checkpoint_dir=checkpoint_dir)
