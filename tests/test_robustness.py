"""Never lose a run: bad input, divergence, interruption, killed checkpoint writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml import checkpoint
from imaml.app.cli import main

ROOT = Path(__file__).resolve().parents[1]

YAML_CASES = [
    ("inner_lr: fast\n", "'inner_lr' must be float, got 'fast'"),
    ("meta_steps: 2.5\n", "'meta_steps' must be an integer, got 2.5"),
    ("algo: reptile\n", "--algo reptile: unknown value; choose one of imaml, maml, fomaml"),
    ("- just\n- a list\n", "expected a mapping of option: value"),
    ("ways: [unclosed\n", "not valid YAML"),
    ("cg_trust_region: maybe\n", "'cg_trust_region' must be true or false"),
    ("meta_batch_size: 0\n", "--meta-batch-size 0: must be an integer >= 1"),
    ("on_divergence: ignore\n", "--on-divergence ignore: unknown value; choose one of stop, skip"),
]


@pytest.mark.parametrize("text,message", YAML_CASES, ids=[m[:24] for _, m in YAML_CASES])
def test_bad_yaml_presets_stop_with_one_line(tmp_path, capsys, text, message):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    code = main(["--config", str(preset), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def _glyph_args(data_root, out, *extra):
    return ["--task", "glyphs", "--ways", "3", "--channels", "4", "--query-shots", "2", "--meta-batch-size", "2",
            "--inner-steps", "2", "--test-inner-steps", "2", "--test-tasks", "4", "--val-tasks", "2",
            "--val-every", "100", "--data-root", data_root, "--output-dir", str(out), *extra]


@pytest.mark.parametrize("execution", ["per-task", "vectorized"])
@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_divergence_stops_with_a_message_and_a_loadable_checkpoint(tmp_path, data_root, capsys, algo, execution):
    # iMAML: the built-in Lower problem with plain SGD (the preset's line search would not diverge)
    plain = ["--lower-problem", "none", "--inner-optimizer", "sgd"] if algo == "imaml" else []
    code = main(_glyph_args(data_root, tmp_path / "out", "--algo", algo, "--inner-lr", "1e6", "--meta-steps", "5",
                            "--execution", execution, *plain))
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "diverged at meta-step 1, task 0" in err and "--inner-lr" in err and "Traceback" not in err
    state = checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")
    assert state["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["upper"]["module"].values())


def test_divergence_skip_keeps_theta_and_finishes(tmp_path, data_root, capsys):
    code = main(_glyph_args(data_root, tmp_path / "out", "--algo", "maml", "--inner-lr", "1e6",
                            "--meta-steps", "3", "--on-divergence", "skip", "--log-every", "3"))
    assert code == 0
    assert capsys.readouterr().out.count("meta-batch skipped") == 3
    import json

    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train/skipped_meta_batches"] == 3


def test_meta_gradient_clipping_bounds_the_update(make_config):
    from engines import build_engine

    engine = build_engine(make_config(task="glyphs", algo="maml", meta_grad_clip=1e-3, meta_lr=0.1))

    before = [p.detach().clone() for p in engine.upper.module.parameters()]
    seen = {}
    step = engine.upper.optimizer.step

    def capture(*args, **kwargs):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.upper.module.parameters()]))
        return step(*args, **kwargs)

    engine.upper.optimizer.step = capture
    engine.train_step()
    assert seen["norm"] <= 1e-3 * (1 + 1e-5) < engine.upper.meta_grad_norm
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.upper.module.parameters()))


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, data_root):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(ROOT / "run.py"), "--task", "sinusoid", "--algo", "maml", "--meta-steps", "100000",
            "--test-tasks", "4", "--val-every", "100000", "--log-every", "5", "--output-dir", str(out)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM after meta-step" in err and "--resume" in err and "Traceback" not in err
    state = checkpoint.load(out / "checkpoints" / "latest.pt")
    assert state["step"] >= 5
    code = main(["--resume", str(out), "--meta-steps", str(state["step"] + 2)])
    assert code == 0 and checkpoint.load(out / "checkpoints" / "latest.pt")["step"] == state["step"] + 2


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from imaml import checkpoint
i = 0
while True:
    i += 1
    checkpoint.save({path!r}, {{"step": i, "weights": torch.full((2_000_000,), float(i))}})
    print(i, flush=True)
"""


def test_sigkill_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    script = WRITER.format(root=str(ROOT), path=str(path))
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = checkpoint.load(path)
        assert state["step"] >= 1 and bool((state["weights"] == state["step"]).all())  # whole and consistent
