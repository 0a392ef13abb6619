"""Omniglot as its official release ships it, and Lake's 20 one-shot runs.

The official sets (github.com/brendenlake/omniglot, ``python/``) are read from
``<data-root>/omniglot-py/``, each either extracted (``<set>/<Alphabet>/<character>/*.png``)
or as the ``<set>.zip`` itself, read in place:

- ``images_background`` (30 alphabets, 964 characters), ``images_evaluation`` (20, 659);
- ``images_background_small1`` / ``_small2`` (5 alphabets each: the challenge's "minimal"
  background sets);
- ``all_runs`` (``all_runs.zip``): 20 runs of 20-way within-alphabet one-shot classification
  on evaluation alphabets, ``runNN/training/classJJ.png``, ``runNN/test/itemKK.png`` and
  ``runNN/class_labels.txt`` (``runNN/test/itemKK.png runNN/training/classJJ.png`` per item).

Images are 105×105 1-bit PNGs, white background and black ink. We resize them to 28×28
(Lanczos) and invert them, so ink is high (255) and background 0, as the MAML code does.
Each set is cached as ``omniglot-py/imaml-28px-v2-<set>.pt`` where that folder is writable, with
the fingerprint of the zip or folder it was made from (``envs.cache``): a changed source is read again.
Every missing or malformed file is a one-line ``UsageError`` naming it and the fix.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from envs import cache
from envs.meta_batch import MetaBatch
from imaml.errors import UsageError

__all__ = ["SETS", "BACKGROUNDS", "OmniglotSet", "OneShotRun", "read_set", "read_runs", "OneShotRuns",
           "hold_out", "SOURCE"]

SETS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
BACKGROUNDS = {"full": "images_background", "small1": "images_background_small1",
               "small2": "images_background_small2"}
SOURCE = "github.com/brendenlake/omniglot (python/)"
DRAWINGS = 20  # every character is drawn once by each of 20 people
SIZE = 28
CACHE = "imaml-28px-v2-{}.pt"


@dataclass
class OmniglotSet:
    """One official set: ``images`` [characters, 20, 1, 28, 28] uint8 (ink 255), drawings in
    drawer order; ``alphabets`` and ``characters`` name each row ("Greek", "character07")."""

    images: torch.Tensor
    alphabets: List[str]
    characters: List[str]


def _to_28px(data, where: str, fix: str, size: Optional[int] = SIZE) -> np.ndarray:
    """One PNG (bytes or path) as size×size uint8 with ink high (size None: as it is)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            small = image.convert("L")
            small = small if size is None else small.resize((size, size), Image.LANCZOS)
    except (OSError, ValueError) as err:
        raise UsageError(f"{where}: not a readable PNG ({str(err)[:80]}); {fix}") from None
    return 255 - np.asarray(small, dtype=np.uint8)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UsageError(f"{path}: not a readable zip file ({str(err)[:80]}); "
                         f"get it again from {SOURCE}") from None


def _set_files(root: Path, name: str) -> Tuple[Dict[Tuple[str, str], List[str]], Callable[[str], bytes], Path]:
    """{(alphabet, character): [png names, sorted]}, a reader of one png, and the source path."""
    folder, archive = root / "omniglot-py" / name, root / "omniglot-py" / f"{name}.zip"
    found: Dict[Tuple[str, str], List[str]] = {}
    if folder.is_dir():
        for png in folder.glob("*/*/*.png"):
            found.setdefault((png.parent.parent.name, png.parent.name), []).append(str(png))
        return found, lambda p: Path(p).read_bytes(), folder
    if archive.is_file():
        pattern = re.compile(rf"(?:.*/)?{re.escape(name)}/([^/]+)/([^/]+)/([^/]+\.png)$")
        zf = _open_zip(archive)
        for member in zf.namelist():
            match = pattern.match(member)
            if match and not member.startswith("__MACOSX") and not match.group(3).startswith("._"):
                found.setdefault((match.group(1), match.group(2)), []).append(member)
        return found, zf.read, archive
    raise UsageError(f"omniglot: neither {folder}/ nor {archive} exists; get {name}.zip from {SOURCE} "
                     f"and put it (or its extracted folder) in {root / 'omniglot-py'}/")


def read_set(root: Path | str, name: str) -> OmniglotSet:
    """The official set ``name`` (one of ``SETS``) from its folder or its zip, through a cache
    that records the source it was made from (rebuilt when the source changes)."""
    root = Path(root)
    found, read, source = _set_files(root, name)
    path, made_from = root / "omniglot-py" / CACHE.format(name), cache.fingerprint(source)
    saved = cache.read(path, lambda p: torch.load(p, weights_only=True), lambda s: _check_cache(s, made_from, source))
    if saved is not None:
        return OmniglotSet(saved["images"], saved["alphabets"], saved["characters"])
    if not found:
        raise UsageError(f"{source}: no <alphabet>/<character>/*.png inside; it is not {name} "
                         f"(get {name}.zip from {SOURCE})")
    keys = sorted(found)
    rows = []
    for alphabet, character in keys:
        files = sorted(found[(alphabet, character)])
        if len(files) != DRAWINGS:
            raise UsageError(f"{source}: {alphabet}/{character} has {len(files)} drawings, expected "
                             f"{DRAWINGS}; get {name}.zip again from {SOURCE}")
        fix = f"get {name}.zip again from {SOURCE}"
        rows.append(np.stack([_to_28px(read(f), f"{source}: {f}", fix) for f in files]))
    result = OmniglotSet(torch.from_numpy(np.stack(rows)).unsqueeze(2),
                         [a for a, _ in keys], [c for _, c in keys])
    cache.write(path, lambda f: torch.save({"source": made_from, "images": result.images,
                                            "alphabets": result.alphabets, "characters": result.characters}, f))
    return result


def _check_cache(saved, made_from: str, source: Path) -> Optional[str]:
    """Why a loaded cache is not this set, or None."""
    if not isinstance(saved, dict) or not {"source", "images", "alphabets", "characters"} <= set(saved):
        return "is not an imaml Omniglot cache (or an older one that does not record its source)"
    if saved["source"] != made_from:
        return f"was made from another {source.name} than the one there now"
    images = saved["images"]
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 5
            and tuple(images.shape[1:]) == (DRAWINGS, 1, SIZE, SIZE)
            and len(images) == len(saved["alphabets"]) == len(saved["characters"])):
        kind = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        return f"holds {kind} images, expected uint8 [characters, {DRAWINGS}, 1, {SIZE}, {SIZE}], one per name"
    return None


# ------------------------------------------------------------------------------ held-out splits
def hold_out(set_: OmniglotSet, by: str, seed: int = 1623) -> Tuple[np.ndarray, np.ndarray, dict]:
    """(train rows, validation rows, description): a fixed split of a background set.

    ``by="alphabets"``: one alphabet in six (at least one) is held out whole;
    ``by="characters"``: one character in four of every alphabet (at least one) is (enough for
    20-way validation tasks from a minimal set). The choice
    depends on nothing but ``seed`` and the set's sorted contents."""
    rng = np.random.default_rng(seed)
    alphabets = np.array(set_.alphabets)
    names = sorted(set(set_.alphabets))
    if by == "alphabets":
        if len(names) < 2:
            raise UsageError("--omniglot-val alphabets: the background set has a single alphabet; "
                             "use --omniglot-val characters")
        held = sorted(rng.permutation(names)[:max(1, round(len(names) / 6))].tolist())
        val = np.isin(alphabets, held)
        description = {"held_out": "alphabets", "alphabets": held}
    elif by == "characters":
        val = np.zeros(len(alphabets), dtype=bool)
        for name in names:
            rows = np.flatnonzero(alphabets == name)
            val[rng.permutation(rows)[:max(1, round(len(rows) / 4))]] = True
        description = {"held_out": "characters", "characters_per_alphabet": "1 in 4"}
    else:
        raise ValueError(by)
    description["train_characters"], description["val_characters"] = int((~val).sum()), int(val.sum())
    return np.flatnonzero(~val), np.flatnonzero(val), description


# ------------------------------------------------------------------------------ Lake's runs
@dataclass
class OneShotRun:
    """One run: ``training`` [N, 1, 28, 28] (classJJ.png in order), ``test`` [M, 1, 28, 28]
    (itemKK.png in order) and ``labels`` [M], the class (0-based JJ − 1) of each test item."""

    name: str
    training: torch.Tensor
    test: torch.Tensor
    labels: torch.Tensor


RUNS = 20
_RUNS_FIX = (f"get all_runs.zip from {SOURCE} and put it (or its extracted all_runs/ folder, with "
             f"run01/ … run20/ inside) in <data-root>/omniglot-py/")


def _runs_files(root: Path) -> Tuple[Callable[[str], Optional[bytes]], Path]:
    """A reader of files named relative to all_runs/ (None where absent), and the source."""
    folder, archive = root / "omniglot-py" / "all_runs", root / "omniglot-py" / "all_runs.zip"
    if folder.is_dir():
        return (lambda rel: (folder / rel).read_bytes() if (folder / rel).is_file() else None), folder
    if archive.is_file():
        zf = _open_zip(archive)
        members = set(zf.namelist())
        labels = [m for m in members if re.match(r"(?:.*/)?run01/class_labels\.txt$", m)]
        prefix = min(labels, key=len)[: -len("run01/class_labels.txt")] if labels else ""
        return (lambda rel: zf.read(prefix + rel) if prefix + rel in members else None), archive
    raise UsageError(f"--task omniglot-lake: the 20 one-shot runs are missing (neither "
                     f"{folder}/ nor {archive}); {_RUNS_FIX}")


def read_runs(root: Path | str, size: Optional[int] = SIZE) -> List[OneShotRun]:
    """Lake's 20 runs, each test item mapped to its class as its ``class_labels.txt`` says;
    images size×size (None: the files' own 105×105, for pixel baselines)."""
    root = Path(root)
    read, source = _runs_files(root)
    runs = []
    for r in range(1, RUNS + 1):
        run = f"run{r:02d}"
        text = read(f"{run}/class_labels.txt")
        if text is None:
            raise UsageError(f"{source}: {run}/class_labels.txt is missing; {_RUNS_FIX}")
        pairs = [line.split() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
        where = f"{source}: {run}/class_labels.txt"
        items, classes = [], []
        for number, pair in enumerate(pairs, start=1):
            item = _run_file(pair[0] if len(pair) == 2 else "", run, "test", "item")
            cls = _run_file(pair[1] if len(pair) == 2 else "", run, "training", "class")
            if item is None or cls is None:
                raise UsageError(f"{where}, line {number}: expected '{run}/test/itemKK.png "
                                 f"{run}/training/classJJ.png', got {' '.join(pair)!r}; {_RUNS_FIX}")
            items.append(item)
            classes.append(cls)
        if not pairs or sorted(items) != list(range(1, len(items) + 1)):
            raise UsageError(f"{where}: expected one line for each of item01 … itemNN, got items "
                             f"{sorted(items)}; {_RUNS_FIX}")
        ways = max(classes)

        def image(rel: str) -> np.ndarray:
            data = read(rel)
            if data is None:
                raise UsageError(f"{source}: {rel} is missing (named in {run}/class_labels.txt); {_RUNS_FIX}")
            return _to_28px(data, f"{source}: {rel}", _RUNS_FIX, size)

        training = np.stack([image(f"{run}/training/class{j:02d}.png") for j in range(1, ways + 1)])
        test = np.stack([image(f"{run}/test/item{k:02d}.png") for k in range(1, len(items) + 1)])
        order = np.argsort(items)
        runs.append(OneShotRun(run, torch.from_numpy(training).unsqueeze(1), torch.from_numpy(test).unsqueeze(1),
                               torch.tensor(np.array(classes)[order] - 1)))
    shapes = {(len(run.training), len(run.test)) for run in runs}
    if len(shapes) > 1:
        raise UsageError(f"{source}: the runs differ in size ({sorted(shapes)} classes/items); {_RUNS_FIX}")
    return runs


def _run_file(path: str, run: str, folder: str, stem: str) -> Optional[int]:
    """JJ of ``.../runNN/<folder>/<stem>JJ.png`` (any leading folders), else None."""
    match = re.match(rf"(?:.*/)?{run}/{folder}/{stem}(\d+)\.png$", path.replace("\\", "/"))
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


class OneShotRuns:
    """Lake's runs as a fixed, ordered list of tasks: run i is one N-way 1-shot task whose
    queries are the run's test items. ``batches`` serves them in order (never sampled)."""

    kind = "classification"

    def __init__(self, runs: Sequence[OneShotRun]):
        self.runs = list(runs)
        self.ways = len(self.runs[0].training)
        self.shots, self.query_shots = 1, len(self.runs[0].test) // self.ways
        self.input_shape = tuple(self.runs[0].training.shape[1:])
        self.num_outputs = self.ways
        self.description = {"set": "all_runs", "runs": [run.name for run in self.runs], "ways": self.ways,
                            "shots": self.shots, "query_per_class": self.query_shots}

    def batches(self, num_tasks: int, batch_size: int) -> Iterator[MetaBatch]:
        if num_tasks != len(self.runs):
            raise UsageError(f"--test-tasks {num_tasks}: the omniglot-lake meta-test is the {len(self.runs)} "
                             f"official runs; use --test-tasks {len(self.runs)}")
        for start in range(0, num_tasks, batch_size):
            chosen = self.runs[start:start + batch_size]
            scale = lambda x: x.float().div(255.0)  # noqa: E731
            yield MetaBatch(
                support_x=torch.stack([scale(run.training) for run in chosen]),
                support_y=torch.arange(self.ways).expand(len(chosen), self.ways).clone(),
                query_x=torch.stack([scale(run.test) for run in chosen]),
                query_y=torch.stack([run.labels for run in chosen]),
            )

    def report(self, accuracies: Sequence[float]) -> dict:
        """Lake's figure: the error rate of each run and their mean."""
        errors = [round(1.0 - a, 6) for a in accuracies]  # a run's error is a multiple of 1/items
        return {"error_rate": sum(errors) / len(errors),
                "per_run_error": {run.name: e for run, e in zip(self.runs, errors)}}
