"""Meta-training across processes: one meta-batch, its tasks sharded over the processes of a
``torchrun`` job, one averaged meta-gradient, the same meta-update everywhere.

Every process samples the *same* full meta-batch from the same random stream (so sampling is
what a single process would draw) and adapts only its share of the tasks, ``shard(count)``:
tasks ``rank, rank + world, …``. Betty averages the query losses over the tasks a process
ran (``gradient_accumulation`` = its share); ``all_reduce_gradients`` weights each process's
mean by its share of the meta-batch and sums, in one collective over one flat buffer, so
every process holds the mean over *all* tasks before clipping and the optimizer step.
Evaluation shards its fixed task stream the same way and ``gather_objects`` brings the
per-task scores back in task order, so mean and CI are computed exactly as in one process.

With no ``torchrun`` environment (``WORLD_SIZE`` absent or 1) nothing here creates a
process group and every helper is the identity: one process behaves exactly as before.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, List

import torch
import torch.distributed as dist

from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["local_processes", "run_local_job", "process_group", "world_size", "rank", "is_main", "shard", "all_reduce_gradients",
           "max_over_ranks", "gather_objects", "process_device", "broadcast_module", "average_buffers",
           "node_main_first", "local_job_environment"]


def _launched(name: str, default: int) -> int:
    """An integer torchrun puts in every worker's environment (RANK, WORLD_SIZE, …)."""
    return int(os.environ.get(name, default))


def world_size() -> int:
    """Processes sharing each meta-batch (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """The process that logs, prints and writes files: rank 0 of the job (or the only one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _launched("RANK", 0) == 0


def shard(count: int, start: int = 0) -> range:
    """This process's tasks among ``count`` tasks numbered from ``start`` in a longer stream:
    the global indices ``g ≡ rank (mod world)``, returned as positions ``g - start``."""
    world = world_size()
    return range((rank() - start) % world, count, world)


def _backend(config: RunConfig) -> str:
    if config.dist_backend != "auto":
        return config.dist_backend
    return "nccl" if config.device.startswith("cuda") else "gloo"


def _check_setup(config: RunConfig, world: int, local_rank: int) -> None:
    """Bad launches as one-line UsageErrors, before any process waits for another."""
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run a single process (python run.py)")
    if world > config.meta_batch_size and not config.eval_only:
        raise UsageError(
            f"--meta-batch-size {config.meta_batch_size} with {world} processes: every process needs at "
            f"least one task of the meta-batch; use --meta-batch-size >= {world} or fewer processes")
    backend = _backend(config)
    if backend == "nccl" and not config.device.startswith("cuda"):
        raise UsageError(f"--dist-backend nccl needs GPUs (--device cuda), not --device {config.device}; "
                         "use --dist-backend gloo (or auto) on CPU")
    if config.device.startswith("cuda"):
        if ":" in config.device:
            raise UsageError(f"--device {config.device} under torchrun: each process uses the GPU of its "
                             "LOCAL_RANK; pass --device cuda")
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process with LOCAL_RANK {local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}); use --nproc_per_node <= {torch.cuda.device_count()}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _threads_per_process() -> int:
    """The cores of this node divided among its processes: small tasks run fastest with one
    thread each and as many processes as cores (``OMP_NUM_THREADS``, if set, decides)."""
    return max(1, usable_cores() // _launched("LOCAL_WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- local CPU jobs
def local_processes(config: RunConfig) -> int:
    """How many processes a plain ``python run.py`` on a CPU starts to share each meta-batch.

    ``--processes N``, or with 0 (auto) one single-thread process per core, at most one per
    task of a meta-batch: at few-shot batch sizes, parallelism across tasks beats threads
    inside each operator (docs/performance.md). 1 under torchrun (it already chose) and on GPUs."""
    if config.device != "cpu" or "WORLD_SIZE" in os.environ:
        return 1
    if config.processes:
        return config.processes
    return max(1, min(usable_cores(), config.meta_batch_size) if not config.eval_only else usable_cores())


def local_job_environment(processes: int) -> dict:
    """The environment (without RANK/LOCAL_RANK) for ``processes`` workers on this machine,
    as torchrun sets it: a free port, this project importable, one thread each unless
    OMP_NUM_THREADS says otherwise."""
    root = str(Path(__file__).resolve().parents[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
           "LOCAL_WORLD_SIZE": str(processes), "PYTHONPATH": os.pathsep.join(
               p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_local_job(command: List[str], processes: int, lock=None) -> int:
    """Run ``command`` (the application's worker: an interpreter, its module and run.py's flags)
    in ``processes`` processes on this machine, wired as
    torchrun wires its workers (gloo, one thread each unless OMP_NUM_THREADS is set), holding
    ``lock`` (the output folder's ``OutputLock``) with them. Ctrl-C and SIGTERM are passed on
    once, so the job saves its checkpoint and stops; returns the exit status of rank 0 (or
    the first failure)."""
    base = {**local_job_environment(processes), **(lock.environment() if lock else {})}
    # Rank 0 speaks for the job; the others' stderr is kept aside and shown only if one of
    # them fails while rank 0 did not (otherwise it only echoes rank 0's error).
    logs = [None] + [tempfile.TemporaryFile(mode="w+") for _ in range(1, processes)]
    workers = [subprocess.Popen(command, start_new_session=True,
                                env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=logs[r],
                                pass_fds=lock.fds() if lock else ())
               for r in range(processes)]

    def forward(signum, frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = next((r for r, c in enumerate(codes) if c), None)
    if codes[0] == 0 and failed is not None:
        logs[failed].seek(0)
        sys.stderr.write(logs[failed].read()[-4000:])
    for log in logs[1:]:
        log.close()
    return codes[0] or (codes[failed] if failed is not None else 0)


@contextmanager
def process_group(config: RunConfig) -> Iterator[None]:
    """Join the job ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) for the duration of the block; nothing without one."""
    joined = dist.is_available() and dist.is_initialized()
    world = world_size() if joined else _launched("WORLD_SIZE", 1)
    if world <= 1:
        yield
        return
    local_rank = _launched("LOCAL_RANK", 0)
    _check_setup(config, world, local_rank)
    if joined:  # already in the job (a second run in the same processes): only the checks
        yield
        return
    if config.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_threads_per_process())
    dist.init_process_group(backend=_backend(config), rank=_launched("RANK", 0), world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def process_device(name: str) -> str:
    """``--device cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) in a job."""
    if name == "cuda" and world_size() > 1:
        return f"cuda:{torch.cuda.current_device()}"
    return name


def _wire_device() -> torch.device:
    """Where small tensors for collectives live: the GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(params: Iterable[torch.Tensor], scale: float) -> None:
    """Set every ``p.grad`` to Σ over processes of ``scale``·``p.grad`` (missing gradients count
    as zeros), with one all-reduce of one flat buffer. ``scale`` = this process's share of
    the meta-batch turns per-process means into the mean over all tasks."""
    params = list(params)
    with torch.no_grad():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                          for p in params])
        flat.mul_(scale)
        dist.all_reduce(flat)
        for p, grad in zip(params, flat.split([p.numel() for p in params])):
            p.grad = grad.view_as(p)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` any process holds, so that decisions (stop, skip) agree."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_wire_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_objects(obj: Any) -> List[Any]:
    """Every process's ``obj`` (picklable, on the CPU), in rank order."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Start every process from rank 0's parameters and buffers (as DDP does)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers (inductive BatchNorm's running statistics) over the
    processes, so every process — and rank 0's checkpoint — holds the same statistics, drawn
    from all tasks of the meta-batch. Integer buffers (batch counters) advance alike everywhere."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if world_size() == 1 or not buffers:
        return
    with torch.no_grad():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat.div_(world_size())
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))


@contextmanager
def node_main_first() -> Iterator[None]:
    """Run the block in each node's first process (LOCAL_RANK 0) before the others, so a
    dataset is downloaded or generated once per node and then read from its cache."""
    if world_size() == 1:
        yield
        return
    first = _launched("LOCAL_RANK", 0) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:  # also on an error (a missing file): the others then meet it themselves
        if first:
            dist.barrier()
