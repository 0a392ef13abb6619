"""Which classes a run is built from: the built-in ones, or extensions.

An extension is named by import path in the config (``--lower-problem``, ``--upper-problem``,
``--env``, ``--model``, ``--hypergrad``; also in YAML) or passed from Python to
``build_engine`` (``lower_cls=``, ``upper_cls=``, ``env_cls=``, ``model=``, ``solver=``; these
win over the config). Each is checked here against the base it must extend, so a wrong one
stops the run before any work with one line. docs/extending.md has the contracts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from envs import FewShotEnv
from imaml.config import HYPERGRADS, RunConfig
from imaml.errors import UsageError
from imaml.solvers import register_solver, solver_key
from imaml.models import build_model
from imaml.plugins import check_class, is_import_path, load_class, load_object, qualname
from problems import ImplicitLower, MetaInit, UnrolledLower

# the Lower problem of each kind of --algo; --adapt and --head-init are read by each
BUILT_IN_LOWERS = {"imaml": ImplicitLower, "unrolled": UnrolledLower}

__all__ = ["Parts", "choose_parts", "make_model", "adapts_head"]

ModelChoice = Union[nn.Module, type, None]


@dataclass(frozen=True)
class Parts:
    """The classes (and model) one run uses, checked."""

    lower: type
    upper: type
    env: type
    model: ModelChoice  # an nn.Module, an nn.Module class, or None for build_model(config.model)
    solver: Optional[str]  # Betty's dispatch key for the iMAML hypergradient; None for unrolled

    def why_not_stackable(self) -> Optional[str]:
        """Why these parts cannot adapt a whole meta-batch at once, or None: the Lower problem
        must be built in or say ``stackable = True`` in its own class body (a subclass inherits
        the hooks but not the promise), the Upper problem MetaInit, and the solver built in."""
        if self.lower not in BUILT_IN_LOWERS.values() and not self.lower.__dict__.get("stackable", False):
            return f"the Lower problem {qualname(self.lower)} does not declare stackable = True"
        if self.upper is not MetaInit:
            return f"the Upper problem {qualname(self.upper)} replaces MetaInit"
        if self.solver is not None and self.solver not in {solver_key(name) for name in HYPERGRADS}:
            return "an extension solver solves one task at a time"
        return None


def choose_parts(config: RunConfig, lower_cls: Optional[type] = None, upper_cls: Optional[type] = None,
                 env_cls: Optional[type] = None, model: ModelChoice = None,
                 solver: Optional[Callable] = None) -> Parts:
    """Resolve and check every part of ``config`` (Python overrides first)."""
    implicit = config.algo == "imaml"
    lower_base = ImplicitLower if implicit else UnrolledLower
    lower = _pick(lower_cls, "lower_cls", config.lower_problem, "--lower-problem", lower_base,
                  f"--algo {config.algo}")
    needs = lower.upper_class  # MetaInit, or the Upper this Lower relies on (Meta-SGD's)
    upper = _pick(upper_cls, "upper_cls", config.upper_problem, "--upper-problem", needs,
                  f"the Lower problem {qualname(lower)}" if needs is not MetaInit else "")
    env = _pick(env_cls, "env_cls", config.env, "--env", FewShotEnv)
    if isinstance(model, nn.Module):
        chosen_model: ModelChoice = model
    else:
        spec = config.model if is_import_path(config.model) else None
        chosen_model = _pick(model, "model", spec, "--model", nn.Module) if model or spec else None
    if config.grad_checkpoint and not getattr(lower, "recomputable", False):
        raise UsageError(f"--grad-checkpoint: the Lower problem {qualname(lower)} keeps state that recomputing "
                         f"an inner step in the backward pass would not restore (recomputable = False); "
                         f"drop the flag")
    zero_head = (getattr(lower, "fixed_head_init", None) or config.head_init) == "zero"
    if config.test_ways is not None and config.test_ways != config.ways and not (lower.variable_ways or zero_head):
        raise UsageError(
            f"--test-ways {config.test_ways}: the Lower problem {qualname(lower)} adapts a head with "
            f"--ways {config.ways} outputs, so it meta-tests only at {config.ways} ways; a zero-initialized "
            f"head adapts to any number: --head-init zero")
    return Parts(lower, upper, env, chosen_model, _solver_key(config, solver) if implicit else None)


def adapts_head(lower: type, config: RunConfig) -> bool:
    """Whether the Lower class ``lower`` adapts the output layer alone on θ's features in this run."""
    return (getattr(lower, "fixed_adapt", None) or config.adapt) == "head"


def make_model(config: RunConfig, parts: Parts, input_shape: tuple, num_outputs: int) -> nn.Module:
    """The meta-model θ: the one given, ``Class(input_shape, num_outputs, config)`` for an
    extension class, or the built-in ``config.model``."""
    if isinstance(parts.model, nn.Module):
        return parts.model
    if parts.model is None:
        return build_model(config.model, input_shape, num_outputs, config.channels, config.bn_mode,
                           config.activation)
    try:  # the contract, checked before the call so that errors inside it keep their traceback
        inspect.signature(parts.model).bind(input_shape, num_outputs, config)
    except TypeError as err:
        raise UsageError(f"--model {config.model or qualname(parts.model)}: a model class is built as "
                         f"Class(input_shape, num_outputs, config), and {qualname(parts.model)} "
                         f"does not take those arguments ({err})") from None
    return parts.model(input_shape, num_outputs, config)


def _pick(given: Optional[type], keyword: str, spec: Optional[str], flag: str, base: type,
          needed_by: str = "") -> type:
    """The class passed from Python, else the one ``spec`` names, else ``base`` itself."""
    if given is not None:
        return check_class(given, f"{keyword}={getattr(given, '__name__', repr(given))}", base, needed_by)
    if spec is not None:
        return load_class(spec, flag, base, needed_by)
    return base


def _solver_key(config: RunConfig, solver: Optional[Callable]) -> str:
    """The Lower config's ``type``: a built-in solver, or a user's one registered with Betty."""
    if solver is None and not is_import_path(config.hypergrad):
        return solver_key(config.hypergrad)
    what = f"--hypergrad {config.hypergrad}" if solver is None else f"solver={solver!r}"
    fn = solver if solver is not None else load_object(config.hypergrad, "--hypergrad")
    if isinstance(fn, type):
        fn = fn()  # a solver class: one instance, called like a function
    if not callable(fn):
        raise UsageError(f"{what}: is a {type(fn).__name__}, not a function solve(matvec, b, config) "
                         f"-> (x, SolveInfo)")
    # a dotted name, so it never replaces a built-in solver's key
    name = config.hypergrad if solver is None else qualname(fn if hasattr(fn, "__qualname__") else type(fn))
    return register_solver(name, fn)
