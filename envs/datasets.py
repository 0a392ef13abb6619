"""The real few-shot benchmarks, read from the files a user already has under ``--data-root``.

The on-disk layouts are learn2learn's (so a data root prepared by learn2learn works as is),
and ``--download`` hands the download to learn2learn's dataset classes. Reading differs
from learn2learn where it would hurt:

- mini-ImageNet: learn2learn holds each split as float32 (3.2 GB for train); we keep the
  pickle's uint8 array (0.8 GB) and scale each sampled task.
- Omniglot: torchvision refuses the extracted folders unless the zip files are also there
  (it checks their MD5); we read either, resized to 28×28 once and cached beside them
  (``envs.omniglot``, which also reads Lake's one-shot runs).
  learn2learn's class split is an unseeded ``random.shuffle``; ours is a fixed permutation
  (1,200 train / 100 validation / 323 test characters, as in the MAML paper's code).
- CIFAR-FS is read in place, not from learn2learn's per-split copy of it (which a kill can
  leave half made).
- tiered-ImageNet and CIFAR-FS are decoded lazily, per sampled image (448k PNGs for
  tiered-ImageNet's train split do not fit in memory decoded).

Every failure to find or read a file is a one-line ``UsageError`` naming the file, what is
wrong with it and where to get it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from imaml.errors import UsageError

__all__ = ["DATASETS", "BenchmarkSpec", "load_split", "FlatPool", "DecodedPool", "alphabet_groups", "missing_files",
           "import_learn2learn"]

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------ pools
class FlatPool:
    """Images [M, C, H, W] (uint8) with a class label each; classes may differ in size."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]):
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        self.members = np.split(order, starts[1:])
        self.images_ = images
        self.sizes = np.array([len(m) for m in self.members])
        self.input_shape = tuple(images.shape[1:])

    def images(self, cls: int, picks: np.ndarray) -> torch.Tensor:
        return self.images_[torch.from_numpy(self.members[cls][picks])]


class DecodedPool:
    """Encoded images (PNG bytes or file paths) decoded only when a task samples them."""

    def __init__(self, items: Sequence, labels: Sequence[int], image_size: int, channels: int):
        self.items = items
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        _, starts = np.unique(labels[order], return_index=True)
        self.members = np.split(order, starts[1:])
        self.sizes = np.array([len(m) for m in self.members])
        self.input_shape = (channels, image_size, image_size)

    def images(self, cls: int, picks: np.ndarray) -> torch.Tensor:
        return torch.stack([self._decode(self.items[i]) for i in self.members[cls][picks]])

    def _decode(self, item) -> torch.Tensor:
        from PIL import Image

        source = item if isinstance(item, (str, os.PathLike)) else io.BytesIO(bytes(item))
        with Image.open(source) as image:
            image = image.convert("RGB" if self.input_shape[0] == 3 else "L")
            if image.size != self.input_shape[1:]:
                image = image.resize(self.input_shape[1:], Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


# ------------------------------------------------------------------------------ benchmarks
@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark is on disk and how its images are fed to the model."""

    name: str
    files: Tuple[str, ...]  # paths under --data-root that must exist
    source: str  # where a user obtains the files
    image_size: int
    mean: Optional[Tuple[float, ...]]  # per-channel normalization after scaling to [0, 1]
    std: Optional[Tuple[float, ...]]
    augment_padding: Optional[int]  # random-crop padding of --augment; None: no augmentation
    class_rotations: bool = False  # Omniglot: each class of a task rotated by a random k·90°


_IMAGENET_MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
_IMAGENET_STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
_CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
_CIFAR_STD = (0.2675, 0.2565, 0.2761)

DATASETS: Dict[str, BenchmarkSpec] = {
    "omniglot": BenchmarkSpec(
        "omniglot", ("omniglot-py/images_background", "omniglot-py/images_evaluation"),
        "images_background.zip and images_evaluation.zip from github.com/brendenlake/omniglot "
        "(python/), into <data-root>/omniglot-py/ (as they are, or extracted)", 28, None, None, None,
        class_rotations=True),
    "mini-imagenet": BenchmarkSpec(
        "mini-imagenet", tuple(f"mini-imagenet-cache-{s}.pkl" for s in ("train", "validation", "test")),
        "the Ravi & Larochelle split pickles (zenodo.org/record/7978538)", 84,
        _IMAGENET_MEAN, _IMAGENET_STD, 8),
    "tiered-imagenet": BenchmarkSpec(
        "tiered-imagenet", tuple(f"tiered-imagenet/{s}_{kind}.pkl" for s in SPLITS
                                 for kind in ("images_png", "labels")),
        "the tiered-ImageNet pickles (zenodo.org/record/7978538, tiered-imagenet-*.pkl, renamed "
        "without the prefix into <data-root>/tiered-imagenet/)", 84, _IMAGENET_MEAN, _IMAGENET_STD, 8),
    "cifarfs": BenchmarkSpec(
        "cifarfs", ("cifarfs/cifar100/data", "cifarfs/cifar100/splits/bertinetto"),
        "cifar100.zip (zenodo.org/record/7978538) extracted into <data-root>/cifarfs/", 32,
        _CIFAR_MEAN, _CIFAR_STD, 4),
    "fc100": BenchmarkSpec(
        "fc100", tuple(f"FC100_{s}.pickle" for s in SPLITS),
        "fc100.zip (zenodo.org/record/7978538) extracted into <data-root>/", 32, _CIFAR_MEAN, _CIFAR_STD, 4),
}

# The fixed Omniglot class split: a permutation of the 1,623 characters (sorted by set,
# alphabet and name) that depends on nothing but this constant.
OMNIGLOT_SPLIT_SEED = 1623
# 1,200 / 100 / 323 characters; a folder with fewer characters is split in the same proportions.


def omniglot_split_bounds(num_characters: int) -> Dict[str, Tuple[int, int]]:
    train = round(num_characters * 1200 / 1623)
    val = train + max(1, round(num_characters * 100 / 1623))
    return {"train": (0, train), "val": (train, val), "test": (val, num_characters)}


def missing_files(spec: BenchmarkSpec, root: Path) -> List[str]:
    if spec.name == "cifarfs" and (root / "cifarfs" / "processed").is_dir():
        return []  # learn2learn already made its per-split folders
    zips = spec.name == "omniglot"  # Omniglot's sets are read from their zip files as well
    return [f for f in spec.files if not ((root / f).exists() or (zips and (root / f"{f}.zip").is_file()))]


def check_files(spec: BenchmarkSpec, root: Path) -> None:
    """A one-line error naming the missing files and where to get them."""
    missing = missing_files(spec, root)
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UsageError(f"--task {spec.name}: missing {root / missing[0]}{more} under --data-root {root}; "
                         f"get {spec.source}, or pass --download to fetch them with learn2learn")


def load_split(spec: BenchmarkSpec, root: Path, split: str):
    """The ``split`` (train / val / test) of a benchmark as a ``ClassPool``."""
    check_files(spec, root)
    return _LOADERS[spec.name](root, split)


# ------------------------------------------------------------------------------ readers
def _read_pickle(path: Path, what: str, encoding: str = "ASCII"):
    """Unpickle ``path``, turning every way a file can be bad into one clear line."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(0)
            return pickle.load(f, encoding=encoding)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, UnicodeDecodeError, MemoryError) as err:
        html = head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        why = ("it is an HTML page, not a pickle (a failed download saved a web page)" if html
               else f"it is not a readable pickle ({type(err).__name__}: {str(err)[:80]})")
        raise UsageError(f"{path}: {why}; delete it and get {what} again") from None


def _mini_imagenet(root: Path, split: str):
    name = {"train": "train", "val": "validation", "test": "test"}[split]
    path = root / f"mini-imagenet-cache-{name}.pkl"
    data = _read_pickle(path, "the mini-ImageNet pickles")
    try:
        images = np.asarray(data["image_data"], dtype=np.uint8)
        labels = np.empty(len(images), dtype=np.int64)
        for label, indices in enumerate(data["class_dict"].values()):
            labels[np.asarray(indices)] = label
        assert images.ndim == 4 and images.shape[-1] == 3
    except (KeyError, TypeError, IndexError, AssertionError):
        raise UsageError(f"{path}: not a mini-ImageNet cache pickle (expected 'image_data' "
                         f"[N, 84, 84, 3] and 'class_dict'); delete it and get it again") from None
    return FlatPool(torch.from_numpy(images).permute(0, 3, 1, 2), labels)


def _tiered_imagenet(root: Path, split: str):
    folder = root / "tiered-imagenet"
    images = _read_pickle(folder / f"{split}_images_png.pkl", "the tiered-ImageNet pickles")
    labels = _read_pickle(folder / f"{split}_labels.pkl", "the tiered-ImageNet pickles", encoding="latin1")
    try:
        labels = np.asarray(labels["label_specific"])
        assert len(labels) == len(images)
    except (KeyError, TypeError, IndexError, AssertionError):
        raise UsageError(f"{folder / f'{split}_labels.pkl'}: expected a 'label_specific' entry with one "
                         f"label per image of {split}_images_png.pkl; delete both and get them again") from None
    return DecodedPool(images, labels, 84, 3)


def _fc100(root: Path, split: str):
    path = root / f"FC100_{split}.pickle"
    data = _read_pickle(path, "fc100.zip", encoding="latin1")
    try:
        images = np.asarray(data["data"], dtype=np.uint8)
        labels = np.asarray(data["labels"])
        assert images.ndim == 4 and images.shape[-1] == 3 and len(labels) == len(images)
    except (KeyError, TypeError, IndexError, AssertionError):
        raise UsageError(f"{path}: not an FC100 pickle (expected 'data' [N, 32, 32, 3] and 'labels'); "
                         f"delete it and get fc100.zip again") from None
    return FlatPool(torch.from_numpy(images).permute(0, 3, 1, 2), labels)


def import_learn2learn():
    """``import learn2learn``, without the "unmaintained" notice its gym import prints."""
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn
    return learn2learn


def _cifarfs(root: Path, split: str):
    """A CIFAR-FS split read in place, as ``splits/bertinetto/<split>.txt`` lists its classes,
    in learn2learn's order (classes, then files, sorted). learn2learn's copy of it
    (``cifarfs/processed/``, derived data a kill can leave half made) is read only where the
    extracted ``cifar100/`` is gone."""
    base = root / "cifarfs" / "cifar100"
    if (base / "data").is_dir():
        listing = base / "splits" / "bertinetto" / f"{split}.txt"
        try:
            names = sorted({line.strip() for line in listing.read_text().splitlines() if line.strip()})
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--task cifarfs: cannot read {listing} ({err}); extract cifar100.zip "
                             f"(zenodo.org/record/7978538) into <data-root>/cifarfs/ again") from None
        folders = [base / "data" / name for name in names]
    else:
        processed = root / "cifarfs" / "processed" / split
        folders = sorted(p for p in processed.iterdir() if p.is_dir()) if processed.is_dir() else []
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_FILES)) if folder.is_dir() else []
        if not files:
            raise UsageError(f"--task cifarfs: no images in {folder} (class {label} of the {split} split); "
                             f"extract cifar100.zip (zenodo.org/record/7978538) into <data-root>/cifarfs/ again")
        paths += [str(folder / f) for f in files]
        labels += [label] * len(files)
    if not folders:
        raise UsageError(f"--task cifarfs: the {split} split lists no classes under {root / 'cifarfs'}")
    return DecodedPool(paths, labels, 32, 3)


_IMAGE_FILES = (".png", ".jpg", ".jpeg")


def _omniglot(root: Path, split: str):
    """A split of all 1,623 characters (both official sets, sorted by set, alphabet and
    character) by the fixed permutation; ``groups`` holds the split's classes by alphabet."""
    from envs.omniglot import read_set

    sets = {name: read_set(root, name) for name in ("images_background", "images_evaluation")}
    images = torch.cat([s.images for s in sets.values()])
    alphabets = [f"{name}/{a}" for name, s in sets.items() for a in s.alphabets]
    lo, hi = omniglot_split_bounds(len(images))[split]
    rows = np.sort(np.random.default_rng(OMNIGLOT_SPLIT_SEED).permutation(len(images))[lo:hi])
    chosen = images[torch.from_numpy(rows)]  # [classes, 20, 1, 28, 28]
    pool = FlatPool(chosen.flatten(0, 1), np.repeat(np.arange(len(chosen)), chosen.shape[1]))
    pool.groups = alphabet_groups([alphabets[r] for r in rows])
    return pool


def alphabet_groups(alphabets: Sequence[str]) -> List[np.ndarray]:
    """The positions of each alphabet's classes, alphabets in sorted order."""
    alphabets = np.asarray(alphabets)
    return [np.flatnonzero(alphabets == name) for name in sorted(set(alphabets.tolist()))]


_LOADERS: Dict[str, Callable] = {
    "omniglot": _omniglot, "mini-imagenet": _mini_imagenet, "tiered-imagenet": _tiered_imagenet,
    "cifarfs": _cifarfs, "fc100": _fc100,
}
