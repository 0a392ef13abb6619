"""The command line: parse, build, run, write results.json. ``run.py`` calls ``main``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from imaml.config import RunConfig, checkpoint_path, parse_args
from imaml.reporting import RunLog, write_json

__all__ = ["run_from_args", "main"]


def run_from_args(argv: Optional[list] = None) -> dict:
    """Everything ``python run.py ...`` does; returns the results it wrote."""
    config = parse_args(argv)
    from engines import build_engine  # heavy imports only once the flags are known good
    from imaml import checkpoint

    from imaml.wandb_sink import start_wandb

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(output_dir, append=bool(config.resume), sink=start_wandb(config, output_dir))
    write_json(output_dir / "config.json", config.to_dict())
    engine = build_engine(config, log=log, checkpoint_dir=output_dir / "checkpoints")
    start = checkpoint_path(config)
    if start is not None:
        engine.load_state_dict(checkpoint.load(start))
    if config.eval_only:
        log.say(f"meta-test of {start} (meta-step {engine.global_step}) on {config.test_tasks} tasks ...")
        outcome = {"test": engine.evaluate("test", config.test_tasks), "checkpoint": str(start),
                   "checkpoint_step": engine.global_step}
    else:
        log.say(_describe(config, engine.env.kind))
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
        "protocol": {"inner_steps": config.inner_steps, "test_inner_steps": config.test_inner_steps,
                     "meta_batch_size": config.meta_batch_size,
                     "hypergrad": config.hypergrad if config.algo == "imaml" else None,
                     "lam": config.lam if config.algo == "imaml" else None},
        "config": config.to_dict(),
    }
    write_json(output_dir / "results.json", results)
    if not config.eval_only:
        from imaml.plots import write_plots

        write_plots(output_dir)
    log.finish(results)
    log.say(f"wrote {output_dir / 'results.json'} and plots/")
    return results


def _describe(config: RunConfig, kind: str) -> str:
    ways = f"{config.ways}-way " if kind == "classification" else ""
    return (f"{config.algo} on {config.task}: {ways}{config.shots}-shot, meta-batch {config.meta_batch_size}, "
            f"{config.meta_steps} meta-steps, {config.inner_steps} inner steps ({config.test_inner_steps} at "
            f"test), device {config.device}")


def main(argv: Optional[list] = None) -> int:
    """Console-script entry point (same behaviour as run.py)."""
    from imaml.errors import RunStopped, UsageError

    try:
        run_from_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"{'stopped' if stop.exit_code == 3 else 'interrupted'}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
