"""Workarounds for our stack's packaging defects, applied in one place.

torchvision 0.28.0 from PyPI is a CUDA build. Beside our CPU torch its compiled library
cannot load, and its import then dies registering a fake kernel for an operator that was
never declared (``RuntimeError: operator torchvision::nms does not exist``). Declaring the
two operator schemas first lets datasets and transforms import; the compiled ops (``nms``,
image decoding) stay unavailable, which nothing here uses. Where the library does load
(a matching CUDA torch on a GPU machine) nothing is declared.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

__all__ = ["import_torchvision", "import_learn2learn", "check_stack"]

_declared: list = []  # keeps the torch.library fragment alive


def _declare_torchvision_schemas() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(path)
            return  # the real operators exist
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(lib)


def import_torchvision():
    """Import torchvision, declaring its missing operator schemas first if needed."""
    import sys

    if "torchvision" not in sys.modules and not _declared:
        _declare_torchvision_schemas()
    import torchvision

    return torchvision


def import_learn2learn():
    """Import learn2learn (which imports torchvision and gym) without their noise."""
    import warnings

    import_torchvision()
    os.environ.setdefault("GYM_DISABLE_WARNINGS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # gym's "unmaintained" notice
            import learn2learn
    return learn2learn


def check_stack() -> None:
    """Import every package of the stack once; used by the set-up script as a smoke test."""
    import betty  # noqa: F401
    import wandb  # noqa: F401

    import_learn2learn()
    print(f"stack ok: torch {torch.__version__}, betty-ml {betty.__version__}")
