"""Shared fixtures: a generated glyph cache (once per session) and small run configs, and the
device of the tests marked ``device`` (``--device``, cpu unless told: benchmarks/gpu_check.sh
runs them with ``-m device --device cuda``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaml.config import RunConfig  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the tests marked `device` run: cpu (default) or cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: a test of a device path; runs on --device (make_config's device)")
    config.addinivalue_line("markers", "long: a test of a minute or more (whole pipelines in subprocesses); started "
                                       "first, so that make test's parallel workers finish together")


def pytest_collection_modifyitems(session, config, items):
    """The long tests first (docs/architecture.md, "The test suite"): a long test drawn last would
    keep one worker busy after the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order


@pytest.fixture
def run_device(request) -> str:
    """``--device`` for a test marked ``device``, cpu for any other: one option moves the tests of
    the CUDA paths to a GPU while the rest, and CI, stay on the CPU."""
    marked = request.node.get_closest_marker("device") is not None
    return request.config.getoption("--device") if marked else "cpu"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """A data root with the glyph benchmark generated once for the whole session.

    Set IMAML_TEST_DATA to reuse a cache between sessions."""
    root = os.environ.get("IMAML_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    from envs.glyphs import load_glyphs

    load_glyphs(root)
    return root


@pytest.fixture
def make_config(data_root, tmp_path, run_device):
    """RunConfig factory: small, fast settings on ``run_device``; keyword arguments override."""

    def make(**overrides) -> RunConfig:
        base = dict(task="sinusoid", device=run_device, algo="maml", ways=None, shots=5, query_shots=5,
                    meta_batch_size=2, meta_steps=2, inner_steps=2, test_inner_steps=2,
                    inner_lr=0.01, val_every=1000, val_tasks=2, test_tasks=4, log_every=1,
                    data_root=data_root, output_dir=str(tmp_path / "run"))
        if overrides.get("task") == "glyphs":
            base.update(ways=3, shots=1, query_shots=2, channels=4, inner_lr=0.1)
        base.update(overrides)
        return RunConfig(**base).validate()

    return make


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: one thread is faster and makes float results order-independent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """``main()`` would share each meta-batch among one process per core (--processes 0);
    tests ask for more processes explicitly (tests/test_distributed.py, test_cli.py)."""
    from engines import distributed

    monkeypatch.setattr(distributed, "usable_cores", lambda: 1)
