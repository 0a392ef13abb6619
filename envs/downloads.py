"""Fetching a missing benchmark with learn2learn (``--download``), checked for what it fetched."""

from __future__ import annotations

from pathlib import Path

from envs.datasets import BenchmarkSpec, import_learn2learn, missing_files
from imaml.errors import UsageError

__all__ = ["download"]

_L2L_CLASSES = {"omniglot": "FullOmniglot", "mini-imagenet": "MiniImagenet",
                "tiered-imagenet": "TieredImagenet", "cifarfs": "CIFARFS", "fc100": "FC100"}


def download(spec: BenchmarkSpec, root: Path) -> None:
    """``--download``: fetch what is missing with learn2learn's downloader, then check every
    file; a failed or bogus download (an HTML page saved as a pickle) is removed and reported."""
    if not missing_files(spec, root):
        return
    root.mkdir(parents=True, exist_ok=True)
    before = {p for p in root.rglob("*")}
    dataset_cls = getattr(import_learn2learn().vision.datasets, _L2L_CLASSES[spec.name])
    modes = [None] if spec.name == "omniglot" else ["train", "validation", "test"]
    error = None
    for mode in modes:
        try:
            if mode is None:
                dataset_cls(str(root), download=True)
            else:
                dataset_cls(str(root), mode=mode, download=True)
        except Exception as err:  # noqa: BLE001 - any downloader failure is reported in one line
            error = error or f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    bad = [p for p in sorted(set(root.rglob("*")) - before) if p.is_file() and _is_html(p)]
    for path in bad:
        path.unlink()
    if bad:
        raise UsageError(f"--download {spec.name}: the server sent an HTML page instead of "
                         f"{bad[0].name} (removed); try again later or get {spec.source}")
    if missing_files(spec, root):
        raise UsageError(f"--download {spec.name}: the download failed ({error or 'files still missing'}); "
                         f"get {spec.source}")


def _is_html(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))
