"""What a run shows while it runs: progress bars, a one-line result, the memory it peaked at."""

from __future__ import annotations

import resource
import sys
from typing import Dict

import torch
from tqdm import tqdm

from engines import distributed

__all__ = ["progress_bar", "peak_memory_mb", "describe_result"]


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar with tasks/s and ETA on a terminal; silent when stdout is not one."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not sys.stdout.isatty() or not distributed.is_main())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def describe_result(result: Dict[str, float]) -> str:
    """An evaluation's result in one line: the metric with its 95% CI."""
    scale, unit = (100.0, "%") if result["metric"] == "accuracy" else (1.0, "")
    error = f"; error rate {result['error_rate'] * 100:.2f}% over the runs" if "error_rate" in result else ""
    return (f"{result['metric']} {result['mean'] * scale:.2f}{unit} "
            f"± {result['ci95'] * scale:.2f}{unit} (95% CI, {result['num_tasks']} tasks){error}")
