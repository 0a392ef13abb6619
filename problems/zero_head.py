"""A zero-initialized head, reset to zero before every task, by its earlier import paths.

Where the head starts is a setting now: ``--head-init zero`` (``problems.adaptation.head_start``),
with the whole network adapted (``--adapt all``) or the head alone (``--adapt head``). Every class
starts each task's head at zeros with as many rows as the task has classes, so meta-training at
``--ways 5`` and meta-testing at ``--test-ways 20`` use the same θ (the "zeroing trick" of Kao et
al., 2022); with the head alone and iMAML, the inner problem is λ-strongly convex
(``problems.features``). These classes are those settings under the names earlier runs and
presets used; each says so once when built.
"""

from __future__ import annotations

from problems.legacy import say_replaced
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["ZeroHeadUnrolled", "ZeroHeadImplicit", "ZeroHeadANILImplicit"]


class ZeroHeadUnrolled(UnrolledLower):
    """``--algo maml|fomaml --head-init zero``: unrolled MAML / FOMAML from (θ_enc, zero head)."""

    fixed_head_init = "zero"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.zero_head:ZeroHeadUnrolled", "--head-init zero")
        super().__init__(*args, **kwargs)


class ZeroHeadImplicit(ImplicitLower):
    """``--algo imaml --head-init zero``: iMAML from (θ_enc, zero head), the proximal term
    anchored at that start: λ/2·(‖φ_enc − θ_enc‖² + ‖φ_h‖²)."""

    fixed_head_init = "zero"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.zero_head:ZeroHeadImplicit", "--head-init zero")
        super().__init__(*args, **kwargs)


class ZeroHeadANILImplicit(ImplicitLower):
    """``--algo imaml --adapt head --head-init zero``: iMAML over a zero-started head on θ's
    features, g(φ_h; θ) = L_support(φ_h; θ_enc) + λ/2·‖φ_h‖², λ-strongly convex."""

    fixed_adapt, fixed_head_init = "head", "zero"

    def __init__(self, *args, **kwargs):
        say_replaced("problems.zero_head:ZeroHeadANILImplicit", "--adapt head --head-init zero")
        super().__init__(*args, **kwargs)
