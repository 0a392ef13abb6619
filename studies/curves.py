"""Validation accuracy against meta-training seconds, one line per method with its band over
seeds: which method is best for the compute a user has (``studies.compare`` draws it, from each
run's metrics.jsonl, whose records carry ``sys/meta_training_seconds``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

__all__ = ["validation_curve", "on_grid", "plot_against_time"]

Curve = List[Tuple[float, float]]  # (meta-training seconds, validation accuracy), in order


def validation_curve(run_dir: Path) -> Curve:
    """A run's meta-validations, each at the meta-training seconds it followed, a
    ``--warmup-fraction`` warm-up's first (its clock runs on into the run's); [] where its records
    do not carry them (a peer's run, or one from before they did)."""
    paths = [path for path in (run_dir / "warmup" / "metrics.jsonl", run_dir / "metrics.jsonl") if path.is_file()]
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line]
    return [(r["sys/meta_training_seconds"], r["val/accuracy"]) for r in records
            if "val/accuracy" in r and "sys/meta_training_seconds" in r]


def on_grid(curve: Curve, grid: Sequence[float]) -> List[float]:
    """The curve read at each time of ``grid``: the last validation made by then (nan before
    the first)."""
    values, i, last = [], 0, float("nan")
    for t in grid:
        while i < len(curve) and curve[i][0] <= t:
            last = curve[i][1]
            i += 1
        values.append(last)
    return values


def plot_against_time(curves: Dict[str, Dict[int, Curve]], labels: Dict[str, str], path: Path, title: str) -> bool:
    """One line per method (the mean over its seeds) and the band between its lowest and highest
    seed, from the time every seed has validated to the time every seed reached; False (no file)
    where no run has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {m: [c for c in by_seed.values() if c] for m, by_seed in curves.items()}
    drawn = {m: cs for m, cs in drawn.items() if cs}
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for method, seeds in drawn.items():
        start, end = max(c[0][0] for c in seeds), min(c[-1][0] for c in seeds)  # where every seed has a value
        grid = sorted({start, *(t for c in seeds for t, _ in c if start <= t <= end)})
        rows = [on_grid(c, grid) for c in seeds]
        mean = [sum(col) / len(col) for col in zip(*rows)]
        line, = ax.plot(grid, [100 * v for v in mean], drawstyle="steps-post",
                        label=f"{labels.get(method, method)} ({len(seeds)} seeds)")
        ax.fill_between(grid, [100 * min(col) for col in zip(*rows)], [100 * max(col) for col in zip(*rows)],
                        color=line.get_color(), alpha=0.2, step="post")
    ax.set(xlabel="meta-training seconds", ylabel="meta-validation accuracy (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
