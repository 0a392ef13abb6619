"""PNG plots of a finished run, drawn from the files it wrote (``metrics.jsonl``,
``results.json``), so they can be redrawn for any run directory: ``write_plots(dir)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

__all__ = ["write_plots"]


def _series(records: List[dict], key: str) -> tuple:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def write_plots(output_dir: str | Path) -> List[Path]:
    """meta_train_loss.png, meta_validation.png (mean with its 95% CI band) and
    inner_loop.png (the inner objective per step, averaged over the meta-test tasks,
    before and after meta-training). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    results = json.loads((output_dir / "results.json").read_text())
    metric = results["test"]["metric"]
    plot_dir = output_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    title = f"{results['algo']} on {results['task']}"
    written = []

    def save(fig, name):
        path = plot_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    steps, loss = _series(records, "train/query_loss")
    if steps:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(steps, loss, label="query loss after adaptation")
        ax.set(xlabel="meta-step", ylabel="loss", title=f"{title}: meta-training")
        ax.legend()
        save(fig, "meta_train_loss.png")

    steps, mean = _series(records, f"val/{metric}")
    if steps:
        _, ci = _series(records, f"val/{metric}_ci95")
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(steps, mean, marker="o", label=f"meta-validation {metric}")
        ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                        alpha=0.25, label="95% CI")
        before = results.get("before_meta_training")
        if before:
            ax.axhline(before["mean"], color="gray", linestyle="--", label="initialization (meta-test)")
        ax.set(xlabel="meta-step", ylabel=metric, title=f"{title}: meta-validation")
        ax.legend()
        save(fig, "meta_validation.png")

    curves = {name: results.get(name, {}).get("inner_curve") for name in ("before_meta_training", "test")}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, label in (("before_meta_training", "before meta-training"), ("test", "after meta-training")):
            if curves[name]:
                ax.plot(range(1, len(curves[name]) + 1), curves[name], marker=".", label=label)
        ax.set(xlabel="inner step", ylabel="support objective", yscale="log",
               title=f"{title}: inner loop on meta-test tasks")
        ax.legend()
        save(fig, "inner_loop.png")
    return written
