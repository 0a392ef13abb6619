"""One run per output folder (imaml/app/output_lock.py): a second run into a folder in use stops
before any work with one line naming the folder and the run that holds it; a run killed with
-9 leaves a lock that the next run simply takes; --resume of a killed or finished run works."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imaml import checkpoint
from imaml.app.cli import main
from imaml.errors import UsageError
from imaml.app.output_lock import ENV, OutputLock

ROOT = Path(__file__).resolve().parents[1]


def _sinusoid(out, *extra):
    return ["--task", "sinusoid", "--algo", "maml", "--meta-batch-size", "2", "--inner-steps", "1",
            "--test-inner-steps", "1", "--val-every", "3", "--val-tasks", "2", "--test-tasks", "2",
            "--log-every", "3", "--output-dir", str(out), *extra]


def _refused(capsys, argv, holder_pid):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --output-dir ") and "in use by another run" in err, err
    assert f"pid {holder_pid} on " in err, err
    return err


def _no_work(*args, **kwargs):
    raise AssertionError("work started")


def test_a_second_run_into_a_folder_in_use_stops_and_a_killed_run_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # one process: a --processes N job's workers outlive a killed launcher (and hold the folder)
    first = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *_sinusoid(out, "--meta-steps", "100000",
                                                                                "--processes", "1")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # a guard against a hang, not a timed assertion
        while not (out / "checkpoints" / "latest.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoints" / "latest.pt").exists(), f"no checkpoint; the first run exited {first.poll()}"
        config = (out / "config.json").read_bytes()
        import engines
        from engines import distributed

        with monkeypatch.context() as patch:
            patch.setattr(engines, "build_engine", _no_work)
            patch.setattr(distributed, "run_local_job", _no_work)
            patch.setattr(distributed, "usable_cores", lambda: 2)
            err = _refused(capsys, _sinusoid(out, "--meta-steps", "3", "--seed", "7", "--processes", "1"), first.pid)
            assert str(out) in err
            _refused(capsys, _sinusoid(out, "--meta-steps", "3", "--seed", "7", "--processes", "2"), first.pid)
            _refused(capsys, ["--resume", str(out), "--meta-steps", "3", "--processes", "1"], first.pid)
        assert (out / "config.json").read_bytes() == config  # nothing of the first run's was touched
        assert first.poll() is None  # and it is still running
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".lock").exists()  # left behind by the killed run, held by no one
    step = checkpoint.load(out / "checkpoints" / "latest.pt")["step"]
    assert main(["--resume", str(out), "--meta-steps", str(step + 1), "--processes", "1"]) == 0
    assert not (out / ".lock").exists()  # given back at the end
    assert main(["--resume", str(out), "--meta-steps", str(step + 2), "--processes", "2"]) == 0  # a finished run
    assert checkpoint.load(out / "checkpoints" / "latest.pt")["step"] == step + 2
    assert not (out / ".lock").exists()


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from imaml.app.output_lock import OutputLock
lock = OutputLock({out!r}).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_folder_is_refused_and_a_lock_whose_holder_is_gone_is_taken(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"--output-dir {out}: in use by another run \\(pid {holder.pid} on "):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputLock(out).acquire() as lock:
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        assert lock.owned
        with pytest.raises(UsageError, match="in use by another run"):  # even from this same process
            OutputLock(out).acquire()
        with monkeypatch.context() as patch:  # a local job's worker, handed the launcher's lock
            patch.setenv(ENV, lock.environment()[ENV])
            worker = OutputLock(out).acquire()
            assert worker.fd == lock.fd and not worker.owned
            worker.release()  # not the worker's to give back
        me = f"pid {os.getpid()}"
        assert (out / ".lock").read_text() == f"{me} on {socket.gethostname()}, its rank 0 {me}"
    assert not (out / ".lock").exists()
    assert main(_sinusoid(out, "--meta-steps", "1", "--processes", "1")) == 0
