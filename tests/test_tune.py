"""studies.tune: every method's knobs chosen the same way, on meta-validation, from at most six
candidates of the same budget; the test tasks are never what chooses."""

import json

import pytest

from studies import tune
from tests.test_compare import SMALL


def test_tune_runs_each_candidate_and_chooses_the_best_validation(tmp_path, data_root):
    out = tmp_path / "tune"
    code = tune.main(["--task", "glyphs", "--method", "maml", "--out", str(out), "--grid", "inner-lr=0.05,0.4",
                      "--", *SMALL, "--data-root", data_root])
    assert code == 0
    record = json.loads((out / "maml" / "tune.json").read_text())
    rows = record["candidates"]
    assert [r["flags"] for r in rows] == [["--inner-lr", "0.05"], ["--inner-lr", "0.4"]]
    scores = [r["best_validation"]["mean"] for r in rows]
    assert record["chosen"] == scores.index(max(scores))
    for k, flags in enumerate(r["flags"] for r in rows):
        run = json.loads((out / "maml" / f"candidate-{k}" / "maml" / "seed-0" / "results.json").read_text())
        assert run["config"]["inner_lr"] == float(flags[1]) and run["protocol"]["test_tasks"] == 2
    assert "**chosen**" in (out / "maml" / "tune.md").read_text()


def test_at_most_six_candidates_and_a_readable_grid():
    assert tune.candidates(["inner-lr=0.1,0.4", "inner-steps=1,5"]) == [
        ["--inner-lr", "0.1", "--inner-steps", "1"], ["--inner-lr", "0.1", "--inner-steps", "5"],
        ["--inner-lr", "0.4", "--inner-steps", "1"], ["--inner-lr", "0.4", "--inner-steps", "5"]]
    with pytest.raises(SystemExit, match="7 candidates; every method gets at most 6"):
        tune.candidates(["lam=1,2,3,4,5,6,7"])
    with pytest.raises(SystemExit, match="write FLAG=VALUE"):
        tune.candidates(["inner-lr"])
    assert tune.candidates([], ["--inner-lr 0.4 --inner-steps 5 --test-inner-steps 5"]) == [
        ["--inner-lr", "0.4", "--inner-steps", "5", "--test-inner-steps", "5"]]
    with pytest.raises(SystemExit, match="no candidate"):
        tune.candidates([])


def test_the_choice_is_the_highest_accuracy_or_the_lowest_mse():
    assert tune.choose([{"metric": "accuracy", "mean": 0.5}, {"metric": "accuracy", "mean": 0.7}]) == 1
    assert tune.choose([{"metric": "mse", "mean": 0.5}, {"metric": "mse", "mean": 0.7}]) == 0
