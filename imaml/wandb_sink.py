"""Weights & Biases, our own way (Betty's W&B logger never calls ``wandb.init``, hard-codes
the project and logs one key per call, so W&B's step counter runs away).

One ``wandb.init`` with the full resolved config, one ``wandb.log`` per logged meta-step on
the meta-step axis, the final meta-test in the run summary. W&B must never cost a run: an
online start that fails (no network, no login) falls back to offline mode, which can be
synced later with ``wandb sync``; anything else that fails turns W&B off with one warning.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from imaml.config import RunConfig

__all__ = ["WandbSink", "start_wandb"]


class WandbSink:
    def __init__(self, run):
        self.run = run

    def log(self, step: int, record: Dict[str, Any]) -> None:
        self.run.log(record, step=step)

    def finish(self, results: Dict[str, Any]) -> None:
        summary = {}
        for phase in ("test", "before_meta_training"):
            if results.get(phase):
                result = results[phase]
                summary[f"{phase}/{result['metric']}"] = result["mean"]
                summary[f"{phase}/{result['metric']}_ci95"] = result["ci95"]
                summary[f"{phase}/num_tasks"] = result["num_tasks"]
        for key in ("train_seconds", "tasks_per_second"):
            if results.get(key) is not None:
                summary[key] = results[key]
        self.run.summary.update(summary)
        self.run.finish()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def start_wandb(config: RunConfig, output_dir: Path) -> Optional[WandbSink]:
    """A started W&B run for ``config`` (None when ``--wandb-mode disabled``)."""
    if config.wandb_mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    id_file = output_dir / "wandb-run-id"  # so that --resume continues the same W&B run
    run_id = id_file.read_text().strip() if config.resume and id_file.is_file() else None
    kwargs = dict(project=config.wandb_project or "imaml", entity=config.wandb_entity, id=run_id,
                  name=config.wandb_name, group=config.wandb_group,
                  tags=[t.strip() for t in config.wandb_tags.split(",") if t.strip()] if config.wandb_tags else None,
                  config=config.to_dict(), dir=str(output_dir), resume="allow" if run_id else None,
                  settings=wandb.Settings(init_timeout=60))
    for mode in ((config.wandb_mode, "offline") if config.wandb_mode == "online" else (config.wandb_mode,)):
        try:
            run = wandb.init(mode=mode, **kwargs)
            id_file.write_text(run.id)
            return WandbSink(run)
        except Exception as err:  # wandb raises its own types for login/network failures
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _warn(f"W&B {mode} start failed ({reason}); "
                  + ("logging offline instead (sync later with `wandb sync`)" if mode == "online"
                     else "continuing without W&B"))
    return None
