"""Where a run's records go: one JSON line per logged step (the full record), one line of at most
``LINE_WIDTH`` characters on stdout that a person reads, and the final results file (written
atomically, so no reader ever sees half of it)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tqdm import tqdm

__all__ = ["LINE_WIDTH", "RunLog", "write_json"]

LINE_WIDTH = 120  # a console line's most characters: a terminal shows it whole
_clock = time.monotonic  # the ETA's clock (tests replace it)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _number(value: float, decimals: int = 3) -> str:
    """Fixed-point, or 1.23e+04 where that would be long or read as 0: at most 9 characters, so
    no value can widen the console line much."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10 ** (6 - decimals) or 0 < abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.{decimals}f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if math.isfinite(fraction) else str(fraction)


def _whole_percent(fraction: float) -> str:
    """Rounded down: 100% only where every inner loop or solve got within tolerance."""
    return f"{math.floor(100 * fraction)}%" if math.isfinite(fraction) else str(fraction)


def _duration(seconds: float) -> str:
    """m:ss, h:mm:ss under 100 hours, then days and hours."""
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours >= 100:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _first(record: Dict[str, Any], *keys: str) -> Optional[float]:
    """The value of the first of ``keys`` in ``record`` (meta-learners log train/query_*,
    pretrain train/*)."""
    return next((float(record[k]) for k in keys if k in record), None)


class RunLog:
    """``log(step, record)`` appends to ``<output-dir>/metrics.jsonl`` and prints ``console_line``;
    ``log_curves`` appends the inner-loop grid's rows to ``inner_curves.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike, quiet: bool = False, append: bool = False,
                 sink=None, total_steps: Optional[int] = None, time_budget: Optional[float] = None):
        self.sink = sink  # e.g. a WandbSink: gets every record, and the results at the end
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.curves_path = self.output_dir / "inner_curves.jsonl"
        if not append:
            self.metrics_path.write_text("")
            self.curves_path.write_text("")
        self.quiet = quiet
        self.total_steps = total_steps  # the run's --meta-steps: step/total and the ETA
        self.time_budget = time_budget  # its --time-budget: seconds/budget and the ETA, where set
        self.last_validation: Optional[str] = None  # e.g. "84.1%": shown on every line once seen
        self.first_logged: Optional[Tuple[Optional[float], float]] = None  # (progress, clock): the ETA's start

    def log(self, step: int, record: Dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.sink is not None:
            self.sink.log(step, record)
        self.say(self.console_line(step, record))

    def console_line(self, step: int, record: Dict[str, Any]) -> str:
        """``step  40/200 | loss 0.412 | acc 86.3% | val 84.1% | 12.3 tasks/s | inner 100% solve 94%
        | ETA 1:02``: the few numbers a person watches (the rest is in metrics.jsonl), each field
        present only where the record has it, so lines of one run stay aligned."""
        fields: List[str] = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"
                             if self.total_steps and not self.time_budget else f"step {step:>6}"]
        seconds = _first(record, "sys/meta_training_seconds")
        if self.time_budget and seconds is not None:
            fields.append(f"{seconds:>{len(f'{self.time_budget:.0f}')}.0f}/{self.time_budget:.0f} s")
        loss = _first(record, "train/query_loss", "train/loss")
        accuracy = _first(record, "train/query_accuracy", "train/accuracy")
        mse = _first(record, "train/query_mse", "train/mse")
        if loss is not None:
            fields.append(f"loss {_number(loss):>5}")
        if accuracy is not None:
            fields.append(f"acc {_percent(accuracy):>6}")
        if mse is not None:
            fields.append(f"mse {_number(mse):>5}")
        if "val/accuracy" in record:
            self.last_validation = _percent(float(record["val/accuracy"]))
        elif "val/mse" in record:
            self.last_validation = _number(float(record["val/mse"]))
        fields.append(f"val {self.last_validation or '-':>6}")
        if "train/tasks_per_second" in record:
            fields.append(f"{_number(float(record['train/tasks_per_second']), 1):>5} tasks/s")
        converged = [f"{name} {_whole_percent(float(record[key])):>4}" for name, key in
                     (("inner", "train/inner_converged"), ("solve", "train/solver_converged")) if key in record]
        if converged:
            fields.append(" ".join(converged))
        eta = self._eta(self._progress(step, seconds))
        if eta is not None:
            fields.append(f"ETA {eta}")
        line = " | ".join(fields)
        return line if len(line) <= LINE_WIDTH else line[:LINE_WIDTH - 1] + "…"

    def _progress(self, step: int, seconds: Optional[float]) -> Optional[float]:
        """The fraction of the run done: of --meta-steps, or of --time-budget's seconds of
        meta-training where that is further (the run stops at whichever ends first)."""
        parts = [step / self.total_steps] if self.total_steps else []
        if self.time_budget and seconds is not None:
            parts.append(seconds / self.time_budget)
        return min(max(parts), 1.0) if parts else None

    def _eta(self, progress: Optional[float]) -> Optional[str]:
        """Time left at the pace since the first logged step (startup, compilation and a
        resume's earlier steps stay out of it); "-" until a second step is logged."""
        now = _clock()
        if self.first_logged is None:
            self.first_logged = (progress, now)
        if progress is None:
            return None
        first_progress, first_time = self.first_logged
        if progress >= 1.0:
            return "0:00"
        if first_progress is None or progress <= first_progress:
            return "-"
        return _duration((now - first_time) / (progress - first_progress) * (1.0 - progress))

    def log_curves(self, step: int, record: Dict[str, Any]) -> None:
        """Append per-task inner-loop curves (lists, not scalars: they stay out of the sink's
        history) to ``<output-dir>/inner_curves.jsonl``, one line per step."""
        with self.curves_path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")

    def finish(self, results: Dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.finish(results)

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line, file=sys.stdout)  # keeps an active progress bar intact
