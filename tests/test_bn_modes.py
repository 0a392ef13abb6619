"""BatchNorm at meta-train and meta-test: transductive, inductive and episodic statistics."""

import pytest
import torch
import torch.nn.functional as F

from engines import build_engine
from imaml.models import EpisodicBatchNorm2d, norm2d, support_statistics

F64 = torch.float64


def _trained_engine(make_config, bn_mode, algo, steps=2):
    engine = build_engine(make_config(task="glyphs", algo=algo, bn_mode=bn_mode, query_shots=3,
                                      execution="per-task"), dtype=F64)  # one task adapted and probed
    engine.train()
    for _ in range(steps):
        engine.train_step()
    return engine


def _adapt_to_a_test_task(engine):
    engine.eval()
    engine.env.load(next(engine.env.episodes("test", 1)))
    task = engine.env.select(0)
    engine.inner_loop(engine.run_config.test_inner_steps)
    return task


@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_inductive_running_statistics_accumulate_only_in_meta_training(make_config, algo):
    engine = build_engine(make_config(task="glyphs", algo=algo, bn_mode="inductive", inner_steps=2,
                                      meta_batch_size=2), dtype=F64)
    bn = [m for m in engine.upper.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.track_running_stats for m in bn)
    engine.train()
    engine.train_step()
    # each task: 2 inner (support) forwards and 1 query forward; the solver's re-evaluation is not counted
    assert all(m.num_batches_tracked.item() == 2 * 3 for m in bn)
    assert all(m.running_mean.abs().sum() > 0 for m in bn)
    stored = [m.running_mean.clone() for m in bn]
    engine.evaluate("test", 2)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bn, stored))


@pytest.mark.device
@pytest.mark.parametrize("bn_mode,independent", [("inductive", True), ("episodic", True), ("transductive", False)])
@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_a_query_prediction_does_not_depend_on_the_other_queries(make_config, algo, bn_mode, independent):
    engine = _trained_engine(make_config, bn_mode, algo)
    task = _adapt_to_a_test_task(engine)
    with torch.no_grad():
        together = engine.lower.predict(task.query_x)
        alone = torch.cat([engine.lower.predict(task.query_x[i:i + 1]) for i in range(len(task.query_x))])
    same = torch.allclose(together, alone, rtol=0, atol=1e-10)
    assert same == independent  # transductive BatchNorm: the test really can tell


def test_episodic_batchnorm_normalizes_everything_with_the_support_statistics():
    torch.manual_seed(0)
    layer = EpisodicBatchNorm2d(3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    support, query = torch.randn(4, 3, 5, 5, dtype=F64), 3 + 2 * torch.randn(6, 3, 5, 5, dtype=F64)
    mean = support.mean(dim=(0, 2, 3))
    var = support.var(dim=(0, 2, 3), unbiased=False)
    expected = F.batch_norm(torch.cat([support, query]), mean, var, layer.weight, layer.bias, training=False,
                            eps=layer.eps)
    with support_statistics(layer, 4):
        got = layer(torch.cat([support, query]))
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(layer(support), expected[:4], atol=1e-12)  # support alone: its own batch statistics
    assert layer.reference_rows is None


def test_norm_layers_of_each_mode():
    assert not norm2d(4, "transductive").track_running_stats
    assert norm2d(4, "inductive").track_running_stats
    assert isinstance(norm2d(4, "episodic"), EpisodicBatchNorm2d)
