"""--time-budget: meta-training stops after the meta-step that crosses the budget of meta-training
seconds, then validates, checkpoints and meta-tests as at --meta-steps; a resumed run continues
the budget. Every --algo, on a clock that ticks one second per reading (no timing asserted)."""

import json

import pytest

from engines import meta_engine
from imaml import checkpoint
from imaml.app.cli import main, run_from_args


class OneSecondPerReading:
    """``time`` for engines.meta_engine: each perf_counter() is one second after the last, so a
    meta-step (two readings around it) takes exactly one second of meta-training."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def _flags(tmp_path, data_root, algo, *extra):
    return ["--task", "glyphs", "--algo", algo, "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "1000", "--meta-batch-size", "2", "--inner-steps", "1", "--test-inner-steps", "1",
            "--test-tasks", "4", "--val-tasks", "2", "--val-every", "100", "--log-every", "100", "--processes", "1",
            "--data-root", data_root, "--output-dir", str(tmp_path / algo), *extra]


@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "pretrain", "protonet"])
def test_the_budget_stops_saves_meta_tests_and_resumes(tmp_path, data_root, monkeypatch, algo):
    monkeypatch.setattr(meta_engine, "time", OneSecondPerReading())
    results = run_from_args(_flags(tmp_path, data_root, algo, "--time-budget", "2.5"))
    out = tmp_path / algo
    assert results["meta_steps_done"] == 3 and results["train_seconds"] == 3.0 and results["time_budget"] == 2.5
    assert results["test"]["num_tasks"] == 4  # meta-tested as at the end of --meta-steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3] and "val/accuracy" in records[0]  # logged and validated
    assert records[0]["sys/meta_training_seconds"] == 3.0  # the x-axis of accuracy against compute
    assert checkpoint.load(out / "checkpoints" / "latest.pt")["step"] == 3
    assert checkpoint.load(out / "checkpoints" / "best.pt")["step"] == 3
    resumed = run_from_args(["--resume", str(out), "--time-budget", "4.5"])  # the budget continues: 2 more
    assert resumed["meta_steps_done"] == 5 and resumed["train_seconds"] == 5.0
    again = run_from_args(["--resume", str(out)])  # its budget (4.5 s) is spent: no step, a meta-test
    assert again["meta_steps_done"] == 5 and again["test"] == resumed["test"]


def test_a_warmup_gets_its_fraction_of_the_budget_and_the_run_the_rest(tmp_path, data_root, monkeypatch):
    """--warmup-fraction 0.5 of 4.5 s: the head warm-up stops after the step that crosses 2.25 s,
    the whole network continues its clock and steps to the run's 4.5 s."""
    monkeypatch.setattr(meta_engine, "time", OneSecondPerReading())
    results = run_from_args(_flags(tmp_path, data_root, "imaml", "--time-budget", "4.5", "--warmup-fraction", "0.5",
                                   "--lam", "10", "--head-lam", "0.1", "--head-init", "zero", "--test-also-at", "2"))
    warm = json.loads((tmp_path / "imaml" / "warmup" / "results.json").read_text())
    assert warm["time_budget"] == 2.25 and warm["meta_steps_done"] == 3 and warm["train_seconds"] == 3.0
    assert results["meta_steps_done"] == 5 and results["train_seconds"] == 5.0  # 2 whole-network steps
    assert results["test_also_at"] == warm["test_also_at"] and warm["test_also_at"]["meta_steps_done"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "imaml" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5]


def test_without_a_budget_meta_steps_decide(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(meta_engine, "time", OneSecondPerReading())
    results = run_from_args(_flags(tmp_path, data_root, "maml", "--meta-steps", "4"))
    assert results["meta_steps_done"] == 4 and results["time_budget"] is None


def test_a_two_process_job_stops_together(tmp_path, data_root, monkeypatch):
    """Each process measures its own seconds; they stop after the same meta-step (the real clock)."""
    monkeypatch.setenv("PYTHONPATH", str(meta_engine.__file__).rsplit("/engines/", 1)[0])
    assert main(_flags(tmp_path, data_root, "maml", "--time-budget", "1", "--processes", "2")) == 0
    results = json.loads((tmp_path / "maml" / "results.json").read_text())
    assert results["processes"] == 2 and 1 <= results["meta_steps_done"] < 1000
    assert checkpoint.load(tmp_path / "maml" / "checkpoints" / "latest.pt")["step"] == results["meta_steps_done"]


@pytest.mark.parametrize("argv, message", [
    (["--time-budget", "0"], "--time-budget 0.0: must be a positive number"),
    (["--time-budget", "-5"], "must be a positive number"),
])
def test_a_bad_budget_is_one_line(argv, message, capsys):
    assert main(["--algo", "imaml", *argv, "--processes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_theta_is_also_meta_tested_at_the_seconds_asked_and_a_resumed_run_keeps_it(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(meta_engine, "time", OneSecondPerReading())
    results = run_from_args(_flags(tmp_path, data_root, "maml", "--time-budget", "3.5", "--test-also-at", "2"))
    early = results["test_also_at"]
    assert (early["meta_steps_done"], early["train_seconds"], early["test"]["num_tasks"]) == (2, 2.0, 4)
    resumed = run_from_args(["--resume", str(tmp_path / "maml"), "--time-budget", "5.5"])
    assert resumed["meta_steps_done"] == 6 and resumed["test_also_at"] == early  # measured once, kept
