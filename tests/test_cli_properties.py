"""Property-based tests of the whole command line (hypothesis): random combinations and
values of every flag either work or stop with exit status 2 or 3 and one line on stderr,
never a traceback.

Two sizes: every flag with any value, parsed and validated only (``parse_args``, the classes
it names, the output directory); and real runs of ``main`` on flags sized to finish in a
second or two (tiny tasks, one or two meta-steps). Derandomized, so CI sees the same
examples every time. What they found (an --output-dir below a file, in /proc or taken by a
file; --seed -1; NaN or float32-overflowing numbers) is kept as regular tests in test_cli.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imaml import config as config_module
from imaml.app.cli import main, run_from_args
from imaml.app.arguments import parse_args
from imaml.app.run_folder import choose_folder
from imaml.config import RunConfig
from imaml.errors import UsageError

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
SWITCHES = [name for name in FIELDS if config_module.field_type(name) is bool]
EXTENSIONS = ["problems.anil:ANILUnrolled", "problems.anil:ANILImplicit", "problems.meta_sgd:MetaSGDLower",
              "problems.zero_head:ZeroHeadUnrolled", "problems.zero_head:ZeroHeadImplicit", "problems:MetaInit",
              "problems.nope:Missing", "imaml.config:RunConfig", "not a path"]
SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _switch(name: str):
    """Every way to give a boolean option: bare, negated, with a value, with =value, bad."""
    flag = _flag(name)
    forms = [[flag], ["--no-" + flag[2:]], [flag, "true"], [flag, "false"], [f"{flag}=false"], [f"{flag}=1"],
             [flag, "maybe"], ["--no-" + flag[2:] + "=true"]]
    if "Optional" in str(FIELDS[name].type):
        forms.append([flag, "none"])
    return st.sampled_from(forms)


def _value(name: str, values):
    return st.sampled_from(values).map(lambda v: [_flag(name), str(v)])


def _flags(strategies: dict):
    """A random subset of the flags in ``strategies``, in a random order, each with a value."""
    names = sorted(strategies)
    return st.lists(st.sampled_from(names), unique=True, max_size=len(names)).flatmap(
        lambda chosen: st.tuples(*(strategies[n] for n in chosen)) if chosen else st.just(())).map(
        lambda parts: [token for part in parts for token in part])


# ----------------------------------------------------------------------------- every flag, any value


GARBAGE = ["", "x", "-1", "0", "1e400", "nan", "inf", "-inf", "1.5", "none", "3", "2**4", "--", "=", "é"]


def _any_value(name: str):
    """Values by type for any field (garbage included), so a field added later is covered."""
    if name in SWITCHES:
        return _switch(name)
    typ = config_module.field_type(name)
    if typ is int:
        numbers = st.one_of(st.integers(-5, 40), st.sampled_from([2**31, 2**32 - 1, 2**32, 2**63, 10**30]))
        return st.one_of(numbers.map(str), st.sampled_from(GARBAGE)).map(lambda v: [_flag(name), v])
    if typ is float:
        numbers = st.floats(allow_nan=True, allow_infinity=True).map(repr)
        return st.one_of(numbers, st.sampled_from(GARBAGE)).map(lambda v: [_flag(name), v])
    return st.sampled_from(GARBAGE).map(lambda v: [_flag(name), v])


def _paths(root: Path) -> list:
    (root / "a-file").write_text("not a directory, not a checkpoint, not YAML: [")
    (root / "busy").mkdir(exist_ok=True)
    (root / "busy" / "checkpoints").write_text("")
    return [str(root / "out"), str(root / "a-file"), str(root / "a-file" / "below"), "/proc/imaml-test",
            str(root / "busy"), str(root), str(root / "missing")]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-properties")


def _every_flag(scratch: Path):
    paths = _paths(scratch)
    strategies = {name: _any_value(name) for name in FIELDS}
    choices = {"algo": config_module.ALGOS, "hypergrad": config_module.HYPERGRADS + ("imaml.solvers:dense_solve",),
               "execution": config_module.EXECUTIONS, "bn_mode": config_module.BN_MODES,
               "activation": config_module.ACTIVATIONS,
               "wandb_mode": config_module.WANDB_MODES, "meta_optimizer": config_module.META_OPTIMIZERS,
               "lr_schedule": config_module.LR_SCHEDULES, "dist_backend": config_module.DIST_BACKENDS,
               "task": ("glyphs", "sinusoid", "omniglot", "mini-imagenet", "nope"), "model": ("conv4", "mlp", "x:Y"),
               "device": ("cpu", "cuda", "cuda:7", "tpu"), "on_divergence": ("stop", "skip"),
               "lower_problem": EXTENSIONS, "upper_problem": EXTENSIONS, "env": EXTENSIONS + ["envs:FewShotEnv"]}
    for name, values in choices.items():  # known choices, plus what _any_value draws
        strategies[name] = st.one_of(_value(name, list(values)), strategies[name])
    for name in ("output_dir", "resume", "checkpoint", "config", "data_root"):
        strategies[name] = _value(name, paths)
    return _flags(strategies)


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


def test_every_flag_with_any_value_validates_or_names_the_problem(scratch, monkeypatch):
    """Parsing, validation, the classes named and the output directory: a RunConfig or a
    one-line UsageError, for any combination of any values of every flag."""
    from engines.extensions import choose_parts

    # a default output directory (runs/<date>_<time>, or runs/<new W&B id> with W&B on) is
    # created here, not in the checkout
    monkeypatch.chdir(scratch)

    @settings(max_examples=1000, **SETTINGS)
    @given(argv=_every_flag(scratch))
    def check(argv):
        try:
            config = parse_args(argv)
            choose_parts(config)
            choose_folder(config)
        except UsageError as err:
            assert _one_line(str(err)), (argv, str(err))

    check()


# ----------------------------------------------------------------------------- small real runs


@pytest.fixture(scope="module")
def trained(scratch, data_root) -> Path:
    """A finished tiny sinusoid run, for --eval-only and --resume."""
    out = scratch / "trained"
    run_from_args(["--task", "sinusoid", "--algo", "maml", "--meta-steps", "1", "--meta-batch-size", "1",
                   "--inner-steps", "1", "--test-inner-steps", "1", "--test-tasks", "2", "--val-tasks", "2",
                   "--processes", "1", "--data-root", data_root, "--output-dir", str(out)])
    return out


# what every small run starts from (the drawn flags come after, so they override it)
SMALL = ["--meta-steps", "1", "--meta-batch-size", "2", "--inner-steps", "1", "--test-inner-steps", "1",
         "--test-tasks", "2", "--val-tasks", "2", "--val-every", "100", "--channels", "3", "--query-shots", "2",
         "--cg-steps", "2", "--neumann-terms", "2", "--wandb-mode", "disabled"]


def _small_runs(scratch: Path, trained: Path):
    bad_paths = _paths(scratch)[1:4]
    checkpoint = str(trained / "checkpoints" / "latest.pt")
    small = {
        "algo": ["imaml", "maml", "fomaml"],
        "task": ["sinusoid", "glyphs", "glyphs", "omniglot", "fc100"],  # the benchmarks: no files here
        "ways": [2, 3, 1, "none"], "test_ways": [2, 4, "none"], "shots": [1, 2], "query_shots": [1, 2],
        "test_query_shots": [1, "none"], "meta_batch_size": [1, 2, 3], "meta_steps": [1, 2],
        "inner_steps": [1, 2], "test_inner_steps": [1, 2], "inner_lr": [0.01, 0.3, 1e6, "nan", "1e308"],
        "meta_lr": [1e-3, 1e3], "inner_momentum": [0.0, 0.5], "inner_weight_decay": [0.0, 0.1],
        "lam": [0.5, 2.0], "hypergrad": ["cg", "neumann", "darts", "exact"],
        "cg_steps": [1, 3], "neumann_terms": [1, 3], "neumann_alpha": [0.1, "none"], "darts_radius": [0.01],
        "execution": ["auto", "per-task", "vectorized"], "model": ["conv4", "conv4-strided", "mlp", "none"],
        "channels": [2, 3], "bn_mode": ["transductive", "inductive", "episodic"], "activation": ["relu", "silu"],
        "lower_problem": EXTENSIONS[:5], "upper_problem": ["problems:MetaInit", "problems.meta_sgd:MetaSGDInit"],
        "meta_optimizer": ["adam", "adamw", "sgd"], "lr_schedule": ["none", "cosine", "step"],
        "lr_step_every": [1], "lr_gamma": [0.5], "val_every": [1, 2], "val_tasks": [2], "test_tasks": [2, 3],
        "seed": [0, 7, -1], "device": ["cpu", "cuda"], "processes": [0, 1], "log_every": [1, 5],
        "on_divergence": ["stop", "skip"], "divergence_factor": [1000.0, 1e-9], "meta_grad_clip": [0.0, 1e-3, "nan"],
        "output_dir": bad_paths, "checkpoint": [checkpoint, bad_paths[0]], "resume": ["trained", bad_paths[0]],
        "episodes": ["any", "within-alphabet"], "omniglot_background": ["full", "small1"],
        "omniglot_val": ["auto", "characters"],
    }
    strategies = {name: _value(name, values) for name, values in small.items()}
    for name in SWITCHES:
        if name != "download":  # a download would reach for the network
            strategies[name] = _switch(name)
    return _flags(strategies)


@pytest.mark.long  # docs/architecture.md, "The test suite"
def test_small_runs_finish_or_stop_with_one_line(scratch, trained, data_root):
    """``main`` on random small runs: exit 0 with results.json, or exit 2 (bad input) or 3
    (divergence) with one line on stderr; nothing raises, nothing prints a traceback."""
    counter = iter(range(10**6))

    @settings(max_examples=120, **SETTINGS)
    @given(argv=_small_runs(scratch, trained))
    def check(argv):
        run_dir = scratch / f"run{next(counter)}"
        if "trained" in argv:  # --resume: a fresh copy of the finished run each time
            shutil.copytree(trained, run_dir / "resumed")
            argv = [str(run_dir / "resumed") if a == "trained" else a for a in argv]
        full = [*SMALL, "--data-root", data_root, "--output-dir", str(run_dir / "out"), *argv]  # argv wins
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(full)  # --processes 0 is one process here (conftest: one usable core)
        message = err.getvalue().strip()
        assert "Traceback" not in message, (full, message)
        if code == 0:
            assert (Path(parse_args(full).output_dir) / "results.json").is_file(), full
            return
        assert code in (2, 3), (full, code, message)
        assert _one_line(message) and message.startswith(("error: ", "stopped: ")), (full, message)

    check()
