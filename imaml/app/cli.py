"""The command line: parse, claim the run's folder, build, run, write results.json. ``run.py``
calls ``main``; a local multi-process job's workers run this module."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

from imaml.app.arguments import automatic_preset, config_from_flags, parse_flags
from imaml.app.methods import describe as describe_method
from imaml.app.results import assemble_results, describe_protocol
from imaml.app.run_folder import NEW_FOLDER_ENV, begin_writing, checkpoint_path, claimed
from imaml.app.warmup import continue_from_warmup, warm_up
from imaml.config import CONFIG_DIR, FIELDS, RunConfig
from imaml.errors import UsageError
from imaml.reporting import RunLog, write_json

__all__ = ["run_from_args", "load_config", "configure_process", "first_line", "main"]


def load_config(argv: Optional[list] = None) -> RunConfig:
    """The run's configuration: flags over preset over defaults (``imaml.app.arguments``); resuming
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

    refused, new = None, False
    with ExitStack() as held:
        if main_process:
            try:
                config, new, _ = held.enter_context(claimed(config))
            except UsageError as err:
                refused = err
        if distributed.max_over_ranks(float(refused is not None)):
            raise refused or UsageError("--output-dir: refused by rank 0")
        yield replace(config, output_dir=distributed.gather_objects(config.output_dir)[0]), new  # rank 0's folder


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
    log = (RunLog(output_dir, append=True, total_steps=config.meta_steps, time_budget=config.time_budget)
           if main_process else None)
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
    warmed = warm_up(config, main_process, _run) if config.warmup_fraction and start is None else None
    if warmed is not None:
        continue_from_warmup(engine, config, warmed)
    if config.eval_only:
        say(f"meta-test of {start} (meta-step {engine.global_step}) on {config.test_tasks} tasks ...")
        outcome = {"test": engine.evaluate("test", config.test_tasks), "checkpoint": str(start),
                   "checkpoint_step": engine.global_step}
        say(f"meta-test: {describe_result(outcome['test'])}")
    else:
        say(describe_protocol(config, engine.env.kind, distributed.world_size()))
        outcome = engine.run()
    results = assemble_results(config, engine, outcome, warmed)
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
            with claimed(config) as (config, new, lock):  # here, not only in a worker: before any work
                argv = [*argv, "--output-dir", config.output_dir]
                if config.wandb_id:  # the workers' W&B run is this one
                    argv = [*argv, "--wandb-id", config.wandb_id]
                with _environment(NEW_FOLDER_ENV, config.output_dir if new else None):  # rank 0 makes it runs/latest
                    return distributed.run_local_job([sys.executable, "-m", "imaml.app.cli", *argv], processes, lock)
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


@contextmanager
def _environment(name: str, value: Optional[str]) -> Iterator[None]:
    """``name=value`` in this process's environment (which a local job's workers inherit) for the
    block, then as it was; nothing where ``value`` is None."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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
