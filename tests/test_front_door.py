"""The front door (issue 38): no run harms another run's files, the preset follows the method the
flags name, flags are exact, and what a run prints is short and says what runs."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imaml.app.arguments import HELP_GROUPS, automatic_preset, list_presets, load_preset, parse_args
from imaml.app.cli import main
from imaml.config import CONFIG_DIR, FIELDS
from imaml.errors import UsageError
from imaml.app.methods import method_of
from tests.test_omniglot import write_lake_root

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("glyphs", "sinusoid", "omniglot-lake", "omniglot", "mini-imagenet", "tiered-imagenet", "cifarfs", "fc100")


def _sinusoid(*extra):
    return ["--task", "sinusoid", "--algo", "maml", "--meta-batch-size", "2", "--meta-steps", "3", "--inner-steps", "1",
            "--test-inner-steps", "1", "--val-every", "3", "--val-tasks", "2", "--test-tasks", "2", "--log-every", "3",
            "--processes", "1", *extra]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (links not followed) with its bytes' digest."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder holding a finished run (results, metrics, config, plots, checkpoints)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_sinusoid("--output-dir", str(out))) == 0
    assert (out / "results.json").is_file() and (out / "checkpoints" / "latest.pt").is_file()
    return out


REFUSALS = {  # every kind of refusal, each aimed at the finished run's folder
    "the folder holds a run": [],
    "the folder holds a run, more steps": ["--meta-steps", "5"],
    "a bad value": ["--overwrite", "--meta-lr", "-1"],
    "an unknown value": ["--overwrite", "--bn-mode", "sometimes"],
    "an abbreviated flag": ["--overwrite", "--meta-step", "5"],
    "an unknown flag": ["--overwrite", "--no-wandb"],
    "a missing preset": ["--overwrite", "--config", "no-such-preset"],
    "missing data": ["--overwrite", "--task", "omniglot", "--algo", "maml", "--data-root", "{empty}"],
    "too many ways": ["--overwrite", "--task", "glyphs", "--ways", "2000", "--data-root", "{empty}"],
    "fewer tasks than Lake's runs": ["--overwrite", "--task", "omniglot-lake", "--omniglot-background", "small1",
                                     "--ways", "4", "--data-root", "{lake}"],  # --test-tasks 2 of 20
    "an extension that does not import": ["--overwrite", "--lower-problem", "no_such_module:Lower"],
    "a missing checkpoint": ["--eval-only", "--checkpoint", "{empty}/best.pt"],
    "overwrite and resume": ["--overwrite", "--resume", "{out}"],
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_run_leaves_a_finished_run_byte_for_byte(finished, tmp_path, capsys, case):
    before = _snapshot(finished)
    if "{lake}" in REFUSALS[case]:
        write_lake_root(tmp_path / "lake", zipped=True)
    extra = [a.replace("{empty}", str(tmp_path)).replace("{out}", str(finished)).replace("{lake}", str(tmp_path / "lake"))
             for a in REFUSALS[case]]
    code = main(_sinusoid("--output-dir", str(finished), *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert _snapshot(finished) == before


def test_a_busy_folder_is_refused_and_left_alone(finished, capsys):
    before = _snapshot(finished)
    fd = os.open(finished / ".lock", os.O_RDWR | os.O_CREAT)  # another run holding the folder
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 1 on elsewhere")
    try:
        assert main(_sinusoid("--output-dir", str(finished), "--overwrite")) == 2
        assert "in use by another run (pid 1 on elsewhere)" in capsys.readouterr().err
    finally:
        os.close(fd)
        (finished / ".lock").unlink()
    assert _snapshot(finished) == before


def test_the_refusal_names_resume_and_overwrite(finished, capsys):
    assert main(_sinusoid("--output-dir", str(finished))) == 2
    err = capsys.readouterr().err
    assert f"--resume {finished}" in err and "--overwrite" in err


def test_overwrite_replaces_the_whole_run(tmp_path):
    out = tmp_path / "run"
    assert main(_sinusoid("--output-dir", str(out), "--seed", "1")) == 0
    (out / "plots" / "stale.png").write_bytes(b"an earlier run's plot")
    assert main(_sinusoid("--output-dir", str(out), "--overwrite", "--meta-steps", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert results["meta_steps"] == 2 and config["seed"] == 0 and config["meta_steps"] == 2
    assert not (out / "plots" / "stale.png").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # none of the first run's records


def test_runs_without_an_output_dir_get_folders_of_their_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_sinusoid()) == 0
    assert main(_sinusoid("--seed", "1")) == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((p / "results.json").is_file() for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()
    assert json.loads((latest / "config.json").read_text())["seed"] == 1
    assert main(_sinusoid("--meta-lr", "0")) == 2  # refused: no folder left behind, latest unchanged
    assert sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest") == runs
    assert main(_sinusoid("--task", "omniglot", "--data-root", str(tmp_path / "none"))) == 2  # refused at build
    assert sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest") == runs
    assert latest.resolve() == runs[-1].resolve()


def test_a_local_job_without_an_output_dir_shares_one_new_folder(tmp_path, data_root, monkeypatch):
    """`run.py --processes 2` starts two single-thread workers sharing each meta-batch; their run
    is written into the one new folder the parent chose, and its result records both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert main(["--task", "glyphs", "--algo", "maml", "--ways", "3", "--channels", "4", "--query-shots", "2",
                 "--meta-batch-size", "2", "--meta-steps", "2", "--inner-steps", "1", "--test-inner-steps", "1",
                 "--val-tasks", "2", "--test-tasks", "4", "--data-root", data_root, "--processes", "2"]) == 0
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and (tmp_path / "runs" / "latest").resolve() == runs[0].resolve()
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["processes"] == 2 and results["test"]["num_tasks"] == 4


def test_eval_only_prints_the_score_and_writes_its_own_folder(finished, tmp_path, capsys):
    before = _snapshot(finished)
    out = tmp_path / "eval"
    assert main(["--eval-only", "--checkpoint", str(finished / "checkpoints" / "best.pt"), "--output-dir", str(out),
                 "--processes", "1"]) == 0
    printed = capsys.readouterr().out
    score = json.loads((out / "results.json").read_text())["test"]
    assert re.search(r"meta-test: mse [0-9.]+ ± [0-9.]+", printed), printed
    assert f"{score['mean']:.2f}" in printed
    assert "plots/" not in printed and not (out / "plots").exists()
    assert _snapshot(finished) == before


# ---------------------------------------------------------------------------- presets and methods
def _shipped_method_presets():
    """(task, method, path) of each preset named exactly <task>-<method>.yaml."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        task = max((t for t in TASKS if path.stem.startswith(t + "-")), key=len, default=None)
        data = load_preset(path)
        if task and path.stem[len(task) + 1:] == method_of(data):
            yield task, method_of(data), path


def test_every_method_preset_is_what_its_name_says():
    found = list(_shipped_method_presets())
    assert len(found) >= 20
    assert {m for _, m, _ in found} >= {"imaml", "imaml-hf", "imaml-head", "maml", "fomaml", "pretrain"}
    for task, method, path in found:
        assert load_preset(path)["task"] == task, path


@pytest.mark.parametrize("flags, preset", [
    (["--algo", "imaml", "--adapt", "head", "--head-init", "zero"], "glyphs-imaml-head"),
    (["--algo", "imaml", "--adapt", "head"], "glyphs-imaml-head"),
    (["--algo", "imaml"], "glyphs-imaml"),
    ([], "glyphs-imaml"),
    (["--algo", "maml"], "glyphs-maml"),
    (["--algo", "pretrain"], "glyphs-pretrain"),
    (["--task", "omniglot", "--algo", "imaml", "--inner-optimizer", "hessian-free"], "omniglot-imaml-hf"),
    (["--task", "omniglot", "--adapt", "head", "--head-init", "zero"], "omniglot-imaml-head"),
    (["--task", "sinusoid", "--algo", "imaml", "--adapt", "head", "--head-init", "zero"], "sinusoid-imaml-head"),
    (["--algo", "maml", "--adapt", "head"], None),  # ANIL: glyphs has no preset of its own
    (["--algo", "imaml", "--adapt", "head", "--head-init", "theta"], None),
])
def test_the_automatic_preset_follows_the_method(flags, preset):
    config = parse_args(flags)
    assert (Path(config.config).stem if config.config else None) == preset
    if preset:
        for key, value in load_preset(CONFIG_DIR / f"{preset}.yaml").items():
            if key not in flags and f"--{key.replace('_', '-')}" not in flags:
                assert getattr(config, key) == value, key
    for flag in ("--adapt", "--head-init", "--algo"):  # the flags still win
        if flag in flags:
            assert getattr(config, flag[2:].replace("-", "_")) == flags[flags.index(flag) + 1]


def test_a_flag_overrides_the_preset_it_picked():
    config = parse_args(["--algo", "imaml", "--adapt", "head", "--head-init", "zero", "--lam", "3"])
    assert config.lam == 3 and Path(config.config).stem == "glyphs-imaml-head"


def test_the_first_line_names_the_method_and_its_preset(tmp_path, capsys):
    assert main(_sinusoid("--output-dir", str(tmp_path / "a"))) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("MAML (second order), whole network, on sinusoid; preset configs/sinusoid-maml.yaml")
    assert str(tmp_path / "a") in first
    assert main(_sinusoid("--output-dir", str(tmp_path / "b"), "--adapt", "head")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("ANIL") and "no preset (configs/sinusoid-anil.yaml does not exist" in first


def _make_run_command(args: str) -> list:
    """The run.py flags ``make run ARGS=...`` passes (make -n prints the command)."""
    out = subprocess.run(["make", "-s", "-n", "run", f"ARGS={args}"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    line = [line for line in out.splitlines() if "run.py" in line][-1]
    return line.split("run.py", 1)[1].split()


@pytest.mark.parametrize("args, preset", [
    ("", "glyphs-imaml-head"),
    ("--meta-steps 20", "glyphs-imaml-head"),
    ("--task sinusoid", "sinusoid-imaml-head"),
    ("--algo maml", "glyphs-maml"),
    ("--algo=fomaml", "glyphs-fomaml"),
    ("--config glyphs-imaml", "glyphs-imaml"),
])
def test_make_run_keeps_its_method_unless_args_name_another(args, preset):
    config = parse_args(_make_run_command(args))
    assert Path(config.config).stem == preset
    if args == "--meta-steps 20":
        assert config.meta_steps == 20 and (config.adapt, config.head_init) == ("head", "zero")


# ---------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv", [["--meta-step", "3"], ["--no-wandb"], ["--lr", "0.1"], ["--algo=maml", "--overwr"]])
def test_flags_are_never_abbreviated(argv):
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parse_args(argv)


def test_help_is_grouped_and_shows_what_runs():
    names = [name for group in HELP_GROUPS.values() for name in group]
    assert sorted(names) == sorted(FIELDS)  # every option in exactly one group
    text = subprocess.run([sys.executable, "run.py", "--algo", "maml", "--help"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout
    for title in HELP_GROUPS:
        assert f"\n{title}:\n" in text, title
    inner_lr = load_preset(CONFIG_DIR / "glyphs-maml.yaml")["inner_lr"]
    assert re.search(rf"--inner-lr LR .*?\[{inner_lr}, preset\]", text, re.S)
    assert "[maml, given]" in text
    for repeated in ("  seed [", "  device [", "val every", "log every", "wandb project"):
        assert repeated not in text


def test_list_presets_names_every_preset_in_one_line():
    text = subprocess.run([sys.executable, "run.py", "--list-presets"], cwd=ROOT, text=True, capture_output=True,
                          check=True).stdout
    assert text == list_presets() + "\n"
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert all(len(line) <= 125 and len(line.split(None, 1)) == 2 for line in lines)


def test_make_runs_console_fits_a_terminal(tmp_path, data_root):
    """The head method's run as make run starts it, piped to a file: no line over 160 characters."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [*_make_run_command("--meta-steps 4 --val-every 2 --log-every 1 --val-tasks 4 --test-tasks 4 --processes 1"),
            "--data-root", data_root]  # make run's own folder: runs/<date>_<time>
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("iMAML over a zero-started head on θ's features, on glyphs; preset "
                               "configs/glyphs-imaml-head.yaml")
    assert sum(line.startswith("step ") for line in lines) == 4
    assert max(len(line) for line in lines) <= 160, max(lines, key=len)


def test_automatic_preset_names_a_file_in_configs():
    assert automatic_preset({"task": "omniglot", "algo": "maml", "adapt": "head"}) == CONFIG_DIR / "omniglot-anil.yaml"


# ---------------------------------------------------------------------------- presets that inherit
def test_a_preset_says_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "a.yaml").write_text("task: sinusoid\nalgo: maml\ninner_lr: 0.2\nmeta_steps: 9\n")
    (tmp_path / "b.yaml").write_text("# b: a with more steps\nbase: a\nmeta_steps: 20\n")
    assert load_preset(tmp_path / "b.yaml") == {"task": "sinusoid", "algo": "maml", "inner_lr": 0.2, "meta_steps": 20}
    config = parse_args(["--config", str(tmp_path / "b.yaml"), "--inner-lr", "0.3"])
    assert (config.task, config.inner_lr, config.meta_steps) == ("sinusoid", 0.3, 20)
    shipped = load_preset(CONFIG_DIR / "omniglot-maml-20w5s.yaml")  # two levels: 20w5s <- 20w1s <- omniglot-maml
    assert (shipped["ways"], shipped["shots"], shipped["task"]) == (20, 5, "omniglot")


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b\n", "b.yaml": "base: a\n"}, "leads back to itself"),
    ({"a.yaml": "base: a\n"}, "leads back to itself"),
    ({"a.yaml": "base: nowhere\n"}, "base nowhere: no such preset"),
    ({"a.yaml": "base: b\n", "b.yaml": "meta_stepz: 3\n"}, "unknown key 'meta_stepz'"),
])
def test_a_bad_base_is_one_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=message) as err:
        load_preset(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)


def test_no_shipped_preset_repeats_another():
    """A preset that differs from another shipped one in one or two values only inherits it."""
    presets = {p.stem: load_preset(p) for p in CONFIG_DIR.glob("*.yaml")}
    assert sum(_base(CONFIG_DIR / f"{name}.yaml") is not None for name in presets) >= 19
    for name, values in presets.items():
        if _base(CONFIG_DIR / f"{name}.yaml"):
            continue
        for other, theirs in presets.items():
            if other == name or set(theirs) != set(values) or _base(CONFIG_DIR / f"{other}.yaml") == name:
                continue
            differ = [k for k in values if values[k] != theirs[k]]
            assert len(differ) > 2, f"{name} repeats {other} but for {differ}: give it base: {other}"


def _base(path: Path):
    """The ``base:`` a preset file names, or None."""
    for line in path.read_text().splitlines():
        if line.startswith("base:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    return None
