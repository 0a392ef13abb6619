"""One run per output folder: ``<output-dir>/.lock``, held with ``flock`` for the run's life.

The kernel drops a flock when its holder ends, however it ends (kill -9 too), so a lock left
behind by a run that is gone is simply taken: no stale lock to clean up by hand. The file
names its holder (pid and host) for the one line that stops a second run into the folder.
A local multi-process job (``--processes N``) takes the lock in its launcher and hands the
open file to its workers (``environment``, ``fds``), so rank 0 holds it too and a worker left
running after its launcher still keeps the folder; under torchrun, rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from imaml.errors import UsageError

__all__ = ["OutputLock", "ENV", "in_use"]

ENV = "IMAML_OUTPUT_LOCK"  # "<fd>" of the launcher's lock, in a local job's workers


class OutputLock:
    """``with OutputLock(folder).acquire():`` the folder is this run's until the block ends."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.fd: Optional[int] = None
        self.owned = False  # False: held by our launcher (or not at all), not ours to remove

    def acquire(self) -> "OutputLock":
        """Take the lock, or stop with a UsageError naming the folder and the run that has it."""
        self.fd = self._inherited()
        if self.fd is not None:  # name this worker too: it keeps the folder if its launcher is killed
            os.pwrite(self.fd, f", its rank 0 pid {os.getpid()}".encode(), os.fstat(self.fd).st_size)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process starting up"
                os.close(fd)
                raise in_use(self.folder, holder) from None
            except OSError as err:  # a filesystem without locks: say so and go on
                os.close(fd)
                print(f"warning: cannot lock --output-dir {self.folder} ({err.strerror or err}); make sure "
                      f"no other run writes there", file=sys.stderr)
                return self
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
                self.fd, self.owned = fd, True
            else:  # its last holder removed it between our open and our lock: take the new one
                os.close(fd)
        return self

    def holder(self) -> Optional[str]:
        """Who holds the folder now (another run, still going; not our own job's launcher), or
        None; takes nothing."""
        if self._inherited() is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process starting up"
        except OSError:
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the folder back: the file goes first, while still held, so no one locks a
        file that is no longer there."""
        if self.fd is not None and self.owned:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
        self.fd, self.owned = None, False

    def environment(self) -> Dict[str, str]:
        """What a local job's workers need in their environment to hold this lock with us."""
        return {ENV: str(self.fd)} if self.fd is not None else {}

    def fds(self) -> Tuple[int, ...]:
        """The file descriptor the workers inherit (``subprocess.Popen(pass_fds=...)``)."""
        return (self.fd,) if self.fd is not None else ()

    def _inherited(self) -> Optional[int]:
        """The launcher's lock on this folder, if this process inherited it."""
        fd = os.environ.get(ENV, "")
        return int(fd) if fd.isdigit() and _same_file(int(fd), self.path) else None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(folder: Path, holder: str) -> UsageError:
    """The one line that stops a second run into a folder in use."""
    return UsageError(f"--output-dir {folder}: in use by another run ({holder}); wait for it to end or stop it, "
                      f"or pass another --output-dir")


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
