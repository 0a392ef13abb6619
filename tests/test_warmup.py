"""--warmup-fraction: the head warm-up before whole-network iMAML. The warm-up is a run of its
own (head alone, at the head's λ) in <output-dir>/warmup; the whole-network phase starts from
its θ and its meta-batch stream, at the meta-step after it; a resumed run does not redo it."""

import json

import pytest
import torch

from imaml import checkpoint
from imaml.app.cli import load_config, main
from imaml.app.warmup import continue_from_warmup, warmup_config
from imaml.errors import UsageError

FLAGS = ["--task", "glyphs", "--algo", "imaml", "--meta-steps", "4", "--warmup-fraction", "0.5", "--lam", "10",
         "--head-lam", "0.1", "--head-init", "zero", "--meta-batch-size", "2", "--inner-steps", "3",
         "--test-inner-steps", "3", "--val-every", "2", "--val-tasks", "2", "--test-tasks", "4", "--log-every", "1",
         "--processes", "1", "--wandb-mode", "disabled"]


def _flags(tmp_path, *more):
    return [*FLAGS, "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), *more]


def test_the_warmup_run_is_the_head_method_at_the_heads_lam(tmp_path):
    config = load_config(_flags(tmp_path))
    warm = warmup_config(config)
    assert (config.warmup_steps, warm.meta_steps) == (2, 2)
    assert (warm.adapt, warm.head_init, warm.lam, warm.head_lam, warm.warmup_fraction) == ("head", "zero", 0.1, None, 0)
    assert warm.output_dir == str(tmp_path / "run" / "warmup")
    assert warm.seed == config.seed and warm.task == config.task  # same tasks, same θ₀


def test_a_run_with_warmup_continues_from_its_theta_and_keeps_both_phases_records(tmp_path):
    assert main(_flags(tmp_path)) == 0
    run = tmp_path / "run"
    warm = json.loads((run / "warmup" / "results.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert warm["config"]["adapt"] == "head" and results["config"]["adapt"] == "all"
    assert results["warmup"]["meta_steps"] == 2 and results["warmup"]["meta_gradient"]["inner_converged"] is not None
    assert results["before_meta_training"] == warm["before_meta_training"]  # θ₀ is tested once
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 3 and steps[-1] == 4  # the whole network's meta-steps follow the warm-up's


def test_the_whole_network_phase_starts_from_the_warmup_theta(tmp_path):
    assert main(_flags(tmp_path)) == 0
    from engines import build_engine

    config = load_config(_flags(tmp_path, "--output-dir", str(tmp_path / "again")))
    engine = build_engine(config)
    saved = checkpoint.load(tmp_path / "run" / "warmup" / "checkpoints" / "latest.pt")
    warmed = {"theta": tmp_path / "run" / "warmup" / "checkpoints" / "latest.pt", "output_dir": "warmup"}
    before = [p.detach().clone() for p in engine.upper.module.parameters()]
    continue_from_warmup(engine, config, warmed)
    after = dict(engine.upper.module.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in saved["upper"]["module"].items() if name in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after.values()))  # θ₀ was replaced
    assert engine.global_step == 2 and engine.env.state_dict() == saved["env"]


def test_a_resumed_run_does_not_redo_the_warmup(tmp_path):
    assert main(_flags(tmp_path)) == 0
    finished = tmp_path / "run" / "warmup" / "results.json"
    stamp = finished.stat().st_mtime_ns
    assert main(["--resume", str(tmp_path / "run"), "--meta-steps", "6"]) == 0
    assert finished.stat().st_mtime_ns == stamp
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


@pytest.mark.parametrize("flags,message", [
    (["--algo", "maml"], "--algo imaml --adapt all"),
    (["--adapt", "head"], "--algo imaml --adapt all"),
    (["--warmup-fraction", "0.9", "--meta-steps", "2"], "leaves both phases at least one step"),
])
def test_warmup_is_refused_where_it_has_no_meaning(tmp_path, flags, message):
    args = [a for a in _flags(tmp_path) if a not in ("--head-lam", "0.1")] + flags
    with pytest.raises(UsageError, match=message):
        load_config(args)
