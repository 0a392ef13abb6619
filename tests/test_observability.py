"""W&B (offline), local metrics and plots."""

import json

import pytest

from imaml.cli import run_from_args
from tests.wandb_records import read_records


def _args(tmp_path, data_root, *extra):
    return ["--task", "glyphs", "--algo", "imaml", "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "3",
            "--test-tasks", "4", "--val-tasks", "3", "--val-every", "2", "--log-every", "1",
            "--data-root", data_root, "--output-dir", str(tmp_path / "out"), *extra]


def test_offline_wandb_run_records_config_history_and_summary(tmp_path, data_root):
    run_from_args(_args(tmp_path, data_root, "--wandb-mode", "offline", "--wandb-project", "imaml-tests",
                        "--wandb-tags", "ci, smoke", "--wandb-group", "g"))
    files = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algo"] == "imaml" and config["lam"] == 0.5 and config["meta_steps"] == 4  # preset + flags
    assert run.project == "imaml-tests" and list(run.tags) == ["ci", "smoke"] and run.run_group == "g"
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h.step.num for h in history]
    assert steps == [1, 2, 3, 4]  # one row per logged meta-step, on the meta-step axis
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    assert {"train/query_loss", "train/solver_residual", "train/hypergrad_norm", "train/meta_lr",
            "inner/objective_step_01", "val/accuracy", "val/accuracy_ci95", "sys/peak_memory_mb"} <= keys
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == steps
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.summary.update})
    assert "test/accuracy" in summary and "before_meta_training/accuracy" in summary
    assert "exit" in kinds


def test_without_wandb_the_run_writes_metrics_and_plots(tmp_path, data_root):
    run_from_args(_args(tmp_path, data_root))
    out = tmp_path / "out"
    assert not (out / "wandb").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") == 4
    for name in ("meta_train_loss.png", "meta_validation.png", "inner_loop.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    results = json.loads((out / "results.json").read_text())
    assert len(results["test"]["inner_curve"]) == 3  # test inner steps
    assert results["test"]["inner_curve"][-1] < results["test"]["inner_curve"][0]


def test_online_wandb_without_login_falls_back_to_offline(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no settings
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    results = run_from_args(_args(tmp_path, data_root, "--wandb-mode", "online"))
    assert results["test"]["num_tasks"] == 4
    assert "W&B online start failed" in capsys.readouterr().err
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_sweep_file_names_real_flags():
    import yaml

    from imaml.config import CONFIG_DIR, build_parser, parse_args

    sweep = yaml.safe_load((CONFIG_DIR / "sweeps" / "glyphs-imaml.yaml").read_text())
    assert sweep["program"] == "run.py" and "${args}" in sweep["command"]
    assert sweep["metric"]["name"] == "val/accuracy"
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {f"--{name}" for name in sweep["parameters"]} <= flags
    # a sampled trial parses: the fixed flags plus one value of each parameter, as W&B passes them
    fixed = [c for c in sweep["command"] if not c.startswith("${")]
    sampled = [f"--{name}={spec.get('min', (spec.get('values') or [None])[0])}"
               for name, spec in sweep["parameters"].items()]
    config = parse_args(fixed + sampled)
    assert config.wandb_mode == "online" and config.inner_steps == 5 and config.lam == 0.1


def test_global_norm_is_the_norm_of_all_entries_together():
    import torch

    from imaml.metrics import global_norm

    tensors = [torch.randn(3, 4, requires_grad=True), None, torch.randn(5, dtype=torch.float64)]
    expected = torch.cat([tensors[0].detach().reshape(-1).double(), tensors[2]]).norm()
    norm = global_norm(tensors)
    assert norm.grad_fn is None and norm.dim() == 0
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert float(global_norm([None])) == 0.0
