"""Omniglot's official files (extracted or zipped) and Lake's one-shot protocol, on small files
the tests write in the official formats (every image spells its character's code)."""

import json
import zipfile

import numpy as np
import pytest
import torch

from envs import build_task_sources
from envs.omniglot import read_runs, read_set
from envs.tasks import RotatedClasses
from imaml.app.cli import main
from imaml.config import RunConfig
from tests.benchmark_files import official_omniglot_set, official_runs, read_code, write_files

ALPHABETS, CHARACTERS, WAYS = 4, 8, 4  # the background set; 4-way runs (the real ones are 20-way)
TINY = ["--algo", "maml", "--task", "omniglot-lake", "--omniglot-background", "small1", "--ways", str(WAYS),
        "--shots", "1", "--query-shots", "2", "--meta-batch-size", "2", "--meta-steps", "2", "--inner-steps", "1",
        "--test-inner-steps", "1", "--val-every", "1", "--val-tasks", "2", "--test-tasks", "20",
        "--channels", "4", "--log-every", "1", "--processes", "1"]


def write_lake_root(root, zipped: bool):
    """<root>/omniglot-py/: images_background_small1 and all_runs, zipped or extracted."""
    folder = root / "omniglot-py"
    background = official_omniglot_set("images_background_small1", ALPHABETS, CHARACTERS)
    runs, truth = official_runs(WAYS)
    if zipped:
        write_files(background, root, folder / "images_background_small1.zip")
        write_files({f"all_runs/{k}": v for k, v in runs.items()}, root, folder / "all_runs.zip")
    else:
        write_files(background, folder)
        write_files(runs, folder / "all_runs")
    return truth


@pytest.fixture(scope="module", params=["zip", "extracted"])
def lake_root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lake-{request.param}")
    return root, write_lake_root(root, zipped=request.param == "zip")


def lake_config(root, **overrides) -> RunConfig:
    base = dict(task="omniglot-lake", omniglot_background="small1", ways=WAYS, shots=1, query_shots=2,
                test_tasks=20, data_root=str(root))
    return RunConfig(**{**base, **overrides}).validate()


def test_a_set_reads_the_same_from_its_zip_and_its_folder(tmp_path):
    files = official_omniglot_set("images_background_small1", 2, 3)
    write_files(files, tmp_path / "a", tmp_path / "a" / "omniglot-py" / "images_background_small1.zip")
    write_files(files, tmp_path / "b" / "omniglot-py")
    a, b = read_set(tmp_path / "a", "images_background_small1"), read_set(tmp_path / "b", "images_background_small1")
    assert torch.equal(a.images, b.images) and a.alphabets == b.alphabets and a.characters == b.characters
    assert a.images.shape == (6, 20, 1, 28, 28) and a.images.dtype == torch.uint8
    assert a.images.float().mean() < 128  # inverted: background 0, ink 255
    assert [read_code(img) for img in a.images[:, 0]] == [1, 2, 3, 4, 5, 6]
    assert a.alphabets == ["Alphabet_A"] * 3 + ["Alphabet_B"] * 3
    cached = read_set(tmp_path / "a", "images_background_small1")  # from the cache beside the zip
    assert (tmp_path / "a" / "omniglot-py" / "imaml-28px-v2-images_background_small1.pt").is_file()
    assert torch.equal(cached.images, a.images)


def test_the_run_reader_maps_each_test_item_to_its_class_as_class_labels_says(lake_root):
    root, truth = lake_root
    runs = read_runs(root)
    assert [run.name for run in runs] == [f"run{r:02d}" for r in range(1, 21)]
    for r, run in enumerate(runs, start=1):
        assert run.labels.tolist() == truth[run.name]
        assert [read_code(x) for x in run.training] == [2000 + 100 * r + j for j in range(WAYS)]
        assert [read_code(x) for x in run.test] == [2000 + 100 * r + c for c in truth[run.name]]


def test_meta_test_is_the_runs_in_order_with_their_labels(lake_root):
    root, truth = lake_root
    sources = build_task_sources(lake_config(root))
    batches = list(sources["test"].batches(20, 8))
    assert [b.num_tasks for b in batches] == [8, 8, 4]
    query_y = torch.cat([b.query_y for b in batches])
    assert query_y.tolist() == [truth[f"run{r:02d}"] for r in range(1, 21)]
    support = torch.cat([b.support_x for b in batches])
    assert support.shape == (20, WAYS, 1, 28, 28) and 0 <= support.min() and support.max() <= 1
    assert torch.cat([b.support_y for b in batches]).tolist() == [list(range(WAYS))] * 20


@pytest.mark.parametrize("val", ["characters", "alphabets"])
def test_training_and_validation_never_see_a_test_character_and_are_disjoint(lake_root, val):
    root, _ = lake_root
    sources = build_task_sources(lake_config(root, omniglot_val=val, class_rotations=False))
    codes = {}
    for split in ("train", "val"):
        pool = sources[split].pool
        codes[split] = {read_code(pool.images(c, np.arange(1))[0]) for c in range(len(pool.sizes))}
    assert all(code < 2000 for split in codes for code in codes[split])  # run images are codes >= 2000
    assert not codes["train"] & codes["val"]
    assert len(codes["train"]) + len(codes["val"]) == ALPHABETS * CHARACTERS
    alphabet = lambda code: (code - 1) // CHARACTERS  # noqa: E731
    if val == "alphabets":  # whole alphabets held out
        assert not {alphabet(c) for c in codes["train"]} & {alphabet(c) for c in codes["val"]}
    else:  # a quarter of every alphabet's characters
        assert {alphabet(c) for c in codes["val"]} == set(range(ALPHABETS))


def test_within_alphabet_episodes_draw_every_class_from_one_alphabet(lake_root):
    root, _ = lake_root
    for rotations in (False, True):
        source = build_task_sources(lake_config(root, episodes="within-alphabet", class_rotations=rotations))["train"]
        batch = source.sample(np.random.default_rng(0), 12)
        alphabets_seen = set()
        for t in range(12):
            images = batch.support_x[t]
            codes = [read_code(img) for img in images]  # in any quarter turn
            alphabets = {(c - 1) // CHARACTERS for c in codes}
            assert len(alphabets) == 1, codes
            alphabets_seen |= alphabets
        assert len(alphabets_seen) > 1  # the alphabet itself is drawn per task


def test_rotated_classes_are_new_classes_of_the_same_alphabet():
    base = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 1, 4, 4)
    pool = RotatedClasses(base)
    assert pool.sizes.tolist() == [3] * 8
    for cls in range(8):
        assert torch.equal(pool.images(cls, np.array([1])), base[cls // 4, [1]].rot90(cls % 4, dims=(-2, -1)))
    assert [g.tolist() for g in RotatedClasses.groups([np.array([1]), np.array([0])])] == [[4, 5, 6, 7], [0, 1, 2, 3]]


def test_lake_run_writes_per_run_error_before_and_after(lake_root, tmp_path, capsys):
    root, _ = lake_root
    out = tmp_path / "out"
    code = main([*TINY, "--data-root", str(root), "--output-dir", str(out), "--episodes", "within-alphabet",
                 "--augment"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for key in ("test", "before_meta_training"):
        result = results[key]
        assert result["num_tasks"] == 20 and sorted(result["per_run_error"]) == [f"run{r:02d}" for r in range(1, 21)]
        per_run = list(result["per_run_error"].values())
        assert result["error_rate"] == pytest.approx(sum(per_run) / 20)
        assert result["error_rate"] == pytest.approx(1 - result["mean"])
        assert all(e in (0.0, 0.25, 0.5, 0.75, 1.0) for e in np.round(per_run, 6))  # 4 items per run
    assert results["splits"]["val"]["held_out"] == "characters"
    assert results["splits"]["train"]["episodes"] == "within-alphabet"
    assert results["protocol"]["test_query_shots"] == 1  # the runs' one test item per class, not --query-shots


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_runs_name_all_runs_zip_and_where_it_goes(tmp_path, capsys):
    write_files(official_omniglot_set("images_background_small1", 2, 4), tmp_path / "omniglot-py")
    err = _error(capsys, [*TINY, "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert "all_runs.zip" in err and str(tmp_path / "omniglot-py") in err


def test_missing_background_set_names_its_zip(tmp_path, capsys):
    runs, _ = official_runs(WAYS)
    write_files(runs, tmp_path / "omniglot-py" / "all_runs")
    err = _error(capsys, [*TINY, "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert "images_background_small1.zip" in err


@pytest.mark.parametrize("damage", ["bad line", "missing image", "missing run", "not a zip", "not a png"])
def test_malformed_runs_give_one_line(tmp_path, capsys, damage):
    folder = tmp_path / "omniglot-py"
    write_files(official_omniglot_set("images_background_small1", 2, 4), folder)
    runs, _ = official_runs(WAYS)
    if damage == "bad line":
        runs["run03/class_labels.txt"] = b"run03/test/item01.png\n"
    elif damage == "missing image":
        del runs["run05/training/class02.png"]
    elif damage == "missing run":
        runs = {k: v for k, v in runs.items() if not k.startswith("run20/")}
    elif damage == "not a png":
        runs["run01/test/item01.png"] = b"<html>not found</html>"
    if damage == "not a zip":
        (folder / "all_runs.zip").write_bytes(b"<html>not found</html>")
    else:
        write_files(runs, folder / "all_runs")
    err = _error(capsys, [*TINY, "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    expected = {"bad line": "run03/class_labels.txt, line 1", "missing image": "run05/training/class02.png",
                "missing run": "run20/class_labels.txt", "not a zip": "not a readable zip",
                "not a png": "run01/test/item01.png"}[damage]
    assert expected in err


@pytest.mark.parametrize("flags, expected", [
    (["--ways", "5"], "Lake's runs are 4-way"),
    (["--test-query-shots", "3"], "one-shot"),
    (["--test-tasks", "600"], "--test-tasks 20"),
    (["--omniglot-background", "full"], "images_background.zip"),
])
def test_lake_protocol_mismatches_are_one_line(lake_root, tmp_path, capsys, flags, expected):
    root, _ = lake_root
    argv = [*TINY, "--data-root", str(root), "--output-dir", str(tmp_path / "o"), *flags]
    assert expected in _error(capsys, argv)


@pytest.mark.parametrize("flags, expected", [
    (["--task", "glyphs", "--episodes", "within-alphabet"], "only for the Omniglot tasks"),
    (["--task", "omniglot", "--omniglot-background", "small1"], "only for --task omniglot-lake"),
])
def test_omniglot_options_elsewhere_are_refused(tmp_path, capsys, flags, expected):
    assert expected in _error(capsys, [*flags, "--output-dir", str(tmp_path / "o")])


def test_maml_split_reads_the_full_sets_from_their_zips(tmp_path):
    folder = tmp_path / "omniglot-py"
    write_files(official_omniglot_set("images_background", 2, 10), tmp_path, folder / "images_background.zip")
    write_files(official_omniglot_set("images_evaluation", 2, 10, first_code=21), tmp_path,
                folder / "images_evaluation.zip")
    config = RunConfig(task="omniglot", data_root=str(tmp_path), ways=2, episodes="within-alphabet").validate()
    sources = build_task_sources(config)
    sizes = {split: len(source.pool.sizes) for split, source in sources.items()}
    assert sizes == {"train": 30, "val": 2, "test": 8}  # 40 characters, 1200:100:323
    pool = sources["train"].pool
    for group in pool.groups:  # the split's classes by alphabet (set/alphabet)
        codes = {read_code(pool.images(int(c), np.arange(1))[0]) for c in group}
        assert len({(code - 1) // 10 for code in codes}) == 1


def test_proxy_runs_hold_their_alphabet_out_of_the_background_zip(tmp_path):
    from studies.lake_proxy import build_proxy

    source = tmp_path / "images_background_small1.zip"
    write_files(official_omniglot_set("images_background_small1", 3, 20), tmp_path, source)
    summary = build_proxy(source, ["Alphabet_B"], tmp_path / "proxy")
    root = tmp_path / "proxy"
    kept = read_set(root, "images_background_small1")
    assert sorted(set(kept.alphabets)) == ["Alphabet_A", "Alphabet_C"] and summary["kept_characters"] == 40
    runs = read_runs(root)
    for run in runs:
        codes = [read_code(x) for x in run.training]
        assert all(21 <= c <= 40 for c in codes) and len(set(codes)) == 20  # Alphabet_B's characters
        assert [read_code(x) for x in run.test] == [codes[c] for c in run.labels.tolist()]
    with zipfile.ZipFile(root / "omniglot-py" / "all_runs.zip") as zf:
        assert "all_runs/run01/class_labels.txt" in zf.namelist()


def test_hausdorff_baseline_reads_the_full_size_runs_and_classifies_them(lake_root):
    from studies.hausdorff import modified_hausdorff, run_errors

    root, _ = lake_root
    square, shifted = np.argwhere(np.ones((3, 3))).astype(float), np.argwhere(np.ones((3, 3))).astype(float) + 1
    assert modified_hausdorff(square, square) == 0 and modified_hausdorff(square, shifted) > 0
    assert read_runs(root, size=None)[0].training.shape[-2:] == (105, 105)
    errors = run_errors(root)  # test items are their class's image: the baseline gets them all
    assert sorted(errors) == [f"run{r:02d}" for r in range(1, 21)] and set(errors.values()) == {0.0}


@pytest.mark.parametrize("where", ["below a file", "/proc"])
def test_an_unusable_data_root_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    root = str(tmp_path / "file" / "data") if where == "below a file" else "/proc/imaml-data"
    err = _error(capsys, ["--task", "glyphs", "--data-root", root, "--output-dir", str(tmp_path / "o"),
                          "--processes", "1"])
    assert f"--data-root {root}" in err


def test_the_small_jitter_draws_what_it_drew_before_koch_s_options():
    """The default jitter's numbers are unchanged (the documented runs used them): the legacy
    formula, written out, against ``random_affine()`` on the same stream."""
    from envs.tasks import random_affine

    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(3)
    angle = torch.from_numpy(rng.uniform(-10, 10, 5) * np.pi / 180).float()
    zoom = torch.from_numpy(rng.uniform(0.9, 1.1, 5)).float()
    offset = torch.from_numpy(rng.uniform(-0.2, 0.2, (5, 2))).float()
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [5, 1, 28, 28], align_corners=False)
    legacy = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    assert torch.equal(random_affine()(x, np.random.default_rng(3)), legacy)


def test_shear_slants_a_bar_and_stroke_jitter_thickens_or_thins_each_image():
    from envs.tasks import random_affine

    bar = torch.zeros(40, 1, 28, 28)
    bar[..., 4:24, 13:15] = 1.0  # a vertical stroke
    still = dict(degrees=0.0, shift=0.0, scale=(1.0, 1.0))
    assert torch.allclose(random_affine(**still)(bar, np.random.default_rng(0)), bar, atol=1e-6)  # the identity
    sheared = random_affine(**still, shear=0.3)(bar, np.random.default_rng(0))
    columns = torch.arange(28.0)

    def centre(rows):  # the ink's mean column over those rows, per image
        ink = sheared[:, 0, rows]
        return (ink * columns).sum((1, 2)) / ink.sum((1, 2))
    slant = (centre(slice(4, 9)) - centre(slice(19, 24))).abs()
    assert slant.max() > 1.0  # some bars lean by more than a pixel between their ends
    # stroke jitter comes after the affine draws: the same warp, then each image dilated or eroded
    base = random_affine(shear=0.3)(bar, np.random.default_rng(1))
    thick = random_affine(shear=0.3, thickness=1.0)(bar, np.random.default_rng(1))
    thicker = (thick >= base - 1e-6).flatten(1).all(1)
    thinner = (thick <= base + 1e-6).flatten(1).all(1)
    assert bool((thicker | thinner).all()) and bool(thicker.any()) and bool(thinner.any())
    assert not torch.allclose(thick, base)


def test_the_jitter_options_reach_meta_training_and_the_views_and_are_refused_where_idle(lake_root, tmp_path):
    from engines import build_engine
    from imaml.errors import UsageError

    root, _ = lake_root
    small = lake_config(root, augment=True)
    koch = lake_config(root, augment=True, jitter="koch", stroke_jitter=0.5)
    a, b = build_task_sources(small), build_task_sources(koch)
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    assert not torch.equal(a["train"].sample(rng(), 2).support_x, b["train"].sample(rng(), 2).support_x)
    assert torch.equal(a["val"].sample(rng(), 2).support_x, b["val"].sample(rng(), 2).support_x)  # not jittered
    views = {}
    for name, jitter in (("small", "small"), ("koch", "koch")):
        config = lake_config(root, jitter=jitter, test_augment=2, channels=4, output_dir=str(tmp_path / name),
                             processes=1)
        engine = build_engine(config)
        batch = next(engine.env.episodes("test", 20))
        views[name] = engine.test_time.support(batch, "test", 0).support_x
    assert views["small"].shape == views["koch"].shape and not torch.equal(views["small"], views["koch"])
    with pytest.raises(UsageError, match="--jitter: for the jitter of Omniglot's --augment and --test-augment"):
        lake_config(root, jitter="koch")  # neither on
    with pytest.raises(UsageError, match="--stroke-jitter"):
        RunConfig(task="glyphs", ways=5, augment=True, stroke_jitter=0.5).validate()
    with pytest.raises(UsageError, match=r"--stroke-jitter 1.5: must be in \[0, 1\]"):
        lake_config(root, augment=True, stroke_jitter=1.5)
