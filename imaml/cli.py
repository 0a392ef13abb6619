"""The command line: parse, build, run, write results.json. ``run.py`` calls ``main``."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

from imaml.arguments import automatic_preset, config_from_flags, parse_flags
from imaml.config import CONFIG_DIR, FIELDS, RunConfig
from imaml.errors import UsageError
from imaml.methods import describe as describe_method
from imaml.output_lock import OutputLock
from imaml.reporting import RunLog, write_json
from imaml.run_folder import NEW_FOLDER_ENV, begin_writing, choose_folder, drop_if_empty, prepare_output_dir

__all__ = ["run_from_args", "load_config", "configure_process", "checkpoint_path", "prepare_output_dir", "run_protocol",
           "first_line", "main"]


def load_config(argv: Optional[list] = None) -> RunConfig:
    """The run's configuration: flags over preset over defaults (``imaml.arguments``); resuming
    (``--resume``) or evaluating a checkpoint (``--eval-only``), the checkpoint's own settings
    with the flags given now over them."""
    cli, preset_flag = parse_flags(argv)
    saved = _saved_config(cli)
    if saved is None:
        return config_from_flags(cli, preset_flag)
    merged = {**saved, **cli}
    if cli.get("resume"):
        merged["output_dir"] = cli["resume"]
    return RunConfig(**merged).validate()


def run_from_args(argv: Optional[list] = None) -> dict:
    """Everything ``python run.py ...`` does; returns the results it wrote. Launched by
    ``torchrun``, every process runs this, sharing the work (docs/distributed.md)."""
    config = load_config(argv)
    from engines import distributed  # heavy imports only once the flags are known good

    configure_process(config)
    with distributed.process_group(config), _claim_output_dir(config, distributed.is_main()) as (config, new):
        return _run(config, main_process=distributed.is_main(), new_folder=new)


@contextmanager
def _claim_output_dir(config: RunConfig, main_process: bool) -> Iterator[Tuple[RunConfig, bool]]:
    """The main process chooses, checks and locks the run's folder before any work (a local
    job's launcher already holds the lock: its rank 0 shares it); every process of a job learns
    the folder, or that it was refused, which stops them all, said once by rank 0. A folder made
    for this run and left empty (the run was refused before writing) is removed again."""
    from engines import distributed

    lock, refused, new = None, None, False
    if main_process:
        try:
            config, new = choose_folder(config)
            lock = OutputLock(config.output_dir).acquire()
        except UsageError as err:
            refused = err
    if distributed.max_over_ranks(float(refused is not None)):
        raise refused or UsageError("--output-dir: refused by rank 0")
    config = replace(config, output_dir=distributed.gather_objects(config.output_dir)[0])  # rank 0's folder
    try:
        yield config, new
    finally:
        if lock is not None:
            lock.release()
        if main_process and new:
            drop_if_empty(Path(config.output_dir))


def configure_process(config: RunConfig) -> None:
    """Process-wide settings a run applies before any work (every process of a job)."""
    if config.device == "cpu" and config.keep_freed_memory:
        from imaml.allocator import keep_freed_memory

        keep_freed_memory()


def _run(config: RunConfig, main_process: bool, new_folder: bool = False) -> dict:
    """Build (every check that can refuse the run), (resume,) run and report; only the main
    process writes files or prints, and nothing is written before the run has been built."""
    from engines import build_engine, distributed
    from engines.progress import describe_result
    from imaml import checkpoint
    from imaml.wandb_sink import start_wandb

    output_dir = Path(config.output_dir)
    log = RunLog(output_dir, append=True, total_steps=config.meta_steps) if main_process else None
    say = log.say if log else (lambda line: None)
    say(first_line(config))
    engine = build_engine(config, log=log, checkpoint_dir=output_dir / "checkpoints" if main_process else None)
    start = checkpoint_path(config)
    if start is not None:
        engine.load_state_dict(checkpoint.load(start))  # every process loads the same state
    if main_process:
        begin_writing(output_dir, continuing=bool(config.resume), new=new_folder)
        log.sink = start_wandb(config, output_dir)
        write_json(output_dir / "config.json", config.to_dict())
    warmed = _warm_up(config, main_process) if config.warmup_fraction and start is None else None
    if warmed is not None:
        _continue_from_warmup(engine, config, warmed)
    if config.eval_only:
        say(f"meta-test of {start} (meta-step {engine.global_step}) on {config.test_tasks} tasks ...")
        outcome = {"test": engine.evaluate("test", config.test_tasks), "checkpoint": str(start),
                   "checkpoint_step": engine.global_step}
        say(f"meta-test: {describe_result(outcome['test'])}")
    else:
        say(_describe(config, engine.env.kind, distributed.world_size()))
        outcome = engine.run()
    results = {
        "algo": config.algo,
        "task": config.task,
        "ways": config.ways if engine.env.kind == "classification" else None,
        "test_ways": (config.test_ways or config.ways) if engine.env.kind == "classification" else None,
        "shots": config.shots,
        "query_shots": config.query_shots,
        "meta_steps": config.meta_steps,
        "seed": config.seed,
        **outcome,
        "protocol": run_protocol(config, engine.env.kind, engine.env.describe()),
        "splits": engine.env.describe(),
        "processes": distributed.world_size(),
        "config": config.to_dict(),
    }
    if warmed is not None:
        results["warmup"] = {key: warmed["results"].get(key) for key in
                             ("meta_steps", "meta_gradient", "best_validation", "train_seconds", "total_seconds")}
        results["warmup"]["output_dir"] = warmed["output_dir"]
    if not main_process:
        return results
    write_json(output_dir / "results.json", results)
    if not config.eval_only:
        from imaml.plots import write_plots

        write_plots(output_dir)
    log.finish(results)
    log.say(f"wrote {output_dir / 'results.json'}" + ("" if config.eval_only else " and plots/"))
    return results


def first_line(config: RunConfig) -> str:
    """What runs, from which preset, into which folder: the first thing a run prints."""
    if config.config:
        preset = f"preset {_shown_path(config.config)}"
    elif config.resume or config.eval_only:
        preset = "the settings saved with its checkpoint"
    else:
        preset = f"no preset ({_shown_path(automatic_preset(config.to_dict()))} does not exist: the code's defaults)"
    return f"{describe_method(config)}, on {config.task}; {preset}; writing {config.output_dir}"


def _shown_path(path) -> str:
    """A preset's path as the docs write it: configs/<name>.yaml for a shipped one."""
    path = Path(path).resolve()
    return f"configs/{path.name}" if path.parent == CONFIG_DIR else str(path)


def warmup_config(config: RunConfig) -> RunConfig:
    """The settings of ``--warmup-fraction``'s first phase: the same run with the head alone adapted,
    at the head's λ, for the warm-up's meta-steps, in ``<output-dir>/warmup``."""
    return replace(config, adapt="head", lam=config.head_lam or config.lam, head_lam=None,
                   meta_steps=config.warmup_steps, warmup_fraction=0.0, output_dir=str(Path(config.output_dir) / "warmup"),
                   resume=None, wandb_mode="disabled").validate()


def _warm_up(config: RunConfig, main_process: bool) -> Optional[dict]:
    """Run (or find finished) the warm-up phase; None when a resumed run is past it already."""
    if checkpoint_path(config) is not None:  # resumed: the whole-network phase has its own checkpoint
        return None
    warm = warmup_config(config)
    finished = Path(warm.output_dir) / "results.json"
    results = json.loads(finished.read_text()) if finished.is_file() else {}
    if results.get("config") != warm.to_dict():  # else a finished warm-up with these settings: reused
        if main_process:
            prepare_output_dir(warm.output_dir)
        results = _run(warm, main_process)
    return {"results": results, "output_dir": warm.output_dir,
            "theta": Path(warm.output_dir) / "checkpoints" / "latest.pt"}


def _continue_from_warmup(engine, config: RunConfig, warmed: dict) -> None:
    """Start the whole-network phase after the warm-up's meta-steps, from the warm-up's θ (a fresh
    meta-optimizer), with its meta-test of θ₀ as this run's "before meta-training"."""
    from imaml import checkpoint

    state = checkpoint.load(warmed["theta"])
    engine.upper.module.load_state_dict(state["upper"]["module"])
    engine.global_step = config.warmup_steps
    engine.before = state["before_meta_training"]
    engine.env.load_state_dict(state["env"])  # the next meta-batches are the ones an unbroken run would draw
    engine.start_note = (f"warm-up done ({warmed['output_dir']}): the whole network adapts from its θ, "
                         f"meta-steps {config.warmup_steps + 1}-{config.meta_steps}")


def run_protocol(config: RunConfig, kind: str, splits: dict) -> dict:
    """What a published number depends on, recorded beside it: results.json's ``protocol``, which
    the peer rows (benchmarks/peers) write too. A test split that describes its own tasks, like
    Lake's runs, says how many queries per class it has."""
    queries = splits.get("test", {}).get("query_per_class", config.test_query_shots or config.query_shots)
    return {"test_tasks": config.test_tasks, "test_query_shots": queries,
            "test_inner_steps": config.test_inner_steps, "inner_steps": config.inner_steps,
            "bn_mode": config.bn_mode if kind == "classification" else None,
            "model": config.model, "activation": config.activation, "channels": config.channels,
            "meta_batch_size": config.meta_batch_size,
            "hypergrad": config.hypergrad if config.algo == "imaml" else None,
            "lam": config.lam if config.algo == "imaml" else None, "seed": config.seed}


def _describe(config: RunConfig, kind: str, processes: int) -> str:
    ways = f"{config.ways}-way " if kind == "classification" else ""
    bn = f", BatchNorm {config.bn_mode}" if kind == "classification" else ""
    if config.algo == "pretrain":  # engines/pretrain.py: no inner loop in training
        images = config.meta_batch_size * config.ways * (config.shots + config.query_shots)
        return (f"pretrain on {config.task}: {config.meta_steps} steps of {images} images over all training "
                f"classes; meta-test {ways}{config.shots}-shot, {config.test_inner_steps} fine-tuning steps{bn}, "
                f"device {config.device}" + (f", {processes} processes" if processes > 1 else ""))
    return (f"{config.algo} on {config.task}: {ways}{config.shots}-shot, meta-batch {config.meta_batch_size}, "
            f"{config.meta_steps} meta-steps, {config.inner_steps} inner steps ({config.test_inner_steps} at "
            f"test){bn}, device {config.device}" + (f", {processes} processes" if processes > 1 else ""))


def main(argv: Optional[list] = None) -> int:
    """Console-script entry point (same behaviour as run.py)."""
    from imaml.errors import RunStopped

    # every process of a torchrun job meets the same error: only the first (RANK 0) says it
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *args, **kwargs: None)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = load_config(argv)
        from envs.downloads import fetch_missing

        fetch_missing(config)  # --download: once, here, before any output folder or worker process
        from engines import distributed

        processes = distributed.local_processes(config)
        if processes > 1:  # one single-thread process per core, sharing each meta-batch
            config, new = choose_folder(config)  # here, not only in a worker: before any work
            argv = [*argv, "--output-dir", config.output_dir]
            if config.wandb_id:  # the workers' W&B run is this one
                argv = [*argv, "--wandb-id", config.wandb_id]
            if new:  # rank 0 makes it runs/latest once the run has passed its checks
                os.environ[NEW_FOLDER_ENV] = config.output_dir
            try:
                with OutputLock(config.output_dir).acquire() as lock:  # handed down to the workers
                    return distributed.run_local_job(argv, processes, lock)
            finally:
                if new:
                    drop_if_empty(Path(config.output_dir))
        run_from_args(argv)
    except UsageError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        say(f"{'stopped' if stop.exit_code == 3 else 'interrupted'}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        say("interrupted", file=sys.stderr)
        return 130
    return 0


def checkpoint_path(config: RunConfig) -> Optional[Path]:
    """The checkpoint a resumed or evaluation-only run starts from."""
    if config.resume:
        return Path(config.resume) / "checkpoints" / "latest.pt"
    if config.eval_only:
        return Path(config.checkpoint)
    return None


def _saved_config(cli: dict) -> Optional[dict]:
    """The configuration stored in the checkpoint that ``--resume``/``--eval-only`` names."""
    probe = RunConfig(**{k: v for k, v in cli.items() if k in ("resume", "eval_only", "checkpoint")})
    if probe.eval_only and not probe.checkpoint:
        probe.validate()  # the one-line error
    path = checkpoint_path(probe)
    if path is None:
        return None
    from imaml import checkpoint

    saved = checkpoint.load(path)["config"]
    run_control = ("resume", "eval_only", "checkpoint", "overwrite")
    if probe.eval_only:  # a meta-test of a checkpoint is a run of its own: its own folder and W&B run
        run_control += ("wandb_id", "output_dir")
    return {k: v for k, v in saved.items() if k in FIELDS and k not in run_control}


if __name__ == "__main__":  # the workers of a local multi-process job (engines.distributed)
    sys.exit(main())
