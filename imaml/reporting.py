"""Where a run's records go: one JSON line per logged step, a short line on stdout, and the
final results file (written atomically, so no reader ever sees half of it)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict

from tqdm import tqdm

__all__ = ["RunLog", "write_json"]


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLog:
    """``log(step, record)`` appends to ``<output-dir>/metrics.jsonl`` and prints a summary;
    ``log_curves`` appends the inner-loop grid's rows to ``inner_curves.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike, quiet: bool = False, append: bool = False,
                 sink=None):
        self.sink = sink  # e.g. a WandbSink: gets every record, and the results at the end
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.curves_path = self.output_dir / "inner_curves.jsonl"
        if not append:
            self.metrics_path.write_text("")
            self.curves_path.write_text("")
        self.quiet = quiet

    def log(self, step: int, record: Dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.sink is not None:
            self.sink.log(step, record)
        self.say(f"step {step:>6} | " + " ".join(f"{k}={_short(v)}" for k, v in record.items()))

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
