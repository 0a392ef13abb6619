"""Checkpoints: a resumed run equals an uninterrupted one; --eval-only reproduces the final
meta-test; bad checkpoint files give a one-line error."""

import json
import math

import pytest
import torch

from imaml import checkpoint
from imaml.app.cli import main, run_from_args


def _common(data_root, algo):
    return ["--task", "glyphs", "--algo", algo, "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "2", "--test-tasks", "4",
            "--val-tasks", "3", "--val-every", "2", "--log-every", "1", "--data-root", data_root]


def _records(path):
    return [{k: v for k, v in json.loads(line).items() if "per_second" not in k and not k.startswith("sys/")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo,recipe", [
    ("imaml", []),
    ("maml", []),
    ("maml", ["--bn-mode", "inductive", "--meta-optimizer", "sgd", "--lr-schedule", "step", "--lr-step-every", "1"]),
], ids=["imaml", "maml", "maml-inductive-sgd-step-schedule"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, data_root, algo, recipe):
    common = _common(data_root, algo) + recipe
    whole = run_from_args(common + ["--meta-steps", "4", "--output-dir", str(tmp_path / "whole")])
    run_from_args(common + ["--meta-steps", "2", "--output-dir", str(tmp_path / "part")])
    resumed = run_from_args(["--resume", str(tmp_path / "part"), "--meta-steps", "4"])
    assert _records(tmp_path / "part") == _records(tmp_path / "whole")
    assert resumed["test"] == whole["test"]
    assert resumed["before_meta_training"] == whole["before_meta_training"]
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "latest.pt")["upper"]["module"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "latest.pt")["upper"]["module"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # parameters and running statistics


def test_eval_only_reproduces_the_final_meta_test(tmp_path, data_root):
    trained = run_from_args(_common(data_root, "imaml") + ["--meta-steps", "2", "--output-dir", str(tmp_path / "t")])
    latest = tmp_path / "t" / "checkpoints" / "latest.pt"
    evaluated = run_from_args(["--eval-only", "true", "--checkpoint", str(latest), "--output-dir", str(tmp_path / "e")])
    assert evaluated["test"] == trained["test"]
    assert json.loads((tmp_path / "e" / "results.json").read_text())["checkpoint_step"] == 2
    best = checkpoint.load(tmp_path / "t" / "checkpoints" / "best.pt")
    assert best["best_validation"]["step"] in (2,) and best["step"] == 2


def test_bad_checkpoints_give_one_line_errors(tmp_path, data_root, capsys):
    run_from_args(_common(data_root, "maml") + ["--meta-steps", "2", "--output-dir", str(tmp_path / "t")])
    good = (tmp_path / "t" / "checkpoints" / "latest.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path, fragment in [(truncated, "truncated, corrupt"), (foreign, "not an imaml checkpoint"),
                           (text, "truncated, corrupt"), (tmp_path / "missing.pt", "no such file")]:
        code = main(["--eval-only", "true", "--checkpoint", str(path), "--output-dir", str(tmp_path / "e")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert main(["--eval-only", "true"]) == 2
    assert "--eval-only needs --checkpoint" in capsys.readouterr().err


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # and no temporary file is left


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_cosine_schedule_follows_the_new_length_of_a_resumed_run(make_config):
    from engines import build_engine

    short = build_engine(make_config(lr_schedule="cosine", meta_steps=4, meta_lr=1.0))
    for _ in range(2):
        short.upper.lr_schedule.step()
    longer = build_engine(make_config(lr_schedule="cosine", meta_steps=8, meta_lr=1.0))
    longer.upper.lr_schedule.load_state_dict(short.upper.lr_schedule.state_dict())
    longer.upper.lr_schedule.step()
    assert longer.upper.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))
