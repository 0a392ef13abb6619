"""Statistics for comparing methods on the same test tasks: paired differences and their
intervals, over tasks and over seeds (``studies.compare``)."""

from __future__ import annotations

from typing import Dict, List

from imaml.metrics import mean_ci95

__all__ = ["paired_difference"]

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
    mean, over_seeds = mean_ci95(per_seed, student=True)
    return {"mean": mean, "ci95_seeds": over_seeds, "ci95_tasks": mean_ci95(pooled)[1], "seeds": seeds,
            "per_seed": per_seed, "tasks": len(pooled)}
