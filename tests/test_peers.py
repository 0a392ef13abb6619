"""studies/peers: learn2learn's MAML and TorchOpt's iMAML on run.py's tasks, network and flags.

The TorchOpt tests run only where ``torchopt`` imports (its own venv: bash
studies/peers/setup_torchopt.sh, then ``.venv-peers/bin/python -m pytest tests/test_peers.py``).
"""

import json

import pytest
import torch

from studies import compare
from studies.peers import common
from studies.peers.l2l_maml import L2LMAML
from engines import build_engine
from tests.reference import engine_meta_gradient, relative_error

F64 = torch.float64
TINY = ["--ways", "3", "--channels", "4", "--query-shots", "2", "--meta-steps", "2", "--meta-batch-size", "2",
        "--inner-steps", "1", "--test-inner-steps", "2", "--test-tasks", "5", "--val-tasks", "2", "--val-every", "2",
        "--processes", "1"]


def _config(peer, tmp_path, data_root, *flags):
    return common.load_config(["--data-root", data_root, "--output-dir", str(tmp_path / "peer"), *flags], peer)


class Recorder(L2LMAML):
    """The l2l peer, keeping every task it is asked to predict and every meta-batch it trains on."""

    def __init__(self, setup):
        super().__init__(setup)
        self.predicted, self.trained = [], []

    def predict(self, task):
        self.predicted.append(task)
        return super().predict(task)

    def meta_gradient(self, batch):
        self.trained.append(batch)
        return super().meta_gradient(batch)


def _tensors(task):
    return [task.support_x, task.support_y, task.query_x, task.query_y]


@pytest.mark.parametrize("task", ["glyphs", "sinusoid"])
def test_the_peer_runs_on_run_pys_tasks_and_theta(tmp_path, data_root, task):
    flags = ["--task", task, *TINY, "--test-query-shots", "3", "--meta-batch-size", "3"]
    if task == "sinusoid":
        flags += ["--ways", "none", "--shots", "5", "--query-shots", "4"]
    config = _config(L2LMAML, tmp_path, data_root, *flags)
    engine = build_engine(config)
    peer = Recorder(common.build(config))
    for ours, theirs in zip(engine.upper.module.state_dict().values(), peer.setup.model.state_dict().values()):
        assert torch.equal(ours, theirs)  # θ₀
    seen = []  # the meta-test tasks the engine adapts to, as it loads them
    load = engine.env.load
    engine.env.load = lambda batch: seen.append(batch) or load(batch)
    engine.evaluate("test", config.test_tasks)
    theirs = common.evaluate(peer, "test", config.test_tasks)
    ours = [batch.task(i) for batch in seen for i in range(batch.num_tasks)]
    assert len(ours) == len(peer.predicted) == config.test_tasks == theirs["num_tasks"]
    assert ours[0].query_x.shape[0] == 3 * (config.ways or 1)  # --test-query-shots reached the tasks
    for a, b in zip(ours, peer.predicted):
        assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))
    batches = [engine.env.step() for _ in range(config.meta_steps)]  # what each engine meta-step starts with
    common.meta_train(peer)
    assert len(peer.trained) == config.meta_steps
    for a, b in zip(batches, peer.trained):
        assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


def test_the_l2l_peers_meta_gradient_is_the_engines_second_order_maml(tmp_path, data_root):
    config = _config(L2LMAML, tmp_path, data_root, "--task", "glyphs", *TINY, "--inner-steps", "2", "--inner-lr", "0.3")
    engine = build_engine(config, dtype=F64)
    ours, _ = engine_meta_gradient(engine)
    peer = L2LMAML(common.PeerSetup(config, engine.env, engine.upper.module))
    theta = list(engine.upper.module.parameters())
    for p in theta:
        p.grad = None
    peer.meta_gradient(engine.env.batch)
    theirs = [p.grad for p in theta]
    # second order: test_meta_gradients checks that this differs from the first-order gradient
    assert relative_error(theirs, ours) < 1e-10


def test_the_l2l_row_beside_maml_in_compare(tmp_path, data_root):
    out = tmp_path / "cmp"
    flags = [*TINY, "--data-root", data_root, "--execution", "per-task"]
    assert compare.main(["--task", "glyphs", "--out", str(out), "--methods", "maml", "l2l-maml", "--seeds", "0",
                         "--", *flags]) == 0
    table = (out / "comparison.md").read_text()
    assert "| MAML | 1 |" in table and "| learn2learn MAML | 1 |" in table
    maml, peer = (json.loads((out / m / "seed-0" / "results.json").read_text()) for m in ("maml", "l2l-maml"))
    assert peer["peer"] == "learn2learn 0.2.0" and peer["algo"] == "maml"
    assert peer["config"]["inner_lr"] == maml["config"]["inner_lr"] == 0.4  # the MAML preset, for both
    assert peer["protocol"] == maml["protocol"]
    for key in ("tasks_per_second", "train_seconds", "total_seconds"):
        assert peer[key] > 0
    # θ₀, its adaptation and its scoring on the same tasks: the same score, task by task
    assert peer["before_meta_training"]["scores"] == maml["before_meta_training"]["scores"]
    assert len(peer["test"]["scores"]) == len(maml["test"]["scores"]) == 5
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert rows["l2l-maml"]["difference"]["tasks"] == 5
    assert compare.main(["--task", "glyphs", "--out", str(out), "--methods", "maml", "l2l-maml", "--seeds", "0",
                         "--table-only"]) == 0


def test_compare_names_the_setup_script_when_the_torchopt_venv_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(compare.PEERS, "torchopt-imaml", (*compare.PEERS["torchopt-imaml"][:3], "no/such/python", ()))
    with pytest.raises(SystemExit, match="bash studies/peers/setup_torchopt.sh"):
        compare.main(["--out", str(tmp_path), "--methods", "maml", "torchopt-imaml", "--seeds", "0"])
    assert not (tmp_path / "maml").exists()  # refused before any run


def test_the_peers_refuse_what_they_do_not_run(tmp_path, data_root):
    from imaml.errors import UsageError

    with pytest.raises(UsageError, match="--adapt"):
        _config(L2LMAML, tmp_path, data_root, "--task", "glyphs", "--adapt", "head")
    with pytest.raises(UsageError, match="--algo imaml"):
        _config(L2LMAML, tmp_path, data_root, "--task", "glyphs", "--algo", "imaml")


def _torchopt():
    return pytest.importorskip("torchopt", reason="TorchOpt lives in its own venv (bash "
                                                  "studies/peers/setup_torchopt.sh); CI does not have it")


def test_the_torchopt_peers_meta_gradient_is_the_exact_implicit_one(tmp_path, data_root):
    _torchopt()
    from torch.func import functional_call

    from studies.peers.torchopt_imaml import TorchOptIMAML
    from imaml.metrics import task_loss
    from imaml.models import MLP
    from tests.reference import proximal_adapt

    lam, lr, steps = 10.0, 0.01, 400  # lr < 2/(λ + λ_max(H)): proximal GD converges linearly (SiLU: smooth)
    config = _config(TorchOptIMAML, tmp_path, data_root, "--task", "sinusoid", "--ways", "none", "--shots", "5",
                     "--query-shots", "5", "--meta-batch-size", "2", "--lam", str(lam), "--inner-lr", str(lr),
                     "--inner-steps", str(steps), "--inner-tol", "0", "--hypergrad", "exact", "--execution", "per-task",
                     "--activation", "silu", "--cg-steps", "500", "--cg-tol", "1e-12")
    engine = build_engine(config, dtype=F64)
    for problem in (engine.upper, engine.lower):  # a 1-16-1 regressor: the exact solve is dense
        problem.module.net = MLP(1, 1, hidden=(16,), activation="silu").to(F64).net
    engine.upper.optimizer = torch.optim.Adam(engine.upper.module.parameters(), lr=1e-3)
    engine.lower.optimizer = torch.optim.SGD(engine.lower.module.parameters(), lr=lr)
    ours, tasks = engine_meta_gradient(engine)
    model = engine.upper.module
    names, theta = zip(*model.named_parameters())
    for task in tasks:  # the precondition: every task's inner loop reached a stationary point
        phi = proximal_adapt(model, task, lr, steps, lam, "regression")
        g = task_loss("regression", functional_call(model, dict(zip(names, phi)), (task.support_x,)), task.support_y)
        g = g + 0.5 * lam * sum((p - t).pow(2).sum() for p, t in zip(phi, theta))
        assert torch.cat([d.reshape(-1) for d in torch.autograd.grad(g, phi)]).norm() < 1e-10
    peer = TorchOptIMAML(common.PeerSetup(config, engine.env, model))
    for p in theta:
        p.grad = None
    peer.meta_gradient(engine.env.batch)
    assert relative_error([p.grad for p in theta], ours) < 1e-8


def test_the_torchopt_peer_scores_theta0_as_run_py_does(tmp_path, data_root):
    _torchopt()
    from studies.peers.torchopt_imaml import TorchOptIMAML

    config = _config(TorchOptIMAML, tmp_path, data_root, "--task", "glyphs", *TINY, "--inner-tol", "0",
                     "--execution", "per-task", "--test-inner-steps", "3")
    engine = build_engine(config)
    peer = TorchOptIMAML(common.build(config))
    ours = engine.evaluate("test", config.test_tasks)["scores"]
    assert common.evaluate(peer, "test", config.test_tasks)["scores"] == ours


def test_a_peer_stops_at_the_time_budget_as_run_py_does(tmp_path, data_root, monkeypatch):
    """On a clock that ticks one second per reading, a budget of 2.5 s stops after meta-step 3,
    which is validated and logged with its seconds; --test-also-at 1.5 meta-tests θ after step 2."""
    clock = iter(float(t) for t in range(1, 10_000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    config = _config(L2LMAML, tmp_path, data_root, "--task", "glyphs", *TINY, "--meta-steps", "50", "--time-budget",
                     "2.5", "--val-every", "100", "--log-every", "100", "--test-also-at", "1.5")
    peer = Recorder(common.build(config))
    logged = []
    out = common.meta_train(peer, lambda step, record: logged.append((step, record)))
    assert out["meta_steps_done"] == 3 and len(peer.trained) == 3 and out["train_seconds"] == 3.0
    assert [step for step, _ in logged] == [3] and logged[0][1]["sys/meta_training_seconds"] == 3.0
    assert out["best_validation"]["step"] == 3
    early = out["test_also_at"]
    assert (early["meta_steps_done"], early["train_seconds"]) == (2, 2.0)
    assert early["test"]["num_tasks"] == config.test_tasks and len(peer.trained) == 3
