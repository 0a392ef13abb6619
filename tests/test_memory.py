"""Memory against inner steps, counted exactly: the bytes autograd graphs hold at their peak
during one meta-step (benchmarks.measure.SavedTensorPeak), on a tiny model.

iMAML does not grow with inner steps; second-order MAML grows by one step's graph per step;
with --grad-checkpoint it grows only by one copy of φ per step.
"""

import pytest
import torch

from benchmarks.measure import SavedTensorPeak
from engines import build_engine

pytestmark = pytest.mark.device


def _peak(make_config, inner_steps, **overrides) -> int:
    engine = build_engine(make_config(task="glyphs", inner_steps=inner_steps, meta_batch_size=2, **overrides))
    engine.train()
    with SavedTensorPeak() as saved:
        engine.train_step()
    return saved.peak


def _phi_bytes(make_config) -> int:
    engine = build_engine(make_config(task="glyphs"))
    return sum(p.numel() * p.element_size() for p in engine.upper.module.parameters())


@pytest.mark.parametrize("execution", ["per-task", "vectorized"])
def test_imaml_memory_does_not_grow_with_inner_steps(make_config, execution):
    peaks = [_peak(make_config, k, algo="imaml", execution=execution) for k in (1, 8)]
    assert peaks[1] == peaks[0]


@pytest.mark.parametrize("execution", ["per-task", "vectorized"])
def test_maml_memory_grows_linearly_and_checkpointing_removes_it(make_config, execution):
    plain = [_peak(make_config, k, algo="maml", execution=execution) for k in (1, 2, 8)]
    assert plain[2] - plain[1] == pytest.approx(6 * (plain[1] - plain[0]), rel=0.02)  # one graph per step
    assert plain[2] > 3 * plain[0]
    checkpointed = [_peak(make_config, k, algo="maml", execution=execution, grad_checkpoint=True) for k in (1, 8)]
    tasks = 2 if execution == "vectorized" else 1  # φ is stacked over the meta-batch
    # seven more steps keep seven more copies of φ and nothing else
    assert checkpointed[1] - checkpointed[0] <= 7 * tasks * _phi_bytes(make_config)
    assert checkpointed[0] <= plain[0]
