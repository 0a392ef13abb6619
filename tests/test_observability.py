"""W&B (offline), local metrics and plots."""

import json
from pathlib import Path

import pytest

from imaml.app.cli import run_from_args
from tests.wandb_records import read_finished_run


def _args(tmp_path, data_root, *extra):
    return ["--task", "glyphs", "--algo", "imaml", "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "3",
            "--test-tasks", "4", "--val-tasks", "3", "--val-every", "2", "--log-every", "1",
            "--data-root", data_root, "--output-dir", str(tmp_path / "out"), *extra]


def _items(entries) -> dict:
    """W&B key/value records (config, summary, history items) as {key: value}; nested keys joined by '.'."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in entries}


def _offline_run(out) -> list:
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return read_finished_run(files[0])


def _of(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_offline_wandb_run_records_config_history_and_summary(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where W&B stages artifact files
    run_from_args(_args(tmp_path, data_root, "--wandb-mode", "offline", "--wandb-project", "imaml-tests",
                        "--wandb-tags", "ci, smoke", "--wandb-group", "g", "--wandb-log-checkpoints"))
    out = tmp_path / "out"
    records = _offline_run(out)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = _of(records, "run")[0]
    config = _items(run.config.update)
    assert config["algo"] == "imaml" and config["lam"] == 0.5 and config["meta_steps"] == 4  # preset + flags
    assert run.project == "imaml-tests" and list(run.tags) == ["ci", "smoke"] and run.run_group == "g"
    rows = [_items(h.item) for h in _of(records, "history")]
    logged = [row for row in rows if "train/query_loss" in row]
    assert [row["meta_step"] for row in logged] == [1, 2, 3, 4]  # one row per logged meta-step, on the meta-step axis
    assert len(rows) == 5 and rows[-1]["meta_step"] == 4  # and the plots' row, at the last meta-step
    assert {"train/query_loss", "train/solver_residual", "train/hypergrad_norm", "train/meta_lr",
            "inner/objective_step_01", "val/accuracy", "val/accuracy_ci95", "sys/peak_memory_mb"} <= set().union(*logged)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # meta_step is every chart's x-axis; the summary keeps the best meta-validation, not the last
    defined = {m.name or m.glob_name: m for m in _of(records, "metric")}
    assert defined["*"].step_metric == "meta_step" and defined["val/accuracy"].summary.max
    summary = {}
    for update in _of(records, "summary"):
        summary.update(_items(update.update))
    accuracies = [m["val/accuracy"] for m in metrics if "val/accuracy" in m]
    assert len(accuracies) == 2
    assert summary["val/accuracy"] == {"max": max(accuracies)} and summary["val/best_accuracy"] == max(accuracies)
    assert "test/accuracy" in summary and "before_meta_training/accuracy" in summary
    # every PNG the run wrote under plots/ (whoever drew it) is an image, logged once
    pngs = sorted(p.relative_to(out / "plots").with_suffix("").as_posix() for p in (out / "plots").rglob("*.png"))
    assert {"meta_train_loss", "meta_validation", "inner_loop"} <= set(pngs)
    images = {k.split(".")[0] for row in rows for k, v in row.items() if k.endswith("._type") and v == "image-file"}
    assert images == {f"plots/{name}" for name in pngs}
    saved = {f.path for files in _of(records, "files") for f in files.files}
    assert {f"media/images/plots/{name}" for name in pngs} <= {p.rsplit("_", 2)[0] for p in saved if p.endswith(".png")}
    # the inner-loop curves as a native line plot: a W&B table of both curves and its chart
    visualize = {k: v for c in _of(records, "config") for k, v in _items(c.update).items()
                 if k.startswith("_wandb.visualize.")}
    chart = visualize["_wandb.visualize.charts/inner_loop"]
    assert chart["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    table_file = next(out.glob("wandb/offline-run-*/files/media/table/charts/inner_loop_table_*.table.json"))
    table = json.loads(table_file.read_text())
    results = json.loads((out / "results.json").read_text())
    assert len(table["data"]) == 2 * len(results["test"]["inner_curve"])
    assert {row[1] for row in table["data"]} == {"before meta-training", "after meta-training"}
    # results.json and config.json saved with the run; the checkpoints as a model artifact
    assert {"results.json", "config.json"} <= saved
    artifact = next(a for a in _of(records, "artifact") if a.type == "model")
    assert artifact.name == f"checkpoints-{run.run_id}" and "latest" in artifact.aliases
    assert sorted(c.path for c in artifact.manifest.contents) == ["best.pt", "latest.pt"]
    assert "exit" in kinds


def test_without_the_option_no_checkpoint_artifact_and_w_and_b_failures_only_warn(tmp_path, data_root, monkeypatch,
                                                                                   capsys):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("the W&B service went away")

    monkeypatch.setattr(wandb.plot, "line_series", broken)
    results = run_from_args(_args(tmp_path, data_root, "--wandb-mode", "offline"))
    assert results["test"]["num_tasks"] == 4 and (tmp_path / "out" / "results.json").is_file()
    assert "W&B could not log the plots (the W&B service went away)" in capsys.readouterr().err
    records = _offline_run(tmp_path / "out")
    assert not [a for a in _of(records, "artifact") if a.type == "model"]
    assert "exit" in [r.WhichOneof("record_type") for r in records]  # the run still finished


def _sweep_command(data_root, *extra):
    """The sweep's command line as a W&B agent runs it, with small values for the sampled flags."""
    import yaml

    from imaml.config import CONFIG_DIR

    sweep = yaml.safe_load((CONFIG_DIR / "sweeps" / "glyphs-imaml-head.yaml").read_text())
    fixed = [c for c in sweep["command"] if not c.startswith("${")]
    small = _args(Path("unused"), data_root)
    small = small[:small.index("--output-dir")]  # the sweep's command has no --output-dir
    return [*fixed, *small, "--wandb-mode", "offline", *extra]  # offline: no network in tests


def test_each_sweep_trial_writes_to_runs_slash_its_w_and_b_run_id(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for _ in range(2):
        run_from_args(_sweep_command(data_root))
    monkeypatch.setenv("WANDB_RUN_ID", "agent-named-1")  # what a sweep agent sets for its trial
    run_from_args(_sweep_command(data_root))
    dirs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(dirs) == 3 and (tmp_path / "runs" / "agent-named-1") in dirs
    for out in dirs:
        assert (out / "results.json").is_file() and (out / "plots" / "inner_loop.png").is_file()
        assert _of(_offline_run(out), "run")[0].run_id == out.name
        assert json.loads((out / "config.json").read_text())["output_dir"] == f"runs/{out.name}"


def test_a_local_multi_process_job_shares_one_runs_dir(tmp_path, data_root, monkeypatch):
    """The job's parent picks the W&B run id (and so runs/<id>); its workers use the same."""
    from imaml.app.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    assert main(_sweep_command(data_root, "--processes", "2", "--test-tasks", "2")) == 0
    dirs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(dirs) == 1 and (dirs[0] / "results.json").is_file()
    assert _of(_offline_run(dirs[0]), "run")[0].run_id == dirs[0].name


def test_w_and_b_run_ids_and_output_dirs(tmp_path, monkeypatch):
    from imaml.app.arguments import parse_args
    from imaml.errors import UsageError
    from imaml.app.run_folder import choose_folder

    def folder(argv):
        return choose_folder(parse_args(argv))[0]

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    assert parse_args([]).output_dir is None and parse_args([]).wandb_id is None  # a new runs/<date>_<time>
    assert folder([]).output_dir.startswith("runs/20")
    first, second = folder(["--wandb-mode", "offline"]), folder(["--wandb-mode", "offline"])
    assert first.wandb_id != second.wandb_id and first.output_dir == f"runs/{first.wandb_id}"
    given = folder(["--wandb-mode", "offline", "--output-dir", str(tmp_path / "mine")])
    assert given.output_dir == str(tmp_path / "mine") and given.wandb_id is None  # W&B names the run itself
    named = folder(["--wandb-mode", "online", "--wandb-id", "trial_7"])
    assert named.output_dir == "runs/trial_7"
    with pytest.raises(UsageError) as err:
        parse_args(["--wandb-mode", "offline", "--wandb-id", "a/b"])
    assert str(err.value).count("\n") == 0 and "--wandb-id 'a/b'" in str(err.value)


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

    from imaml.app.arguments import build_parser, parse_args
    from imaml.config import CONFIG_DIR

    sweep = yaml.safe_load((CONFIG_DIR / "sweeps" / "glyphs-imaml-head.yaml").read_text())
    assert sweep["program"] == "run.py" and "${args}" in sweep["command"]
    assert sweep["metric"]["name"] == "val/best_accuracy"  # a plain number in the summary (W&B logs it)
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {f"--{name}" for name in sweep["parameters"]} <= flags
    # a sampled trial parses: the fixed flags plus one value of each parameter, as W&B passes them
    fixed = [c for c in sweep["command"] if not c.startswith("${")]
    sampled = [f"--{name}={spec.get('min', (spec.get('values') or [None])[0])}"
               for name, spec in sweep["parameters"].items()]
    config = parse_args(fixed + sampled)
    assert config.wandb_mode == "online" and config.inner_cg_steps == 5 and config.lam == 0.01


def test_global_norm_is_the_norm_of_all_entries_together():
    import torch

    from imaml.metrics import global_norm

    tensors = [torch.randn(3, 4, requires_grad=True), None, torch.randn(5, dtype=torch.float64)]
    expected = torch.cat([tensors[0].detach().reshape(-1).double(), tensors[2]]).norm()
    norm = global_norm(tensors)
    assert norm.grad_fn is None and norm.dim() == 0
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert float(global_norm([None])) == 0.0
