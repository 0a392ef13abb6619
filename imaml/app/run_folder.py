"""A run's folder: chosen, checked and claimed before any work; written only once the run has
passed every check, so that no run, refused, failed or finished, changes another run's files.

Without ``--output-dir`` each run gets a new folder ``runs/<date>_<time>`` (``runs/<W&B id>``
with W&B on) and ``runs/latest`` points at the newest, as Lightning's ``version_N`` and Hydra's
dated folders do. A folder the user names is used as given; one that already holds a run is
refused unless ``--resume`` continues it or ``--overwrite`` replaces it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

from imaml.config import WANDB_ID, RunConfig
from imaml.errors import UsageError
from imaml.app.output_lock import OutputLock, in_use

__all__ = ["RUNS", "RUN_FILES", "NEW_FOLDER_ENV", "held_run", "choose_folder", "prepare_output_dir",
           "claimed", "begin_writing", "drop_if_empty", "checkpoint_path"]

RUNS = Path("runs")  # where folders are made for runs without --output-dir, beside runs/latest
# everything a run writes in its folder: what --overwrite removes, and what says a folder holds a run
RUN_FILES = ("config.json", "results.json", "metrics.jsonl", "inner_curves.jsonl", "checkpoints", "plots", "warmup",
             "wandb", "wandb-run-id")
_RUN_SUBFOLDERS = ("checkpoints", "plots", "warmup", "wandb")
NEW_FOLDER_ENV = "IMAML_NEW_RUN_FOLDER"  # a local job's workers: the folder their launcher made for them


def held_run(folder: Path) -> Optional[str]:
    """The first file in ``folder`` that a run wrote (so the folder holds one), or None; a plain
    file where a run keeps a folder is no run (``prepare_output_dir`` names it)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() if name in _RUN_SUBFOLDERS else path.is_file():
            return name
    return None


def choose_folder(config: RunConfig) -> Tuple[RunConfig, bool]:
    """(``config`` with its run's folder, whether the folder is a new one made here for a run
    without ``--output-dir``). The folder exists afterwards; nothing else is written. A named
    folder that holds a run is refused, unless the run continues (``--resume``) or replaces it
    (``--overwrite``)."""
    inherited = os.environ.get(NEW_FOLDER_ENV)
    if inherited and config.output_dir == inherited:  # made by this local job's launcher
        return config, True
    if config.output_dir is None:
        return replace(config, output_dir=str(_new_folder(config))), True
    folder = Path(config.output_dir)
    found = held_run(folder) if folder.is_dir() else None
    holder = OutputLock(folder).holder() if found else None
    if holder:
        raise in_use(folder, holder)
    if found and not (config.resume or config.overwrite):
        raise UsageError(f"--output-dir {folder}: holds a run ({found}); continue it with --resume {folder}, "
                         f"replace it with --overwrite, or name another folder")
    prepare_output_dir(str(folder))
    return config, False


def _new_folder(config: RunConfig) -> Path:
    """Make ``runs/<W&B id>`` (W&B on) or ``runs/<date>_<time>`` (``-2``, ``-3`` ... when two runs
    start in the same second): made here with ``mkdir``, so two runs never share one."""
    prepare_output_dir(str(RUNS))
    if config.wandb_mode != "disabled" and config.wandb_id and WANDB_ID.fullmatch(config.wandb_id):
        folder = RUNS / config.wandb_id
        if folder.is_dir() and held_run(folder):
            raise UsageError(f"{folder}: W&B run {config.wandb_id} has a run here already; continue it with "
                             f"--resume {folder}, or start a new W&B run (another --wandb-id)")
        folder.mkdir(exist_ok=True)
        return folder
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1, 1000):
        folder = RUNS / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise UsageError(f"{RUNS}: cannot make a new run folder for {stamp}; pass --output-dir")


def prepare_output_dir(path: str) -> Path:
    """Create ``path`` (and its parents) and check that files can be written there, so a bad one
    stops the run before any work, not at its first write; a UsageError names the path and the
    problem. Creates nothing else."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--output-dir {path}: exists and is not a directory") from None
    except OSError as err:
        raise UsageError(f"--output-dir {path}: cannot create this directory ({err.strerror or err})") from None
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--output-dir {path}: cannot write files in it ({err.strerror or err})") from None
    for sub in ("checkpoints", "plots"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise UsageError(f"--output-dir {path}: {out / sub} exists and is not a directory")
    return out


@contextmanager
def claimed(config: RunConfig) -> Iterator[Tuple[RunConfig, bool, OutputLock]]:
    """The run's folder chosen (``choose_folder``) and locked for the block: (``config`` with the
    folder, whether it is new, the lock); a new folder left empty (the run was refused before it
    wrote anything) is removed at the end."""
    config, new = choose_folder(config)
    try:
        with OutputLock(config.output_dir).acquire() as lock:
            yield config, new, lock
    finally:
        if new:
            drop_if_empty(Path(config.output_dir))


def begin_writing(folder: Path, continuing: bool, new: bool) -> None:
    """The run has passed every check: its folder becomes its own. A run that does not continue
    (``--resume``) starts with none of an earlier run's files (only ``--overwrite`` lets one be
    there); a new folder under runs/ becomes ``runs/latest``."""
    if not continuing:
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    if new:
        _point_latest(folder)


def _point_latest(folder: Path) -> None:
    """``runs/latest`` → ``folder``, replaced atomically; a real folder named latest (from an
    earlier version of this tool) is left as it is."""
    latest = folder.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        return
    link = folder.parent / f".latest.{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(folder.name, link)
    os.replace(link, latest)


def checkpoint_path(config: RunConfig) -> Optional[Path]:
    """The checkpoint a resumed or evaluation-only run starts from."""
    if config.resume:
        return Path(config.resume) / "checkpoints" / "latest.pt"
    if config.eval_only:
        return Path(config.checkpoint)
    return None


def drop_if_empty(folder: Path) -> None:
    """Remove a folder made for a run that was refused before it wrote anything."""
    try:
        folder.rmdir()
    except OSError:
        pass
