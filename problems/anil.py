"""ANIL, "almost no inner loop" (Raghu et al., 2020), by its earlier import paths.

ANIL is a setting now: ``--adapt head`` (``problems.head_only``), with the head starting at θ's
(``--head-init theta``, the default). These classes are that setting under the names earlier
runs and presets used (``--lower-problem problems.anil:ANILUnrolled`` / ``ANILImplicit``); each
says so once when built.
"""

from __future__ import annotations

from problems.head_only import HeadImplicit, HeadUnrolled
from problems.legacy import say_replaced

__all__ = ["ANILUnrolled", "ANILImplicit"]


class ANILUnrolled(HeadUnrolled):
    """``--algo maml|fomaml --adapt head``: unrolled steps on a head started at θ's."""

    fixed_head_init = "theta"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.anil:ANILUnrolled", "--adapt head")
        super().__init__(*args, **kwargs)


class ANILImplicit(HeadImplicit):
    """``--algo imaml --adapt head``: iMAML over a head started at θ's, on θ's features."""

    fixed_head_init = "theta"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.anil:ANILImplicit", "--adapt head")
        super().__init__(*args, **kwargs)
