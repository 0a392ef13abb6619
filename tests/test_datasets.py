"""The real benchmarks' loading path, end to end, on tiny files in each real on-disk format."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from envs import build_task_sources
from envs.datasets import DATASETS
from imaml.app.cli import main
from imaml.config import RunConfig
from tests.benchmark_files import WRITERS

TINY = ["--algo", "maml", "--ways", "2", "--shots", "1", "--query-shots", "2", "--meta-batch-size", "2",
        "--meta-steps", "2", "--inner-steps", "1", "--test-inner-steps", "1", "--val-every", "1",
        "--val-tasks", "2", "--test-tasks", "2", "--channels", "4", "--log-every", "1"]

# each task also exercises one model / BatchNorm mode / recipe option on the real path
VARIANTS = {
    "omniglot": ["--model", "conv4-strided"],
    "mini-imagenet": ["--model", "resnet12", "--augment", "true", "--bn-mode", "inductive",
                      "--lr-schedule", "cosine"],
    "tiered-imagenet": ["--bn-mode", "episodic", "--algo", "imaml", "--inner-momentum", "0.5"],
    "cifarfs": ["--meta-optimizer", "sgd", "--lr-schedule", "step", "--lr-step-every", "1"],
    "fc100": ["--algo", "fomaml", "--test-query-shots", "3", "--meta-optimizer", "adamw"],
}


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    for writer in WRITERS.values():
        writer(root)
    return root


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_each_benchmark_meta_trains_and_meta_tests_from_its_files(benchmark_root, tmp_path, task, capsys):
    out = tmp_path / "out"
    code = main(["--task", task, "--data-root", str(benchmark_root), "--output-dir", str(out), *TINY,
                 *VARIANTS[task]])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["test"]["num_tasks"] == 2
    assert 0.0 <= results["test"]["mean"] <= 1.0
    flags = dict(zip(VARIANTS[task][::2], VARIANTS[task][1::2]))
    assert results["protocol"]["bn_mode"] == flags.get("--bn-mode", "transductive")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/query_loss" in r] == [1, 2]


@pytest.mark.parametrize("task", ["mini-imagenet", "tiered-imagenet", "fc100", "cifarfs"])
def test_served_labels_match_the_images_classes(benchmark_root, task):
    config = RunConfig(task=task, data_root=str(benchmark_root), ways=3, shots=2, query_shots=3).validate()
    spec = DATASETS[task]
    for split, source in build_task_sources(config).items():
        batch = source.sample(np.random.default_rng(0), 4)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        for t in range(4):
            task_ = batch.task(t)
            x = torch.cat([task_.support_x, task_.query_x]) * std + mean
            y = torch.cat([task_.support_y, task_.query_y])
            values = (x * 255).round().amin(dim=(1, 2, 3))  # the class's base value (noise is added)
            classes = ((values - 10) / 20).round()
            for label in range(3):
                assert classes[y == label].unique().numel() == 1  # one class per label
            assert classes.unique().numel() == 3  # and three different classes


def test_ragged_classes_are_sampled_within_each_class(benchmark_root):
    config = RunConfig(task="tiered-imagenet", data_root=str(benchmark_root), ways=2, shots=1,
                       query_shots=5).validate()  # the smallest class has 6 examples
    pool = build_task_sources(config)["train"].pool
    assert sorted(pool.sizes) == [6, 7, 8, 9]
    with pytest.raises(Exception, match="only 6 examples per class in its smallest class"):
        build_task_sources(RunConfig(task="tiered-imagenet", data_root=str(benchmark_root), ways=2, shots=2,
                                     query_shots=5).validate())


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_missing_files_name_what_is_expected_and_where_to_get_it(tmp_path, capsys, task):
    err = _one_line_error(capsys, ["--task", task, "--data-root", str(tmp_path / "empty"),
                                   "--output-dir", str(tmp_path / "out")])
    assert "missing" in err and str(tmp_path / "empty" / DATASETS[task].files[0]) in err
    assert "--download" in err and DATASETS[task].source.split()[0] in err


def test_an_html_page_saved_as_a_pickle_is_reported_in_one_line(tmp_path, capsys):
    WRITERS["mini-imagenet"](tmp_path)
    (tmp_path / "mini-imagenet-cache-validation.pkl").write_text("<!DOCTYPE html><html>quota exceeded</html>")
    err = _one_line_error(capsys, ["--task", "mini-imagenet", "--data-root", str(tmp_path), *TINY,
                                   "--output-dir", str(tmp_path / "out")])
    assert "mini-imagenet-cache-validation.pkl: it is an HTML page" in err and "delete it" in err


def test_a_truncated_or_wrong_pickle_is_reported_in_one_line(tmp_path, capsys):
    WRITERS["fc100"](tmp_path)
    data = (tmp_path / "FC100_train.pickle").read_bytes()
    (tmp_path / "FC100_train.pickle").write_bytes(data[: len(data) // 2])
    err = _one_line_error(capsys, ["--task", "fc100", "--data-root", str(tmp_path), *TINY,
                                   "--output-dir", str(tmp_path / "out")])
    assert "FC100_train.pickle: it is not a readable pickle" in err
    with open(tmp_path / "FC100_train.pickle", "wb") as f:
        pickle.dump({"something": "else"}, f)
    err = _one_line_error(capsys, ["--task", "fc100", "--data-root", str(tmp_path), *TINY,
                                   "--output-dir", str(tmp_path / "out")])
    assert "not an FC100 pickle" in err


def test_a_bogus_download_is_removed_and_reported(tmp_path, capsys, monkeypatch):
    """learn2learn's downloader saving a web page (quota, login) as the dataset file."""
    import learn2learn as l2l

    capsys.readouterr()  # gym's "unmaintained" notice, printed on learn2learn's first import
    module = l2l.vision.datasets.mini_imagenet
    calls = []

    def fake_download(*args, **kwargs):
        destination = args[-1] if len(args) > 1 else kwargs.get("destination")
        destination = destination if str(destination).endswith(".pkl") else f"{destination}.pkl"
        calls.append(destination)
        with open(destination, "w") as f:
            f.write("<html><body>Google Drive - Virus scan warning</body></html>")

    monkeypatch.setattr(module, "download_file", fake_download)
    monkeypatch.setattr(module, "download_file_from_google_drive", fake_download)
    err = _one_line_error(capsys, ["--task", "mini-imagenet", "--download", "true", "--data-root",
                                   str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")])
    assert calls, "learn2learn's downloader was not used"
    assert "HTML page instead of" in err and "(removed)" in err
    assert not list((tmp_path / "data").glob("*.pkl"))


def test_omniglot_split_is_fixed_whatever_the_global_random_state(benchmark_root):
    config = RunConfig(task="omniglot", data_root=str(benchmark_root), ways=2).validate()

    def split_images(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return {split: source.pool.images_ for split, source in build_task_sources(config).items()}

    first, second = split_images(1), split_images(2)
    for split in first:
        assert torch.equal(first[split], second[split])
    sizes = {split: len(source.pool.sizes) for split, source in build_task_sources(config).items()}
    assert sizes == {"train": 30, "val": 2, "test": 8}  # 40 characters in the 1200:100:323 proportions
    fingerprints = {s: {bytes(img.numpy()) for img in imgs} for s, imgs in first.items()}
    assert not fingerprints["train"] & fingerprints["test"] and not fingerprints["val"] & fingerprints["test"]


def test_omniglot_images_are_28px_inverted_and_cached(benchmark_root):
    from envs.omniglot import CACHE, read_set

    images = torch.cat([read_set(benchmark_root, s).images for s in ("images_background", "images_evaluation")])
    assert images.shape == (40, 20, 1, 28, 28) and images.dtype == torch.uint8
    assert images.float().mean() < 128  # background 0, ink 255 (inverted, as in the MAML code)
    for name in ("images_background", "images_evaluation"):
        assert (benchmark_root / "omniglot-py" / CACHE.format(name)).is_file()


def test_augmentation_only_touches_meta_training_tasks(benchmark_root):
    plain = RunConfig(task="mini-imagenet", data_root=str(benchmark_root), ways=2).validate()
    augmented = RunConfig(task="mini-imagenet", data_root=str(benchmark_root), ways=2, augment=True).validate()
    a, b = build_task_sources(plain), build_task_sources(augmented)
    for split in ("val", "test"):
        x, y = (s[split].sample(np.random.default_rng(0), 2).query_x for s in (a, b))
        assert torch.equal(x, y)
    x, y = (s["train"].sample(np.random.default_rng(0), 2).query_x for s in (a, b))
    assert not torch.equal(x, y) and x.shape == y.shape


def test_augment_is_refused_where_it_does_not_apply(tmp_path, capsys, data_root):
    err = _one_line_error(capsys, ["--task", "glyphs", "--augment", "true", "--data-root", data_root,
                                   "--output-dir", str(tmp_path)])
    assert "--augment true" in err
