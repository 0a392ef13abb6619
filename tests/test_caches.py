"""Derived files under --data-root (envs/cache.py): a cache that cannot be trusted is rebuilt
with one line saying so, a changed source is read again, and a kill during a build leaves no
half file in charge. The glyph benchmark is shrunk to 9 classes so each rebuild is instant."""

import io
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from envs import glyphs
from envs.omniglot import CACHE, read_set
from imaml.app.cli import main
from imaml.errors import UsageError
from tests.benchmark_files import official_omniglot_set, read_code, write_cifarfs, write_files

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(NUM_CLASSES=9, SPLITS={"train": (0, 3), "val": (3, 6), "test": (6, 9)})


@pytest.fixture
def small_glyphs(monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setattr(glyphs, name, value)
    return np.stack([glyphs.render_class(c) for c in range(9)])


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_GLYPHS = {
    "truncated": lambda good: _npy(good)[:len(_npy(good)) // 2],
    "empty": lambda good: b"",
    "not numpy": lambda good: b"<!doctype html><html>",
    "an npz archive": lambda good: _npz(good),
    "wrong shape": lambda good: _npy(good[:5]),
    "wrong dtype": lambda good: _npy(good.astype(np.float32)),
    "another generator": lambda good: _npy(255 - good),
}


def _npz(array) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=array)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(BAD_GLYPHS))
def test_an_untrusted_glyph_cache_is_rebuilt_with_one_line(tmp_path, capsys, small_glyphs, case):
    path = tmp_path / "glyphs" / f"glyphs-v{glyphs.GENERATOR_VERSION}.npy"
    path.parent.mkdir()
    path.write_bytes(BAD_GLYPHS[case](small_glyphs))
    images = glyphs.load_glyphs(tmp_path)
    err = capsys.readouterr().err.strip()
    assert np.array_equal(images, small_glyphs)
    assert len(err.splitlines()) == 1 and err.startswith(f"cache {path}: ") and err.endswith("rebuilding it"), err
    assert np.array_equal(glyphs.load_glyphs(tmp_path), small_glyphs) and capsys.readouterr().err == ""
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_cache_that_cannot_be_written_is_one_line_and_the_run_goes_on(tmp_path, capsys, small_glyphs, monkeypatch):
    import envs.cache

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(envs.cache.os, "replace", read_only)
    assert np.array_equal(glyphs.load_glyphs(tmp_path), small_glyphs)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write it (Read-only file system)" in err, err
    assert list((tmp_path / "glyphs").iterdir()) == []


KILLED_BUILD = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from envs import glyphs
glyphs.NUM_CLASSES = 9
save = np.save
def save_half_then_wait(f, array):  # the build's write, stopped halfway for the parent to kill it
    save(f, array)
    f.truncate(f.tell() // 2)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
np.save = save_half_then_wait
glyphs.load_glyphs({root_dir!r})
"""


def test_sigkill_during_a_cache_build_then_a_normal_run(tmp_path, capsys, small_glyphs):
    data = tmp_path / "data"
    script = KILLED_BUILD.format(root=str(ROOT), root_dir=str(data))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = data / "glyphs"
    half = f".glyphs-v2.npy.tmp-{socket.gethostname()}-{proc.pid}"
    assert [p.name for p in folder.iterdir()] == [half]  # half a file, and not in charge
    code = main(["--task", "glyphs", "--algo", "maml", "--ways", "3", "--shots", "1", "--query-shots", "1",
                 "--channels", "4", "--meta-batch-size", "2", "--meta-steps", "1", "--inner-steps", "1",
                 "--test-inner-steps", "1", "--val-tasks", "2", "--test-tasks", "2", "--data-root", str(data),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["glyphs-v2.npy"]  # the orphan is gone
    assert np.array_equal(np.load(folder / "glyphs-v2.npy"), small_glyphs)


# ------------------------------------------------------------------------------ Omniglot
SET = "images_background_small1"


def _zip_set(root, alphabets, first_code=1):
    write_files(official_omniglot_set(SET, alphabets, 2, first_code), root, root / "omniglot-py" / f"{SET}.zip")


def _codes(loaded):
    return [read_code(image) for image in loaded.images[:, 0]]


def test_a_replaced_zip_is_read_again_not_its_old_cache(tmp_path, capsys):
    _zip_set(tmp_path, 2)
    assert _codes(read_set(tmp_path, SET)) == [1, 2, 3, 4] and capsys.readouterr().err == ""
    _zip_set(tmp_path, 3, first_code=11)  # a re-download of another version, under the same name
    assert _codes(read_set(tmp_path, SET)) == [11, 12, 13, 14, 15, 16]
    err = capsys.readouterr().err.strip()
    assert err == f"cache {tmp_path / 'omniglot-py' / CACHE.format(SET)}: was made from another {SET}.zip " \
                  f"than the one there now; rebuilding it"
    assert _codes(read_set(tmp_path, SET)) == [11, 12, 13, 14, 15, 16] and capsys.readouterr().err == ""


def test_a_changed_file_in_an_extracted_set_is_read_again(tmp_path, capsys):
    files = official_omniglot_set(SET, 1, 2)
    write_files(files, tmp_path / "omniglot-py")
    assert _codes(read_set(tmp_path, SET)) == [1, 2]
    others = official_omniglot_set(SET, 1, 2, first_code=7)  # character02 redrawn as another character
    for (name, _), data in zip(files.items(), others.values()):
        if "character02" in name:
            (tmp_path / "omniglot-py" / name).write_bytes(data)
    assert _codes(read_set(tmp_path, SET)) == [1, 8]
    assert "was made from another" in capsys.readouterr().err


BAD_SETS = {
    "truncated": lambda good: good[:len(good) // 3],
    "an older cache without its source": lambda good: _torch_bytes({k: v for k, v in torch.load(
        io.BytesIO(good), weights_only=True).items() if k != "source"}),
    "wrong dtype": lambda good: _torch_bytes({**torch.load(io.BytesIO(good), weights_only=True),
                                              "images": torch.zeros(4, 20, 1, 28, 28)}),
    "wrong shape": lambda good: _torch_bytes({**torch.load(io.BytesIO(good), weights_only=True),
                                              "images": torch.zeros(4, 20, 28, 28, dtype=torch.uint8)}),
    "names missing": lambda good: _torch_bytes({**torch.load(io.BytesIO(good), weights_only=True), "alphabets": []}),
    "a list": lambda good: _torch_bytes([1, 2]),
}


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_an_untrusted_omniglot_cache_is_rebuilt_with_one_line(tmp_path, capsys, case):
    _zip_set(tmp_path, 2)
    read_set(tmp_path, SET)
    cache = tmp_path / "omniglot-py" / CACHE.format(SET)
    cache.write_bytes(BAD_SETS[case](cache.read_bytes()))
    loaded = read_set(tmp_path, SET)
    err = capsys.readouterr().err.strip()
    assert _codes(loaded) == [1, 2, 3, 4] and loaded.alphabets == ["Alphabet_A"] * 2 + ["Alphabet_B"] * 2
    assert len(err.splitlines()) == 1 and err.startswith(f"cache {cache}: ") and err.endswith("rebuilding it"), err
    read_set(tmp_path, SET)
    assert capsys.readouterr().err == ""


def test_a_cache_whose_source_is_gone_is_one_line_naming_the_fix(tmp_path):
    _zip_set(tmp_path, 2)
    read_set(tmp_path, SET)
    (tmp_path / "omniglot-py" / f"{SET}.zip").unlink()  # nothing to check the cache against
    with pytest.raises(UsageError, match=f"neither .* exists; get {SET}.zip from github.com/brendenlake/omniglot"):
        read_set(tmp_path, SET)


# ------------------------------------------------------------------------------ CIFAR-FS
def test_cifarfs_reads_its_classes_in_place_as_learn2learn_lists_them(tmp_path):
    from envs.datasets import DATASETS, import_learn2learn, load_split

    write_cifarfs(tmp_path)
    ours = {split: load_split(DATASETS["cifarfs"], tmp_path, split) for split in ("train", "val", "test")}
    l2l = import_learn2learn()
    for split, mode in (("train", "train"), ("val", "validation"), ("test", "test")):
        theirs = l2l.vision.datasets.CIFARFS(str(tmp_path), mode=mode).samples  # makes cifarfs/processed/
        names = lambda items: [(Path(p).parent.name, Path(p).name) for p in items]  # noqa: E731
        assert names(ours[split].items) == names(p for p, _ in theirs)
        assert [int(c) for c in np.concatenate(ours[split].members)] == list(range(len(theirs)))
    # a copy that a kill cut short (one class of train) is not what the split is read from
    processed = tmp_path / "cifarfs" / "processed" / "train"
    for folder in sorted(processed.iterdir())[1:]:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    assert len(load_split(DATASETS["cifarfs"], tmp_path, "train").sizes) == 4
