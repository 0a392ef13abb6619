"""studies.compare: the methods on the same test tasks, over seeds, with paired differences;
studies.paired: the statistics."""

import json
import math

import pytest

from studies import compare
from imaml.metrics import mean_ci95
from studies.curves import on_grid, plot_against_time, validation_curve
from studies.paired import paired_difference

SMALL = ["--ways", "3", "--channels", "4", "--query-shots", "2", "--meta-steps", "2", "--meta-batch-size", "2",
         "--inner-steps", "1", "--test-inner-steps", "2", "--test-tasks", "4", "--val-tasks", "2", "--val-every", "2",
         "--processes", "1"]


@pytest.mark.long  # docs/architecture.md, "The test suite"
def test_compare_runs_its_rows_over_seeds_on_the_same_tasks(tmp_path, data_root):
    out = tmp_path / "cmp"
    methods = ["maml", "imaml-head", "pretrain"]  # a MAML, an iMAML and a baseline row; the rest: the next test
    code = compare.main(["--task", "glyphs", "--out", str(out), "--methods", *methods, "--seeds", "0", "1",
                         "--set", "pretrain:inner-lr=0.05", "--", *SMALL, "--data-root", data_root])
    assert code == 0
    table = (out / "comparison.md").read_text()
    for method in methods:
        assert f"| {compare.METHODS[method][0]} | 2 |" in table
    summary = json.loads((out / "comparison.json").read_text())
    rows = summary["rows"]
    assert summary["protocol"]["test_tasks"] == 4 and summary["seeds"] == [0, 1]
    assert "difference" not in rows["maml"] and rows["imaml-head"]["difference"]["tasks"] == 8  # 4 tasks × 2 seeds
    assert rows["imaml-head"]["config"]["head_init"] == "zero"
    assert rows["pretrain"]["config"]["inner_lr"] == 0.05 and rows["maml"]["config"]["inner_lr"] == 0.4
    assert "inner_converged" in rows["imaml-head"] and "inner_converged" not in rows["maml"]
    # the paired difference is of the very tasks each run scored, seed by seed
    per_task = {m: {s: json.loads((out / m / f"seed-{s}" / "results.json").read_text())["test"]["scores"]
                    for s in (0, 1)} for m in ("maml", "imaml-head")}
    expected = [sum(a - b for a, b in zip(per_task["imaml-head"][s], per_task["maml"][s])) / 4 for s in (0, 1)]
    assert rows["imaml-head"]["difference"]["per_seed"] == pytest.approx(expected)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = validation_curve(out / "maml" / "seed-0")  # --val-every 2 of --meta-steps 2: one validation
    assert len(curve) == 1 and curve[0][0] > 0 and 0 <= curve[0][1] <= 1
    again = compare.main(["--task", "glyphs", "--out", str(out), "--methods", *methods, "--seeds", "0", "1",
                          "--table-only"])
    assert again == 0 and (out / "comparison.md").read_text() == table
    pair = compare.main(["--task", "glyphs", "--out", str(out), "--methods", "pretrain", "maml", "--seeds", "0", "1",
                         "--table-only", "--name", "pair"])  # other rows of the same runs, beside the table
    assert pair == 0 and (out / "comparison.md").read_text() == table and (out / "pair_time.png").is_file()
    assert "paired Δ vs pretrain" in (out / "pair.md").read_text()


def test_each_method_runs_its_preset_with_its_own_flags(tmp_path):
    """What every row runs, as run.py resolves its command: the task's preset for the method where
    there is one, else the preset it borrows plus the method's flags."""
    from imaml.app.cli import load_config

    def config(method, task="glyphs", shared=()):
        command = compare.command_for(method, task, 0, tmp_path, list(shared), [], None)
        assert command[1].endswith("run.py") and command[command.index("--output-dir") + 1].endswith(
            f"{method}/seed-0")
        return load_config(command[2:])

    assert config("maml").inner_lr == 0.4 and config("maml").adapt == "all"
    assert config("anil").adapt == "head" and config("anil").algo == "maml"  # glyphs: MAML's preset, the head alone
    assert config("imaml").adapt == "all" and config("imaml").algo == "imaml"
    hessian_free = config("imaml-hf")  # glyphs has no -hf preset: its GD preset with the Hessian-free flags
    assert hessian_free.inner_optimizer == "hessian-free" and hessian_free.inner_cg_steps == 5
    assert config("imaml-head").head_init == "zero" and config("imaml-head").adapt == "head"
    assert config("fomaml").algo == "fomaml" and config("protonet").algo == "protonet"
    assert config("anil", task="omniglot").inner_steps == 5  # Omniglot's own ANIL preset
    assert config("pretrain", shared=["--inner-lr", "0.05"]).inner_lr == 0.05  # shared flags after the preset
    torchopt = config("imaml-torchopt")
    assert (torchopt.hypergrad, torchopt.lam, torchopt.inner_lr) == ("normal-cg", 2.0, 0.1)  # TorchOpt's example
    with pytest.raises(SystemExit, match="no preset sinusoid-imaml-converged.yaml"):
        config("imaml-converged", task="sinusoid")


def test_compare_refuses_runs_with_different_meta_test_tasks():
    def run(test_tasks):
        return {"task": "glyphs", "test_ways": 5, "shots": 1, "seed": 0, "query_shots": 5,
                "protocol": {"test_tasks": test_tasks, "test_query_shots": 5, "bn_mode": "transductive",
                             "model": None, "channels": 32}}

    assert compare.check_protocol({"maml": run(600), "pretrain": run(600)})["test_tasks"] == 600
    with pytest.raises(SystemExit, match="differ in test_tasks"):
        compare.check_protocol({"maml": run(600), "pretrain": run(300)})


def test_the_intervals_are_students_over_seeds_and_normal_over_tasks():
    mean, half = mean_ci95([0.90, 0.92, 0.94], student=True)  # sd 0.02, n 3: t(2) = 4.303
    assert mean == pytest.approx(0.92) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert math.isnan(mean_ci95([0.5], student=True)[1])
    assert mean_ci95([0.90, 0.92, 0.94])[1] == pytest.approx(1.96 * 0.02 / math.sqrt(3))  # many values: z
    a = {0: [1.0, 0.0, 1.0, 1.0], 1: [1.0, 1.0, 0.0, 1.0]}
    b = {0: [0.0, 0.0, 1.0, 1.0], 1: [1.0, 0.0, 0.0, 1.0]}
    d = paired_difference(a, b)
    assert d["per_seed"] == [0.25, 0.25] and d["mean"] == 0.25 and d["ci95_seeds"] == 0.0 and d["tasks"] == 8
    diffs = [1, 0, 0, 0, 0, 1, 0, 0]
    sd = math.sqrt(sum((x - 0.25) ** 2 for x in diffs) / 7)
    assert d["ci95_tasks"] == pytest.approx(1.96 * sd / math.sqrt(8))
    with pytest.raises(ValueError, match="the same tasks"):
        paired_difference({0: [1.0, 0.0]}, {0: [1.0]})


@pytest.mark.long  # docs/architecture.md, "The test suite"
def test_a_finished_run_is_reused_and_a_changed_one_runs_again(tmp_path, data_root, capsys):
    out = tmp_path / "cmp"
    methods = ["maml", "imaml-torchopt"]

    def run(*extra):
        assert compare.main(["--task", "glyphs", "--out", str(out), "--methods", *methods, "--seeds", "0", *extra,
                             "--", *SMALL, "--data-root", data_root]) == 0
        return {m: (out / m / "seed-0" / "results.json").stat().st_mtime_ns for m in methods}

    first = run()
    config = json.loads((out / "imaml-torchopt" / "seed-0" / "results.json").read_text())["config"]
    assert (config["hypergrad"], config["lam"], config["inner_lr"]) == ("normal-cg", 2.0, 0.1)  # TorchOpt's example
    capsys.readouterr()
    assert run() == first and capsys.readouterr().out.count(": reused)") == 2  # nothing ran again
    changed = run("--set", "maml:inner-lr=0.3")
    assert changed["maml"] != first["maml"] and changed["imaml-torchopt"] == first["imaml-torchopt"]
    assert run("--set", "maml:inner-lr=0.3", "--rerun")["imaml-torchopt"] != first["imaml-torchopt"]


def test_table_only_names_a_run_that_has_not_finished(tmp_path):
    with pytest.raises(SystemExit, match=r"maml/seed-0/results.json is missing: maml \(seed 0\) has not finished"):
        compare.main(["--task", "glyphs", "--out", str(tmp_path), "--methods", "maml", "--seeds", "0", "--table-only"])


def test_a_curve_is_read_at_the_last_validation_made_by_each_time(tmp_path):
    curve = [(1.0, 0.5), (3.0, 0.7), (6.0, 0.8)]
    got = on_grid(curve, [0.5, 1.0, 2.0, 3.0, 5.9, 6.0, 9.0])
    assert math.isnan(got[0]) and got[1:] == [0.5, 0.5, 0.7, 0.7, 0.8, 0.8]
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 2, "train/query_loss": 1.0, "sys/meta_training_seconds": 1.5},
               {"step": 4, "val/accuracy": 0.6, "sys/meta_training_seconds": 3.0},
               {"step": 6, "val/accuracy": 0.7}]  # a record without the seconds (an older run) is left out
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert validation_curve(run) == [(3.0, 0.6)]
    assert validation_curve(tmp_path / "none") == []
    assert not plot_against_time({"maml": {0: []}}, {}, tmp_path / "none.png", "t")  # nothing to draw: no file
    assert not (tmp_path / "none.png").exists()
    assert plot_against_time({"maml": {0: curve, 1: [(2.0, 0.6), (5.0, 0.9)]}}, {}, tmp_path / "t.png", "t")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_equal_compute_runs_side_by_side_and_tabulates_half_the_budget(tmp_path, data_root):
    """Every row under the same --time-budget, two runs at once (--jobs 2), each also meta-tested
    at --test-also-at seconds: the table gives that accuracy and its paired difference too."""
    out = tmp_path / "budget"
    at = SMALL.index("--meta-steps")
    flags = SMALL[:at] + SMALL[at + 2:]
    code = compare.main(["--task", "glyphs", "--out", str(out), "--methods", "maml", "protonet", "--seeds", "0",
                         "--jobs", "2", "--", *flags, "--meta-steps", "1000", "--time-budget", "0.5",
                         "--test-also-at", "0.25", "--data-root", data_root])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    for method in ("maml", "protonet"):
        run = json.loads((out / method / "seed-0" / "results.json").read_text())
        early = run["test_also_at"]
        assert early["train_seconds"] >= 0.25 and early["meta_steps_done"] <= run["meta_steps_done"] < 1000
        assert early["test"]["num_tasks"] == 4 and rows[method]["test_also_at"]["seconds"] == 0.25
        assert rows[method]["meta_steps"] == run["meta_steps_done"]
    assert rows["protonet"]["test_also_at"]["difference"]["tasks"] == 4  # paired on the same 4 tasks
    table = (out / "comparison.md").read_text()
    assert "at 0.25 s: accuracy" in table and "at 0.25 s: paired Δ" in table
