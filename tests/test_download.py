"""``--download`` without a network (issue 38): one try, from one process, one line naming the
whole URL, a bounded wait, then one error line naming where to get the files by hand.

No test reaches beyond this machine: every fetch goes through ``HTTPS_PROXY``/``HTTP_PROXY``
pointed at a loopback server of the test's own, which counts the connections (the
attempts, from every process of a run) and either closes them at once (a network that
refuses) or never answers (one that drops packets)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List

import pytest

from envs import downloads
from envs.datasets import DATASETS
from envs.downloads import download, fetch_missing
from imaml.app.cli import main
from imaml.config import RunConfig
from imaml.errors import UsageError
from tests.benchmark_files import WRITERS

# The first URL learn2learn 0.2.0 (pinned by scripts/setup-env.sh) fetches for each benchmark:
# mini-ImageNet's is a local variable of MiniImagenet.__init__, Omniglot's torchvision's
# Omniglot.download_url_prefix + the zip.
FIRST_URL = {
    "mini-imagenet": "https://www.dropbox.com/s/9g8c6w345s2ek03/mini-imagenet-cache-train.pkl?dl=1",
    "tiered-imagenet": "https://zenodo.org/record/7978538/files/tiered-imagenet-class_names.txt",
    "cifarfs": "https://zenodo.org/record/7978538/files/cifar100.zip",
    "fc100": "https://zenodo.org/record/7978538/files/fc100.zip",
    "omniglot": "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
}


class LoopbackProxy:
    """A proxy on 127.0.0.1 that counts connections and refuses (closes) or ignores them."""

    def __init__(self, answer: bool):
        self.answer, self.connections, self.held = answer, 0, []  # held: ignored sockets, kept open
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            if self.answer:
                conn.close()
            else:
                self.held.append(conn)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        for conn in [self.server, *self.held]:
            conn.close()


def _route_through(monkeypatch, proxy: LoopbackProxy) -> None:
    """Every process of the run (the environment is inherited) fetches through ``proxy``."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener keeps the proxy it first saw


@pytest.fixture
def refusing(monkeypatch) -> Iterator[LoopbackProxy]:
    proxy = LoopbackProxy(answer=True)
    _route_through(monkeypatch, proxy)
    yield proxy
    proxy.stop()


@pytest.fixture
def silent(monkeypatch) -> Iterator[LoopbackProxy]:
    proxy = LoopbackProxy(answer=False)
    _route_through(monkeypatch, proxy)
    yield proxy
    proxy.stop()


def _config(task: str, root: Path, **overrides) -> RunConfig:
    return RunConfig(task=task, data_root=str(root), ways=2, download=True, **overrides).validate()


def _downloading_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "ownloading" in line]  # ours and learn2learn's


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_offline_download_is_one_try_one_line_and_one_error(task, tmp_path, refusing, capsys):
    capsys.readouterr()
    root = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(UsageError) as raised:
        fetch_missing(_config(task, root))
    elapsed = time.monotonic() - start
    out = capsys.readouterr()
    message = str(raised.value)
    assert refusing.connections == 1, f"{refusing.connections} tries: {out.out}"
    assert _downloading_lines(out.out + out.err) == [f"downloading {task} from {FIRST_URL[task]} ..."]
    assert len(message.splitlines()) == 1
    assert f"could not fetch {FIRST_URL[task]} (" in message  # the whole URL, not cut short
    assert DATASETS[task].source.split(" (")[0].replace("<data-root>", str(root)) in message
    assert str(root) in message
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert not root.exists()  # a failed download leaves nothing behind


def test_a_run_of_two_processes_tries_once(tmp_path, refusing, capfd):
    """The whole command: whichever process fetches (the launcher, or the workers' first
    process while the other waits), the network is tried once and said once."""
    capfd.readouterr()
    start = time.monotonic()
    code = main(["--task", "mini-imagenet", "--download", "true", "--data-root", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out"), "--processes", "2", "--device", "cpu",
                 "--algo", "maml", "--ways", "2", "--shots", "1", "--query-shots", "1",
                 "--meta-batch-size", "2", "--meta-steps", "1", "--channels", "4"])
    elapsed = time.monotonic() - start
    out = capfd.readouterr()
    assert code == 2, out.err
    assert refusing.connections == 1, f"{refusing.connections} tries: {out.out}"
    assert _downloading_lines(out.out + out.err) == [f"downloading mini-imagenet from {FIRST_URL['mini-imagenet']} ..."]
    errors = out.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --download mini-imagenet: could not fetch "), out.err
    assert FIRST_URL["mini-imagenet"] in errors[0] and "zenodo.org/record/7978538" in errors[0]
    assert elapsed < 30, f"{elapsed:.1f} s"


@pytest.mark.parametrize("task", ["mini-imagenet", "omniglot"])  # requests (learn2learn), urllib (torchvision)
def test_a_network_that_never_answers_does_not_hang(task, tmp_path, silent, monkeypatch, capsys):
    for name in ("CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "SOCKET_TIMEOUT_S"):
        monkeypatch.setattr(downloads, name, 0.5)
    outcome = {}

    def attempt() -> None:
        try:
            fetch_missing(_config(task, tmp_path / "data"))
        except UsageError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the download waits without a bound"
    assert silent.connections == 1 and FIRST_URL[task] in outcome["error"], outcome
    assert "timed out" in outcome["error"].lower()


def test_only_a_nodes_first_process_fetches(tmp_path, refusing, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match="still missing after this node's first process tried"):
        download(DATASETS["fc100"], tmp_path / "data")
    assert refusing.connections == 0 and not _downloading_lines(capsys.readouterr().out)


def test_the_launcher_leaves_a_jobs_processes_to_build_engine(tmp_path, refusing, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun worker, or a worker of a local job
    fetch_missing(_config("fc100", tmp_path / "data"))
    assert refusing.connections == 0 and not (tmp_path / "data").exists()


def test_nothing_is_fetched_or_written_unless_asked_and_missing(tmp_path, refusing, capsys):
    capsys.readouterr()
    fetch_missing(RunConfig(task="fc100", data_root=str(tmp_path / "absent"), ways=2).validate())  # no --download
    WRITERS["fc100"](tmp_path / "present")
    files = sorted((tmp_path / "present").rglob("*"))
    fetch_missing(_config("fc100", tmp_path / "present"))
    assert refusing.connections == 0 and not capsys.readouterr().out
    assert not (tmp_path / "absent").exists() and sorted((tmp_path / "present").rglob("*")) == files


def test_a_mirror_is_not_tried_after_a_bad_file(tmp_path, monkeypatch, capsys):
    """learn2learn falls back to Google Drive when FC100's zip is not a zip: one fetch only, the
    HTML page removed and reported with the URL that sent it."""
    import learn2learn.vision.datasets.fc100 as module

    fetched = []

    def fake_download(source, destination, size=None):
        fetched.append(source)
        Path(destination).write_text("<!DOCTYPE html><html>quota exceeded</html>")

    monkeypatch.setattr(module, "download_file", fake_download)
    monkeypatch.setattr(module, "download_file_from_google_drive", lambda id, destination: fetched.append(id))
    with pytest.raises(UsageError, match="HTML page instead of fc100.zip [(]removed[)]") as raised:
        download(DATASETS["fc100"], tmp_path)
    assert fetched == [FIRST_URL["fc100"]] and FIRST_URL["fc100"] in str(raised.value)
    assert not list(tmp_path.iterdir())


def test_a_download_that_works_says_so_in_one_more_line(tmp_path, monkeypatch, capsys):
    """The same routing on a working network (learn2learn's fetch replaced by one that writes
    FC100's real zip): one line per file fetched, one when done, the files read as usual."""
    import zipfile

    import learn2learn.vision.datasets.fc100 as module

    WRITERS["fc100"](tmp_path / "served")
    archive = tmp_path / "fc100.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (tmp_path / "served").iterdir():
            z.write(path, path.name)
    monkeypatch.setattr(module, "download_file", lambda source, destination, size=None:
                        Path(destination).write_bytes(archive.read_bytes()))
    capsys.readouterr()
    fetch_missing(_config("fc100", tmp_path / "data"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"downloading fc100 from {FIRST_URL['fc100']} ..." and len(lines) == 2
    assert lines[1].startswith(f"downloaded fc100 into {tmp_path / 'data'}: 1 file(s)")
    assert sorted(p.name for p in (tmp_path / "data").glob("FC100_*")) == [f"FC100_{s}.pickle" for s in
                                                                           ("test", "train", "val")]
