"""Tiny benchmark files in each dataset's real on-disk format (what learn2learn and the
original releases write), so tests can run the real loading path offline.

Every image encodes its class in its pixels (``class_value``), so a test can check that a
task's labels agree with the images it was served."""

from __future__ import annotations

import io
import zipfile
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def class_value(label: int) -> int:
    return 10 + 20 * label


def _rgb(label: int, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([label, index])
    image = rng.integers(0, 8, size=(size, size, 3)).astype(np.uint8)
    return image + np.uint8(class_value(label))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mini_imagenet(root: Path, classes: int = 4, per_class: int = 6) -> None:
    """mini-imagenet-cache-{train,validation,test}.pkl: image_data [N, 84, 84, 3] uint8 and
    class_dict {wnid: [indices]} (the Ravi & Larochelle cache pickles)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        images, class_dict = [], {}
        for c in range(classes):
            class_dict[f"n{c:08d}"] = list(range(len(images), len(images) + per_class))
            images += [_rgb(c, i, 84) for i in range(per_class)]
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f, protocol=4)


def write_tiered_imagenet(root: Path, classes: int = 4, per_class=(6, 9, 7, 8)) -> None:
    """tiered-imagenet/{split}_images_png.pkl (a list of PNG-encoded uint8 arrays) and
    {split}_labels.pkl ({'label_specific': ..., 'label_general': ...}); classes differ in size."""
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        images, labels = [], []
        for c in range(classes):
            for i in range(per_class[c % len(per_class)]):
                images.append(np.frombuffer(_png(_rgb(c, i, 84)), dtype=np.uint8))
                labels.append(c)
        order = np.random.default_rng(0).permutation(len(labels))  # interleaved, as in the real files
        with open(folder / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump([images[i] for i in order], f, protocol=4)
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": np.array(labels)[order], "label_general": np.zeros(len(labels))}, f,
                        protocol=2)


def write_fc100(root: Path, classes: int = 4, per_class: int = 6) -> None:
    """FC100_{train,val,test}.pickle: {'data': [N, 32, 32, 3] uint8, 'labels': [...]} (Python 2
    pickles in the real release, hence latin1)."""
    root.mkdir(parents=True, exist_ok=True)
    for split_index, split in enumerate(("train", "val", "test")):
        data, labels = [], []
        for c in range(classes):
            data += [_rgb(c, i, 32) for i in range(per_class)]
            labels += [c + 100 * split_index] * per_class  # global CIFAR-100 label ids
        with open(root / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump({"data": np.stack(data), "labels": labels}, f, protocol=2)


def write_cifarfs(root: Path, classes_per_split: int = 4, per_class: int = 6) -> None:
    """cifarfs/cifar100/data/<class>/*.png and cifarfs/cifar100/splits/bertinetto/{split}.txt
    (the extracted cifar100.zip that learn2learn processes into per-split folders)."""
    base = root / "cifarfs" / "cifar100"
    splits = base / "splits" / "bertinetto"
    splits.mkdir(parents=True, exist_ok=True)
    label = 0
    for split in ("train", "val", "test"):
        names = []
        for _ in range(classes_per_split):
            name = f"class_{label:03d}"
            folder = base / "data" / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_rgb(label, i, 32)).save(folder / f"{name}_s_{i:03d}.png")
            names.append(name)
            label += 1
        (splits / f"{split}.txt").write_text("\n".join(names) + "\n")


def write_omniglot(root: Path, alphabets: int = 4, characters: int = 10) -> None:
    """omniglot-py/images_{background,evaluation}/<alphabet>/character<NN>/<id>_<drawer>.png:
    20 drawings of 105×105 black-on-white per character."""
    for s, set_name in enumerate(("images_background", "images_evaluation")):
        for a in range(alphabets // 2):
            for c in range(characters):
                folder = root / "omniglot-py" / set_name / f"Alphabet_{s}{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                label = (s * (alphabets // 2) + a) * characters + c
                for d in range(20):
                    canvas = np.full((105, 105), 255, dtype=np.uint8)
                    rng = np.random.default_rng([label, d])
                    top = 10 + (label % 7) * 10 + int(rng.integers(0, 3))
                    left = 5 + (label // 7) * 10
                    canvas[top:top + 12, left:left + 40] = 0  # a stroke whose place identifies the class
                    Image.fromarray(canvas).save(folder / f"{label:04d}_{d + 1:02d}.png")


WRITERS = {"mini-imagenet": write_mini_imagenet, "tiered-imagenet": write_tiered_imagenet,
           "fc100": write_fc100, "cifarfs": write_cifarfs, "omniglot": write_omniglot}


# ------------------------------------------------------------------------------ official Omniglot files
_CORNERS = (0, 3, 12, 15)  # cells of the 4×4 grid: top-left always inked (orientation), the others never
_BITS = [cell for cell in range(16) if cell not in _CORNERS]  # 12 cells spell the code


def glyph_code(code: int) -> np.ndarray:
    """A 105×105 black-on-white image whose 4×4 grid of ink blocks spells ``code`` (< 4096),
    still readable after the loader's resize to 28×28 and in any quarter turn (``read_code``)."""
    assert 0 <= code < 4096
    canvas = np.full((105, 105), 255, dtype=np.uint8)
    for cell in [0] + [cell for bit, cell in enumerate(_BITS) if code >> bit & 1]:
        r, c = divmod(cell, 4)
        canvas[r * 26 + 4:r * 26 + 22, c * 26 + 4:c * 26 + 22] = 0
    return canvas


def read_code(image) -> int:
    """The code of a loaded 28×28 image (ink high, any scale, turned by any multiple of 90°),
    inverse of ``glyph_code``; -1 if no turn puts the orientation mark top-left alone."""
    image = np.asarray(image, dtype=np.float32).reshape(28, 28)
    image = image / max(float(image.max()), 1e-6)
    for turn in range(4):
        upright = np.rot90(image, -turn)
        ink = [upright[r * 7 + 2:r * 7 + 5, c * 7 + 2:c * 7 + 5].mean() > 0.5 for r in range(4) for c in range(4)]
        if ink[0] and not any(ink[cell] for cell in _CORNERS[1:]):
            return sum(1 << bit for bit, cell in enumerate(_BITS) if ink[cell])
    return -1


def _png_1bit(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("1").save(buffer, format="PNG")  # mode "1", as the real files
    return buffer.getvalue()


def official_omniglot_set(set_name: str, alphabets: int, characters: int, first_code: int = 1) -> dict:
    """{member path: PNG bytes} of an official set: <set>/<Alphabet>/character<NN>/<id>_<drawer>.png,
    20 drawers; character i of the set shows code ``first_code + i``."""
    files, code = {}, first_code
    for a in range(alphabets):
        for c in range(1, characters + 1):
            for d in range(1, 21):
                files[f"{set_name}/Alphabet_{chr(65 + a)}/character{c:02d}/{code:04d}_{d:02d}.png"] = \
                    _png_1bit(glyph_code(code))
            code += 1
    return files


def official_runs(ways: int = 4, first_code: int = 2000, seed: int = 0) -> tuple:
    """({member path under all_runs/: bytes}, {run: [class (0-based) of each test item]}): 20 runs
    in the format of all_runs.zip; class j of run r shows code first_code + 100·r + j, and the
    test items show their class's code, in a shuffled order."""
    rng = np.random.default_rng(seed)
    files, truth = {}, {}
    for r in range(1, 21):
        run = f"run{r:02d}"
        order = rng.permutation(ways)
        for j in range(ways):
            files[f"{run}/training/class{j + 1:02d}.png"] = _png_1bit(glyph_code(first_code + 100 * r + j))
        lines = []
        for k, cls in enumerate(order, start=1):
            files[f"{run}/test/item{k:02d}.png"] = _png_1bit(glyph_code(first_code + 100 * r + int(cls)))
            lines.append(f"{run}/test/item{k:02d}.png {run}/training/class{cls + 1:02d}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
        truth[run] = [int(c) for c in order]
    return files, truth


def write_files(files: dict, root: Path, zip_path: Path | None = None) -> None:
    """Write ``files`` extracted under ``root``, or as one zip file ``zip_path``."""
    if zip_path is not None:
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zip_path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_background_stand_in(zip_path: Path, alphabets: dict | None = None) -> None:
    """``images_background_small1.zip`` in the official format, small (``{alphabet: characters}``,
    named as in the real set): what benchmarks/gpu_check.sh's dry run reads where the real file
    is absent, so its real-Omniglot step still runs: Korean held out for 20-way runs, and enough
    characters left for 20-way validation tasks on a quarter of them."""
    files, code = {}, 1
    for alphabet, characters in (alphabets or {"Korean": 20, "Latin": 80}).items():
        one = official_omniglot_set("images_background_small1", 1, characters, first_code=code)
        files.update({name.replace("/Alphabet_A/", f"/{alphabet}/"): data for name, data in one.items()})
        code += characters
    write_files(files, Path(zip_path).parent, Path(zip_path))
