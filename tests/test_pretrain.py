"""--algo pretrain: a classifier over the pooled meta-training classes, meta-validated and
meta-tested exactly like the meta-learners (same fixed tasks, same loop, same files)."""

import json

import numpy as np
import pytest
import torch

from engines import build_engine
from envs.omniglot import OneShotRuns
from imaml.app.cli import main, run_from_args
from imaml.errors import UsageError
from problems.pretrain import FineTune, FineTuneHead, Pretrained, prototype_head
from tests.benchmark_files import WRITERS, read_code
from tests.test_omniglot import WAYS as LAKE_WAYS, write_lake_root


class Recorded:
    """A class pool that notes every class a caller reads (split, class)."""

    def __init__(self, pool, split, reads):
        self.pool, self.split, self.reads = pool, split, reads
        self.sizes, self.input_shape = pool.sizes, pool.input_shape

    def images(self, cls, picks):
        self.reads.append((self.split, int(cls)))
        return self.pool.images(cls, picks)


def record_reads(engine) -> list:
    """Every read of every split's examples from now on: (split, class) or (split, 'runs')."""
    reads = []
    for split, source in engine.env.sources.items():
        if isinstance(source, OneShotRuns):
            batches = source.batches
            source.batches = lambda *a, _b=batches, _s=split: (reads.append((_s, "runs")), _b(*a))[1]
        else:
            source.pool = Recorded(source.pool, split, reads)
    return reads


def _train(engine, steps: int) -> None:
    engine.train()
    for step in range(1, steps + 1):
        engine.global_step = step
        engine.train_step()


def _meta_test_tasks(engine, split: str, num_tasks: int) -> list:
    """The support and query sets ``engine.evaluate`` adapts to and scores, as it runs."""
    seen = []
    load = engine.env.load
    engine.env.load = lambda batch: (seen.append(batch), load(batch))[1]
    engine.evaluate(split, num_tasks)
    engine.env.load = load
    return seen


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    write_lake_root(root, zipped=True)
    return root


# ------------------------------------------------------------------------------ the same meta-test
@pytest.mark.parametrize("split", ["val", "test"])
def test_pretrain_is_evaluated_on_the_meta_learners_tasks(make_config, split):
    tasks = {}
    for algo in ("maml", "imaml", "pretrain"):
        engine = build_engine(make_config(task="glyphs", algo=algo, meta_batch_size=3, test_tasks=7, val_tasks=5))
        _train(engine, 2)  # training advances only the training stream
        tasks[algo] = _meta_test_tasks(engine, split, 7)
    for algo in ("imaml", "pretrain"):
        assert len(tasks[algo]) == len(tasks["maml"]) == 3  # batches of 3, 3 and 1 tasks
        for mine, theirs in zip(tasks[algo], tasks["maml"]):
            for name in ("support_x", "support_y", "query_x", "query_y"):
                assert torch.equal(getattr(mine, name), getattr(theirs, name)), (algo, name)


def test_pretrain_meta_tests_on_the_twenty_lake_runs(lake_root, make_config):
    config = dict(task="omniglot-lake", omniglot_background="small1", ways=LAKE_WAYS, shots=1, query_shots=2,
                  test_tasks=20, data_root=str(lake_root), channels=4)
    maml = _meta_test_tasks(build_engine(make_config(algo="maml", **config)), "test", 20)
    pretrain = _meta_test_tasks(build_engine(make_config(algo="pretrain", **config)), "test", 20)
    assert sum(b.num_tasks for b in pretrain) == 20
    assert all(torch.equal(a.query_x, b.query_x) and torch.equal(a.support_x, b.support_x)
               for a, b in zip(maml, pretrain))


# ------------------------------------------------------------------------------ no held-out class in training
def _check_training_reads_only_training_classes(engine, steps: int = 3) -> None:
    reads = record_reads(engine)
    seen_labels = []
    original = engine.upper.supervised_step
    engine.upper.supervised_step = lambda x, y: (seen_labels.append(y), original(x, y))[1]
    _train(engine, steps)
    assert reads and {split for split, _ in reads} == {"train"}, "training read a validation or test example"
    classes = engine.env.pooled.num_classes
    assert engine.upper.module.head.out_features == classes  # θ classifies the training classes only
    labels = torch.cat(seen_labels)
    assert int(labels.min()) >= 0 and int(labels.max()) < classes
    reads.clear()
    engine.evaluate("test", engine.run_config.test_tasks)
    assert {split for split, _ in reads} == {"test"}  # and the meta-test reads only the test split


def test_pretrain_never_reads_a_validation_or_test_class_of_glyphs(make_config):
    engine = build_engine(make_config(task="glyphs", algo="pretrain", test_tasks=4))
    assert engine.env.pooled.num_classes == 1200  # glyphs' training classes (validation 100, test 300)
    _check_training_reads_only_training_classes(engine)


@pytest.mark.parametrize("task", sorted(WRITERS))
def test_pretrain_never_reads_a_held_out_class_of_the_image_benchmarks(tmp_path, make_config, task):
    WRITERS[task](tmp_path)
    engine = build_engine(make_config(task=task, algo="pretrain", ways=2, shots=1, query_shots=2, channels=4,
                                      test_tasks=2, data_root=str(tmp_path)))
    _check_training_reads_only_training_classes(engine, steps=2)


def test_pretrain_on_lake_trains_only_on_the_training_characters(lake_root, make_config):
    """Every image the baseline trains on spells a training character's code (each turn a class
    of its own), never a validation character's or a run's."""
    engine = build_engine(make_config(algo="pretrain", task="omniglot-lake", omniglot_background="small1",
                                      ways=LAKE_WAYS, shots=1, query_shots=2, test_tasks=20, channels=4,
                                      data_root=str(lake_root)))
    sources = engine.env.sources
    codes = {split: {read_code(sources[split].pool.images(c, np.arange(1))[0])
                     for c in range(len(sources[split].pool.sizes))} for split in ("train", "val")}
    runs = {read_code(x) for run in sources["test"].runs for x in torch.cat([run.training, run.test])}
    assert codes["train"].isdisjoint(codes["val"]) and codes["train"].isdisjoint(runs)
    x, y = engine.env.labelled_batch()
    assert {read_code(image) for image in x} <= codes["train"]
    assert engine.env.pooled.num_classes == len(sources["train"].pool.sizes)  # rotations are already classes
    _check_training_reads_only_training_classes(engine, steps=2)


# ------------------------------------------------------------------------------ the adaptation
def test_the_prototype_head_is_the_nearest_prototype_classifier():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 6, generator=generator)
    labels = torch.arange(4).repeat(3)
    weight, bias = prototype_head(features, labels)
    queries = torch.randn(50, 6, generator=generator)
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])
    assert torch.equal((queries @ weight.T + bias).argmax(1), torch.cdist(queries, means).argmin(1))


@pytest.mark.parametrize("lower", [FineTune, FineTuneHead])
def test_fine_tuning_starts_from_the_pretrained_encoder_and_leaves_theta_alone(make_config, lower):
    engine = build_engine(make_config(task="glyphs", algo="pretrain", test_inner_steps=3, inner_lr=0.5),
                          lower_cls=lower)
    assert isinstance(engine.upper, Pretrained)
    theta = {k: v.clone() for k, v in engine.upper.module.state_dict().items()}
    engine.eval()
    engine.env.load(next(engine.env.episodes("test", 1)))
    task = engine.env.select(0)
    engine.inner_loop(3)
    names = engine.lower._param_names
    adapted = dict(zip(names, engine.lower.params))
    assert adapted["head.weight"].shape == (3, engine.upper.module.head.in_features)  # the task's 3 ways
    encoder_moved = any(not torch.equal(adapted[n], theta[n]) for n in names if not n.startswith("head."))
    assert encoder_moved == (lower is FineTune)
    assert all(torch.equal(v, theta[k]) for k, v in engine.upper.module.state_dict().items())
    accuracy = (engine.lower.predict(task.query_x).argmax(-1) == task.query_y).float().mean()
    assert 0 <= float(accuracy) <= 1


def test_pretrain_refuses_tasks_without_classes_and_the_wrong_extensions(make_config):
    with pytest.raises(UsageError, match="has no classes"):
        build_engine(make_config(algo="pretrain"))  # sinusoid
    with pytest.raises(UsageError, match="subclass of problems.pretrain.FineTune"):
        build_engine(make_config(task="glyphs", algo="pretrain", lower_problem="problems.anil:ANILUnrolled"))


# ------------------------------------------------------------------------------ the run: same files
def _args(tmp_path, data_root, algo, *extra):
    return ["--task", "glyphs", "--algo", algo, "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "3",
            "--test-tasks", "4", "--val-tasks", "3", "--val-every", "2", "--log-every", "2",
            "--data-root", data_root, "--output-dir", str(tmp_path / algo), *extra]


def _shape(value):
    """The keys of nested dicts (values replaced by their type), to compare results.json files."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("config",)}
    return type(value).__name__ if value is not None else None


def test_a_pretrain_run_writes_what_a_meta_learning_run_writes(tmp_path, data_root):
    maml = run_from_args(_args(tmp_path, data_root, "maml"))
    pretrain = run_from_args(_args(tmp_path, data_root, "pretrain"))
    assert _shape(pretrain) == _shape(maml)
    assert pretrain["protocol"]["test_tasks"] == maml["protocol"]["test_tasks"] == 4
    for name in ("metrics.jsonl", "inner_curves.jsonl", "config.json", "results.json", "checkpoints/latest.pt",
                 "checkpoints/best.pt", "plots/meta_train_loss.png", "plots/meta_validation.png",
                 "plots/inner_loop.png", "plots/inner_loop_grid.png"):
        assert (tmp_path / "pretrain" / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"train/loss", "train/accuracy", "train/meta_lr", "val/accuracy", "val/accuracy_ci95"} <= set(records[0])
    # --resume continues and --eval-only meta-tests the checkpoint on the same tasks
    resumed = run_from_args(["--resume", str(tmp_path / "pretrain"), "--meta-steps", "6"])
    assert resumed["meta_steps"] == 6
    code = main(["--eval-only", "--checkpoint", str(tmp_path / "pretrain" / "checkpoints" / "latest.pt"),
                 "--output-dir", str(tmp_path / "eval")])
    assert code == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["test"]["mean"] == pytest.approx(resumed["test"]["mean"])


def test_the_glyphs_preset_selects_pretrain(tmp_path):
    from imaml.app.arguments import parse_args

    config = parse_args(["--algo", "pretrain", "--output-dir", str(tmp_path)])
    assert config.config.endswith("glyphs-pretrain.yaml") and config.meta_steps == 400
