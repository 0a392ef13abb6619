"""The command line: results.json, reproducibility, and one-line errors for bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imaml.app.arguments import parse_args
from imaml.app.cli import main, run_from_args
from imaml.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp_path, data_root, *extra):
    return ["--task", "sinusoid", "--algo", "maml", "--meta-steps", "3", "--meta-batch-size", "2",
            "--inner-steps", "1", "--test-inner-steps", "2", "--test-tasks", "5", "--val-every", "2",
            "--val-tasks", "3", "--log-every", "1", "--data-root", data_root,
            "--output-dir", str(tmp_path / "out"), *extra]


def test_run_writes_results_json(tmp_path, data_root):
    results = run_from_args(_args(tmp_path, data_root))
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("algo", "task", "ways", "shots", "meta_steps", "seed", "test", "before_meta_training",
                "train_seconds", "tasks_per_second"):
        assert key in written
    assert written["ways"] is None and written["algo"] == "maml" and written["meta_steps"] == 3
    for phase in ("test", "before_meta_training"):
        assert written[phase]["metric"] == "mse" and written[phase]["num_tasks"] == 5
        assert written[phase]["ci95"] > 0
    assert written["test"] == results["test"]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][:2] == [1, 2]


@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml"])
def test_same_seed_same_results(tmp_path, data_root, algo):
    common = ["--task", "glyphs", "--ways", "3", "--channels", "4", "--query-shots", "2", "--algo", algo,
              "--meta-steps", "2", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "2",
              "--test-tasks", "4", "--val-every", "100", "--data-root", data_root]
    a = run_from_args(common + ["--output-dir", str(tmp_path / "a")])
    b = run_from_args(common + ["--output-dir", str(tmp_path / "b")])
    c = run_from_args(common + ["--output-dir", str(tmp_path / "c"), "--seed", "1"])
    assert a["test"] == b["test"] and a["before_meta_training"] == b["before_meta_training"]
    assert a["test"] != c["test"]
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab"]
    strip = [[{k: v for k, v in json.loads(l).items() if "per_second" not in k and not k.startswith("sys/")} for l in m] for m in metrics]
    assert strip[0] == strip[1]


BAD_INPUTS = [
    (["--task", "omniglot-typo"], "--task omniglot-typo: unknown task"),
    (["--task", "glyphs", "--ways", "150"], "--ways 150: the glyphs val split has only 100 classes"),
    (["--task", "glyphs", "--shots", "18", "--query-shots", "5"], "examples per class"),
    (["--algo", "reptile"], "argument --algo: invalid choice"),
    (["--inner-lr", "-0.1"], "--inner-lr -0.1: must be a positive number"),
    (["--lam", "0"], "--lam 0.0: must be a positive number"),
    (["--test-tasks", "1"], "--test-tasks 1: must be an integer >= 2"),
    (["--shots", "two"], "'shots' must be int"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--hypergrad", "magic"], "--hypergrad magic: unknown solver"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
    (["--seed", "4294967296"], "--seed 4294967296: must be an integer in [0, 4294967295]"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be an integer in [0, 4294967295]"),
    (["--grad-checkpoint", "maybe"], "--grad-checkpoint: 'grad_checkpoint' must be true or false, got 'maybe'"),
    (["--no-eval-only=true"], "argument --no-eval-only: takes no value (or use --eval-only true)"),
    (["--output-dir", ""], "--output-dir: may not be empty"),
    (["--inner-lr", "1e308"], "--inner-lr: 'inner_lr' must be a finite number of at most 3.4e+38 in size"),
    (["--meta-grad-clip", "nan"], "--meta-grad-clip: 'meta_grad_clip' must be a finite number"),
    (["--darts-radius", "inf"], "--darts-radius: 'darts_radius' must be a finite number"),
    (["--hypergrad", "cg-damped", "--cg-damping", "-0.5"], "--cg-damping -0.5: must be >= 0"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[m.split(":")[0] for _, m in BAD_INPUTS])
def test_bad_input_stops_with_one_line(tmp_path, data_root, capsys, argv, message):
    code = main(["--data-root", data_root, "--output-dir", str(tmp_path / "out"), "--meta-steps", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("task: sinusoid\ninner_lr: 0.01\ninner_lrr: 0.1\n")
    assert main(["--config", str(preset)]) == 2
    assert "unknown key 'inner_lrr'" in capsys.readouterr().err


def test_cli_flag_overrides_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("task: sinusoid\nways: null\ninner_lr: 0.02\nshots: 7\n")
    config = parse_args(["--config", str(preset), "--shots", "3"])
    assert (config.task, config.inner_lr, config.shots, config.ways) == ("sinusoid", 0.02, 3, None)


def test_errors_print_no_traceback_from_the_real_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--task", "nope", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: --task nope")


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_preset_is_valid_and_names_its_task(preset):
    from envs import TASKS
    from imaml.app.arguments import parse_args
    from imaml.app.methods import method_of

    config = parse_args(["--config", str(ROOT / "configs" / preset)])
    # <task>-<algo or method>[-variant].yaml (the method: imaml/app/methods.py, e.g. anil), or
    # <task>-cpu.yaml: the task's best preset for this CPU, whatever its algorithm
    names = (f"{config.task}-{config.algo}", f"{config.task}-{method_of(config.to_dict())}")
    assert config.task in TASKS and (preset.startswith(names) or preset == f"{config.task}-cpu.yaml")


def test_auto_processes_is_one_per_core_up_to_the_meta_batch(monkeypatch, make_config):
    from engines import distributed

    monkeypatch.setattr(distributed, "usable_cores", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.local_processes(make_config(meta_batch_size=2)) == 2
    assert distributed.local_processes(make_config(meta_batch_size=8)) == 4
    assert distributed.local_processes(make_config(meta_batch_size=8, processes=1)) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: it already decided
    assert distributed.local_processes(make_config(meta_batch_size=8)) == 1


KEEPS_FREED = """
import sys, torch
from imaml.allocator import keep_freed_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) >> 10
applied = sys.argv[1] == "keep" and keep_freed_memory()
before = rss()
block = torch.empty(64 << 18).fill_(1.0)  # 64 MiB, touched
del block
print(applied, rss() - before)
"""


@pytest.mark.parametrize("setting", ["keep", "system"])
def test_keep_freed_memory_keeps_a_freed_block_for_reuse(setting):
    """glibc hands a large freed block back to the system at once by default; with the
    setting run.py applies on CPU, the process keeps it for the next inner step."""
    out = subprocess.run([sys.executable, "-c", KEEPS_FREED, setting], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    kept_mib = int(out[1])
    if setting == "keep":
        assert out[0] == "True" and kept_mib >= 60
    else:
        assert kept_mib < 8


@pytest.mark.parametrize("device,flag,applied", [("cpu", True, True), ("cpu", False, False), ("cuda", True, False)])
def test_run_applies_the_allocator_setting_on_cpu_unless_told_not_to(monkeypatch, make_config, device, flag, applied):
    import imaml.allocator
    from imaml.app.cli import configure_process

    calls = []
    monkeypatch.setattr(imaml.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    configure_process(dataclasses.replace(make_config(keep_freed_memory=flag), device=device))
    assert bool(calls) == applied


@pytest.mark.parametrize("switch", [f.name for f in dataclasses.fields(RunConfig) if "bool" in str(f.type)])
def test_every_boolean_option_is_a_switch_with_an_optional_value(switch):
    """``--x`` on, ``--no-x`` off, ``--x VALUE`` / ``--x=VALUE`` as given (W&B sweeps pass
    ``--x=true``); the last one wins."""
    from imaml.app.arguments import build_parser, coerce

    flag = "--" + switch.replace("_", "-")
    negated = "--no-" + flag[2:]

    def parsed(*argv):
        return coerce(switch, vars(build_parser().parse_args(list(argv)))[switch], flag)

    assert parsed(flag) is True and parsed(negated) is False
    assert parsed(flag, "false") is False and parsed(flag, "true") is True
    assert parsed(f"{flag}=false") is False and parsed(f"{flag}=yes") is True
    assert parsed(flag, negated) is False and parsed(negated, flag) is True
    assert parsed(flag, "--seed", "3") is True  # a bare switch does not swallow the next flag
    assert f"{flag}, {negated}" in build_parser().format_help()


def test_eval_only_as_a_switch(tmp_path, data_root, capsys):
    run_from_args(_args(tmp_path, data_root))
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    code = main(["--eval-only", "--checkpoint", str(tmp_path / "out" / "checkpoints" / "best.pt"),
                 "--output-dir", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["checkpoint"].endswith("best.pt") and evaluated["test"]["num_tasks"] == trained["test"]["num_tasks"]


def _unusable_output_dirs(tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "taken" / "checkpoints").parent.mkdir()
    (tmp_path / "taken" / "checkpoints").write_text("")
    return {
        "below a file": (tmp_path / "a-file" / "run", "cannot create this directory (Not a directory)"),
        "a file": (tmp_path / "a-file", "exists and is not a directory"),
        "in /proc": (Path("/proc/imaml-run"), "cannot create this directory"),
        "checkpoints is a file": (tmp_path / "taken", f"{tmp_path / 'taken' / 'checkpoints'} exists and is not a directory"),
    }


@pytest.mark.parametrize("case", ["below a file", "a file", "in /proc", "checkpoints is a file"])
@pytest.mark.parametrize("processes", [1, 2])
def test_an_unusable_output_dir_stops_before_any_work(tmp_path, data_root, capsys, monkeypatch, case, processes):
    import engines
    from engines import distributed

    path, reason = _unusable_output_dirs(tmp_path)[case]

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(engines, "build_engine", no_work)
    monkeypatch.setattr(distributed, "run_local_job", no_work)
    monkeypatch.setattr(distributed, "usable_cores", lambda: processes)
    code = main(_args(tmp_path, data_root) + ["--output-dir", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --output-dir {path}: {reason}"), err


def test_a_shipped_preset_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("omniglot-imaml-hf", "omniglot-imaml-hf.yaml"):
        config = parse_args(["--config", name])
        assert config.inner_optimizer == "hessian-free" and config.adapt == "all" and config.lam == 2.0
    assert main(["--config", "no-such-preset"]) == 2


def test_algo_imaml_is_the_papers_whole_network_imaml_and_the_head_needs_asking():
    for task in ("omniglot", "mini-imagenet", "tiered-imagenet", "cifarfs", "fc100", "glyphs", "sinusoid",
                 "omniglot-lake"):
        config = parse_args(["--task", task, "--algo", "imaml"])
        assert (config.adapt, config.head_init) == ("all", "theta"), task
    assert parse_args(["--task", "omniglot", "--algo", "imaml"]).lam == 2.0
    assert parse_args(["--config", "glyphs-imaml-head"]).adapt == "head"
