"""The shipped extensions (ANIL, Meta-SGD, zero-initialized head): their meta-gradients
against plain autograd in float64, and the behaviour each one promises."""

import json

import pytest
import torch

from engines import build_engine
from imaml import checkpoint
from imaml.app.cli import run_from_args
from imaml.errors import UsageError
from imaml.models import MLP
from problems.head import head_names
from tests.reference import engine_meta_gradient, implicit_general, relative_error, unrolled_general

F64 = torch.float64
ANIL = {"maml": "problems.anil:ANILUnrolled", "fomaml": "problems.anil:ANILUnrolled",
        "imaml": "problems.anil:ANILImplicit"}
ZERO_HEAD = {"maml": "problems.zero_head:ZeroHeadUnrolled", "fomaml": "problems.zero_head:ZeroHeadUnrolled",
             "imaml": "problems.zero_head:ZeroHeadImplicit"}
META_SGD = "problems.meta_sgd:MetaSGDLower"
ZERO_HEAD_ANIL = "problems.zero_head:ZeroHeadANILImplicit"


def _engine(make_config, task, **overrides):
    """A float64 engine; sinusoid on a 1-16-1 regressor so dense references stay small."""
    settings = dict(inner_steps=3, meta_batch_size=2, inner_lr=0.05 if task == "sinusoid" else 0.4)
    settings.update(overrides)
    model = MLP(1, 1, hidden=(16,)) if task == "sinusoid" else None
    return build_engine(make_config(task=task, **settings), dtype=F64, model=model)


# ----------------------------------------------------------------------------- ANIL

@pytest.mark.device
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_anil_unrolled_meta_gradient_equals_plain_autograd(make_config, task, algo):
    engine = _engine(make_config, task, algo=algo, lower_problem=ANIL[algo])
    got, tasks = engine_meta_gradient(engine)
    model, kind, lr = engine.upper.module, engine.env.kind, engine.run_config.inner_lr
    head = head_names(model)
    reference = unrolled_general(model, tasks, 3, kind, lr, first_order=algo == "fomaml", adapted=head)
    assert relative_error(got, reference) < 1e-10
    # it is not MAML (every parameter adapted), and second order is really second order
    assert relative_error(unrolled_general(model, tasks, 3, kind, lr, first_order=algo == "fomaml"), reference) > 1e-3
    if algo == "maml":
        assert relative_error(unrolled_general(model, tasks, 3, kind, lr, first_order=True, adapted=head),
                              reference) > 1e-3


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_anil_unrolled_takes_inner_momentum_and_weight_decay(make_config, algo):
    engine = _engine(make_config, "sinusoid", algo=algo, lower_problem=ANIL[algo], inner_momentum=0.9,
                     inner_weight_decay=0.1)
    got, tasks = engine_meta_gradient(engine)
    model, kind, lr = engine.upper.module, engine.env.kind, engine.run_config.inner_lr
    options = dict(first_order=algo == "fomaml", adapted=head_names(model))
    reference = unrolled_general(model, tasks, 3, kind, lr, momentum=0.9, weight_decay=0.1, **options)
    assert relative_error(got, reference) < 1e-10
    assert relative_error(unrolled_general(model, tasks, 3, kind, lr, **options), reference) > 1e-3


def test_meta_sgd_refuses_inner_momentum(make_config):
    with pytest.raises(UsageError, match="inner-momentum"):
        _engine(make_config, "sinusoid", algo="maml", lower_problem=META_SGD, inner_momentum=0.9)


@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_anil_implicit_meta_gradient_equals_dense_implicit_reference(make_config, task):
    engine = _engine(make_config, task, algo="imaml", hypergrad="exact", lam=2.0, lower_problem=ANIL["imaml"])
    got, tasks = engine_meta_gradient(engine)
    model, cfg = engine.upper.module, engine.run_config
    reference = implicit_general(model, tasks, cfg.inner_lr, 3, cfg.lam, engine.env.kind, adapted=head_names(model))
    assert relative_error(got, reference) < 1e-8
    # the encoder's part is there (direct query loss and the cross term), not only the head's
    encoder = [g for (name, _), g in zip(model.named_parameters(), got) if name not in head_names(model)]
    assert torch.cat([g.reshape(-1) for g in encoder]).norm() > 1e-3


def test_anil_implicit_is_the_derivative_through_a_converged_inner_loop(make_config):
    """At a converged head, the implicit meta-gradient equals autograd through every one of
    the (many) proximal inner steps: no implicit-function algebra in the reference."""
    steps, lam, lr = 300, 1.0, 0.5
    engine = _engine(make_config, "glyphs", algo="imaml", hypergrad="exact", lam=lam, inner_lr=lr,
                     inner_steps=steps, meta_batch_size=1, lower_problem=ANIL["imaml"],
                     inner_tol=0.0)  # all the steps the reference takes
    got, tasks = engine_meta_gradient(engine)
    losses = engine.lower.inner_losses
    assert abs(losses[-1] - losses[-2]) < 1e-13  # precondition: the head's problem has converged
    model = engine.upper.module
    unrolled = unrolled_general(model, tasks, steps, "classification", lr, adapted=head_names(model), lam=lam)
    assert relative_error(got, unrolled) < 1e-6


@pytest.mark.parametrize("algo", ["maml", "fomaml", "imaml"])
def test_anil_inner_steps_leave_the_encoder_unchanged(make_config, algo):
    engine = _engine(make_config, "glyphs", algo=algo, lower_problem=ANIL[algo])
    model = engine.upper.module
    head = set(head_names(model))
    theta = {name: t.detach().clone() for name, t in model.named_parameters()}
    engine_meta_gradient(engine)  # a meta-training step: inner loops on every task of the batch
    for training in (True, False):
        if not training:
            engine.evaluate("test", 2)
        lower = engine.lower
        # the encoder runs with θ's own values; the head is the inner loop's ([1, ...]: one task)
        encoder = lower.encoder_tensors(0, support=True)
        assert all(torch.equal(encoder[name], theta[name]) for name in theta if name not in head)
        adapted = dict(zip(head_names(model), (p.detach()[0] for p in lower.trainable_parameters())))
        for name, value in adapted.items():
            assert not torch.equal(value, theta[name]), name  # the head did adapt
        x = engine.env.current.query_x  # the adapted model is θ's encoder + the adapted head
        expected = torch.func.functional_call(model, {**theta, **{n: adapted[n].detach() for n in head}}, (x,))
        with torch.no_grad():
            assert torch.allclose(lower(x), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- Meta-SGD

def _random_rates(engine, scale: float):
    """Per-entry rates in [0.1, 0.5]·scale, all different, so a per-tensor or scalar rate
    would not pass."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in engine.upper.inner_lrs:
            a.copy_(scale * (0.1 + 0.4 * torch.rand(a.shape, generator=gen, dtype=a.dtype)))


@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_meta_sgd_meta_gradient_equals_plain_autograd(make_config, task, algo):
    engine = _engine(make_config, task, algo=algo, lower_problem=META_SGD)
    _random_rates(engine, scale=0.1 if task == "sinusoid" else 1.0)  # the regressor's stable range
    got, tasks = engine_meta_gradient(engine)
    upper = engine.upper
    theta, rates = list(upper.module.parameters()), list(upper.inner_lrs)
    assert len(got) == len(theta) + len(rates)
    reference = unrolled_general(upper.module, tasks, 3, engine.env.kind, rates, wrt=theta + rates,
                                 first_order=algo == "fomaml")
    assert relative_error(got, reference) < 1e-10
    assert relative_error(got[len(theta):], reference[len(theta):]) < 1e-10  # the rates' part on its own


def test_meta_sgd_rates_are_meta_trained_and_checkpointed(make_config, tmp_path):
    config = make_config(task="sinusoid", lower_problem=META_SGD, meta_steps=3)
    engine = build_engine(config)
    upper = engine.upper
    rates = list(upper.inner_lrs)
    assert [r.shape for r in rates] == [p.shape for p in upper.module.parameters()]
    assert all(torch.all(r == config.inner_lr) for r in rates)  # they start at --inner-lr
    in_optimizer = {id(p) for group in upper.optimizer.param_groups for p in group["params"]}
    assert all(id(r) in in_optimizer for r in rates)
    before = [r.detach().clone() for r in rates]
    engine.run()
    assert all(not torch.equal(b, r) for b, r in zip(before, rates))  # every tensor moved
    assert all(upper.optimizer.state[r]["step"] == config.meta_steps for r in rates)  # Adam stepped them

    checkpoint.save(tmp_path / "c.pt", engine.state_dict())
    restored = build_engine(config)
    restored.load_state_dict(checkpoint.load(tmp_path / "c.pt"))
    assert all(torch.equal(a, b) for a, b in zip(restored.upper.inner_lrs, rates))
    saved, loaded = engine.upper.optimizer.state_dict(), restored.upper.optimizer.state_dict()
    assert all(torch.equal(saved["state"][k]["exp_avg"], loaded["state"][k]["exp_avg"]) for k in saved["state"])


def test_meta_sgd_resumed_run_equals_uninterrupted_run(tmp_path, data_root):
    common = ["--task", "sinusoid", "--algo", "maml", "--lower-problem", META_SGD, "--shots", "5",
              "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "2", "--inner-lr", "0.01",
              "--test-tasks", "4", "--val-tasks", "2", "--val-every", "2", "--data-root", data_root]
    whole = run_from_args(common + ["--meta-steps", "4", "--output-dir", str(tmp_path / "whole")])
    run_from_args(common + ["--meta-steps", "2", "--output-dir", str(tmp_path / "part")])
    resumed = run_from_args(["--resume", str(tmp_path / "part"), "--meta-steps", "4"])
    assert resumed["test"] == whole["test"]
    a, b = (checkpoint.load(tmp_path / d / "checkpoints" / "latest.pt")["upper"]["inner_lrs"] for d in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- zero-initialized head

@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_zero_head_unrolled_meta_gradient_equals_plain_autograd(make_config, algo):
    engine = _engine(make_config, "glyphs", algo=algo, lower_problem=ZERO_HEAD[algo])
    got, tasks = engine_meta_gradient(engine)
    model = engine.upper.module
    head = head_names(model)
    reference = unrolled_general(model, tasks, 3, "classification", engine.run_config.inner_lr,
                                 first_order=algo == "fomaml", zero_head=head)
    assert relative_error(got, reference) < 1e-10
    assert all(not g.any() for (name, _), g in zip(model.named_parameters(), got) if name in head)


@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_zero_head_implicit_meta_gradient_equals_dense_implicit_reference(make_config, task):
    engine = _engine(make_config, task, algo="imaml", hypergrad="exact", lam=20.0, lower_problem=ZERO_HEAD["imaml"],
                     channels=2)  # every parameter is adapted: keep the dense matrices small
    got, tasks = engine_meta_gradient(engine)
    model, cfg = engine.upper.module, engine.run_config
    reference = implicit_general(model, tasks, cfg.inner_lr, 3, cfg.lam, engine.env.kind, zero_head=head_names(model))
    assert relative_error(got, reference) < 1e-8


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_zero_head_meta_tests_at_another_number_of_ways(make_config, algo):
    engine = build_engine(make_config(task="glyphs", algo=algo, ways=3, test_ways=5, lower_problem=ZERO_HEAD[algo],
                                      meta_steps=2, test_tasks=3))
    model = engine.upper.module
    head = head_names(model)
    assert all(not model.get_parameter(n).any() for n in head)  # zero at meta-init
    widths = []
    forward = engine.lower.forward

    def recording_forward(x):
        out = forward(x)
        widths.append(out.shape[-1])
        return out

    engine.lower.forward = recording_forward
    result = engine.run()
    assert set(widths) == {3, 5}  # meta-trained at 3 ways, meta-tested at 5
    assert int(engine.env.current.support_y.max()) + 1 == 5  # the meta-test tasks really are 5-way
    assert result["test"]["num_tasks"] == 3 and 0.0 <= result["test"]["mean"] <= 1.0
    assert all(not model.get_parameter(n).any() for n in head)  # θ's head never gets a meta-gradient


def test_zero_head_test_ways_from_the_command_line(tmp_path, data_root):
    out = tmp_path / "run"
    run_from_args(["--task", "glyphs", "--algo", "fomaml", "--ways", "3", "--test-ways", "4", "--channels", "4",
                   "--query-shots", "2", "--meta-steps", "2", "--meta-batch-size", "2", "--inner-steps", "2",
                   "--test-inner-steps", "2", "--test-tasks", "4", "--val-every", "100", "--data-root", data_root,
                   "--lower-problem", ZERO_HEAD["fomaml"], "--output-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["ways"] == 3 and results["test_ways"] == 4 and results["test"]["num_tasks"] == 4
    # a checkpoint meta-tests at any number of ways afterwards
    again = run_from_args(["--eval-only", "true", "--checkpoint", str(out / "checkpoints" / "latest.pt"),
                           "--test-ways", "4", "--output-dir", str(tmp_path / "same")])
    assert again["test"] == results["test"]
    wider = run_from_args(["--eval-only", "true", "--checkpoint", str(out / "checkpoints" / "latest.pt"),
                           "--test-ways", "6", "--output-dir", str(tmp_path / "wider")])
    assert wider["test_ways"] == 6 and wider["test"]["num_tasks"] == 4


# ----------------------------------------------------------------------------- zero head, adapted alone (iMAML)

@pytest.mark.device
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_zero_head_anil_implicit_meta_gradient_equals_dense_implicit_reference(make_config, task):
    engine = _engine(make_config, task, algo="imaml", hypergrad="exact", lam=2.0, lower_problem=ZERO_HEAD_ANIL)
    got, tasks = engine_meta_gradient(engine)
    model, cfg = engine.upper.module, engine.run_config
    head = head_names(model)
    reference = implicit_general(model, tasks, cfg.inner_lr, 3, cfg.lam, engine.env.kind, adapted=head,
                                 zero_head=head)
    assert relative_error(got, reference) < 1e-8
    assert all(not g.any() for (name, _), g in zip(model.named_parameters(), got) if name in head)
    encoder = [g for (name, _), g in zip(model.named_parameters(), got) if name not in head]
    assert torch.cat([g.reshape(-1) for g in encoder]).norm() > 1e-3  # the encoder is what gets meta-learned
    # not the full-network zero head: the encoder is not adapted in the inner loop
    full = implicit_general(model, tasks, cfg.inner_lr, 3, cfg.lam, engine.env.kind, zero_head=head)
    assert relative_error(full, reference) > 1e-3


def test_zero_head_anil_inner_problem_is_strongly_convex_anywhere(make_config):
    """A = ∂²g/∂φ_h² ⪰ λI at any head (here a random one, far from the minimizer) with a ReLU
    encoder: the property that makes its solves well posed."""
    lam = 0.3
    engine = _engine(make_config, "glyphs", algo="imaml", lam=lam, lower_problem=ZERO_HEAD_ANIL)
    engine.env.step()
    engine.env.select(0)
    lower = engine.lower
    lower.begin_task()
    lower.on_inner_loop_start()  # the task's head, created at the start of its inner loop
    head = lower.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head:
            p.copy_(3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lower.training_step(lower.get_batch()), head,
                                                                  create_graph=True)])
    rows = [torch.autograd.grad(grad, head, e, retain_graph=True) for e in torch.eye(len(grad), dtype=grad.dtype)]
    hessian = torch.stack([torch.cat([part.reshape(-1) for part in row]) for row in rows])
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert float(eigenvalues.min()) >= lam - 1e-10
    assert float(eigenvalues.max()) > lam + 1e-3  # the loss's own curvature is there too


def test_zero_head_anil_hessian_free_converges_to_the_unrolled_meta_gradient(make_config):
    """Hessian-free inner steps reach φ_h* to 1e-11 in a few Newton steps, and the implicit
    meta-gradient there is autograd through 300 proximal SGD steps (no implicit algebra)."""
    lam, lr, steps = 1.0, 0.5, 300
    engine = _engine(make_config, "glyphs", algo="imaml", hypergrad="exact", lam=lam, inner_lr=1.0,
                     inner_steps=30, meta_batch_size=1, lower_problem=ZERO_HEAD_ANIL,
                     inner_optimizer="hessian-free", inner_cg_steps=20, inner_tol=1e-11)
    got, tasks = engine_meta_gradient(engine)
    assert float(engine.lower.stationarity()[0]) <= 1e-11
    assert int(engine.lower.inner.moves[0]) < 15
    model = engine.upper.module
    head = head_names(model)
    unrolled = unrolled_general(model, tasks, steps, "classification", lr, adapted=head, zero_head=head, lam=lam)
    assert relative_error(got, unrolled) < 1e-6


def test_validation_and_test_splits_need_only_the_test_ways(make_config, monkeypatch):
    """Meta-training at more ways than the validation split has classes (ProtoNet's wider training
    episodes): each split is checked at the ways it is sampled with."""
    from envs import build_task_sources, glyphs

    monkeypatch.setitem(glyphs.SPLITS, "val", (1200, 1204))  # a validation split of 4 classes
    sources = build_task_sources(make_config(task="glyphs", ways=6, test_ways=3))
    assert (sources["train"].ways, sources["val"].ways, sources["test"].ways) == (6, 3, 3)
    with pytest.raises(UsageError, match="--ways 6: the glyphs val split has only 4 classes"):
        build_task_sources(make_config(task="glyphs", ways=6))
