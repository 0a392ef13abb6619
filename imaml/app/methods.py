"""Which method a run's settings name, in a preset's name and in words.

A method is the pair (algorithm, what adapts from where): ``--algo maml --adapt head`` is ANIL,
``--algo imaml --adapt head --head-init zero`` the head iMAML. The automatic preset is
``configs/<task>-<method>.yaml`` for the method the flags name (``imaml.app.arguments``), and the
first console line of a run says the method in words (``describe``), so neither can silently
disagree with what runs. Torch-free: the command line reads it before any heavy import.
"""

from __future__ import annotations

from typing import Mapping, Optional

__all__ = ["method_name", "method_of", "describe"]

_DEFAULT_HEAD_INIT = {"imaml": "zero"}  # the head iMAML starts its head at zero; ANIL at θ's head


def method_name(algo: str, adapt: str = "all", head_init: Optional[str] = None,
                inner_optimizer: str = "sgd") -> str:
    """The method's short name, as presets are named: imaml, imaml-hf (whole network, Hessian-free
    inner steps), imaml-head, maml, anil, fomaml, fo-anil, pretrain, protonet; a head start other than the
    method's own adds ``-zero`` or ``-theta`` (``maml-zero``: the whole network with a zero-started
    head)."""
    if algo in ("pretrain", "protonet"):
        return algo
    head = adapt == "head"
    usual = _DEFAULT_HEAD_INIT.get(algo, "theta") if head else "theta"
    if head and algo in ("maml", "fomaml"):
        name = "anil" if algo == "maml" else "fo-anil"
    else:
        name = algo + ("-head" if head else "")
    if head_init is not None and head_init != usual:
        name += f"-{head_init}"
    if algo == "imaml" and not head and inner_optimizer == "hessian-free":  # the paper's second preset;
        name += "-hf"  # the head method's inner problem is small enough that its presets all take Newton steps
    return name


def method_of(settings: Mapping[str, object]) -> str:
    """The method named by ``settings`` (flags or a whole configuration; missing: the defaults)."""
    return method_name(str(settings.get("algo", "imaml")), str(settings.get("adapt", "all")),
                       settings.get("head_init"), str(settings.get("inner_optimizer", "sgd")))  # type: ignore[arg-type]


_WORDS = {
    "imaml": "iMAML, whole network (the paper's)",
    "imaml-head": "iMAML over a zero-started head on θ's features",
    "imaml-head-theta": "iMAML over θ's head on θ's features",
    "imaml-zero": "iMAML, whole network with a zero-started head",
    "maml": "MAML (second order), whole network",
    "maml-zero": "MAML (second order), whole network with a zero-started head",
    "anil": "ANIL (second-order MAML over θ's head on θ's features)",
    "anil-zero": "ANIL over a zero-started head (second-order MAML)",
    "fomaml": "first-order MAML, whole network",
    "fomaml-zero": "first-order MAML, whole network with a zero-started head",
    "fo-anil": "first-order ANIL (θ's head on θ's features)",
    "fo-anil-zero": "first-order ANIL over a zero-started head",
    "pretrain": "pretrain + fine-tune (one classifier over all training classes, the baseline)",
    "protonet": "ProtoNet (prototypes of θ's features, squared Euclidean distance; no inner loop)",
}


def describe(config) -> str:
    """The method a ``RunConfig`` runs, in words, e.g. "iMAML, whole network (the paper's), Hessian-free
    inner steps"."""
    if config.lower_problem:
        return f"{config.algo} with the Lower problem {config.lower_problem}"
    name = method_name(config.algo, config.adapt, config.head_init)
    words = _WORDS[name]
    if config.algo == "imaml" and config.adapt == "all" and config.inner_optimizer != "sgd":
        words += f", {config.inner_optimizer} inner steps"
    if config.head_lam is not None:
        words += f", λ {config.lam:g} on the body and {config.head_lam:g} on the head"
    if config.warmup_fraction:
        words += f", after {config.warmup_steps} meta-steps of the head method"
    return words
