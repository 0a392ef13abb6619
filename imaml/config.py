"""Typed run configuration: dataclass defaults < YAML preset < command-line flags.

One ``RunConfig`` is built and validated once in ``run.py`` and passed down; nothing reads
``argparse`` results or globals after that. Presets live in ``configs/<task>-<algo>.yaml``
and are picked automatically unless ``--config`` names another file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import secrets
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from imaml.errors import UsageError
from imaml.plugins import is_import_path, split_import_path

__all__ = ["RunConfig", "ALGOS", "HYPERGRADS", "CONFIG_DIR", "MAX_SEED", "parse_args", "load_preset",
           "checkpoint_path", "prepare_output_dir"]

ALGOS = ("imaml", "maml", "fomaml", "pretrain")
HYPERGRADS = ("cg", "neumann", "darts", "exact", "minres", "normal-cg", "cg-damped")
WANDB_MODES = ("online", "offline", "disabled")
BN_MODES = ("transductive", "inductive", "episodic")
ACTIVATIONS = ("relu", "silu")  # imaml.models.ACTIVATIONS; the CLI does not import the models
META_OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("none", "cosine", "step")
DIST_BACKENDS = ("auto", "nccl", "gloo")
EXECUTIONS = ("auto", "per-task", "vectorized")
INNER_OPTIMIZERS = ("sgd", "armijo", "hessian-free")
OMNIGLOT_BACKGROUNDS = ("full", "small1", "small2")
OMNIGLOT_VALS = ("auto", "alphabets", "characters")
EPISODES = ("any", "within-alphabet")
OMNIGLOT_TASKS = ("omniglot", "omniglot-lake")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # W&B run ids also name a folder: runs/<id>
MAX_SEED = 2**32 - 1  # numpy's and torch's generators all take [0, 2³² − 1]; negative seeds are refused


@dataclass
class RunConfig:
    """Everything a run needs. Field names are the CLI flags with ``-`` for ``_``."""

    algo: str = "imaml"
    task: str = "glyphs"
    # episodes: N ways, K shots (support examples per class), Q query examples per class
    ways: Optional[int] = 5
    test_ways: Optional[int] = None  # ways at meta-validation and meta-test; None: same as ways
    shots: int = 1
    query_shots: int = 5
    # data: --data-root holds the real benchmarks; --download lets learn2learn fetch them
    data_root: str = "data"
    download: bool = False
    augment: bool = False  # meta-training images: random crop + flip (ImageNet/CIFAR), affine jitter (Omniglot)
    # Omniglot: Lake's protocol (--task omniglot-lake) trains on one background set, validates on
    # held-out alphabets or characters of it, and meta-tests on the 20 official one-shot runs
    omniglot_background: str = "full"  # full (30 alphabets), small1 or small2 (5 each: the minimal setting)
    omniglot_val: str = "auto"  # held out of the background set: alphabets, characters; auto: by its size
    episodes: str = "any"  # Omniglot: within-alphabet draws all ways of a training task from one alphabet
    class_rotations: Optional[bool] = None  # Omniglot: 90°/180°/270° turns as new classes; None: on
    # meta-training
    meta_batch_size: int = 16
    meta_steps: int = 1000
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_momentum: float = 0.9  # sgd only
    meta_weight_decay: float = 0.0
    lr_schedule: str = "none"  # of the meta learning rate, over --meta-steps
    lr_step_every: int = 10000  # step schedule: multiply by --lr-gamma every this many meta-steps
    lr_gamma: float = 0.5
    # inner loop (task adaptation), shared by meta-training, meta-validation and meta-test
    inner_steps: int = 5
    test_inner_steps: int = 10
    inner_lr: float = 0.1
    inner_momentum: float = 0.0
    inner_weight_decay: float = 0.0
    inner_optimizer: str = "sgd"  # iMAML: sgd, armijo (line search) or hessian-free (truncated Newton)
    inner_tol: float = 1e-2  # iMAML: a task's inner loop stops at ‖∇g(φ_k)‖ ≤ tol·‖∇g(φ_0)‖
    inner_cg_steps: int = 5  # iMAML hessian-free: CG steps per Newton direction
    # iMAML: proximal strength λ in  L_support(φ) + λ/2·‖φ − θ‖²  (iMAML paper, eq. 3)
    lam: float = 1.0
    hypergrad: str = "cg"
    cg_steps: int = 5
    cg_tol: float = 1e-5
    cg_trust_region: bool = True
    neumann_terms: int = 20
    neumann_alpha: Optional[float] = None  # None: 1/λ_max(A), estimated by power iteration
    darts_radius: float = 0.01
    cg_damping: float = 0.0  # cg-damped: μ in (A + μI) x = ∇φ L_query; 0: the plain operator
    # how a meta-batch runs: one task at a time, or all tasks at once (same meta-gradient)
    execution: str = "auto"
    grad_checkpoint: bool = False  # MAML: recompute inner steps in the backward pass (flat memory)
    # model
    model: Optional[str] = None  # None: the task's default (conv4 for images, mlp for sinusoid)
    channels: int = 64
    bn_mode: str = "transductive"  # BatchNorm statistics at meta-train/meta-test, see imaml.models
    activation: str = "relu"  # relu (the papers' networks) or silu (smooth: iMAML's theorem needs it)
    # extensions: import paths (module.sub:ClassName) replacing a built-in class; docs/extending.md
    lower_problem: Optional[str] = None
    upper_problem: Optional[str] = None
    env: Optional[str] = None
    # evaluation
    val_every: int = 100
    val_tasks: int = 100
    test_tasks: int = 600
    test_query_shots: Optional[int] = None  # None: --query-shots
    # run
    seed: int = 0
    device: str = "cpu"
    dist_backend: str = "auto"  # under torchrun: auto (nccl on GPUs, gloo on CPU), nccl or gloo
    processes: int = 0  # CPU processes sharing each meta-batch; 0: one per core (auto), 1: this process only
    keep_freed_memory: bool = True  # CPU: glibc malloc reuses freed blocks (imaml.allocator)
    output_dir: str = "runs/latest"
    log_every: int = 10
    # robustness: what a diverging meta-batch does, and optional meta-gradient clipping
    on_divergence: str = "stop"  # stop (checkpoint, exit 3) or skip (no meta-update for that batch)
    divergence_factor: float = 1000.0  # ‖φ‖ > factor·‖θ‖ after adaptation counts as diverged
    meta_grad_clip: float = 0.0  # max norm of the meta-gradient; 0: no clipping
    # Weights & Biases (disabled unless asked for; local logs and plots are always written)
    wandb_mode: str = "disabled"
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: Optional[str] = None  # comma-separated
    # the W&B run id; with W&B on and no --output-dir, the run writes to runs/<id> (so every trial
    # of a sweep keeps its own files). None: WANDB_RUN_ID (a sweep agent sets it), else a new id
    wandb_id: Optional[str] = None
    wandb_log_checkpoints: bool = False  # upload checkpoints/{latest,best}.pt as a W&B model artifact
    # checkpoints: <output-dir>/checkpoints/{latest,best}.pt at every validation and at the end
    resume: Optional[str] = None  # the output dir of a run to continue
    eval_only: bool = False  # meta-test --checkpoint and write results.json; no training
    checkpoint: Optional[str] = None
    config: Optional[str] = None  # the preset file this config came from (for the record)

    def validate(self) -> "RunConfig":
        """Check every value once, before any work; raise UsageError naming the fix."""
        _one_of("algo", self.algo, ALGOS)
        if self.hypergrad not in HYPERGRADS and not is_import_path(self.hypergrad):
            raise UsageError(f"--hypergrad {self.hypergrad}: unknown solver; choose one of "
                             f"{', '.join(HYPERGRADS)}, or an import path module:function")
        for name in ("lower_problem", "upper_problem", "env", "model", "hypergrad"):
            # these three are always import paths; model and hypergrad also take built-in names
            _import_path_syntax(name, getattr(self, name), always=name in ("lower_problem", "upper_problem", "env"))
        _one_of("wandb_mode", self.wandb_mode, WANDB_MODES)
        _one_of("on_divergence", self.on_divergence, ("stop", "skip"))
        _one_of("bn_mode", self.bn_mode, BN_MODES)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("meta_momentum", "inner_momentum"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise UsageError(f"{_flag(name)} {value}: must be in [0, 1)")
        for name in ("meta_weight_decay", "inner_weight_decay", "cg_damping"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise UsageError(f"{_flag(name)} {getattr(self, name)}: must be >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise UsageError(f"--lr-gamma {self.lr_gamma}: must be in (0, 1]")
        _one_of("dist_backend", self.dist_backend, DIST_BACKENDS)
        _one_of("execution", self.execution, EXECUTIONS)
        self._validate_omniglot()
        self._validate_inner_loop()
        if self.grad_checkpoint and self.algo != "maml":
            raise UsageError(f"--grad-checkpoint applies to --algo maml (memory through the unrolled inner loop); "
                             f"{self.algo}'s memory does not grow with inner steps: drop the flag")
        _positive("divergence_factor", self.divergence_factor)
        if self.meta_grad_clip < 0:
            raise UsageError(f"--meta-grad-clip {self.meta_grad_clip}: must be >= 0 (0 turns clipping off)")
        for name in ("shots", "query_shots", "meta_batch_size", "meta_steps", "inner_steps",
                     "test_inner_steps", "cg_steps", "neumann_terms", "channels", "val_every",
                     "val_tasks", "log_every", "lr_step_every"):
            _at_least(name, getattr(self, name), 1)
        if self.ways is not None:
            _at_least("ways", self.ways, 2)
        _at_least("processes", self.processes, 0)
        if self.test_ways is not None:
            if self.ways is None:
                raise UsageError(f"--test-ways {self.test_ways}: only for classification tasks (with --ways N)")
            _at_least("test_ways", self.test_ways, 2)
        _at_least("test_tasks", self.test_tasks, 2)  # a 95% CI needs two tasks
        if self.test_query_shots is not None:
            _at_least("test_query_shots", self.test_query_shots, 1)
        for name in ("meta_lr", "inner_lr", "lam", "cg_tol", "darts_radius"):
            _positive(name, getattr(self, name))
        if self.neumann_alpha is not None:
            _positive("neumann_alpha", self.neumann_alpha)
        if self.eval_only and not self.checkpoint:
            raise UsageError("--eval-only needs --checkpoint PATH (e.g. runs/latest/checkpoints/best.pt)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device}: unknown device; use cpu, cuda or cuda:N")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed {self.seed}: must be an integer in [0, {MAX_SEED}]")
        if not self.output_dir:
            raise UsageError("--output-dir: may not be empty")
        if self.wandb_id is not None and not WANDB_ID.fullmatch(self.wandb_id):
            raise UsageError(f"--wandb-id {self.wandb_id!r}: use 1 to 64 letters, digits, '-' or '_'")
        return self

    def _validate_inner_loop(self) -> None:
        _one_of("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        if self.algo != "imaml":
            for name in ("inner_optimizer", "inner_tol", "inner_cg_steps"):
                if getattr(self, name) != getattr(RunConfig, name):
                    raise UsageError(f"{_flag(name)} {getattr(self, name)}: only for --algo imaml ({self.algo}'s "
                                     f"meta-gradient differentiates its plain SGD steps); drop the flag")
        if self.inner_optimizer != "sgd" and self.inner_momentum:
            raise UsageError(f"--inner-momentum {self.inner_momentum}: only with --inner-optimizer sgd "
                             f"({self.inner_optimizer} chooses its own steps)")
        if not (0 <= self.inner_tol < 1):
            raise UsageError(f"--inner-tol {self.inner_tol}: must be in [0, 1) (0: always run --inner-steps)")
        _at_least("inner_cg_steps", self.inner_cg_steps, 1)

    def _validate_omniglot(self) -> None:
        _one_of("omniglot_background", self.omniglot_background, OMNIGLOT_BACKGROUNDS)
        _one_of("omniglot_val", self.omniglot_val, OMNIGLOT_VALS)
        _one_of("episodes", self.episodes, EPISODES)
        for name, value, default in (("episodes", self.episodes, "any"), ("class_rotations", self.class_rotations, None)):
            if value != default and self.task not in OMNIGLOT_TASKS:
                raise UsageError(f"{_flag(name)} {value}: only for the Omniglot tasks ({', '.join(OMNIGLOT_TASKS)})")
        for name in ("omniglot_background", "omniglot_val"):
            if getattr(self, name) != getattr(RunConfig, name) and self.task != "omniglot-lake":
                raise UsageError(f"{_flag(name)} {getattr(self, name)}: only for --task omniglot-lake "
                                 f"(--task omniglot is the MAML paper's split of both full sets)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UsageError(f"{_flag(name)} {value}: unknown value; choose one of {', '.join(choices)}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise UsageError(f"{_flag(name)} {value}: must be an integer >= {low}")


def _import_path_syntax(name: str, value: Optional[str], always: bool) -> None:
    """Only the form here; whether it imports is checked when the run is built."""
    if value is not None and (always or is_import_path(value)):
        try:
            split_import_path(value)
        except ValueError as err:
            raise UsageError(f"{_flag(name)} {err}") from None


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{_flag(name)} {value}: must be a positive number")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_FLOAT32_MAX = 3.4028234663852886e38
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _field_type(name: str) -> type:
    """The scalar type of a field (``Optional[int]`` -> int)."""
    text = str(_FIELDS[name].type)
    for key, typ in _TYPES.items():
        if key in text:
            return typ
    raise TypeError(text)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or say which key is wrong."""
    optional = "Optional" in str(_FIELDS[name].type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{source}: '{name}' may not be empty")
    typ = _field_type(name)
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
        if name not in _FIELDS or name == "config":
            raise UsageError(f"{path}: unknown key '{key}'; known keys: {', '.join(sorted(_FIELDS))}")
        out[name] = _coerce(name, value, str(path))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UsageError (one line) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see: python run.py --help)")


class _Switch(argparse.Action):
    """A boolean option: ``--eval-only`` turns it on, ``--no-eval-only`` off, and an explicit
    value (``--eval-only true``, ``--eval-only=false``: what W&B sweeps pass) sets it; the
    value is checked by ``_coerce`` like a YAML one."""

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


# the options argparse restricts to a list (the rest are checked in RunConfig.validate)
CHOICES = {"algo": ALGOS, "inner_optimizer": INNER_OPTIMIZERS, "wandb_mode": WANDB_MODES, "bn_mode": BN_MODES,
           "activation": ACTIVATIONS, "dist_backend": DIST_BACKENDS,
           "execution": EXECUTIONS, "omniglot_background": OMNIGLOT_BACKGROUNDS, "omniglot_val": OMNIGLOT_VALS,
           "episodes": EPISODES, "meta_optimizer": META_OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
           "on_divergence": ("stop", "skip")}


def build_parser() -> argparse.ArgumentParser:
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
    helps = {
        "algo": "imaml (implicit gradients), maml (second-order unrolled), fomaml (first order) or pretrain "
                "(the baseline: one classifier trained on all meta-training classes, fine-tuned per task "
                "from a prototype head; docs/benchmarks.md)",
        "task": "glyphs (embedded, generated), sinusoid, or a benchmark read from --data-root: "
                "omniglot, omniglot-lake (Lake's 20 one-shot runs), mini-imagenet, tiered-imagenet, "
                "cifarfs, fc100 (files: docs/benchmarks.md)",
        "download": "let learn2learn download a missing benchmark into --data-root",
        "augment": "augment meta-training images: random crop + horizontal flip (mini-imagenet, "
                   "tiered-imagenet, cifarfs, fc100), small affine jitter (omniglot, omniglot-lake)",
        "omniglot_background": "omniglot-lake: the background set meta-training and meta-validation use: "
                               "full (30 alphabets), small1 or small2 (5 alphabets, the minimal setting)",
        "omniglot_val": "omniglot-lake: meta-validate on background alphabets or characters held out of "
                        "meta-training; auto: alphabets for the full set, characters for small1/small2",
        "episodes": "Omniglot training tasks: any (classes from anywhere) or within-alphabet (all ways "
                    "from one alphabet, like Lake's runs)",
        "class_rotations": "Omniglot: each character turned by 90°, 180°, 270° is a new training class; "
                           "none: on",
        "bn_mode": "BatchNorm statistics: transductive (batch statistics at meta-train and meta-test, "
                   "the MAML paper), inductive (running statistics from meta-training used at "
                   "meta-test), episodic (support-set statistics applied to the queries)",
        "activation": "the conv4 / conv4-strided / mlp nonlinearity: relu (the papers' networks) or silu "
                      "(smooth: iMAML's inner loop and solve converge on it; ReLU's kinks stall them)",
        "meta_optimizer": "adam, adamw or sgd (with --meta-momentum)",
        "lr_schedule": "meta learning-rate schedule over --meta-steps: none, cosine, or step "
                       "(× --lr-gamma every --lr-step-every meta-steps)",
        "inner_momentum": "momentum of the inner-loop SGD (reset for every task)",
        "inner_weight_decay": "weight decay of the inner-loop SGD",
        "inner_optimizer": "iMAML's inner optimizer on the proximal objective g: sgd (fixed --inner-lr), armijo "
                           "(steepest descent with a backtracking line search, steps up to --inner-lr) or "
                           "hessian-free (truncated-Newton: --inner-cg-steps of CG, then the line search; the "
                           "iMAML paper's); see docs/meta-gradients.md",
        "inner_tol": "iMAML: a task's inner loop stops once ‖∇g(φ)‖ ≤ tol·‖∇g(θ)‖ (its stationarity, logged as "
                     "train/inner_stationarity); 0: always --inner-steps",
        "inner_cg_steps": "iMAML hessian-free: conjugate-gradient steps per Newton direction",
        "test_query_shots": "query examples per class at meta-validation and meta-test; none: --query-shots",
        "ways": "classes per task (N)",
        "shots": "support examples per class (K); points per task for sinusoid",
        "query_shots": "query examples per class; points per task for sinusoid",
        "lam": "iMAML proximal strength λ: inner objective L_support(φ) + λ/2·‖φ − θ‖²",
        "hypergrad": "iMAML hypergradient solver: cg, neumann, darts, exact (dense; tiny models), minres "
                     "(symmetric indefinite systems), normal-cg (CG on A²x = Av, two products per step), "
                     "cg-damped (CG on A + --cg-damping·I); these three take --cg-steps and --cg-tol "
                     "(docs/meta-gradients.md); or an import path module:function to a linear solver "
                     "(docs/extending.md)",
        "cg_steps": "maximum conjugate-gradient steps per task",
        "cg_tol": "CG stops when ‖residual‖ ≤ tol·‖∇φ L_query‖",
        "cg_trust_region": "truncate CG (Steihaug) at ‖x‖ = ‖v‖/λ and on negative curvature: "
                           "the hypergradient is never longer than ∇φ L_query",
        "neumann_alpha": "Neumann step size; none: 1/λ_max estimated by power iteration",
        "cg_damping": "cg-damped: μ ≥ 0 added to the system's diagonal, as the official iMAML code does; "
                      "a bias toward a scaled first-order gradient, shown by train/solver_residual (against "
                      "the undamped system); 0: the plain operator",
        "model": "conv4 (max-pool; mini-ImageNet), conv4-strided (stride-2, average-pooled; "
                 "MAML's Omniglot), resnet12, or mlp; or an import path module:Class to an nn.Module "
                 "built as Class(input_shape, num_outputs, config); none: the task's default",
        "test_ways": "classes per task at meta-validation and meta-test; none: --ways (a different "
                     "value needs a Lower problem that adapts any number of ways, e.g. the zero-init head)",
        "lower_problem": "import path module:Class to a Lower problem replacing the built-in one "
                         "(subclass of ImplicitLower for imaml, UnrolledLower for maml/fomaml)",
        "upper_problem": "import path module:Class to an Upper problem (subclass of MetaInit)",
        "env": "import path module:Class to an Env (subclass of envs.FewShotEnv)",
        "test_inner_steps": "inner steps at meta-validation and meta-test",
        "test_tasks": "tasks in the final meta-test (mean and 95%% CI over them)",
        "data_root": "where datasets are (the embedded glyphs are generated and cached here)",
        "output_dir": "where results.json and logs are written",
        "config": "YAML preset; default: configs/<task>-<algo>.yaml",
        "resume": "continue the run saved in this output directory (its checkpoints/latest.pt); "
                  "flags given now override its settings, e.g. a larger --meta-steps",
        "eval_only": "only meta-test the --checkpoint and write results.json",
        "checkpoint": "a checkpoint file, for --eval-only",
        "wandb_mode": "Weights & Biases: online, offline (sync later) or disabled",
        "wandb_tags": "W&B tags, comma-separated",
        "wandb_id": "W&B run id; with W&B on and no --output-dir the run writes to runs/<id>; "
                    "none: $WANDB_RUN_ID (as a sweep agent sets it) or a new id",
        "wandb_log_checkpoints": "upload checkpoints/latest.pt and best.pt to W&B as a model artifact at the end",
        "on_divergence": "when a meta-batch diverges: stop (save a checkpoint, exit 3) or skip it",
        "divergence_factor": "adapted weights with ‖φ‖ > factor·‖θ‖ count as diverged",
        "meta_grad_clip": "clip the meta-gradient to this norm; 0: off",
        "processes": "on CPU, single-thread processes sharing each meta-batch (a local torchrun-style "
                     "job); 0: one per core, at most one per task; 1: just this process",
        "keep_freed_memory": "on CPU, malloc keeps freed memory for the next inner step instead of returning "
                             "it to the system (faster; memory stays at its peak until exit)",
        "dist_backend": "torch.distributed backend when launched with torchrun: auto (nccl on GPUs, "
                        "gloo on CPU), nccl or gloo; see docs/distributed.md",
        "execution": "per-task (one inner loop per task), vectorized (the whole meta-batch as one batched "
                     "computation; same meta-gradient) or auto (vectorized where it is faster and supported)",
        "grad_checkpoint": "MAML: keep only each inner step's input and recompute the step in the backward "
                           "pass, so memory stays near one step's",
    }
    defaults = RunConfig()
    for name, f in _FIELDS.items():
        kwargs: dict = {"help": helps.get(name, name.replace("_", " "))}
        if name not in ("config",):
            kwargs["help"] += f" [{getattr(defaults, name)}]"
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        if _field_type(name) is bool:
            kwargs.update(action=_Switch, metavar="BOOL")
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        parser.add_argument(_flag(name), dest=name, **kwargs)
    return parser


def parse_args(argv: Optional[list] = None) -> RunConfig:
    """CLI flags override the preset, which overrides the dataclass defaults."""
    given = vars(build_parser().parse_args(argv))
    cli = {name: _coerce(name, value, _flag(name)) for name, value in given.items() if name != "config"}
    saved = _saved_config(cli)
    if saved is not None:  # resuming or evaluating: the run's own settings, then the flags
        merged = {**saved, **cli}
        if cli.get("resume"):
            merged["output_dir"] = cli["resume"]
        return RunConfig(**merged).validate()
    algo = cli.get("algo", RunConfig.algo)
    task = cli.get("task", RunConfig.task)
    if "config" in given:
        preset_path: Optional[Path] = Path(given["config"])
    else:
        candidate = CONFIG_DIR / f"{task}-{algo}.yaml"
        preset_path = candidate if candidate.is_file() else None
    preset = load_preset(preset_path) if preset_path else {}
    if "config" in given:  # an explicit preset may choose the task and algorithm itself
        cli.setdefault("task", preset.get("task", task))
        cli.setdefault("algo", preset.get("algo", algo))
    merged = {**preset, **cli}
    _wandb_run_dir(merged)
    config = RunConfig(**merged, config=str(preset_path) if preset_path else None)
    return config.validate()


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


def checkpoint_path(config: RunConfig) -> Optional[Path]:
    """The checkpoint a resumed or evaluation-only run starts from."""
    if config.resume:
        return Path(config.resume) / "checkpoints" / "latest.pt"
    if config.eval_only:
        return Path(config.checkpoint)
    return None


def prepare_output_dir(path: str) -> Path:
    """Create ``--output-dir`` (and its parents) and check that files can be written there, so
    a bad one stops the run before any work, not at its first write; a UsageError names the
    path and the problem."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--output-dir {path}: exists and is not a directory") from None
    except OSError as err:
        raise UsageError(f"--output-dir {path}: cannot create this directory ({err.strerror or err})") from None
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--output-dir {path}: cannot write files in it ({err.strerror or err})") from None
    for sub in ("checkpoints", "plots"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise UsageError(f"--output-dir {path}: {out / sub} exists and is not a directory")
    return out


def _saved_config(cli: dict) -> Optional[dict]:
    """The configuration stored in the checkpoint that ``--resume``/``--eval-only`` names."""
    probe = RunConfig(**{k: v for k, v in cli.items() if k in ("resume", "eval_only", "checkpoint")})
    if probe.eval_only and not probe.checkpoint:
        probe.validate()  # the one-line error
    path = checkpoint_path(probe)
    if path is None:
        return None
    from imaml import checkpoint

    saved = checkpoint.load(path)["config"]
    run_control = ("resume", "eval_only", "checkpoint")
    if probe.eval_only:  # a meta-test of a checkpoint is a W&B run of its own
        run_control += ("wandb_id",)
    return {k: v for k, v in saved.items() if k in _FIELDS and k not in run_control}
