"""The meta-test levers (engines.test_time): the balanced assignment against brute force, the
jittered views' determinism, and both through the engine on Lake's protocol (small files in the
official formats)."""

import itertools
import json

import pytest
import torch

from engines import build_engine
from envs.meta_batch import MetaBatch
from imaml.app.cli import main
from imaml.config import RunConfig
from imaml.errors import UsageError
from engines.test_time import MetaTestLevers, balanced_assignment
from tests.test_omniglot import TINY, lake_config, write_lake_root


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    write_lake_root(root, zipped=True)
    return root


def _brute_force(log_probs: torch.Tensor) -> float:
    """The best summed log-probability over every labelling with Q/N queries per class."""
    queries, ways = log_probs.shape
    labels = [c for c in range(ways) for _ in range(queries // ways)]
    return max(sum(log_probs[q, c].item() for q, c in enumerate(order)) for order in set(itertools.permutations(labels)))


@pytest.mark.parametrize("queries,ways", [(5, 5), (6, 3), (8, 4)])
def test_balanced_assignment_is_the_best_labelling_with_equal_counts(queries, ways):
    generator = torch.Generator().manual_seed(queries * ways)
    for _ in range(5):
        log_probs = torch.randn(queries, ways, generator=generator, dtype=torch.float64).log_softmax(-1)
        scores = balanced_assignment(log_probs)
        assert set(scores.sum(1).tolist()) == {1.0}  # one class per query
        assert scores.sum(0).tolist() == [queries // ways] * ways  # the same count per class
        assert (scores * log_probs).sum().item() == pytest.approx(_brute_force(log_probs), abs=1e-9)


def test_balanced_assignment_changes_a_greedy_collision():
    # both queries prefer class 0; the second prefers it less, so it takes class 1
    log_probs = torch.tensor([[0.0, -5.0], [-0.1, -0.2]])
    assert balanced_assignment(log_probs).argmax(-1).tolist() == [0, 1]
    assert log_probs.argmax(-1).tolist() == [0, 0]


def test_unbalanced_queries_are_refused_in_one_line():
    with pytest.raises(UsageError, match="same number per class"):
        balanced_assignment(torch.zeros(5, 2))


def _batch(tasks=3, ways=4, seed=0) -> MetaBatch:
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(torch.rand(tasks, ways, 1, 28, 28, generator=g), torch.arange(ways).repeat(tasks, 1),
                     torch.rand(tasks, ways, 1, 28, 28, generator=g), torch.arange(ways).repeat(tasks, 1))


def test_jittered_support_is_deterministic_per_task_and_keeps_the_originals():
    batch, lever = _batch(), MetaTestLevers(3, "independent", "classification", seed=7)
    one, two = lever.support(batch, "test", 0), lever.support(batch, "test", 0)
    assert one.support_x.shape == (3, 16, 1, 28, 28) and one.support_y[0].tolist() == [0, 1, 2, 3] * 4
    assert torch.equal(one.support_x, two.support_x) and torch.equal(one.support_x[:, :4], batch.support_x)
    assert not torch.allclose(one.support_x[:, 4:8], batch.support_x)  # jittered, not copied
    # task 1 of a batch starting at 0 is task 1 of a batch starting at 1: the views follow the task
    shifted = lever.support(MetaBatch(*(t[1:] for t in (batch.support_x, batch.support_y, batch.query_x,
                                                        batch.query_y))), "test", 1)
    assert torch.equal(shifted.support_x[0], one.support_x[1])
    assert not torch.equal(lever.support(batch, "val", 0).support_x, one.support_x)  # val has its own stream
    assert MetaTestLevers(0, "independent", "classification", 7).support(batch, "test", 0) is batch


def test_views_average_log_probabilities_the_same_stacked_or_one_task_at_a_time():
    batch = _batch()
    weight = torch.randn(4, 28 * 28, generator=torch.Generator().manual_seed(1))
    predict = lambda x: x.flatten(-3) @ weight.T  # noqa: E731  (any model: [.., Q, N] logits)
    lever = MetaTestLevers(2, "independent", "classification", seed=3)
    stacked = lever.predict(predict, batch.query_x, "test", [0, 1, 2])
    alone = torch.stack([lever.predict(predict, batch.query_x[t], "test", [t]) for t in range(3)])
    assert torch.allclose(stacked, alone, atol=1e-6)
    plain = predict(batch.query_x).log_softmax(-1)
    assert not torch.allclose(stacked, plain)
    assert torch.equal(MetaTestLevers(0, "independent", "classification", 3).predict(predict, batch.query_x, "test",
                                                                                [0, 1, 2]), predict(batch.query_x))


@pytest.mark.parametrize("overrides", [dict(algo="maml"), dict(algo="imaml", adapt="head", head_init="zero",
                                                                lam=0.1, hypergrad="exact")])
def test_lake_meta_test_with_both_levers_scores_a_permutation_per_run(lake_root, tmp_path, overrides):
    def run(**levers):
        config = lake_config(lake_root, channels=4, inner_steps=1, test_inner_steps=2, meta_batch_size=2,
                             output_dir=str(tmp_path / "out"), processes=1, **overrides, **levers)
        engine = build_engine(config)
        return engine, engine.evaluate("test", 20)

    engine, both = run(test_augment=2, query_assignment="balanced")
    assert engine.env.current.support_x.shape[-4] == 4 * 3  # the run's 4 images and 2 jittered copies of each
    _, again = run(test_augment=2, query_assignment="balanced")
    assert both["per_run_error"] == again["per_run_error"]  # the same views every time
    # one test item per class: a balanced assignment's errors come in pairs (or none)
    assert all(round(e * 4) != 1 for e in both["per_run_error"].values())
    engine, _ = run()
    assert engine.env.current.support_x.shape[-4] == 4  # off by default: the run as it is


def test_levers_are_in_results_and_refused_where_they_do_not_apply(lake_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, "--data-root", str(lake_root), "--output-dir", str(out), "--test-augment", "1",
                 "--query-assignment", "balanced"]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["test_augment"], config["query_assignment"]) == (1, "balanced")
    with pytest.raises(UsageError, match="--test-augment 2: the test-time jitter is defined for Omniglot"):
        RunConfig(task="glyphs", ways=5, test_augment=2).validate()
    with pytest.raises(UsageError, match="--test-augment -1: must be >= 0"):
        RunConfig(task="omniglot", ways=5, test_augment=-1).validate()
    with pytest.raises(UsageError, match="sinusoid task is regression"):
        RunConfig(task="sinusoid", ways=None, query_assignment="balanced").validate()


def test_the_levers_benchmark_scores_a_finished_run_with_every_combination(lake_root, tmp_path, capsys):
    from studies import lake_levers

    out = tmp_path / "run"
    assert main([*TINY, "--data-root", str(lake_root), "--output-dir", str(out)]) == 0, capsys.readouterr().err
    table = lake_levers.main([str(out), "--views", "0", "1", "--json", str(tmp_path / "levers.json")])
    assert list(table) == [f"--test-augment {v} --query-assignment {a}" for a in ("independent", "balanced")
                           for v in (0, 1)]
    plain = table["--test-augment 0 --query-assignment independent"][str(out)]
    results = json.loads((out / "results.json").read_text())
    assert plain["error_rate"] == pytest.approx(results["test"]["error_rate"])  # the run's own meta-test again
    for name in ("--test-augment 0 --query-assignment balanced", "--test-augment 1 --query-assignment balanced"):
        assert all(round(e * 4) != 1 for e in table[name][str(out)]["per_run_error"].values())
    assert json.loads((tmp_path / "levers.json").read_text()).keys() == table.keys()
    with pytest.raises(UsageError, match="--fine-tune 2:0.1: for ProtoNet runs"):
        lake_levers.score(str(out), 0, "independent", "test", "2:0.1")  # TINY is MAML: it adapts already
    for bad in ("10", "2:0.1"):  # malformed, and for a MAML run: argparse's usage and one error line
        with pytest.raises(SystemExit):
            lake_levers.main([str(out), "--views", "0", "--fine-tune", bad])
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.splitlines()[-1].split(": error: ")[1].count(bad) >= 1


def test_an_ensemble_averages_its_members_on_the_first_member_s_tasks(lake_root, tmp_path, capsys):
    from studies import lake_levers

    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, "0"), (b, "3")):
        assert main([*TINY, "--data-root", str(lake_root), "--output-dir", str(out), "--seed", seed]) == 0, \
            capsys.readouterr().err
    alone = {run: lake_levers.score(str(run), 0, "independent") for run in (a, b)}
    assert alone[a]["per_run_error"] != alone[b]["per_run_error"]  # two different θ, so the test below can fail
    both, swapped = (lake_levers.score(f"{x},{y}", 0, "independent") for x, y in ((a, b), (b, a)))
    assert both["per_run_error"] == swapped["per_run_error"]  # the runs are the same tasks: the order is immaterial
    assert both["per_run_error"] not in [alone[a]["per_run_error"], alone[b]["per_run_error"]]
    # a member twice is that member alone, views and assignment included
    for views, assignment, split in ((1, "independent", "test"), (1, "balanced", "test"), (0, "independent", "val")):
        twice = lake_levers.score(f"{a},{a}", views, assignment, split)
        once = lake_levers.score(str(a), views, assignment, split)
        assert twice["error_rate"] == pytest.approx(once["error_rate"], abs=1e-9)
        assert twice["per_run_error"] == once["per_run_error"]
