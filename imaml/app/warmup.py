"""``--warmup-fraction``: the head method first, in ``<output-dir>/warmup``, then the whole
network from the θ it reached, continuing its step count, meta-batch stream and meta-training
clock (docs/meta-gradients.md, "Whole-network iMAML that meets its theorem"). Under
``--time-budget`` the warm-up gets that fraction of the budget, and the whole run the budget."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from imaml.app.run_folder import checkpoint_path, prepare_output_dir
from imaml.config import RunConfig

__all__ = ["warmup_config", "warm_up", "continue_from_warmup"]


def warmup_config(config: RunConfig) -> RunConfig:
    """The settings of ``--warmup-fraction``'s first phase: the same run with the head alone adapted,
    at the head's λ, for the warm-up's meta-steps (and its fraction of a time budget), in
    ``<output-dir>/warmup``."""
    budget = config.time_budget * config.warmup_fraction if config.time_budget is not None else None
    return replace(config, adapt="head", lam=config.head_lam or config.lam, head_lam=None,
                   meta_steps=config.warmup_steps, time_budget=budget, warmup_fraction=0.0,
                   output_dir=str(Path(config.output_dir) / "warmup"), resume=None, wandb_mode="disabled").validate()


def warm_up(config: RunConfig, main_process: bool, run: Callable[[RunConfig, bool], dict]) -> Optional[dict]:
    """Run (or find finished) the warm-up phase with ``run`` (the application's own run of a
    configuration); None when a resumed run is past it already."""
    if checkpoint_path(config) is not None:  # resumed: the whole-network phase has its own checkpoint
        return None
    warm = warmup_config(config)
    finished = Path(warm.output_dir) / "results.json"
    results = json.loads(finished.read_text()) if finished.is_file() else {}
    if results.get("config") != warm.to_dict():  # else a finished warm-up with these settings: reused
        if main_process:
            prepare_output_dir(warm.output_dir)
        results = run(warm, main_process)
    return {"results": results, "output_dir": warm.output_dir,
            "theta": Path(warm.output_dir) / "checkpoints" / "latest.pt"}


def continue_from_warmup(engine, config: RunConfig, warmed: dict) -> None:
    """Start the whole-network phase after the warm-up's meta-steps, from the warm-up's θ (a fresh
    meta-optimizer), with its meta-test of θ₀ as this run's "before meta-training" and its
    seconds and tasks of meta-training counted in this run's (a time budget covers both phases)."""
    from imaml import checkpoint

    state = checkpoint.load(warmed["theta"])
    engine.upper.module.load_state_dict(state["upper"]["module"])
    engine.global_step = state["step"]  # --warmup-fraction of --meta-steps, or where its budget ran out
    engine.train_seconds, engine.tasks_seen = state["train_seconds"], state["tasks_seen"]
    engine.test_also = state.get("test_also_at")  # --test-also-at within the warm-up: its θ then
    engine.before = state["before_meta_training"]
    engine.env.load_state_dict(state["env"])  # the next meta-batches are the ones an unbroken run would draw
    engine.start_note = (f"warm-up done ({warmed['output_dir']}): the whole network adapts from its θ, "
                         f"meta-steps {engine.global_step + 1}-" +
                         (f"{config.meta_steps}" if config.time_budget is None else f"(budget {config.time_budget:g} s)"))
