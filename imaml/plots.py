"""PNG plots of a finished run, drawn from the files it wrote (``metrics.jsonl``,
``inner_curves.jsonl``, ``results.json``), so they can be redrawn for any run directory:
``write_plots(dir)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

__all__ = ["write_plots", "read_inner_curves", "grid_rows", "draw_inner_loop_grid"]

GRID_ROWS = 6  # rows of the inner-loop grid at most: evenly spaced, the first and the last kept
GRID_COLUMNS = 8  # tasks per row at most


def _series(records: List[dict], key: str) -> tuple:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def read_inner_curves(output_dir: str | Path) -> List[dict]:
    """The rows ``inner_curves.jsonl`` holds (the engine's probed validation tasks), by step;
    a step recorded twice (a resumed run) keeps its last row."""
    path = Path(output_dir) / "inner_curves.jsonl"
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def grid_rows(rows: List[dict], most: int = GRID_ROWS) -> List[dict]:
    """At most ``most`` of ``rows``, evenly spaced over meta-training, first and last kept."""
    if len(rows) <= most:
        return list(rows)
    picks = sorted({round(i * (len(rows) - 1) / (most - 1)) for i in range(most)})
    return [rows[i] for i in picks]


def draw_inner_loop_grid(rows: List[dict], title: str = "", ylabel: str = "loss"):
    """The grid of inner loops: one row per recorded meta-step, one column per task (the same
    fixed validation tasks in every row), each cell the support and the query loss against
    the inner step (0 = the start, θ or the baseline's initial head). Returns the Figure."""
    import matplotlib.pyplot as plt

    rows = grid_rows(rows)
    columns = min(GRID_COLUMNS, max(len(r["tasks"]) for r in rows))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns + 0.6, 1.5 * len(rows) + 0.8),
                             sharex=True, sharey=True, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(row["tasks"]):
                ax.axis("off")
                continue
            task = row["tasks"][c]
            ax.plot(range(len(task["support"])), task["support"], color="tab:blue", label="support")
            ax.plot(range(len(task["query"])), task["query"], color="tab:orange", label="query")
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"task {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"step {row['step']}\n{ylabel}", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("inner step", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    return fig


def _validation_figure(plt, records: list, results: dict, metric: str, title: str):
    """meta_validation.png's figure (the mean with its 95% CI band), or None without validations."""
    steps, mean = _series(records, f"val/{metric}")
    if not steps:
        return None
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
    return fig


def write_plots(output_dir: str | Path) -> List[Path]:
    """meta_train_loss.png, meta_validation.png (mean with its 95% CI band),
    inner_loop.png (the inner objective per step, averaged over the meta-test tasks,
    before and after meta-training) and inner_loop_grid.png (``draw_inner_loop_grid`` of
    inner_curves.jsonl). Returns the files written."""
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
    label = "query loss after adaptation"
    if not steps:  # --algo pretrain: the supervised loss of its mini-batches
        steps, loss = _series(records, "train/loss")
        label = "training loss (all training classes)"
    if steps:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(steps, loss, label=label)
        ax.set(xlabel="meta-step", ylabel="loss", title=f"{title}: meta-training")
        ax.legend()
        save(fig, "meta_train_loss.png")

    fig = _validation_figure(plt, records, results, metric, title)
    if fig is not None:
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

    rows = read_inner_curves(output_dir)
    if rows:
        loss = "loss" if metric == "accuracy" else "MSE"
        save(draw_inner_loop_grid(rows, f"{title}: inner loops on fixed validation tasks "
                                        f"(support blue, query orange)", loss), "inner_loop_grid.png")
    return written
