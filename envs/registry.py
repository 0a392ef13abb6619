"""Task names -> per-split task sources. Add a benchmark by adding one builder here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from envs import datasets, glyphs, omniglot
from envs.downloads import download
from envs.tasks import (ArrayPool, ClassImageTasks, RotatedClasses, SinusoidTasks, TaskSource, random_affine,
                        random_crop_flip)
from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["TASKS", "build_task_sources", "omniglot_jitter"]

SPLITS = ("train", "val", "test")


def split_ways(config: RunConfig, split: str) -> int:
    """Classes per task: --test-ways at meta-validation and meta-test."""
    if split != "train" and config.test_ways is not None:
        return config.test_ways
    return config.ways


def query_shots(config: RunConfig, split: str) -> int:
    """Query examples per class: --test-query-shots at meta-validation and meta-test."""
    if split != "train" and config.test_query_shots is not None:
        return config.test_query_shots
    return config.query_shots


def _glyphs(config: RunConfig) -> Dict[str, TaskSource]:
    if config.augment:
        raise UsageError("--augment true: the glyphs task has no augmentation; it is for the "
                         "ImageNet- and CIFAR-derived tasks")
    images = glyphs.load_glyphs(config.data_root)
    return {
        split: ClassImageTasks(images[lo:hi], split_ways(config, split), config.shots, query_shots(config, split),
                               name=f"glyphs {split} split")
        for split, (lo, hi) in glyphs.SPLITS.items()
    }


def _sinusoid(config: RunConfig) -> Dict[str, TaskSource]:
    return {split: SinusoidTasks(config.shots, query_shots(config, split)) for split in SPLITS}


JITTER_RANGES = {"small": {}, "koch": {"shift": 2 / 105, "scale": (0.8, 1.2), "shear": 0.3}}  # --jitter


def omniglot_jitter(config: RunConfig) -> Callable:
    """The Omniglot jitter of ``--augment`` and ``--test-augment``: ``--jitter``'s affine ranges
    (Koch et al.'s shift of ±2 px was on 105-px images), then ``--stroke-jitter``."""
    return random_affine(**JITTER_RANGES[config.jitter], thickness=config.stroke_jitter)


def _benchmark(name: str) -> Callable[[RunConfig], Dict[str, TaskSource]]:
    """A real benchmark read from --data-root (see envs.datasets for the files)."""
    spec = datasets.DATASETS[name]

    def build(config: RunConfig) -> Dict[str, TaskSource]:
        root = Path(config.data_root)
        if config.download:
            download(spec, root)
        rotations = spec.class_rotations if config.class_rotations is None else config.class_rotations
        sources = {}
        for split in SPLITS:
            augment = None
            if config.augment and split == "train":
                augment = omniglot_jitter(config) if name == "omniglot" else random_crop_flip(spec.augment_padding)
            pool = datasets.load_split(spec, root, split)
            sources[split] = ClassImageTasks(
                pool, split_ways(config, split), config.shots, query_shots(config, split),
                name=f"{name} {split} split", mean=spec.mean, std=spec.std, augment=augment,
                class_rotations=rotations,
                groups=pool.groups if config.episodes == "within-alphabet" and split == "train" else None)
        return sources

    return build


def _omniglot_lake(config: RunConfig) -> Dict[str, TaskSource]:
    """Lake's protocol: meta-train and meta-validate on one background set (validation on
    alphabets or characters held out of meta-training), meta-test on the 20 official runs."""
    if config.download:
        raise UsageError(f"--download: omniglot-lake reads the official files; get {omniglot.BACKGROUNDS[config.omniglot_background]}"
                         f".zip and all_runs.zip from {omniglot.SOURCE} into <data-root>/omniglot-py/")
    root = Path(config.data_root)
    runs = omniglot.OneShotRuns(omniglot.read_runs(root))
    if config.test_tasks != len(runs.runs):  # checked here, before the run claims its folder
        raise UsageError(f"--test-tasks {config.test_tasks}: the omniglot-lake meta-test is the {len(runs.runs)} "
                         f"official runs; use --test-tasks {len(runs.runs)}")
    test_ways = config.test_ways or config.ways
    if test_ways != runs.ways:
        raise UsageError(f"--ways {test_ways}: Lake's runs are {runs.ways}-way; use --ways {runs.ways} "
                         f"(or --test-ways {runs.ways} with a Lower problem that adapts any number of ways)")
    if config.shots != 1 or config.test_query_shots not in (None, runs.query_shots):
        raise UsageError(f"--shots {config.shots} --test-query-shots {config.test_query_shots}: Lake's runs are "
                         f"one-shot with {runs.query_shots} test item per class; use --shots 1 and leave "
                         f"--test-query-shots unset")
    set_name = omniglot.BACKGROUNDS[config.omniglot_background]
    background = omniglot.read_set(root, set_name)
    by = config.omniglot_val
    if by == "auto":
        by = "alphabets" if len(set(background.alphabets)) >= 10 else "characters"
    train_rows, val_rows, held_out = omniglot.hold_out(background, by)
    sources: Dict[str, TaskSource] = {"test": runs}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        pool = ArrayPool(background.images[rows])
        groups = datasets.alphabet_groups([background.alphabets[r] for r in rows])
        if split == "train" and config.class_rotations is not False:
            pool, groups = RotatedClasses(pool), RotatedClasses.groups(groups)
        ways = split_ways(config, split)
        within = config.episodes == "within-alphabet" and (split == "train" or max(map(len, groups)) >= ways)
        sources[split] = ClassImageTasks(
            pool, ways, config.shots, query_shots(config, split), name=f"omniglot-lake {split} split",
            augment=omniglot_jitter(config) if config.augment and split == "train" else None,
            groups=groups if within else None,
            description={"set": set_name, **held_out, "episodes": "within-alphabet" if within else "any",
                         "classes": len(pool.sizes)})
    return sources


TASKS: Dict[str, Callable[[RunConfig], Dict[str, TaskSource]]] = {
    "glyphs": _glyphs,
    "sinusoid": _sinusoid,
    **{name: _benchmark(name) for name in datasets.DATASETS},
    "omniglot-lake": _omniglot_lake,
}


def build_task_sources(config: RunConfig) -> Dict[str, TaskSource]:
    """The train / val / test task sources of ``config.task``, or a one-line UsageError."""
    if config.task not in TASKS:
        raise UsageError(f"--task {config.task}: unknown task; choose one of {', '.join(TASKS)}")
    if config.ways is None and config.task != "sinusoid":
        raise UsageError(f"--ways none: the {config.task} task is classification and needs --ways N")
    return TASKS[config.task](config)
