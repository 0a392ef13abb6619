"""benchmarks/gpu_check.sh cannot rot unseen: its CPU dry run takes every step of the GPU check
(tiny sizes, --device cpu) and writes every table and log. Real Omniglot comes from a small
stand-in in the official format, never from a shared data folder a clone lacks. No timings are asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "tests", "run-glyphs", "run-omniglot", "run-torchrun", "memory", "throughput-imaml-network",
         "throughput-imaml-head", "throughput-maml", "throughput-anil"]
FILES = ["setup.log", "tests.log", "run-glyphs.log", "run-omniglot.log", "run-torchrun.log", "memory.md",
         "throughput.md", "summary.txt"]


def _results(log: str) -> dict:
    """The results.json a run step appends to its log."""
    return json.loads(log[log.rindex("\n{") + 1:])


@pytest.mark.long  # docs/architecture.md, "The test suite"
def test_cpu_dry_run_takes_every_step_and_writes_every_file(tmp_path, data_root):
    out = tmp_path / "out"
    env = {**os.environ, "IMAML_PYTHON": sys.executable,
           "GPU_CHECK_OMNIGLOT_ZIP": str(tmp_path / "absent" / "images_background_small1.zip")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--data-root", data_root],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    assert [line[0] for line in summary] == STEPS
    assert all(line[1] == "ok" for line in summary), summary
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert "torch" in (out / "setup.log").read_text()
    assert " passed" in (out / "tests.log").read_text()
    omniglot = (out / "run-omniglot.log").read_text()
    assert "small stand-in" in omniglot and _results(omniglot)["test"]["num_tasks"] == 20  # the 20 runs
    for step in ("run-glyphs", "run-torchrun"):
        assert _results((out / f"{step}.log").read_text())["test"]["num_tasks"] == 4, step
    memory = (out / "memory.md").read_text()
    assert "| 1 |" in memory and "error" not in memory  # one row of each column: the path, not the growth
    throughput = (out / "throughput.md").read_text()
    rows = [line for line in throughput.splitlines() if line.startswith("| 1×28×28 | 2 | 2 |")]
    assert len(rows) == 4, throughput  # one per method
    assert all(f"## {name}" in throughput for name in ("imaml-network", "imaml-head", "maml", "anil"))
