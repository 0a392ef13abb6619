"""Glyphs: an embedded, procedurally generated Omniglot-like benchmark.

Each of the 1,600 classes is a "character" of one to four pen strokes (cubic Bézier curves
whose control points follow a short random walk). Each of its 20 samples redraws those
strokes with per-sample jitter — control-point noise, a small rotation, scale, shear and
shift, and a varying pen width — rendered anti-aliased to 28×28 grayscale (ink = 1). So, as
in Omniglot, examples of a class share structure but no two are identical, and learning to
tell unseen classes apart from one example each needs features that transfer.

The images are a pure function of ``GENERATOR_VERSION`` (never of the run's seed): they
are generated once (~4 s) and cached under ``<data-root>/glyphs/`` (checked when read, and
drawn again where it cannot be trusted: ``envs.cache``). The class split is
fixed: 1,200 train, 100 validation, 300 test classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from envs import cache
from imaml.errors import UsageError

__all__ = ["NUM_CLASSES", "SAMPLES_PER_CLASS", "IMAGE_SIZE", "SPLITS", "load_glyphs", "render_class"]

GENERATOR_VERSION = 2
NUM_CLASSES = 1600
SAMPLES_PER_CLASS = 20
IMAGE_SIZE = 28
SPLITS = {"train": (0, 1200), "val": (1200, 1300), "test": (1300, 1600)}

_POINTS_PER_STROKE = 12  # polyline resolution of each Bézier stroke
# per-sample variation: control-point noise, rotation (rad), scale range, shear, shift (image widths)
JITTER = dict(points=0.05, rotation=np.deg2rad(15.0), scale=(0.75, 1.15), shear=0.15, shift=0.08)


def _class_strokes(rng: np.random.Generator) -> np.ndarray:
    """Control points [strokes, 4, 2] of one character, centred in the unit square with an
    extent between 0.3 and 0.8 (so no sample of it can leave the canvas or vanish)."""
    strokes = []
    for _ in range(rng.integers(1, 5)):
        start = rng.uniform(0.2, 0.8, size=2)
        steps = rng.normal(0.0, 0.22, size=(3, 2))
        strokes.append(np.vstack([start, start + np.cumsum(steps, axis=0)]))
    points = np.stack(strokes)
    low, high = points.reshape(-1, 2).min(0), points.reshape(-1, 2).max(0)
    extent = max((high - low).max(), 1e-6)
    scale = np.clip(extent, 0.3, 0.8) / extent
    return (points - (low + high) / 2) * scale + 0.5


def _bezier(control: np.ndarray) -> np.ndarray:
    """Points [..., P, 2] along cubic Bézier curves with control points [..., 4, 2]."""
    t = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)[:, None]
    c0, c1, c2, c3 = (control[..., i, None, :] for i in range(4))
    return ((1 - t) ** 3) * c0 + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * (t ** 2) * c2 + (t ** 3) * c3


def render_class(class_index: int, samples: int = SAMPLES_PER_CLASS) -> np.ndarray:
    """All samples of one class as uint8 images [samples, 28, 28]; deterministic in its index."""
    rng = np.random.default_rng([GENERATOR_VERSION, class_index])
    control = _class_strokes(rng)  # [S, 4, 2]
    jittered = control[None] + rng.normal(0.0, JITTER["points"], size=(samples,) + control.shape)
    curves = _bezier(jittered)  # [n, S, P, 2]
    # per-sample affine: rotation, anisotropic scale, shear, shift about the centre
    angle = rng.normal(0.0, JITTER["rotation"], size=samples)
    scale = rng.uniform(*JITTER["scale"], size=(samples, 2))
    shear = rng.normal(0.0, JITTER["shear"], size=samples)
    cos, sin = np.cos(angle), np.sin(angle)
    affine = np.stack([np.stack([cos, -sin + shear], -1), np.stack([sin, cos], -1)], -2)
    affine = affine * scale[:, :, None]
    shift = rng.normal(0.0, JITTER["shift"], size=(samples, 1, 1, 2))
    curves = np.einsum("nij,nspj->nspi", affine, curves - 0.5) + 0.5 + shift
    width = rng.uniform(0.028, 0.05, size=(samples, 1, 1))
    # distance from every pixel centre to the nearest segment, one segment at a time: [n, P]
    # arrays stay small (no page faults from fresh multi-MB temporaries), x and y kept apart
    # (fast in float32)
    a = curves[:, :, :-1].reshape(samples, -1, 2).astype(np.float32)  # segment starts [n, M, 2]
    ab = curves[:, :, 1:].reshape(samples, -1, 2).astype(np.float32) - a
    grid = ((np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE).astype(np.float32)
    px, py = (p.reshape(1, -1) for p in np.meshgrid(grid, grid, indexing="xy"))  # [1, P]
    nearest = np.full((samples, IMAGE_SIZE * IMAGE_SIZE), np.inf, dtype=np.float32)
    for m in range(a.shape[1]):
        apx, apy = px - a[:, m, 0, None], py - a[:, m, 1, None]  # [n, P]
        abx, aby = ab[:, m, 0, None], ab[:, m, 1, None]
        t = np.clip((apx * abx + apy * aby) / np.maximum(abx * abx + aby * aby, 1e-12), 0.0, 1.0)
        dx, dy = apx - t * abx, apy - t * aby
        np.minimum(nearest, dx * dx + dy * dy, out=nearest)
    dist = np.sqrt(nearest)  # [n, P]
    ink = np.clip((width[:, 0] - dist) * IMAGE_SIZE + 0.5, 0.0, 1.0)  # ~1 pixel of anti-aliasing
    return np.round(ink.reshape(samples, IMAGE_SIZE, IMAGE_SIZE) * 255).astype(np.uint8)


def generate() -> np.ndarray:
    """The whole benchmark, uint8 [1600, 20, 28, 28]."""
    return np.stack([render_class(c) for c in range(NUM_CLASSES)])


def load_glyphs(data_root: str | os.PathLike) -> np.ndarray:
    """The cached benchmark, generating it on first use and whenever the cache cannot be
    trusted (unreadable, truncated, of another shape or dtype, or not what this generator draws)."""
    path = Path(data_root) / "glyphs" / f"glyphs-v{GENERATOR_VERSION}.npy"
    images = cache.read(path, _load, _check)
    if images is not None:
        return images
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked before the ~4 s of generation
        raise UsageError(f"--data-root {data_root}: cannot create {path.parent} ({err.strerror or err}); "
                         f"pass a writable --data-root") from None
    images = generate()
    cache.write(path, lambda f: np.save(f, images))
    return images


def _load(path: Path) -> np.ndarray:
    images = np.load(path, allow_pickle=False)
    if not isinstance(images, np.ndarray):  # an .npz archive
        raise ValueError("not a single .npy array")
    return images


def _check(images: np.ndarray) -> Optional[str]:
    """Why a loaded cache is not the benchmark, or None. Its first and last classes are drawn
    again (~10 ms): a cache from a changed generator (same version) differs there."""
    shape = (NUM_CLASSES, SAMPLES_PER_CLASS, IMAGE_SIZE, IMAGE_SIZE)
    if images.shape != shape or images.dtype != np.uint8:
        return f"holds {images.dtype} {list(images.shape)}, expected uint8 {list(shape)}"
    if any(not np.array_equal(images[c], render_class(c)) for c in (0, NUM_CLASSES - 1)):
        return f"differs from what generator v{GENERATOR_VERSION} draws (made by another version of it)"
    return None
