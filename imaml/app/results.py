"""What a run reports: ``results.json``'s fields (the protocol a published number depends on
included) and the line that states a run's protocol before it starts."""

from __future__ import annotations

from typing import Optional

from imaml.config import RunConfig

__all__ = ["assemble_results", "run_protocol", "describe_protocol"]


def assemble_results(config: RunConfig, engine, outcome: dict, warmed: Optional[dict]) -> dict:
    """``results.json``: the run's outcome (meta-test before and after, or an evaluation's), its
    protocol, splits and configuration, and the warm-up phase's summary where there was one."""
    from engines import distributed

    kind = engine.env.kind
    results = {
        "algo": config.algo,
        "task": config.task,
        "ways": config.ways if kind == "classification" else None,
        "test_ways": (config.test_ways or config.ways) if kind == "classification" else None,
        "shots": config.shots,
        "query_shots": config.query_shots,
        "meta_steps": config.meta_steps,
        "seed": config.seed,
        **outcome,
        "protocol": run_protocol(config, kind, engine.env.describe()),
        "splits": engine.env.describe(),
        "processes": distributed.world_size(),
        "config": config.to_dict(),
    }
    if warmed is not None:
        results["warmup"] = {key: warmed["results"].get(key) for key in
                             ("meta_steps", "meta_steps_done", "meta_gradient", "best_validation", "train_seconds",
                              "total_seconds")}
        results["warmup"]["output_dir"] = warmed["output_dir"]
    return results


def run_protocol(config: RunConfig, kind: str, splits: dict) -> dict:
    """What a published number depends on, recorded beside it: results.json's ``protocol``, which
    the peer rows (studies/peers) write too. A test split that describes its own tasks, like
    Lake's runs, says how many queries per class it has."""
    queries = splits.get("test", {}).get("query_per_class", config.test_query_shots or config.query_shots)
    return {"test_tasks": config.test_tasks, "test_query_shots": queries,
            "test_inner_steps": config.test_inner_steps, "inner_steps": config.inner_steps,
            "bn_mode": config.bn_mode if kind == "classification" else None,
            "model": config.model, "activation": config.activation, "channels": config.channels,
            "meta_batch_size": config.meta_batch_size,
            "hypergrad": config.hypergrad if config.algo == "imaml" else None,
            "lam": config.lam if config.algo == "imaml" else None, "seed": config.seed}


def describe_protocol(config: RunConfig, kind: str, processes: int) -> str:
    """The run's protocol in one line, printed before meta-training."""
    ways = f"{config.ways}-way " if kind == "classification" else ""
    bn = f", BatchNorm {config.bn_mode}" if kind == "classification" else ""
    if config.algo == "protonet":  # engines/protonet.py: no inner loop at all
        return (f"protonet on {config.task}: {ways}{config.shots}-shot, meta-batch {config.meta_batch_size}, "
                f"{config.meta_steps} meta-steps, prototypes at meta-test (no inner step){bn}, device {config.device}"
                + (f", {processes} processes" if processes > 1 else ""))
    if config.algo == "pretrain":  # engines/pretrain.py: no inner loop in training
        images = config.meta_batch_size * config.ways * (config.shots + config.query_shots)
        return (f"pretrain on {config.task}: {config.meta_steps} steps of {images} images over all training "
                f"classes; meta-test {ways}{config.shots}-shot, {config.test_inner_steps} fine-tuning steps{bn}, "
                f"device {config.device}" + (f", {processes} processes" if processes > 1 else ""))
    return (f"{config.algo} on {config.task}: {ways}{config.shots}-shot, meta-batch {config.meta_batch_size}, "
            f"{config.meta_steps} meta-steps, {config.inner_steps} inner steps ({config.test_inner_steps} at "
            f"test){bn}, device {config.device}" + (f", {processes} processes" if processes > 1 else ""))
