"""Fetching a missing benchmark with learn2learn (``--download``): once per node, one try per
file with bounded waits, one line per file, then a success line or one error line.

learn2learn's dataset classes fetch with ``requests`` (no timeout), or through torchvision's
urllib for Omniglot (no timeout either), fall back to other mirrors on any error and print
as they go: offline, a two-process run printed 18 "Downloading" lines and an error whose
URL was cut short. The classes still decide what to fetch and where to put it, but every
fetch goes through ``_Fetcher``, which names the whole URL, bounds the wait and, after a
failure, lets no mirror or later split try again; their own output is discarded.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, TextIO

from envs.datasets import DATASETS, BenchmarkSpec, import_learn2learn, missing_files
from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["download", "fetch_missing", "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "SOCKET_TIMEOUT_S"]

_L2L_CLASSES = {"omniglot": "FullOmniglot", "mini-imagenet": "MiniImagenet",
                "tiered-imagenet": "TieredImagenet", "cifarfs": "CIFARFS", "fc100": "FC100"}

# requests (learn2learn): seconds to connect, and seconds without a byte before giving up.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# urllib (torchvision's Omniglot) has one bound, for connecting and for each read.
SOCKET_TIMEOUT_S = 20.0
# learn2learn.data.utils.download_file_from_google_drive's URL (a local variable there) + its id.
GOOGLE_DRIVE_URL = "https://docs.google.com/uc?export=download&id={}"


def fetch_missing(config: RunConfig) -> None:
    """``--download`` from the launcher, before any worker process starts: fetched once, and a
    failure is one UsageError before any output folder or process exists. Nothing happens
    without ``--download``, for tasks that are not downloadable benchmarks, when no file is
    missing (no file is written then), or in a process of a job (``WORLD_SIZE`` > 1): there the
    node's first process fetches in ``build_engine`` while the others wait
    (``engines.distributed.node_main_first``)."""
    if not config.download or config.task not in DATASETS or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    download(DATASETS[config.task], Path(config.data_root))


def download(spec: BenchmarkSpec, root: Path) -> None:
    """``--download``: fetch what is missing with learn2learn's dataset classes, then check
    every file; a failed or bogus download (an HTML page saved as a pickle) is removed and
    reported in one line. Only a node's first process (``LOCAL_RANK`` 0) fetches: the others
    would repeat the same failing tries."""
    missing = missing_files(spec, root)
    if not missing:
        return
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        raise UsageError(f"--download {spec.name}: {root / missing[0]} is still missing after this node's first "
                         f"process tried to fetch it; {_fix(spec, root)}")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.rglob("*"))
    out = sys.stdout  # ours; the downloaders' own output is discarded
    fetcher = _Fetcher(spec.name, out)
    dataset_cls = getattr(import_learn2learn().vision.datasets, _L2L_CLASSES[spec.name])
    modes = [None] if spec.name == "omniglot" else ["train", "validation", "test"]
    error: Optional[BaseException] = None
    start = time.monotonic()
    with _quiet(), _bounded_waits(), _fetches_through(fetcher, dataset_cls):
        for mode in modes:
            try:
                if mode is None:
                    dataset_cls(str(root), download=True)
                else:
                    dataset_cls(str(root), mode=mode, download=True)
            except Exception as err:  # noqa: BLE001 - any downloader failure is reported in one line
                error = err
                break  # the next split would meet the same network
    bad = [p for p in sorted(set(root.rglob("*")) - before) if p.is_file() and _is_html(p)]
    for path in bad:
        path.unlink()
    if bad:
        server = fetcher.urls.get(os.path.abspath(bad[0]), "the server")
        raise UsageError(f"--download {spec.name}: {server} sent an HTML page instead of {bad[0].name} (removed); "
                         f"try again later, or {_fix(spec, root)}")
    if error is not None or missing_files(spec, root):
        _remove_empty_folders(root, before, created)  # a failed download leaves no trace
        raise UsageError(f"--download {spec.name}: {fetcher.failure_text(error)}; {_fix(spec, root)}")
    print(f"downloaded {spec.name} into {root}: {len(fetcher.urls)} file(s), {fetcher.bytes / 1e6:.1f} MB "
          f"in {time.monotonic() - start:.0f} s", file=out, flush=True)


class _Refetch(Exception):
    """learn2learn falling back to a mirror for a file already fetched (its content was bad)."""


class _Fetcher:
    """Every network fetch of one ``download``: announced with its whole URL, tried once, and
    none after the first failure (learn2learn would fall back to its mirrors, then try the
    next split, each printing)."""

    def __init__(self, name: str, out: TextIO):
        self.name, self.out = name, out
        self.urls: Dict[str, str] = {}  # destination (absolute) -> URL, in fetch order
        self.failure: Optional[BaseException] = None
        self.failed_url: Optional[str] = None
        self.bytes = 0

    def __call__(self, url: str, destination: str, fetch: Callable[[], None]) -> None:
        if self.failure is not None:
            raise self.failure
        destination = os.path.abspath(destination)
        if destination in self.urls:
            raise _Refetch(f"{destination} was fetched once already, from {self.urls[destination]}")
        self.urls[destination] = url
        print(f"downloading {self.name} from {url} ...", file=self.out, flush=True)
        try:
            fetch()
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(destination)  # a partial file would pass for a downloaded one next time
            if isinstance(err, Exception):
                self.failure, self.failed_url = err, url
            raise
        with contextlib.suppress(OSError):
            self.bytes += os.path.getsize(destination)

    def failure_text(self, error: Optional[BaseException]) -> str:
        """Why the download failed, with the whole URL of the failing fetch."""
        if self.failure is not None:
            return f"could not fetch {self.failed_url} ({_reason(self.failure)})"
        if isinstance(error, _Refetch) and error.__context__ is not None:
            error = error.__context__  # what made learn2learn want another mirror
        last = next(reversed(self.urls.values()), None)
        if error is None:
            return f"files still missing after fetching {last}" if last else "files still missing"
        return f"no usable files from {last} ({_reason(error)})" if last else f"the download failed ({_reason(error)})"


def _reason(err: BaseException) -> str:
    """What went wrong, short and on one line: requests and urllib wrap the socket's error
    (name resolution, refused, timed out) in layers whose text repeats the URL in part."""
    inner = err
    for _ in range(4):
        nested = getattr(inner, "reason", None)
        if not isinstance(nested, BaseException) and inner.args and isinstance(inner.args[0], BaseException):
            nested = inner.args[0]
        if not isinstance(nested, BaseException):
            break
        inner = nested
    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>: ", "", str(inner)).strip()
    text = text.splitlines()[0] if text else type(inner).__name__
    return f"{type(err).__name__}: {text[:200]}"


def _fix(spec: BenchmarkSpec, root: Path) -> str:
    """The manual way: the files from ``spec.source``, under this --data-root."""
    if "<data-root>" in spec.source:
        return f"without network, get {spec.source.replace('<data-root>', str(root))}"
    return f"without network, get {spec.source} and put them in --data-root {root}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The downloaders' prints and progress bars (learn2learn, torchvision, tqdm) are dropped:
    ``_Fetcher`` says what is fetched, from where."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _bounded_waits() -> Iterator[None]:
    """requests and urllib wait forever by default: a network that drops packets would hang
    the run. Bounds are set only where the caller gave none, and only for the download."""
    import requests

    original = requests.sessions.Session.request

    def request(self, method, url, *args, **kwargs):
        if not args and kwargs.get("timeout") is None:
            kwargs["timeout"] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        return original(self, method, url, *args, **kwargs)

    previous = socket.getdefaulttimeout()
    requests.sessions.Session.request = request
    socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
        requests.sessions.Session.request = original


@contextlib.contextmanager
def _fetches_through(fetcher: _Fetcher, dataset_cls: type) -> Iterator[None]:
    """Route the dataset class's fetch functions (looked up in its module at call time)
    through ``fetcher``: learn2learn's ``download_file`` and ``download_file_from_google_drive``,
    torchvision's ``download_and_extract_archive`` for Omniglot."""
    import torchvision.datasets.omniglot as tv_omniglot

    module = sys.modules[dataset_cls.__module__]
    swaps = [(m, name, wrap) for m in (module, tv_omniglot) for name, wrap in _WRAPPERS.items() if hasattr(m, name)]
    originals = [(m, name, getattr(m, name)) for m, name, _ in swaps]
    try:
        for m, name, wrap in swaps:
            setattr(m, name, wrap(getattr(m, name), fetcher))
        yield
    finally:
        for m, name, original in originals:
            setattr(m, name, original)


def _wrap_download_file(original: Callable, fetcher: _Fetcher) -> Callable:
    def download_file(source: str, destination: str, size: Optional[int] = None) -> None:
        fetcher(source, destination, lambda: original(source, destination) if size is None
                else original(source, destination, size))
    return download_file


def _wrap_google_drive(original: Callable, fetcher: _Fetcher) -> Callable:
    def download_file_from_google_drive(id: str, destination: str) -> None:  # noqa: A002 - learn2learn's name
        fetcher(GOOGLE_DRIVE_URL.format(id), destination, lambda: original(id, destination))
    return download_file_from_google_drive


def _wrap_archive(original: Callable, fetcher: _Fetcher) -> Callable:
    def download_and_extract_archive(url: str, download_root: str, extract_root: Optional[str] = None,
                                     filename: Optional[str] = None, md5: Optional[str] = None,
                                     remove_finished: bool = False) -> None:
        destination = os.path.join(os.path.expanduser(download_root), filename or os.path.basename(url))
        fetcher(url, destination, lambda: original(url, download_root, extract_root, filename, md5, remove_finished))
    return download_and_extract_archive


_WRAPPERS: Dict[str, Callable[[Callable, _Fetcher], Callable]] = {
    "download_file": _wrap_download_file,
    "download_file_from_google_drive": _wrap_google_drive,
    "download_and_extract_archive": _wrap_archive,
}


def _remove_empty_folders(root: Path, before: set, created: bool) -> None:
    for folder in sorted((p for p in set(root.rglob("*")) - before if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty
    if created:
        with contextlib.suppress(OSError):
            root.rmdir()


def _is_html(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))
