"""How the benchmarks measure: one fresh process per configuration, wall-clock tasks/s, and
the peak memory of the measured meta-steps.

Peak memory on CPU is the growth of the resident set over the measured steps: the kernel's
high-water mark (VmHWM) is reset to the current resident set (``/proc/self/clear_refs``)
just before them, so imports, data and model, which are the same for every implementation,
are not counted, and every configuration runs in its own process so one cannot inherit
another's peak. On CUDA it is ``torch.cuda.max_memory_allocated`` above what was allocated
before the steps, after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["PeakMemory", "SavedTensorPeak", "timed_step", "synchronize", "taking_turns", "paired_speedup",
           "format_speedup", "keep_freed_memory", "describe_error", "run_isolated", "StepWorker", "serve_steps", "machine"]

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """``start()`` before the steps, ``mib()`` after: peak memory they added, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
            self.base = _status_kib("VmRSS") * 1024

    def mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.base) / 2**20


class SavedTensorPeak:
    """Peak bytes of the tensors autograd graphs hold for their backward passes, while active
    (a ``with`` block). Independent of the allocator and the device: it counts exactly what
    differentiating through an unrolled inner loop keeps, which is what grows with inner steps.
    Shared storage saved twice is counted twice (an upper bound)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def __enter__(self):
        tracker = self

        class Held:
            __slots__ = ("tensor", "size")

            def __init__(self, tensor):
                # detached: a saved output holding itself would form a cycle the graph never frees
                self.tensor, self.size = tensor.detach(), tensor.numel() * tensor.element_size()
                tracker.live += self.size
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= self.size

        self._hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def timed_step(step: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one call of ``step``, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def taking_turns(names: list, turn: int) -> list:
    """The order of ``names`` in timed round ``turn``: forwards, then backwards, so none of them
    always runs right after the same other one (whose left-over caches or memory it would inherit)."""
    return list(names) if turn % 2 == 0 else list(reversed(names))


def paired_speedup(seconds: list, reference_seconds: list) -> Optional[tuple]:
    """How much faster one implementation is than a reference, from rounds in which both ran
    back to back: (median, lowest, highest) over rounds of reference/own seconds. A slow spell
    of a shared machine (tens of per cent here, lasting seconds to minutes) slows both steps of a
    round alike, so these ratios vary far less than the step times do."""
    ratios = [ref / own for own, ref in zip(seconds, reference_seconds)]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def format_speedup(speedup: Optional[tuple]) -> str:
    """"0.97 (0.93–1.01)": the median, and the range over rounds when there were several."""
    if speedup is None:
        return "—"
    median, low, high = speedup
    return f"{median:.2f}" + (f" ({low:.2f}–{high:.2f})" if high > low else "")


def keep_freed_memory() -> None:
    """``imaml.allocator.keep_freed_memory`` (run.py's CPU setting) in this process, or an error."""
    from imaml.allocator import keep_freed_memory as apply

    if not apply():
        raise RuntimeError("mallopt refused the settings (not glibc?)")


def describe_error(error: Exception) -> str:
    """One line for a table: the error's type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_isolated(module: str, spec: dict, timeout: Optional[float] = None, env: Optional[dict] = None,
                 flag: str = "--one") -> dict:
    """Run ``python -m module --one '<spec>'`` (or another ``flag``) in a fresh process (with
    ``env`` added to the environment); its last stdout line is a JSON result. A failure comes
    back as {"error": ...} so one bad configuration does not stop a table."""
    command = [sys.executable, "-m", module, flag, json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


REPLY = "@@ "  # marks a worker's answers on its stdout


class StepWorker:
    """A fresh process (``python -m module --worker '<spec>'``, ``env`` added to the
    environment) that takes one meta-step per ``request()``; ``reply()`` waits for its answer
    (a dict). Requests to several workers before their replies run them side by side; one at a
    time, they take turns on an otherwise idle machine."""

    def __init__(self, module: str, spec: dict, env: Optional[dict] = None):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", module, "--worker", json.dumps(spec)], cwd=ROOT,
                                        env={**os.environ, **(env or {})}, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log)

    def request(self) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()

    def reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.seek(0)
        raise RuntimeError("worker stopped: " + (self.log.read().strip().splitlines() or ["?"])[-1])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
        self.process.wait()
        self.log.close()


def serve_steps(step: Callable[[], None], device: torch.device) -> None:
    """The worker side of ``StepWorker``: a meta-step for every line on stdin, answered with its
    wall seconds and the peak memory the steps have added so far."""
    memory = PeakMemory(device)
    memory.start()
    for _ in sys.stdin:
        seconds = timed_step(step, device)
        print(REPLY + json.dumps({"seconds": seconds, "peak_mib": memory.mib()}), flush=True)


def machine(device: torch.device, threads: int) -> str:
    """One line saying where the numbers came from."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor() or "unknown CPU")
        where = f"{model}, {os.cpu_count()} cores, {threads} torch thread(s)"
    return f"{where}; torch {torch.__version__}, Python {platform.python_version()}"
