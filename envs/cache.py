"""Derived files under ``--data-root``: trusted only after a check, written so a kill cannot
leave half of one in charge.

``read`` loads a cache and hands it to the caller's ``check``; a file that cannot be read
(truncated, corrupt, not the format) or that the check refuses (wrong shape or dtype, made
from a source that has changed since) is reported in one line and the caller rebuilds it.
``write`` writes to a temporary file in the same folder and renames it over the cache, so a
reader sees the old cache or the new one; temporary files of writers that died (kill -9)
are removed. ``fingerprint`` says what a cache was made from, to be recorded in it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

__all__ = ["fingerprint", "read", "write", "say"]


def say(line: str) -> None:
    """One line on stderr, from the process that builds a node's caches (LOCAL_RANK 0)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def fingerprint(source: Path) -> str:
    """What a cache was made from: a file's content (sha256; the sources cached here are a few
    MB), or a folder's files with the size and modification time of each."""
    digest = hashlib.sha256()
    if source.is_file():
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"
    for folder, _, files in sorted(os.walk(source)):
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(folder, source)}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"


def read(path: Path, load: Callable[[Path], Any], check: Callable[[Any], Optional[str]]) -> Optional[Any]:
    """The cache at ``path`` if ``load`` reads it and ``check`` (None: fine, else why not)
    accepts it; None if there is none or it cannot be trusted (said in one line)."""
    if not path.exists():
        return None
    try:
        value = load(path)
        why = check(value)
    except Exception as err:  # noqa: BLE001 - numpy and torch raise many types for bad files
        text = str(err).strip()
        why = f"unreadable or truncated ({text.splitlines()[0][:100] if text else type(err).__name__})"
    else:
        if why is None:
            return value
    say(f"cache {path}: {why}; rebuilding it")
    return None


def write(path: Path, save: Callable[[BinaryIO], None]) -> bool:
    """Write a cache atomically with ``save(file)``; False (said in one line) where it cannot
    be written, e.g. a read-only data root: the run goes on with what it built in memory."""
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}")
    try:
        _remove_orphans(path)
        with open(tmp, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as err:
        say(f"cache {path}: cannot write it ({err.strerror or err}); this run goes without it and the next "
            f"rebuilds it again (make {path.parent} writable to keep it)")
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _tmp_prefix(path: Path) -> str:
    """Temporary files name their writer's host and pid (data roots may be shared by nodes)."""
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _remove_orphans(path: Path) -> None:
    """Temporary files of this cache whose writer, on this host, is gone (killed while writing)."""
    prefix = _tmp_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
