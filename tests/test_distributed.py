"""Meta-training across processes (engines/distributed.py): two CPU processes with gloo, set
up exactly as torchrun sets up its workers, must compute what one process computes.

One spawn of two workers runs every scenario (process start-up dominates the cost); the
single-process references run here, in the test process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engines import build_engine, distributed
from imaml.app.cli import main, run_from_args
from imaml.config import RunConfig
from imaml.errors import RunStopped, UsageError
from imaml.app.output_lock import OutputLock
from tests.reference import relative_error

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
WORLD = 2
META_STEPS = 3
# (task, algo, meta-batch size, Lower problem): 3 tasks over 2 processes is the uneven split (2 + 1);
# the last one is the Omniglot iMAML preset's Lower problem
SCENARIOS = [("sinusoid", "maml", 4, None), ("sinusoid", "imaml", 3, None), ("glyphs", "maml", 3, None),
             ("glyphs", "imaml", 4, None), ("glyphs", "imaml", 3, "problems.zero_head:ZeroHeadANILImplicit")]


def _meta_train(config: RunConfig) -> dict:
    """θ₀'s meta-test, META_STEPS meta-steps (capturing each averaged meta-gradient as the
    optimizer sees it, i.e. after any all-reduce), θ, and the meta-test of θ; float64."""
    engine = build_engine(config, dtype=F64)
    before = engine.evaluate("test", config.test_tasks)
    grads = []
    apply = engine.upper.optimizer.step

    def capture(*args, **kwargs):
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()  # a zero head: None
                      for p in engine.upper.trainable_parameters()])
        return apply(*args, **kwargs)

    engine.upper.optimizer.step = capture
    engine.train()
    for step in range(1, META_STEPS + 1):
        engine.global_step = step
        engine.train_step()
    theta = [p.detach().clone() for p in engine.upper.trainable_parameters()]
    return {"before": before, "after": engine.evaluate("test", config.test_tasks), "grads": grads,
            "theta": theta, "record": engine._train_record()}


def _diverge(config: RunConfig) -> str:
    """The message of the first meta-step with an inner learning rate that blows up every task."""
    engine = build_engine(dataclasses.replace(config, inner_lr=1e6))
    engine.train()
    engine.global_step = 1
    with pytest.raises(RunStopped) as stop:
        engine.train_step()
    return str(stop.value)


def _cli_args(data_root: str, out: Path, meta_steps: int) -> list:
    return ["--task", "glyphs", "--algo", "imaml", "--ways", "3", "--channels", "4", "--query-shots", "2",
            "--meta-batch-size", "3", "--inner-steps", "2", "--test-inner-steps", "2", "--test-tasks", "5",
            "--val-tasks", "3", "--val-every", "2", "--log-every", "1", "--meta-steps", str(meta_steps),
            "--data-root", data_root, "--output-dir", str(out)]


def _worker(rank: int, port: int, configs: list, data_root: str, cli_out: str, results: str) -> None:
    """One process of a 2-process job, with the environment torchrun gives its workers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    writes = []  # files this process creates, renames or opens for writing under the run directory

    def audit(event, args):
        if event in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove") and args and \
                str(args[0]).startswith(cli_out) and (event != "open" or (args[1] or "r") != "r"):
            writes.append((event, str(args[0])))

    sys.addaudithook(audit)
    out = {}
    with distributed.process_group(configs[0]):
        out["world_size"] = distributed.world_size()
        out["engine"] = [_meta_train(config) for config in configs]
        out["diverged"] = _diverge(configs[0])
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            run_from_args(_cli_args(data_root, Path(cli_out), 2))
            out["cli"] = run_from_args(["--resume", cli_out, "--meta-steps", "3"])
            out["usage_code"] = main(["--resume", cli_out, "--meta-batch-size", "1"])  # 1 task, 2 processes
            held = Path(results) / "held"  # another run's folder: rank 0 cannot lock it, no rank starts
            blocker = OutputLock(held).acquire() if rank == 0 else None
            out["held_code"] = main(_cli_args(data_root, held, 1))
            if blocker:
                blocker.release()
        out["stdout"] = stdout.getvalue()
    out["writes"] = writes
    torch.save(out, Path(results) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory, data_root):
    """Run the two workers once; return (their outputs by rank, the configs, the CLI dir)."""
    tmp = tmp_path_factory.mktemp("dist")
    images = {"ways": 3, "shots": 2, "query_shots": 2, "inner_lr": 0.1}
    points = {"ways": None, "shots": 5, "query_shots": 5, "inner_lr": 0.01}
    configs = [RunConfig(task=task, algo=algo, **(images if task == "glyphs" else points), channels=4,
                         meta_batch_size=batch, meta_steps=META_STEPS, inner_steps=2, test_inner_steps=2,
                         meta_lr=0.01, test_tasks=5, data_root=data_root, output_dir=str(tmp / "unused"),
                         execution="per-task", lower_problem=lower).validate()  # as the sharded processes run
               for task, algo, batch, lower in SCENARIOS]
    cli_out = str(tmp / "cli")
    (tmp / "held").mkdir()
    context = mp.spawn(_worker, args=(_free_port(), configs, data_root, cli_out, str(tmp)), nprocs=WORLD,
                       join=False)
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process job did not finish in 300 s (a collective waiting forever?)")
    outputs = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return outputs, configs, Path(cli_out)


@pytest.fixture(scope="module")
def singles(job):
    """The same scenarios in this (single) process, single-threaded like the workers (module
    fixtures run before the autouse one that sets this): the references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [_meta_train(config) for config in job[1]]
    finally:
        torch.set_num_threads(threads)


def test_two_processes_equal_one_process_meta_training(job, singles):
    outputs, configs, _ = job
    assert [o["world_size"] for o in outputs] == [WORLD, WORLD]
    for index, (config, single) in enumerate(zip(configs, singles)):
        name = SCENARIOS[index]
        for rank_output in outputs:
            shared = rank_output["engine"][index]
            assert len(shared["grads"]) == META_STEPS
            for step, (got, want) in enumerate(zip(shared["grads"], single["grads"])):
                assert relative_error(got, want) < 1e-10, (name, step)  # the mean over all tasks, not a part
            # looser for θ only because Adam (eps 1e-8) turns the rounding noise in the conv biases'
            # meta-gradients (zero: BatchNorm follows) into ~1e-7 steps; a lost or misweighted
            # task moves θ by ~meta_lr per step
            assert relative_error(shared["theta"], single["theta"]) < 1e-5, name
        # meta-training really moved θ, so the equality above says something
        theta0 = build_engine(config, dtype=F64).upper.trainable_parameters()
        assert relative_error(single["theta"], theta0) > 1e-4, name


def test_processes_agree_on_a_divergence(job):
    outputs, configs, _ = job
    single = _diverge(configs[0])
    assert "diverged at meta-step 1, task 0 of the meta-batch" in single
    # rank 1 adapted tasks 1 and 3 only: it reports task 0 because the processes agree
    assert outputs[0]["diverged"] == outputs[1]["diverged"] == single


def test_sharded_evaluation_equals_one_process_evaluation(job, singles):
    outputs, configs, _ = job
    for index, (config, single) in enumerate(zip(configs, singles)):
        for rank_output in outputs:
            shared = rank_output["engine"][index]
            assert shared["before"] == single["before"], SCENARIOS[index]  # same tasks, same order: exact
            assert shared["after"]["num_tasks"] == config.test_tasks
            for key in ("mean", "ci95"):
                assert shared["after"][key] == pytest.approx(single["after"][key], rel=1e-10)
            # the logged training statistics are over all tasks of the meta-batch too
            for key, value in single["record"].items():
                assert shared["record"][key] == pytest.approx(value, rel=1e-8), key


@pytest.fixture(scope="module")
def single_cli(data_root, tmp_path_factory):
    """The CLI run that a job's ``_cli_args`` runs, in one single-thread process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_from_args(_cli_args(data_root, tmp_path_factory.mktemp("single") / "out", 3))
    finally:
        torch.set_num_threads(threads)


def _same_results(result: dict, single: dict) -> None:
    for phase in ("test", "before_meta_training", "validation"):
        for key in ("mean", "ci95"):
            assert result[phase][key] == pytest.approx(single[phase][key], rel=1e-5), (phase, key)


def test_only_rank_zero_writes_and_prints_and_resume_works(job, single_cli):
    outputs, _, cli_out = job
    rank0, rank1 = outputs
    assert rank1["writes"] == [] and rank1["stdout"] == ""
    assert any(path.endswith("metrics.jsonl") for _, path in rank0["writes"])  # the audit does see writes
    assert "2 processes" in rank0["stdout"]
    assert sorted(p.name for p in cli_out.iterdir()) == ["checkpoints", "config.json", "inner_curves.jsonl",
                                                        "metrics.jsonl", "plots", "results.json"]
    # resumed 2-process run == one process running all 3 meta-steps in one go
    written = json.loads((cli_out / "results.json").read_text())
    assert written["processes"] == WORLD
    for result in (written, rank0["cli"], rank1["cli"]):
        _same_results(result, single_cli)
    steps = [json.loads(line) for line in (cli_out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # a bad launch is a one-line usage error with exit status 2 in every process
    assert rank0["usage_code"] == rank1["usage_code"] == 2
    # so is an output folder that another run holds: rank 0 finds it taken and no process waits for it
    assert rank0["held_code"] == rank1["held_code"] == 2
    assert [p.name for p in (cli_out.parent / "held").iterdir()] == []


def test_two_nodes_by_torchrun_equal_one_process(data_root, tmp_path, single_cli):
    """docs/distributed.md's multi-node recipe on this machine: two torchrun launchers, one
    process each, meeting through c10d rendezvous, with every connection on 127.0.0.1."""
    out = tmp_path / "nodes"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes",
               "--local-addr", "127.0.0.1", str(ROOT / "run.py"), *_cli_args(data_root, out, 3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]  # a guard against a hang only
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs
    written = json.loads((out / "results.json").read_text())
    assert written["processes"] == 2
    _same_results(written, single_cli)
    assert not (out / ".lock").exists()


def test_bad_setups_are_usage_errors(make_config, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    for config, message in [
        (make_config(meta_batch_size=2), "--meta-batch-size 2 with 3 processes"),
        (make_config(meta_batch_size=4, dist_backend="nccl"), "--dist-backend nccl needs GPUs"),
        (make_config(meta_batch_size=4, device="cuda:1"), "pass --device cuda"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            with distributed.process_group(config):
                pass
