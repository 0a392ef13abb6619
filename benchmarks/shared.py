"""What the benchmarks share: the engine and the reference loops built on the same synthetic
tasks, θ₀ and task stream, and one meta-step of each in this process.

Every benchmark builds its implementations here, through the project's public API
(``engines.build_engine`` with the synthetic ``sources``; no registry patched), so they
compare the same runs.
"""

from __future__ import annotations

import torch

from benchmarks.measure import StepWorker, serve_steps
from benchmarks.synthetic import SHAPES, synthetic_source

__all__ = ["engine_config", "build_benchmark_engine", "build_reference", "InProcess", "EngineProcesses",
           "serve_engine_worker", "Skipped"]


def engine_config(spec: dict, execution: str = "auto"):
    """The engine's ``RunConfig`` for benchmark size ``spec`` (CG without trust region, and a
    tolerance it cannot reach, so it does every one of its ``cg_steps``)."""
    from imaml.config import RunConfig

    return RunConfig(
        task=f"synthetic-{spec['shape']}", algo=spec["algo"], ways=spec["ways"], shots=spec["shots"],
        query_shots=spec["query_shots"], channels=SHAPES[spec["shape"]].channels,
        meta_batch_size=spec["meta_batch_size"], inner_steps=spec["inner_steps"], inner_lr=spec["inner_lr"],
        meta_lr=spec["meta_lr"], lam=spec["lam"], hypergrad="cg", cg_steps=spec["cg_steps"], cg_tol=1e-30,
        cg_trust_region=False, device=spec["device"], seed=spec["seed"], execution=execution,
        grad_checkpoint=spec.get("grad_checkpoint", False), processes=spec.get("processes", 0),
        lower_problem=spec.get("lower_problem"), adapt=spec.get("adapt", "all"),
        head_init=spec.get("head_init", "theta"),
    ).validate()


def build_benchmark_engine(spec: dict, execution: str = "auto", **kwargs):
    """The engine on the synthetic tasks of ``spec`` (``kwargs``: more of ``build_engine``'s)."""
    from engines import build_engine

    config = engine_config(spec, execution)
    source = synthetic_source(spec["shape"], config.ways, config.shots, config.query_shots, config.seed)
    return build_engine(config, sources={split: source for split in ("train", "val", "test")}, **kwargs)


def build_reference(loop_class, spec: dict, prepare_model=lambda model: model):
    """A reference meta-learner (``loop_class``: BettyReference, PlainLoop or a variant) on the
    synthetic tasks of ``spec``, from the engine's θ₀; ``prepare_model`` may change the
    network first (layout, compilation)."""
    from imaml.models import build_model

    device = torch.device(spec["device"])
    source = synthetic_source(spec["shape"], spec["ways"], spec["shots"], spec["query_shots"], spec["seed"])
    torch.manual_seed(spec["seed"])  # the engine's θ₀
    model = build_model("conv4", source.input_shape, spec["ways"], SHAPES[spec["shape"]].channels).to(device)
    return loop_class(spec["algo"], prepare_model(model), source, spec["meta_batch_size"], spec["inner_steps"],
                      spec["inner_lr"], spec["meta_lr"], spec["lam"], spec["cg_steps"], spec["seed"], device)


class Skipped(Exception):
    """An implementation that does not apply here (its message says why)."""


class InProcess:
    """One implementation built in this process; ``step()`` runs one meta-step."""

    def __init__(self, impl: str, spec: dict):
        self.engine = None
        if impl.startswith("engine"):
            self.engine = build_benchmark_engine(spec, execution=impl.split("-", 1)[1])
            self.engine.train()
            self.step = self.engine.train_step
        elif impl == "betty":
            from benchmarks.betty_reference import BettyReference

            self.step = build_reference(BettyReference, spec).meta_step
        else:
            from benchmarks.plain_loop import PlainLoop

            self.step = build_reference(PlainLoop, spec).meta_step

    def extra(self) -> dict:
        if self.engine is None:
            return {}
        out = {"execution": "vectorized" if self.engine.vectorized else "per-task"}
        if self.engine.records.solves:
            out["cg_iterations"] = sum(i.iterations for i in self.engine.records.solves) / len(self.engine.records.solves)
        return out

    def close(self) -> None:
        pass


class EngineProcesses:
    """The engine as ``python run.py`` runs on a CPU by default: one single-thread process per
    core (at most one per task) sharing each meta-batch (``engines.distributed``), started as
    run.py starts them; ``step()`` has every worker take one meta-step (they end it together,
    in the all-reduce); ``peak_mib`` is the memory their steps have added so far, summed."""

    def __init__(self, spec: dict, worker_module: str):
        from engines.distributed import local_job_environment, local_processes

        self.processes = local_processes(engine_config(spec))
        if self.processes < 2:
            raise Skipped("skipped: run.py uses one process here (one core, or a GPU)")
        env = local_job_environment(self.processes)
        self.workers = [StepWorker(worker_module, spec, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                        for rank in range(self.processes)]
        self.peak_mib = 0.0

    def step(self) -> None:
        for worker in self.workers:
            worker.request()
        self.peak_mib = sum(worker.reply()["peak_mib"] for worker in self.workers)

    def extra(self) -> dict:
        return {"processes": self.processes, "peak_mib": self.peak_mib}

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def serve_engine_worker(spec: dict) -> None:
    """One process of ``EngineProcesses`` (``worker_module`` runs this for ``--worker``), set up as run.py sets up each of its processes."""
    from engines import distributed
    from imaml.app.cli import configure_process

    config = engine_config(spec)
    configure_process(config)
    with distributed.process_group(config):
        engine = build_benchmark_engine(spec)
        engine.train()
        serve_steps(engine.train_step, torch.device(config.device))
