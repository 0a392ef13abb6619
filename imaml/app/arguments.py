"""The command line's flags and YAML presets, read into a ``RunConfig``: defaults < preset < flags.

``build_parser`` makes one flag per ``RunConfig`` field, with the help and choices the field
carries (``imaml.config.option``); ``parse_args`` reads flags and the preset they pick. A resumed
or evaluated run's saved settings are the CLI's business (``imaml.app.cli.load_config``), not the
parser's: nothing here opens a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from imaml.config import CONFIG_DIR, FIELDS, RunConfig, field_type, flag
from imaml.errors import UsageError
from imaml.app.methods import method_of

__all__ = ["build_parser", "parse_flags", "parse_args", "config_from_flags", "coerce", "find_preset", "load_preset",
           "automatic_preset", "list_presets", "HELP_GROUPS"]


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


def load_preset(path: Path, _seen: tuple = ()) -> dict:
    """Read a YAML preset; unknown keys and wrong types are errors, never silently dropped. A
    preset may start from another, ``base: NAME`` (a shipped preset's name, or a path beside
    it), and say only what differs: no preset repeats another's values."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    out = {}
    if "base" in data:
        base = _base_path(path, str(data.pop("base")))
        if base.resolve() in _seen or base.resolve() == path.resolve():
            raise UsageError(f"{path}: base {base.stem} leads back to itself; break the cycle")
        out = load_preset(base, (*_seen, path.resolve()))
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name == "config":
            raise UsageError(f"{path}: unknown key '{key}'; known keys: base, {', '.join(sorted(FIELDS))}")
        out[name] = coerce(name, value, str(path))
    return out


def _base_path(preset: Path, base: str) -> Path:
    """A ``base:`` entry's file: beside the preset, else a shipped preset by name."""
    for candidate in (preset.parent / base, preset.parent / f"{base}.yaml"):
        if candidate.is_file():
            return candidate
    found = find_preset(base)
    if not found.is_file():
        raise UsageError(f"{preset}: base {base}: no such preset (python run.py --list-presets)")
    return found


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


class _ListPresets(argparse.Action):
    """``--list-presets``: every shipped preset with its first line, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(list_presets())
        parser.exit()


HELP_GROUPS = {  # --help's sections, in order; every RunConfig field is in exactly one
    "method (what is meta-trained, how, and from which preset)": (
        "algo", "adapt", "head_init", "config", "lower_problem", "upper_problem", "env"),
    "task and episodes": (
        "task", "ways", "test_ways", "shots", "query_shots", "data_root", "download", "augment", "jitter",
        "stroke_jitter", "omniglot_background", "omniglot_val", "episodes", "class_rotations"),
    "meta-training (the outer loop)": (
        "meta_batch_size", "meta_steps", "time_budget", "test_also_at", "meta_lr", "meta_optimizer", "meta_momentum", "meta_weight_decay",
        "lr_schedule", "lr_step_every", "lr_gamma", "meta_grad_clip"),
    "inner loop (task adaptation: meta-training, meta-validation and meta-test)": (
        "inner_steps", "test_inner_steps", "inner_lr", "inner_momentum", "inner_weight_decay", "inner_optimizer",
        "inner_tol", "inner_cg_steps", "lam", "test_lam", "head_lam", "warmup_fraction"),
    "iMAML hypergradient (the implicit meta-gradient's linear solve)": (
        "hypergrad", "cg_steps", "cg_tol", "cg_trust_region", "cg_damping", "neumann_terms", "neumann_alpha",
        "darts_radius"),
    "model": ("model", "channels", "bn_mode", "activation"),
    "evaluation (meta-validation and meta-test)": (
        "val_every", "val_tasks", "test_tasks", "test_query_shots", "test_augment", "query_assignment"),
    "execution (same math, other speed or memory)": (
        "execution", "grad_checkpoint", "device", "dist_backend", "processes", "keep_freed_memory"),
    "the run: folder, seed, logs, checkpoints, divergence": (
        "output_dir", "overwrite", "resume", "eval_only", "checkpoint", "seed", "log_every", "on_divergence",
        "divergence_factor"),
    "Weights & Biases (off unless --wandb-mode online|offline)": (
        "wandb_mode", "wandb_project", "wandb_entity", "wandb_name", "wandb_group", "wandb_tags", "wandb_id",
        "wandb_log_checkpoints"),
}


def build_parser(shown: Optional[RunConfig] = None, sources: Optional[dict] = None) -> argparse.ArgumentParser:
    """One flag per ``RunConfig`` field, in ``HELP_GROUPS``: ``--name-with-dashes``, its help and
    choices from the field's metadata; switches for booleans. Each help text ends with the value
    that runs: ``shown``'s (default: the code's own), marked with where it comes from
    (``sources[name]``: "preset" or "given"); no abbreviations of flags."""
    parser = _Parser(
        prog="run.py",
        usage="python run.py [--config PRESET] [options]   (python run.py --list-presets: the presets)",
        description="Meta-train an initialization with iMAML or unrolled MAML, then meta-test it. Settings: "
                    "flags > preset > the code's defaults; the preset is --config, or else the task's preset "
                    "for the method the flags name (configs/<task>-<method>.yaml; --list-presets). The value "
                    "in brackets is what runs with the flags written before --help (`run.py --algo maml --help`).",
        epilog="Switches (--eval-only, ...) take no value: --no-X turns one off; --X true|false also works. "
               "Flags are never abbreviated.",
        argument_default=argparse.SUPPRESS,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--list-presets", action=_ListPresets, help="list the shipped presets, one line each, and exit")
    shown = shown or RunConfig()
    sources = sources or {}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = FIELDS[name]
            value = getattr(shown, name)
            where = f", {sources[name]}" if name in sources else ""
            kwargs: dict = {"help": f.metadata["help"].replace("%", "%%") + f" [{value}{where}]"}
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if field_type(name) is bool:
                kwargs.update(action=_Switch, metavar="BOOL")
            else:
                kwargs["metavar"] = name.split("_")[-1].upper()
            group.add_argument(flag(name), dest=name, **kwargs)
    return parser


def parse_flags(argv: Optional[list] = None) -> tuple:
    """(the flags given, converted to their fields' types; the preset path named by --config, or
    None): only what the command line says. ``--help`` shows the values the other flags give."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _print_help([a for a in argv if a not in ("-h", "--help")])
    given = vars(build_parser().parse_args(argv))
    return {name: coerce(name, value, flag(name)) for name, value in given.items() if name != "config"}, given.get("config")


def _print_help(argv: list) -> None:
    """--help with each option's value as it would run with ``argv`` (its preset included)."""
    try:
        cli, preset_flag = parse_flags(argv)
        preset_path = _preset_path(cli, preset_flag)
        preset = load_preset(preset_path) if preset_path else {}
        shown = config_from_flags(dict(cli), preset_flag)
        sources = {**{name: "preset" for name in preset}, **{name: "given" for name in cli}}
    except UsageError:  # the flags before --help are wrong: show the code's defaults
        shown, sources = None, {}
    build_parser(shown, sources).print_help()
    sys.exit(0)


def parse_args(argv: Optional[list] = None) -> RunConfig:
    """CLI flags override the preset, which overrides the dataclass defaults."""
    return config_from_flags(*parse_flags(argv))


def _preset_path(cli: dict, preset_flag: Optional[str]) -> Optional[Path]:
    """``--config``'s file, or else the task's preset for the method the flags name, if it exists."""
    if preset_flag is not None:
        return find_preset(preset_flag)
    candidate = automatic_preset(cli)
    return candidate if candidate.is_file() else None


def automatic_preset(cli: dict) -> Path:
    """``configs/<task>-<method>.yaml`` for the task and method the flags name (it may not exist)."""
    return CONFIG_DIR / f"{cli.get('task', RunConfig.task)}-{method_of(cli)}.yaml"


def config_from_flags(cli: dict, preset_flag: Optional[str] = None) -> RunConfig:
    """The ``RunConfig`` of flags ``cli`` over the preset (``--config``, else the task's own for the
    method the flags name, if there is one); ``--resume DIR`` continues in DIR."""
    preset_path = _preset_path(cli, preset_flag)
    preset = load_preset(preset_path) if preset_path else {}
    if preset_flag is not None:  # an explicit preset may choose the task and algorithm itself
        cli.setdefault("task", preset.get("task", RunConfig.task))
        cli.setdefault("algo", preset.get("algo", RunConfig.algo))
    if "lower_problem" in cli:  # a Lower problem named (none: the built-in one) replaces the preset's
        for name in ("adapt", "head_init"):  # adaptation settings, as the preset's own lower_problem
            if name not in cli:
                preset.pop(name, None)
    merged = {**preset, **cli}
    if cli.get("resume"):
        merged["output_dir"] = cli["resume"]
    _wandb_run_id(merged)
    return RunConfig(**merged, config=str(preset_path) if preset_path else None).validate()


def list_presets() -> str:
    """The shipped presets, one line each: the name ``--config`` takes and what it runs (the
    preset's first comment line)."""
    lines = []
    for path in sorted(CONFIG_DIR.glob("*.yaml"), key=lambda p: p.stem):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        sentence = " ".join(header).split(". ")[0].rstrip(".")
        lines.append(f"{path.stem:<30} {sentence if len(sentence) <= 90 else sentence[:89] + '…'}")
    return "\n".join(lines)


def _wandb_run_id(merged: dict) -> None:
    """With W&B on and no output folder chosen, fix the run's id now: the run's folder is then
    runs/<id> (``imaml.app.run_folder``), so each trial of a sweep keeps its own files."""
    if merged.get("wandb_mode", RunConfig.wandb_mode) == "disabled":
        return
    if "output_dir" in merged and not merged.get("wandb_id"):
        return  # W&B names the run (or takes $WANDB_RUN_ID) as usual
    if not merged.get("wandb_id"):
        merged["wandb_id"] = os.environ.get("WANDB_RUN_ID") or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own ids
