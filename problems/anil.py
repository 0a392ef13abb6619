"""ANIL, "almost no inner loop" (Raghu et al., 2020), by its earlier import paths.

ANIL is a setting now: ``--adapt head`` (``problems.features``), with the head starting at θ's
(``--head-init theta``, the default). These classes are that setting under the names earlier
runs and presets used (``--lower-problem problems.anil:ANILUnrolled`` / ``ANILImplicit``); each
says so once when built.
"""

from __future__ import annotations

from problems.legacy import say_replaced
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["ANILUnrolled", "ANILImplicit"]


class ANILUnrolled(UnrolledLower):
    """``--algo maml|fomaml --adapt head``: unrolled steps on a head started at θ's."""

    fixed_adapt, fixed_head_init = "head", "theta"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.anil:ANILUnrolled", "--adapt head")
        super().__init__(*args, **kwargs)


class ANILImplicit(ImplicitLower):
    """``--algo imaml --adapt head``: iMAML over a head started at θ's, on θ's features."""

    fixed_adapt, fixed_head_init = "head", "theta"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.anil:ANILImplicit", "--adapt head")
        super().__init__(*args, **kwargs)
