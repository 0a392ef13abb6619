"""The console line of each logged step (issue 38): one line of at most ``LINE_WIDTH`` characters
a person reads, whatever the record holds, while metrics.jsonl keeps the full record."""

from __future__ import annotations

import json
import math

import pytest

from imaml import reporting
from imaml.health import MetaGradientHealth
from imaml.reporting import LINE_WIDTH, RunLog
from imaml.solvers.base import SolveInfo

INNER_STEPS = 20  # every inner step's objective is in the record: the old line printed them all


def _inner_curve() -> dict:
    return {f"inner/objective_step_{k:02d}": 1.5 / k for k in range(1, INNER_STEPS + 1)}


def _system() -> dict:
    return {"train/tasks_per_second": 12.34, "sys/peak_memory_mb": 5123.4, "train/skipped_meta_batches": 0}


def imaml_record() -> dict:
    """As TaskRecords.record and _meta_step make it; the health keys from MetaGradientHealth itself,
    so a renamed key fails here."""
    solves = [SolveInfo("cg", 5, 1e-3, True, norm=2.0), SolveInfo("cg", 5, 0.2, False, norm=3.0)]
    health = MetaGradientHealth(inner_tol=1e-2, cg_tol=1e-2).window([1e-3, 5e-3, 0.5, 2e-3], solves)
    return {"train/query_loss": 0.4123, "train/query_accuracy": 0.8634, "train/meta_grad_norm": 0.71,
            "train/meta_lr": 1e-3, **_inner_curve(), **health, **_system()}


def maml_record() -> dict:
    return {"train/query_loss": 0.61, "train/query_accuracy": 0.775, "train/meta_grad_norm": 1.2,
            "train/meta_lr": 1e-3, **_inner_curve(), **_system()}


def sinusoid_record() -> dict:
    return {"train/query_loss": 0.4871, "train/query_mse": 0.4871, "train/meta_grad_norm": 3.1,
            "train/meta_lr": 1e-3, **_inner_curve(), **_system()}


def pretrain_record() -> dict:
    """As PretrainEngine._train_record and _meta_step make it."""
    return {"train/loss": 2.314, "train/accuracy": 0.4167, "train/meta_lr": 1e-3, "train/grad_norm": 4.2,
            **_system()}


def val(metric: str = "accuracy", mean: float = 0.8412) -> dict:
    return {f"val/{metric}": mean, f"val/{metric}_ci95": 0.012}


def _lines(capsys) -> list:
    return capsys.readouterr().out.splitlines()


def _assert_readable(lines: list) -> None:
    assert lines and all(len(line) <= LINE_WIDTH for line in lines), max(lines, key=len)
    assert not any("inner/objective" in line or "=" in line for line in lines)  # no key=value dump


@pytest.mark.parametrize("record, score", [(imaml_record(), "86.3%"), (maml_record(), "77.5%"),
                                           (pretrain_record(), "41.7%"), (sinusoid_record(), "mse 0.487")])
def test_one_short_line_per_step_with_step_total_score_and_last_validation(tmp_path, capsys, record, score):
    log = RunLog(tmp_path, total_steps=200)
    log.log(20, record)
    log.log(40, {**record, **(val("mse", 0.3985) if "train/query_mse" in record else val())})
    log.log(60, record)
    lines = _lines(capsys)
    _assert_readable(lines)
    assert len(lines) == 3
    assert all(score in line and "loss" in line and "12.3 tasks/s" in line for line in lines)
    assert lines[0].startswith("step  20/200 |") and " 40/200 " in lines[1] and " 60/200 " in lines[2]
    seen = "val  0.399" if "train/query_mse" in record else "val  84.1%"
    assert "val      -" in lines[0] and seen in lines[1] and seen in lines[2]  # remembered across calls
    assert ("inner  75% solve  50%" in lines[0]) == ("train/inner_converged" in record)
    rows = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 20, **record} and rows[1]["val/accuracy_ci95" if "val/accuracy" in rows[1]
                                                           else "val/mse_ci95"] == 0.012


def test_a_validation_only_step_and_a_run_without_total(tmp_path, capsys):
    log = RunLog(tmp_path)
    log.log(40, maml_record())
    log.log(50, val())
    lines = _lines(capsys)
    _assert_readable(lines)
    assert lines[0].startswith("step     40 | loss 0.610 | acc  77.5% | val      - |") and "ETA" not in lines[0]
    assert lines[1] == "step     50 | val  84.1%"


def test_six_digit_steps_and_extreme_values_stay_within_the_width(tmp_path, capsys):
    log = RunLog(tmp_path, total_steps=999_999)
    huge = {**imaml_record(), "train/query_loss": -123456.789, "train/query_accuracy": 1.0,
            "train/tasks_per_second": 98765.4, "train/inner_converged": 1.0, "train/solver_converged": 1.0}
    log.log(1, huge)
    log.log(123_456, {**huge, **val(mean=1.0)})
    log.log(654_321, {**sinusoid_record(), "train/query_mse": 1e9, "train/query_loss": math.nan, **val("mse", 1e9)})
    log.log(999_999, {**pretrain_record(), "train/loss": math.inf})
    lines = _lines(capsys)
    _assert_readable(lines)
    assert "step 123456/999999" in lines[1] and "acc 100.0%" in lines[1] and "inner 100% solve 100%" in lines[1]
    assert lines[3].endswith("ETA 0:00")


def test_eta_is_the_pace_since_the_first_logged_step(tmp_path, capsys, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(reporting, "_clock", lambda: now[0])
    log = RunLog(tmp_path, append=True, total_steps=1000)  # resumed at step 500: its pace starts here
    log.log(500, maml_record())
    now[0] += 100.0  # 100 steps in 100 s, validation included
    log.log(600, {**maml_record(), **val()})
    now[0] += 7200.0 - 100.0  # slower: 400 steps left at (7200 s / 200 steps)
    log.log(700, maml_record())
    lines = _lines(capsys)
    assert lines[0].endswith("ETA -") and lines[1].endswith("ETA 6:40") and lines[2].endswith("ETA 3:00:00")


def test_under_a_time_budget_the_seconds_and_their_eta_show(tmp_path, capsys, monkeypatch):
    """--time-budget: the seconds of meta-training against the budget, and the ETA from whichever of
    the budget and --meta-steps ends first."""
    now = [0.0]
    monkeypatch.setattr(reporting, "_clock", lambda: now[0])
    log = RunLog(tmp_path, append=True, total_steps=10**9, time_budget=120)
    log.log(10, {**maml_record(), "sys/meta_training_seconds": 12.0})
    now[0] += 60.0  # 48 s of meta-training in 60 s of wall time: 60 s more to the budget
    log.log(50, {**maml_record(), "sys/meta_training_seconds": 60.0})
    log.log(100, {**maml_record(), **val(), "sys/meta_training_seconds": 121.0})
    lines = _lines(capsys)
    _assert_readable(lines)
    assert lines[0].startswith("step     10 |  12/120 s |") and lines[0].endswith("ETA -")
    assert " 60/120 s |" in lines[1] and lines[1].endswith("ETA 1:15")  # 0.4 of the budget in 60 s: 0.5 left
    assert "121/120 s" in lines[2] and lines[2].endswith("ETA 0:00")
    assert "1000000000" not in "".join(lines)  # the step count does not pretend to run to --meta-steps


def test_quiet_prints_nothing_but_keeps_the_record(tmp_path, capsys):
    log = RunLog(tmp_path, quiet=True, total_steps=10)
    log.log(1, imaml_record())
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, **imaml_record()}
