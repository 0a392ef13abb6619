"""The command line's flags and YAML presets, read into a ``RunConfig``: defaults < preset < flags.

``build_parser`` makes one flag per ``RunConfig`` field, with the help and choices the field
carries (``imaml.config.option``); ``parse_args`` reads flags and the preset they pick. A resumed
or evaluated run's saved settings are the CLI's business (``imaml.cli.load_config``), not the
parser's: nothing here opens a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import secrets
import string
from pathlib import Path
from typing import Any, Optional

import yaml

from imaml.config import CONFIG_DIR, FIELDS, WANDB_ID, RunConfig, field_type, flag
from imaml.errors import UsageError

__all__ = ["build_parser", "parse_flags", "parse_args", "config_from_flags", "coerce", "find_preset", "load_preset"]


_FLOAT32_MAX = 3.4028234663852886e38
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or say which key is wrong."""
    optional = "Optional" in str(FIELDS[name].type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{source}: '{name}' may not be empty")
    typ = field_type(name)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _BOOLS:
            return _BOOLS[str(value).lower()]
        raise UsageError(f"{source}: '{name}' must be true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise UsageError(f"{source}: '{name}' must be an integer, got {value!r}")
    if typ is float and isinstance(value, bool):
        raise UsageError(f"{source}: '{name}' must be a number, got {value!r}")
    try:
        converted = typ(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: '{name}' must be {typ.__name__}, got {value!r}") from None
    if typ is float and not abs(converted) <= _FLOAT32_MAX:  # NaN fails too; the tensors are float32
        raise UsageError(f"{source}: '{name}' must be a finite number of at most {_FLOAT32_MAX:.3g} in size, "
                         f"got {value!r}")
    return converted


def find_preset(name: str) -> Path:
    """``--config``'s file: a path, or a shipped preset's name (``omniglot-imaml-hf`` or
    ``omniglot-imaml-hf.yaml``, from configs/ wherever the run starts)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_preset names it


def load_preset(path: Path) -> dict:
    """Read a YAML preset; unknown keys and wrong types are errors, never silently dropped."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name == "config":
            raise UsageError(f"{path}: unknown key '{key}'; known keys: {', '.join(sorted(FIELDS))}")
        out[name] = coerce(name, value, str(path))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UsageError (one line) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see: python run.py --help)")


class _Switch(argparse.Action):
    """A boolean option: ``--eval-only`` turns it on, ``--no-eval-only`` off, and an explicit
    value (``--eval-only true``, ``--eval-only=false``: what W&B sweeps pass) sets it; the
    value is checked by ``coerce`` like a YAML one."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = ["--no-" + option[2:] for option in option_strings]
        super().__init__([*option_strings, *negated], dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"argument {option_string}: takes no value (or use {self.option_strings[0]} {value})")
            value = False
        setattr(namespace, self.dest, True if value is None else value)


class _HelpFormatter(argparse.HelpFormatter):
    """Switches appear as ``--eval-only, --no-eval-only`` in the option list."""

    def _format_action_invocation(self, action):
        if isinstance(action, _Switch):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``RunConfig`` field: ``--name-with-dashes``, its help (with the default in
    brackets) and choices from the field's metadata; switches for booleans."""
    parser = _Parser(
        prog="run.py",
        description="Meta-train an initialization with iMAML or unrolled MAML, then meta-test it. "
                    "Settings come from the preset configs/<task>-<algo>.yaml (or --config); a flag "
                    "overrides its preset. The values in brackets are the fallbacks for settings "
                    "a preset leaves out. Switches (--eval-only, --grad-checkpoint, ...) take no "
                    "value: --no-X turns one off, and --X true|false also works.",
        argument_default=argparse.SUPPRESS,
        formatter_class=_HelpFormatter,
    )
    defaults = RunConfig()
    for name, f in FIELDS.items():
        kwargs: dict = {"help": f.metadata["help"]}
        if name not in ("config",):
            kwargs["help"] += f" [{getattr(defaults, name)}]"
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if field_type(name) is bool:
            kwargs.update(action=_Switch, metavar="BOOL")
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        parser.add_argument(flag(name), dest=name, **kwargs)
    return parser


def parse_flags(argv: Optional[list] = None) -> tuple:
    """(the flags given, converted to their fields' types; the preset path named by --config, or
    None): only what the command line says."""
    given = vars(build_parser().parse_args(argv))
    return {name: coerce(name, value, flag(name)) for name, value in given.items() if name != "config"}, given.get("config")


def parse_args(argv: Optional[list] = None) -> RunConfig:
    """CLI flags override the preset, which overrides the dataclass defaults."""
    return config_from_flags(*parse_flags(argv))


def config_from_flags(cli: dict, preset_flag: Optional[str] = None) -> RunConfig:
    """The ``RunConfig`` of flags ``cli`` over the preset (``--config``, else the task's and
    algorithm's own, if there is one); ``--resume DIR`` continues in DIR."""
    algo = cli.get("algo", RunConfig.algo)
    task = cli.get("task", RunConfig.task)
    if preset_flag is not None:
        preset_path: Optional[Path] = find_preset(preset_flag)
    else:
        candidate = CONFIG_DIR / f"{task}-{algo}.yaml"
        preset_path = candidate if candidate.is_file() else None
    preset = load_preset(preset_path) if preset_path else {}
    if preset_flag is not None:  # an explicit preset may choose the task and algorithm itself
        cli.setdefault("task", preset.get("task", task))
        cli.setdefault("algo", preset.get("algo", algo))
    if "lower_problem" in cli:  # a Lower problem named (none: the built-in one) replaces the preset's
        for name in ("adapt", "head_init"):  # adaptation settings, as the preset's own lower_problem
            if name not in cli:
                preset.pop(name, None)
    merged = {**preset, **cli}
    if cli.get("resume"):
        merged["output_dir"] = cli["resume"]
    _wandb_run_dir(merged)
    return RunConfig(**merged, config=str(preset_path) if preset_path else None).validate()


def _wandb_run_dir(merged: dict) -> None:
    """With W&B on, fix the run's id now and, unless an output directory was chosen, write to
    runs/<id>: each trial of a sweep (or any W&B run) keeps its own files, not runs/latest."""
    if merged.get("wandb_mode", RunConfig.wandb_mode) == "disabled":
        return
    if "output_dir" in merged and not merged.get("wandb_id"):
        return  # W&B names the run (or takes $WANDB_RUN_ID) as usual
    if not merged.get("wandb_id"):
        merged["wandb_id"] = os.environ.get("WANDB_RUN_ID") or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own ids
    if "output_dir" not in merged and isinstance(merged["wandb_id"], str) and WANDB_ID.fullmatch(merged["wandb_id"]):
        merged["output_dir"] = f"runs/{merged['wandb_id']}"
