"""Statistics for comparing methods on the same test tasks: paired differences and their
intervals, over tasks and over seeds (``benchmarks.compare``)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

__all__ = ["t_interval", "paired_difference"]

# Student's t, two-sided 95%, by degrees of freedom (beyond the table: the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values: Sequence[float]) -> tuple:
    """(mean, half-width of its 95% interval by Student's t; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = 1.96 if df > 30 else T95[max(k for k in T95 if k <= df)]  # between table rows: the larger t
    return mean, t * sd / math.sqrt(n)


def paired_difference(scores: Dict[int, List[float]], reference: Dict[int, List[float]]) -> dict:
    """``scores`` − ``reference`` on the same tasks, seed by seed ({seed: per-task scores}): the
    mean difference, its 95% interval over seeds (training randomness; t with seeds − 1 degrees
    of freedom) and over all paired tasks (test-task sampling; 1.96·sd/√N)."""
    seeds = sorted(set(scores) & set(reference))
    if not seeds:
        raise ValueError("no seed has both runs")
    per_seed, pooled = [], []
    for seed in seeds:
        a, b = scores[seed], reference[seed]
        if len(a) != len(b):
            raise ValueError(f"seed {seed}: {len(a)} and {len(b)} test tasks; a paired difference needs the same tasks")
        diffs = [x - y for x, y in zip(a, b)]
        per_seed.append(sum(diffs) / len(diffs))
        pooled.extend(diffs)
    mean, over_seeds = t_interval(per_seed)
    n = len(pooled)
    tasks_mean = sum(pooled) / n
    sd = math.sqrt(sum((d - tasks_mean) ** 2 for d in pooled) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "ci95_seeds": over_seeds, "ci95_tasks": 1.96 * sd / math.sqrt(n), "seeds": seeds,
            "per_seed": per_seed, "tasks": n}
