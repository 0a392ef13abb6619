"""Weights & Biases, our own way (Betty's W&B logger never calls ``wandb.init``, hard-codes
the project and logs one key per call, so W&B's step counter runs away).

One ``wandb.init`` with the full resolved config; one ``wandb.log`` per logged meta-step, with
``meta_step`` as every chart's x-axis; a summary that keeps the best meta-validation
(``val/accuracy``: max, ``val/mse``: min; also as the plain number ``val/best_<metric>``, the
one a sweep can optimize, since sweeps cannot read nested summaries) and the final meta-test.
At the end, every PNG under ``<output-dir>/plots/`` (whoever drew it) as a ``wandb.Image``, the
inner-loop curves as a native line plot, ``results.json`` and ``config.json`` saved with the
run and, with ``--wandb-log-checkpoints``, the checkpoints as a ``model`` artifact.

W&B must never cost a run: an online start that fails (no network, no login) falls back to
offline mode, which can be synced later with ``wandb sync``; anything else that fails turns
that part (or W&B) off with one warning.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from imaml.config import RunConfig

__all__ = ["WandbSink", "start_wandb"]

# the meta-validation metric of each kind of task, and what "best" means for it
BEST = {"accuracy": max, "mse": min}
# results.json's two meta-tests whose inner-loop curves the line plot shows
CURVES = (("before_meta_training", "before meta-training"), ("test", "after meta-training"))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class WandbSink:
    """Sends a run's records to a started W&B run (``start_wandb`` makes one)."""

    def __init__(self, run, output_dir: Path, log_checkpoints: bool = False):
        self.run = run
        self.output_dir = Path(output_dir)
        self.log_checkpoints = log_checkpoints
        self.last_step = 0
        self.best: Dict[str, float] = {}
        self._safely("set up its metrics", self._define_metrics)

    def _safely(self, what: str, action: Callable[[], Any]) -> None:
        """Run one W&B action; a failure is one warning, never the run's end."""
        if self.run is None:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - W&B raises many types; none may stop a run
            _warn(f"W&B could not {what} ({_reason(err)}); the local files are complete")

    def _define_metrics(self) -> None:
        self.run.define_metric("meta_step")
        self.run.define_metric("*", step_metric="meta_step")
        for metric, better in BEST.items():
            self.run.define_metric(f"val/{metric}", summary="max" if better is max else "min")
            known = self.run.summary.get(f"val/best_{metric}")  # a resumed run's best so far
            if isinstance(known, (int, float)):
                self.best[metric] = known

    # ------------------------------------------------------------------ during the run
    def log(self, step: int, record: Dict[str, Any]) -> None:
        data = {"meta_step": step, **record}
        for metric, better in BEST.items():
            if f"val/{metric}" in record:
                value = record[f"val/{metric}"]
                self.best[metric] = better(self.best.get(metric, value), value)
                data[f"val/best_{metric}"] = self.best[metric]
        self.last_step = max(self.last_step, step)
        # meta_step, not W&B's own step, is the x-axis: a row per call, never held back for a
        # later step, and a resumed run may log a meta-step again without W&B dropping it
        self._safely(f"log meta-step {step}", lambda: self.run.log(data))

    # ------------------------------------------------------------------ at the end
    def finish(self, results: Dict[str, Any]) -> None:
        self._safely("log the plots", lambda: self._log_plots(results))
        self._safely("save results.json and config.json", self._save_files)
        if self.log_checkpoints:
            self._safely("log the checkpoints as an artifact", lambda: self._log_checkpoints(results))
        self._safely("write the summary", lambda: self.run.summary.update(_summary(results)))
        self._safely("finish the run", self.run.finish)

    def _log_plots(self, results: Dict[str, Any]) -> None:
        import wandb

        plot_dir = self.output_dir / "plots"
        media: Dict[str, Any] = {}
        for path in sorted(plot_dir.rglob("*.png")) if plot_dir.is_dir() else []:
            key = "plots/" + path.relative_to(plot_dir).with_suffix("").as_posix()
            media[key] = wandb.Image(str(path), caption=path.name)
        curves = [(label, (results.get(name) or {}).get("inner_curve")) for name, label in CURVES]
        curves = [(label, list(curve)) for label, curve in curves if curve]
        if curves:
            media["charts/inner_loop"] = wandb.plot.line_series(
                xs=[list(range(1, len(curve) + 1)) for _, curve in curves], ys=[curve for _, curve in curves],
                keys=[label for label, _ in curves], xname="inner step",
                title="inner-loop objective on meta-test tasks (mean over tasks)")
        if media:
            self.run.log({"meta_step": self.last_step, **media})

    def _save_files(self) -> None:
        for name in ("results.json", "config.json"):
            if (self.output_dir / name).is_file():
                self.run.save(str(self.output_dir / name), base_path=str(self.output_dir), policy="now")

    def _log_checkpoints(self, results: Dict[str, Any]) -> None:
        import wandb

        files = [p for p in (self.output_dir / "checkpoints" / n for n in ("latest.pt", "best.pt")) if p.is_file()]
        if not files:
            return
        best = results.get("best_validation") or {}
        artifact = wandb.Artifact(f"checkpoints-{self.run.id}", type="model",
                                  description="latest.pt: θ at the end; best.pt: θ at the best meta-validation",
                                  metadata={"meta_step": self.last_step, "best_validation": best})
        for path in files:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{self.last_step}"])


def _summary(results: Dict[str, Any]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for phase in ("test", "before_meta_training"):
        if results.get(phase):
            result = results[phase]
            summary[f"{phase}/{result['metric']}"] = result["mean"]
            summary[f"{phase}/{result['metric']}_ci95"] = result["ci95"]
            summary[f"{phase}/num_tasks"] = result["num_tasks"]
    best = results.get("best_validation")
    if best:
        summary["best_validation/step"] = best.get("step")
    for key in ("train_seconds", "tasks_per_second"):
        if results.get(key) is not None:
            summary[key] = results[key]
    return summary


def start_wandb(config: RunConfig, output_dir: Path) -> Optional[WandbSink]:
    """A started W&B run for ``config`` (None when ``--wandb-mode disabled`` or W&B fails)."""
    if config.wandb_mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    output_dir = Path(output_dir).resolve()  # absolute: W&B's service process has a working directory of its own
    id_file = output_dir / "wandb-run-id"  # so that --resume continues the same W&B run
    run_id = id_file.read_text().strip() if config.resume and id_file.is_file() else None
    kwargs = dict(project=config.wandb_project or "imaml", entity=config.wandb_entity, id=run_id or config.wandb_id,
                  name=config.wandb_name, group=config.wandb_group,
                  tags=[t.strip() for t in config.wandb_tags.split(",") if t.strip()] if config.wandb_tags else None,
                  config=config.to_dict(), dir=str(output_dir), resume="allow" if config.resume else None,
                  settings=wandb.Settings(init_timeout=60))
    for mode in ((config.wandb_mode, "offline") if config.wandb_mode == "online" else (config.wandb_mode,)):
        try:
            run = wandb.init(mode=mode, **kwargs)
            id_file.write_text(run.id)
            return WandbSink(run, output_dir, log_checkpoints=config.wandb_log_checkpoints)
        except Exception as err:  # wandb raises its own types for login/network failures
            _warn(f"W&B {mode} start failed ({_reason(err)}); "
                  + ("logging offline instead (sync later with `wandb sync`)" if mode == "online"
                     else "continuing without W&B"))
    return None
