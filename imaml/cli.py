"""The command line: parse, build, run, write results.json. ``run.py`` calls ``main``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from imaml.config import parse_args
from imaml.reporting import RunLog, write_json

__all__ = ["run_from_args", "main"]


def run_from_args(argv: Optional[list] = None) -> dict:
    """Everything ``python run.py ...`` does; returns the results it wrote."""
    config = parse_args(argv)
    from engines import build_engine  # heavy imports only once the flags are known good

    output_dir = Path(config.output_dir)
    log = RunLog(output_dir)
    write_json(output_dir / "config.json", config.to_dict())
    engine = build_engine(config, log=log)
    log.say(f"{config.algo} on {config.task}: "
            + (f"{config.ways}-way " if engine.env.kind == "classification" else "")
            + f"{config.shots}-shot, meta-batch {config.meta_batch_size}, {config.meta_steps} meta-steps, "
            f"{config.inner_steps} inner steps ({config.test_inner_steps} at test), device {config.device}")
    outcome = engine.run()
    results = {
        "algo": config.algo,
        "task": config.task,
        "ways": config.ways if engine.env.kind == "classification" else None,
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
    log.say(f"wrote {output_dir / 'results.json'}")
    return results


def main(argv: Optional[list] = None) -> int:
    """Console-script entry point (same behaviour as run.py)."""
    from imaml.errors import UsageError

    try:
        run_from_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
