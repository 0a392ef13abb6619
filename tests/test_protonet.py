"""--algo protonet: Prototypical Networks, meta-trained on the meta-learners' episodes and
meta-tested on their very tasks, through the same loop and files; its loss is Snell et al.'s."""

import json

import pytest
import torch
import torch.nn.functional as F

from engines import build_engine
from imaml.app.cli import main, run_from_args
from imaml.errors import UsageError
from problems.head import find_head
from problems.protonet import PrototypeClassifier, Prototypical
from tests.test_pretrain import _args, _meta_test_tasks, _shape, _train


@pytest.mark.parametrize("split", ["val", "test"])
def test_protonet_is_evaluated_on_the_meta_learners_tasks(make_config, split):
    tasks = {}
    for algo in ("maml", "protonet"):
        engine = build_engine(make_config(task="glyphs", algo=algo, meta_batch_size=3, test_tasks=7, val_tasks=5))
        _train(engine, 2)  # training advances only the training stream
        tasks[algo] = _meta_test_tasks(engine, split, 7)
    assert len(tasks["protonet"]) == len(tasks["maml"]) == 3
    for mine, theirs in zip(tasks["protonet"], tasks["maml"]):
        for name in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(mine, name), getattr(theirs, name)), name


def _embed(model, head, x) -> torch.Tensor:
    """The input of the output layer ``head`` when ``model`` runs on ``x``."""
    features = []
    hook = head.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    model(x)
    hook.remove()
    return features[0]


def _snell_loss(model, head, task) -> torch.Tensor:
    """Snell et al.'s loss of one task, written out: −‖f − μ_c‖² logits over the prototypes."""
    support, query = _embed(model, head, task.support_x), _embed(model, head, task.query_x)
    ways = int(task.support_y.max()) + 1
    prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(ways)])
    return F.cross_entropy(-torch.cdist(query, prototypes).pow(2), task.query_y)


def test_a_meta_step_descends_snell_et_als_loss(make_config):
    """The gradient of one meta-step is that of the mean over the meta-batch of the written-out
    loss, in float64 (so the prototype head's algebra, W = 2μ, b = −‖μ‖², is exact)."""
    engine = build_engine(make_config(task="glyphs", algo="protonet", meta_batch_size=3), dtype=torch.float64)
    upper = engine.upper
    grads = []
    upper.optimizer_step = lambda *a, **k: grads.append([None if p.grad is None else p.grad.clone()
                                                          for p in upper.module.parameters()])
    engine.train()
    batch = engine.env.step()
    upper.prototype_step(batch, range(batch.num_tasks))
    upper.zero_grad()
    head = find_head(upper.module)[1]
    reference = sum(_snell_loss(upper.module, head, batch.task(t)) for t in range(batch.num_tasks)) / batch.num_tasks
    expected = torch.autograd.grad(reference, [p for p in upper.module.parameters() if p is not head.weight
                                               and p is not head.bias])
    got = [g for g, p in zip(grads[0], upper.module.parameters()) if p is not head.weight and p is not head.bias]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all(g is None for g, p in zip(grads[0], upper.module.parameters())
               if p is head.weight or p is head.bias)  # the output layer is never used in training


def test_meta_test_is_the_nearest_prototype_classifier(make_config):
    engine = build_engine(make_config(task="glyphs", algo="protonet", meta_batch_size=2, test_tasks=4))
    assert isinstance(engine.upper, Prototypical) and isinstance(engine.lower, PrototypeClassifier)
    engine.eval()
    batch = next(iter(engine.env.episodes("test", 2)))
    engine.env.load(batch)
    engine.adapt(range(1), steps=10)  # steps do not apply: the support set's prototypes are the classifier
    task = engine.env.current
    head = find_head(engine.upper.module)[1]
    with torch.no_grad():
        predicted = engine.lower.predict(task.query_x).argmax(-1)
        support, query = (_embed(engine.upper.module, head, x) for x in (task.support_x, task.query_x))
    assert engine.lower.inner_losses == []  # no step was taken
    ways = int(task.support_y.max()) + 1
    prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(ways)])
    assert torch.equal(predicted, torch.cdist(query, prototypes).argmin(-1))


def test_meta_test_fine_tuning_starts_at_the_prototypes_and_leaves_theta_alone(make_config):
    """``fine_tune_steps`` (studies.lake_levers --fine-tune): FineTune's SGD from the prototype head."""
    engine = build_engine(make_config(task="glyphs", algo="protonet", meta_batch_size=2, test_tasks=4,
                                      inner_lr=0.05), dtype=torch.float64)
    theta = {k: v.clone() for k, v in engine.upper.module.state_dict().items()}
    engine.eval()
    engine.env.load(next(iter(engine.env.episodes("test", 2))))
    task = engine.env.select(0)
    head = find_head(engine.upper.module)[1]
    with torch.no_grad():
        support = _embed(engine.upper.module, head, task.support_x)
        ways = int(task.support_y.max()) + 1
        prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(ways)])
        start = F.cross_entropy(-torch.cdist(support, prototypes).pow(2), task.support_y).item()
    engine.fine_tune_steps = 3
    engine.adapt(range(1), steps=10)  # the engine's own count, not the flag's
    assert len(engine.lower.inner_losses) == 3
    assert engine.lower.inner_losses[0] == pytest.approx(start, rel=1e-9)  # the first step is at the prototypes
    assert engine.lower.inner_losses[-1] < start
    names = engine.lower._param_names
    assert any(not torch.equal(p, theta[n]) for n, p in zip(names, engine.lower.params) if not n.startswith("head"))
    assert all(torch.equal(v, theta[k]) for k, v in engine.upper.module.state_dict().items())


def test_a_protonet_run_writes_what_a_meta_learning_run_writes_and_resumes(tmp_path, data_root):
    maml = run_from_args(_args(tmp_path, data_root, "maml"))
    protonet = run_from_args(_args(tmp_path, data_root, "protonet"))
    assert _shape(protonet) == _shape(maml)
    assert protonet["protocol"]["test_tasks"] == maml["protocol"]["test_tasks"] == 4
    for name in ("metrics.jsonl", "config.json", "results.json", "checkpoints/latest.pt", "checkpoints/best.pt",
                 "plots/meta_train_loss.png", "plots/meta_validation.png"):
        assert (tmp_path / "protonet" / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "protonet" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"train/query_loss", "train/query_accuracy", "val/accuracy"} <= set(records[0])
    resumed = run_from_args(["--resume", str(tmp_path / "protonet"), "--meta-steps", "6"])
    assert resumed["meta_steps"] == 6 and resumed["meta_steps_done"] == 6
    assert main(["--eval-only", "--checkpoint", str(tmp_path / "protonet" / "checkpoints" / "latest.pt"),
                 "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["test"]["mean"] == pytest.approx(resumed["test"]["mean"])


def test_a_resumed_protonet_run_equals_an_uninterrupted_one(tmp_path, data_root):
    whole = run_from_args(_args(tmp_path, data_root, "protonet", "--output-dir", str(tmp_path / "whole")))
    run_from_args(_args(tmp_path, data_root, "protonet", "--meta-steps", "2", "--output-dir", str(tmp_path / "part")))
    resumed = run_from_args(["--resume", str(tmp_path / "part"), "--meta-steps", "4"])
    assert resumed["test"] == whole["test"]


@pytest.mark.parametrize("argv, message", [
    (["--algo", "protonet", "--task", "sinusoid"], "--task sinusoid is regression"),
    (["--algo", "protonet", "--adapt", "head"], "--algo protonet fits its own prototype head"),
    (["--algo", "protonet", "--inner-tol", "0.5"], "only for --algo imaml"),
])
def test_protonet_refuses_what_does_not_apply_in_one_line(argv, message, capsys):
    assert main([*argv, "--processes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_protonet_refuses_the_wrong_extensions(make_config):
    with pytest.raises(UsageError, match="is not a subclass of problems.protonet.Prototypical"):
        build_engine(make_config(task="glyphs", algo="protonet", upper_problem="problems.upper:MetaInit"))


def test_the_glyphs_preset_selects_protonet():
    from imaml.app.arguments import parse_args

    config = parse_args(["--algo", "protonet"])
    assert config.config.endswith("glyphs-protonet.yaml") and config.algo == "protonet"
