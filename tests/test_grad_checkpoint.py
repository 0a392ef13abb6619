"""--grad-checkpoint recomputes each inner step through the Lower problem's own hooks: for
MAML, every shipped extension and a user's own Lower problem, the meta-gradient equals the
one without checkpointing and plain autograd's (float64), and a run's results are the same.

(The plain paths are tied to independent references in test_meta_gradients.py and
test_extensions.py; tests/test_memory.py shows what checkpointing saves.)
"""

import json

import pytest
import torch
from torch import nn

from benchmarks.measure import SavedTensorPeak
from engines import build_engine
from imaml.app.cli import main, run_from_args
from imaml.errors import UsageError
from problems import UnrolledLower
from problems.head import head_names
from tests.reference import engine_meta_gradient, relative_error, unrolled_general

F64 = torch.float64
ANIL = "problems.anil:ANILUnrolled"
META_SGD = "problems.meta_sgd:MetaSGDLower"
ZERO_HEAD = "problems.zero_head:ZeroHeadUnrolled"
STEPS = 3


def _settings(task, **overrides):
    settings = dict(task=task, algo="maml", inner_steps=STEPS, meta_batch_size=2, execution="per-task",
                    inner_lr=0.05 if task == "sinusoid" else 0.4)
    return {**settings, **overrides}


def _random_rates(engine):
    """Meta-SGD: different rates for every entry (a scalar or per-tensor rate would not pass)."""
    gen = torch.Generator().manual_seed(0)
    scale = 0.1 if engine.env.kind == "regression" else 1.0
    with torch.no_grad():
        for a in engine.upper.inner_lrs:
            a.copy_(scale * (0.1 + 0.4 * torch.rand(a.shape, generator=gen, dtype=a.dtype)))


def _both(make_config, lower_cls=None, model=None, **settings):
    """The meta-gradient, tasks and engine of the same meta-step without and with checkpointing."""
    out = []
    for checkpointed in (False, True):
        engine = build_engine(make_config(grad_checkpoint=checkpointed, **settings), dtype=F64,
                              lower_cls=lower_cls, model=model() if model else None)
        if settings.get("lower_problem") == META_SGD:
            _random_rates(engine)
        grads, tasks = engine_meta_gradient(engine)
        out.append((grads, tasks, engine))
    (plain, tasks, _), (got, same_tasks, engine) = out
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, same_tasks))
    return plain, got, tasks, engine


def _reference(engine, tasks, lower, **options):
    """Plain autograd through the inner steps the Lower problem ``lower`` takes."""
    upper, kind, lr = engine.upper, engine.env.kind, engine.run_config.inner_lr
    model = upper.module
    if lower == ANIL:
        options["adapted"] = head_names(model)
    if lower == ZERO_HEAD:
        options["zero_head"] = head_names(model)
    if lower == META_SGD:
        rates = list(upper.inner_lrs)
        return unrolled_general(model, tasks, STEPS, kind, rates, wrt=list(model.parameters()) + rates, **options)
    return unrolled_general(model, tasks, STEPS, kind, lr, **options)


CASES = [(None, "per-task"), (None, "vectorized"), (ANIL, "per-task"), (META_SGD, "per-task"),
         (ZERO_HEAD, "per-task")]  # the extensions are never task-vectorized (engines.build.use_vectorized)


@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
@pytest.mark.parametrize("lower,execution", CASES, ids=["maml", "maml-vectorized", "anil", "meta-sgd", "zero-head"])
def test_checkpointed_meta_gradient_equals_plain_and_autograd(make_config, task, lower, execution):
    plain, got, tasks, engine = _both(make_config, **_settings(task, lower_problem=lower, execution=execution))
    assert engine.vectorized == (execution == "vectorized")
    reference = _reference(engine, tasks, lower)
    assert relative_error(plain, reference) < 1e-9
    assert relative_error(got, plain) < 1e-9
    assert relative_error(got, reference) < 1e-9
    if lower == META_SGD:  # the learned rates get their own meta-gradient, the same one
        theta = len(list(engine.upper.module.parameters()))
        rates = got[theta:]
        assert len(rates) == theta and torch.cat([g.reshape(-1) for g in rates]).norm() > 1e-6
        assert relative_error(rates, reference[theta:]) < 1e-9


@pytest.mark.parametrize("lower,execution", [(None, "per-task"), (None, "vectorized"), (ANIL, "per-task")],
                         ids=["maml", "maml-vectorized", "anil"])
def test_checkpointed_inner_momentum_and_weight_decay(make_config, lower, execution):
    """The momentum buffers are carried through the recomputed steps like φ."""
    plain, got, tasks, engine = _both(make_config, **_settings("sinusoid", lower_problem=lower, execution=execution,
                                                               inner_momentum=0.9, inner_weight_decay=0.1))
    reference = _reference(engine, tasks, lower, momentum=0.9, weight_decay=0.1)
    assert relative_error(got, reference) < 1e-9 and relative_error(got, plain) < 1e-9
    assert relative_error(_reference(engine, tasks, lower), reference) > 1e-3  # momentum matters here


@pytest.mark.parametrize("execution", ["per-task", "vectorized"])
def test_checkpointed_meta_steps_free_what_they_held(make_config, execution):
    """After each meta-step no autograd graph is left: the recomputed steps' inputs and their
    gradients do not keep each other alive."""
    engine = build_engine(make_config(**_settings("glyphs", execution=execution, grad_checkpoint=True,
                                                  inner_momentum=0.5)))
    engine.train()
    with SavedTensorPeak() as saved:
        for _ in range(2):
            engine.train_step()
            assert saved.live == 0 < saved.peak


class ProximalUnrolled(UnrolledLower):
    """A user's own Lower problem: unrolled MAML on L_support(φ) + λ/2‖φ − θ‖², whose inner
    objective reads θ itself at every step (not only through φ₀)."""

    lam = 0.5

    def training_step(self, batch):
        theta = self.meta_problem.initial_parameters()
        proximal = sum((phi - t).pow(2).sum() for phi, t in zip(self.params, theta))
        return super().training_step(batch) + 0.5 * self.lam * proximal


def test_a_users_lower_problem_reading_theta_in_its_steps(make_config):
    plain, got, tasks, engine = _both(make_config, lower_cls=ProximalUnrolled, **_settings("sinusoid"))
    reference = _reference(engine, tasks, None, lam=ProximalUnrolled.lam)
    assert relative_error(got, reference) < 1e-9 and relative_error(got, plain) < 1e-9


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same θ₀ for both runs
        self.net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def test_recomputed_steps_draw_the_same_dropout_masks(make_config):
    plain, got, _, engine = _both(make_config, model=lambda: DropoutMLP().to(F64), **_settings("sinusoid"))
    assert engine.lower.module.training  # dropout is on in the inner loop
    assert relative_error(got, plain) < 1e-9


def test_recomputed_steps_keep_batchnorm_statistics_as_they_were(make_config):
    """Inductive BatchNorm: the running statistics a meta-step leaves are those of one pass
    through each step, not two."""
    settings = _settings("glyphs", bn_mode="inductive")
    plain, got, _, checkpointed = _both(make_config, **settings)
    assert relative_error(got, plain) < 1e-9
    start = build_engine(make_config(**settings), dtype=F64)
    stepped = build_engine(make_config(**settings), dtype=F64)
    engine_meta_gradient(stepped)  # without checkpointing

    def stats(engine):
        return [b for b in engine.upper.module.buffers() if b.is_floating_point()]

    assert not all(torch.equal(a, b) for a, b in zip(stats(stepped), stats(start)))  # they moved
    assert all(torch.equal(a, b) for a, b in zip(stats(stepped), stats(checkpointed)))


class NotRecomputable(UnrolledLower):
    """A Lower problem that keeps state across inner steps where checkpointing cannot see it."""

    recomputable = False


def test_a_lower_problem_that_cannot_be_recomputed_is_refused(make_config, tmp_path, capsys):
    with pytest.raises(UsageError, match="--grad-checkpoint: the Lower problem .*NotRecomputable"):
        build_engine(make_config(grad_checkpoint=True), lower_cls=NotRecomputable)
    build_engine(make_config(), lower_cls=NotRecomputable)  # without the flag it runs
    code = main(["--task", "sinusoid", "--algo", "maml", "--grad-checkpoint", "true", "--output-dir", str(tmp_path / "out"),
                 "--lower-problem", "tests.test_grad_checkpoint:NotRecomputable"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "recomputable = False" in err, err
    out = tmp_path / "out"  # stopped while building the engine: nothing trained, logged or saved
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # nothing written


@pytest.mark.parametrize("lower", [META_SGD, ANIL])
def test_a_run_gives_the_same_results_with_and_without_checkpointing(tmp_path, data_root, lower):
    common = ["--task", "sinusoid", "--algo", "maml", "--lower-problem", lower, "--meta-steps", "3",
              "--meta-batch-size", "2", "--inner-steps", "2", "--test-inner-steps", "2", "--test-tasks", "5",
              "--val-every", "2", "--val-tasks", "2", "--processes", "1", "--data-root", data_root]
    plain = run_from_args(common + ["--output-dir", str(tmp_path / "plain")])
    checkpointed = run_from_args(common + ["--grad-checkpoint", "true", "--output-dir", str(tmp_path / "gc")])
    written = json.loads((tmp_path / "gc" / "results.json").read_text())
    assert written["config"]["grad_checkpoint"] is True
    assert checkpointed["test"] == written["test"]
    if lower == META_SGD:
        assert checkpointed["test"] == plain["test"]
    else:  # the head's steps read the encoder through features computed once per inner loop: the
        # recomputed steps add their gradients into those in another order (float32 rounding)
        for key, value in plain["test"].items():
            assert checkpointed["test"][key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), key
