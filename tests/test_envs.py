"""The data side: coupled tasks, disjoint splits, reproducibility."""

import numpy as np
import pytest
import torch

from envs import FewShotEnv, build_task_sources
from envs import glyphs
from envs.tasks import ClassImageTasks, SinusoidTasks


def _labelled_images(classes=12, samples=8):
    """Images whose every pixel encodes (class, sample), so tasks can be decoded."""
    ids = torch.arange(classes * samples, dtype=torch.float32).view(classes, samples, 1, 1)
    return ids.expand(classes, samples, 4, 4).clone()


def _decode(x):
    ids = x[..., 0, 0].long()  # [examples, 4, 4] -> [examples]
    return ids // 8, ids % 8


def test_support_and_query_share_classes_with_disjoint_examples_and_consistent_labels():
    source = ClassImageTasks(_labelled_images(), ways=5, shots=2, query_shots=3, name="toy")
    batch = source.sample(np.random.default_rng(0), 20)
    assert batch.support_x.shape == (20, 10, 1, 4, 4) and batch.query_x.shape == (20, 15, 1, 4, 4)
    for t in range(batch.num_tasks):
        task = batch.task(t)
        s_class, s_sample = _decode(task.support_x[:, 0])
        q_class, q_sample = _decode(task.query_x[:, 0])
        label_to_class = {}
        for label, cls in zip(task.support_y.tolist() + task.query_y.tolist(),
                              s_class.tolist() + q_class.tolist()):
            assert label_to_class.setdefault(label, cls) == cls  # one class per label
        assert sorted(label_to_class) == list(range(5))
        assert len(set(label_to_class.values())) == 5  # N distinct classes
        examples_s = set(zip(s_class.tolist(), s_sample.tolist()))
        examples_q = set(zip(q_class.tolist(), q_sample.tolist()))
        assert len(examples_s) == 10 and len(examples_q) == 15 and not examples_s & examples_q


def test_labels_are_a_random_assignment_of_classes():
    source = ClassImageTasks(_labelled_images(), ways=5, shots=1, query_shots=1, name="toy")
    batch = source.sample(np.random.default_rng(0), 50)
    first_class = [_decode(batch.task(t).support_x[:1, 0])[0].item() for t in range(50)]
    assert len(set(first_class)) > 5  # label 0 is not always the same class


def test_glyph_splits_never_share_classes(data_root):
    bounds = sorted(glyphs.SPLITS.values())
    assert bounds[0][0] == 0 and bounds[-1][1] == glyphs.NUM_CLASSES
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint
    from imaml.config import RunConfig

    sources = build_task_sources(RunConfig(task="glyphs", data_root=data_root))
    fingerprints = {}
    for split, source in sources.items():
        fingerprints[split] = {bytes(img.numpy()) for img in source.pool.array.flatten(0, 1)}
    assert not fingerprints["train"] & fingerprints["val"]
    assert not fingerprints["train"] & fingerprints["test"]
    assert not fingerprints["val"] & fingerprints["test"]
    # and the env serves test tasks from test images only
    env = FewShotEnv(sources, 4, seed=0)
    batch = next(env.episodes("test", 4))
    served = {bytes((x * 255).round().to(torch.uint8).numpy()) for x in batch.query_x.flatten(0, 1)}
    assert served <= fingerprints["test"]


def test_glyphs_are_deterministic_and_cached(data_root):
    assert np.array_equal(glyphs.render_class(7), glyphs.render_class(7))
    cached = glyphs.load_glyphs(data_root)
    assert cached.shape == (1600, 20, 28, 28) and cached.dtype == np.uint8
    assert np.array_equal(cached[7], glyphs.render_class(7))
    assert not np.array_equal(cached[7], cached[8])


def _sources():
    return {split: ClassImageTasks(_labelled_images(), 3, 1, 2, name=split) for split in ("train", "val", "test")}


def test_same_seed_same_tasks_whatever_the_global_random_state():
    np.random.seed(1)
    torch.manual_seed(1)
    a = FewShotEnv(_sources(), 4, seed=3)
    first = [a.step().support_x.clone() for _ in range(3)]
    np.random.seed(2)
    torch.manual_seed(2)
    b = FewShotEnv(_sources(), 4, seed=3)
    second = [b.step().support_x.clone() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    c = FewShotEnv(_sources(), 4, seed=4)
    assert not torch.equal(c.step().support_x, first[0])


def test_evaluation_tasks_are_fixed_and_independent_of_batch_size_and_training():
    env = FewShotEnv(_sources(), 4, seed=0)
    whole = torch.cat([b.query_x for b in env.episodes("test", 10, batch_size=10)])
    env.step()  # training draws do not move the evaluation stream
    pieces = torch.cat([b.query_x for b in env.episodes("test", 10, batch_size=3)])
    assert torch.equal(whole, pieces)
    val = torch.cat([b.query_x for b in env.episodes("val", 10)])
    assert not torch.equal(whole, val)


def test_sinusoid_tasks_follow_the_maml_distribution():
    batch = SinusoidTasks(shots=10, query_shots=10).sample(np.random.default_rng(0), 200)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0 + 1e-6
    # each task's points lie on one sinusoid: fit A, φ by least squares on sin/cos features
    for t in range(5):
        features = torch.cat([torch.sin(x[t]), torch.cos(x[t])], 1).double()
        coef = torch.linalg.lstsq(features, y[t].double()).solution
        assert torch.allclose(features @ coef, y[t].double(), atol=1e-5)


def test_env_serves_the_selected_task_to_both_levels():
    env = FewShotEnv(_sources(), 4, seed=0)
    batch = env.step()
    env.select(2)
    assert torch.equal(env.support[0], batch.support_x[2]) and torch.equal(env.query[1], batch.query_y[2])


@pytest.mark.parametrize("ways,shots,query,fragment", [
    (13, 1, 1, "has only 12 classes"),
    (3, 6, 3, "has only 8 examples per class"),
])
def test_impossible_episodes_are_rejected(ways, shots, query, fragment):
    from imaml.errors import UsageError

    with pytest.raises(UsageError, match=fragment):
        ClassImageTasks(_labelled_images(), ways, shots, query, name="toy split")
