"""benchmarks.compare: the four methods under one protocol, one table, one plot."""

import json

import pytest

from benchmarks import compare


def test_compare_runs_the_four_methods_and_tabulates_them(tmp_path, data_root):
    out = tmp_path / "cmp"
    code = compare.main(["--task", "glyphs", "--out", str(out), "--set", "pretrain:inner-lr=0.05", "--",
                         "--ways", "3", "--channels", "4", "--query-shots", "2", "--meta-steps", "2",
                         "--meta-batch-size", "2", "--inner-steps", "1", "--test-inner-steps", "2",
                         "--test-tasks", "4", "--val-tasks", "2", "--val-every", "2", "--processes", "1",
                         "--data-root", data_root])
    assert code == 0
    table = (out / "comparison.md").read_text()
    for name in ("MAML", "first-order MAML", "iMAML", "pretrain + fine-tune"):
        assert f"| {name} |" in table
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["protocol"]["test_tasks"] == 4 and summary["protocol"]["test_ways"] == 3
    assert summary["runs"]["pretrain"]["config"]["inner_lr"] == 0.05  # one method's own flag
    assert summary["runs"]["maml"]["config"]["inner_lr"] == 0.4  # the others keep their presets'
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = compare.main(["--task", "glyphs", "--out", str(out), "--table-only"])
    assert again == 0 and (out / "comparison.md").read_text() == table


def test_compare_refuses_runs_with_different_meta_test_tasks():
    def run(test_tasks):
        return {"task": "glyphs", "test_ways": 5, "shots": 1, "seed": 0, "query_shots": 5,
                "protocol": {"test_tasks": test_tasks, "test_query_shots": 5, "bn_mode": "transductive",
                             "model": None, "channels": 32}}

    assert compare.check_protocol({"maml": run(600), "pretrain": run(600)})["test_tasks"] == 600
    with pytest.raises(SystemExit, match="differ in test_tasks"):
        compare.check_protocol({"maml": run(600), "pretrain": run(300)})
