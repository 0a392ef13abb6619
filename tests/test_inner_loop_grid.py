"""The grid of inner loops (plots/inner_loop_grid.png): what the engine records for it, and
that the plot draws exactly those records."""

import json

import pytest
import torch

from engines import build_engine
from imaml.app.cli import run_from_args
from imaml.metrics import task_loss
from imaml.plots import draw_inner_loop_grid, grid_rows, read_inner_curves


def _args(tmp_path, data_root, algo, *extra):
    return ["--task", "glyphs", "--algo", algo, "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "3",
            "--test-tasks", "4", "--val-tasks", "3", "--val-every", "2", "--log-every", "1",
            "--data-root", data_root, "--output-dir", str(tmp_path / algo), *extra]


def _drawn(fig) -> list:
    """(support, query) y-values of every cell of a grid figure, row by row."""
    return [[list(line.get_ydata()) for line in ax.get_lines()] for ax in fig.axes if ax.get_lines()]


@pytest.mark.parametrize("algo", ["maml", "fomaml", "imaml", "pretrain"])
def test_every_run_records_its_inner_loops_and_draws_the_grid_from_them(tmp_path, data_root, algo):
    run_from_args(_args(tmp_path, data_root, algo))
    out = tmp_path / algo
    rows = read_inner_curves(out)
    assert [r["step"] for r in rows] == [0, 2, 4]  # θ₀, then every meta-validation
    for row in rows:
        assert row["split"] == "val" and len(row["tasks"]) == 2  # one meta-batch of the fixed tasks
        assert all(len(t["support"]) == len(t["query"]) == 4 for t in row["tasks"])  # φ₀ … φ₃
    png = (out / "plots" / "inner_loop_grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    expected = [[t["support"], t["query"]] for row in rows for t in row["tasks"]]
    assert _drawn(draw_inner_loop_grid(rows)) == expected


def test_the_grid_follows_the_file_it_is_drawn_from(tmp_path, data_root):
    run_from_args(_args(tmp_path, data_root, "maml"))
    path = tmp_path / "maml" / "inner_curves.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["tasks"][0]["query"] = [9.0, 8.0, 7.0, 6.0]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = _drawn(draw_inner_loop_grid(read_inner_curves(tmp_path / "maml")))
    assert drawn[2][1] == [9.0, 8.0, 7.0, 6.0]  # row 1, task 0, the query curve


def test_many_rows_are_thinned_evenly_keeping_the_first_and_the_last():
    rows = [{"step": s, "tasks": []} for s in range(0, 1001, 50)]
    assert [r["step"] for r in grid_rows(rows, most=6)] == [0, 200, 400, 600, 800, 1000]


@pytest.mark.parametrize("algo", ["maml", "imaml", "pretrain"])
def test_the_probe_measures_the_real_inner_loop_and_changes_nothing(make_config, algo):
    engine = build_engine(make_config(task="glyphs", algo=algo, meta_batch_size=2, val_tasks=3, test_inner_steps=3,
                                      execution="per-task"))
    plain = engine.evaluate("val", 3)
    probed = engine.evaluate("val", 3, probe=True)
    assert probed == plain  # same scores and curves with and without the measurements
    assert len(engine.probed) == 2
    engine.eval()
    engine.env.load(next(engine.env.episodes("val", 3)))
    for index, curves in enumerate(engine.probed):
        task = engine.env.select(index)
        engine.inner_loop(3)
        with torch.no_grad():
            query = task_loss("classification", engine.lower.predict(task.query_x), task.query_y).item()
            support = task_loss("classification", engine.lower.predict(task.support_x), task.support_y).item()
        assert curves["query"][-1] == pytest.approx(query, rel=1e-6)
        assert curves["support"][-1] == pytest.approx(support, rel=1e-6)
        if algo != "pretrain":  # φ₀ = θ
            with torch.no_grad():
                start = task_loss("classification", engine.upper.module(task.support_x), task.support_y).item()
            assert curves["support"][0] == pytest.approx(start, rel=1e-5)


def test_task_vectorized_probes_match_per_task_ones(make_config):
    probes = {}
    for execution in ("per-task", "vectorized"):
        engine = build_engine(make_config(task="glyphs", algo="maml", execution=execution, val_tasks=2,
                                          test_inner_steps=2))
        engine.evaluate("val", 2, probe=True)
        probes[execution] = engine.probed
    for a, b in zip(probes["per-task"], probes["vectorized"]):
        assert a["support"] == pytest.approx(b["support"], rel=1e-4)
        assert a["query"] == pytest.approx(b["query"], rel=1e-4)
