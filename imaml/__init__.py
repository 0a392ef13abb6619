"""imaml: few-shot meta-learning with implicit MAML and unrolled MAML on Betty.

The reusable pieces live here (configuration, models, hypergradient solvers, metrics);
the data side is in ``envs``, the two optimization levels in ``problems`` and the
orchestration in ``engines``.
"""

__version__ = "0.1.0"
