"""Many processes for one training (torchrun, or `fmnist train --nproc N` through torch's launcher): the world,
the process group, and what the ranks share.

Without torchrun every function here is the identity of one process: rank 0 of
1, nothing started, nothing sent. Devices, precision and threads are devices.py's.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from typing import Any

import torch

from .devices import pick_device
from .errors import DeviceError, FmnistError

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that waits longer for the others gives up

@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes of one training: rank 0 of 1 without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = ""  # "gloo" or "nccl" once started; "" for one process

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory and speaks."""
        return self.rank == 0


def launched() -> World:
    """The world torchrun describes in this process's environment (one process without torchrun)."""
    env = os.environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise DeviceError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets them).") from None
    if size <= 1:
        return World()
    if not 0 <= rank < size:
        raise DeviceError(f"RANK {rank} is outside WORLD_SIZE {size}.")
    return World(rank, size, local, max(1, local_size))


def start(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA) and pick this process's device.

    One process (no torchrun, or torchrun with one process) starts nothing: (World(), pick_device(...)).
    """
    world = launched()
    device = pick_device(device_name)
    if world.size == 1:
        return world, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise DeviceError("training on several processes needs CPUs (gloo) or CUDA GPUs (NCCL); MPS has no "
                          "process group backend: use --device cpu.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, store=_store(world), rank=world.rank, world_size=world.size,
                                timeout=TIMEOUT)
    return dataclasses.replace(world, backend=backend), device


def _store(world: World):
    """torchrun's key-value store, with a prefix per restart attempt.

    After torchrun restarts the workers (--max-restarts), the store still holds
    the dead workers' addresses; without a fresh prefix a new worker can read
    one of them and fail with "connection refused" (seen with gloo, torch 2.13).
    """
    import torch.distributed as dist

    env = os.environ
    if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT", "").isdigit():
        raise DeviceError(f"WORLD_SIZE is {world.size} but MASTER_ADDR and MASTER_PORT do not say where the "
                          "processes meet; start them with torchrun (see the README).")
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent serves the store
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size,
                          is_master=world.rank == 0 and not agent, timeout=TIMEOUT, wait_for_workers=False)
    return dist.PrefixStore(f"fmnist/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def ddp(model: torch.nn.Module) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel, each rank keeping its own batch-norm statistics (averaged by
    average_buffers before validation and checkpoints) rather than taking rank 0's at every step."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    own = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
           else "broadcast_buffers")  # torch 2.13 renamed it
    return DistributedDataParallel(model, **{own: False})


def stop() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (any picklable object; a tensor state dict travels as well)."""
    if world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], world: World) -> list[float]:
    """The sums over all ranks of each of `values` (float64, so that counts stay exact)."""
    if world.size == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_wire(world))
    dist.all_reduce(t)
    return t.tolist()


def average_buffers(module: torch.nn.Module, world: World) -> None:
    """Average every floating buffer (batch norm's running mean and variance) over the ranks, in place.

    PyTorch's SyncBatchNorm does not run on the CPU; there each rank's batch
    norm normalises by its own batch, and the running statistics that
    validation and checkpoints use are made one by averaging before each.
    """
    if world.size == 1:
        return
    import torch.distributed as dist

    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world.size)


def gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """The ranks' (n_r, ...) tensors concatenated in rank order, on every rank (sizes may differ)."""
    if world.size == 1:
        return t
    import torch.distributed as dist

    wire = _wire(world)
    sizes = [torch.zeros((), dtype=torch.long, device=wire) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor(len(t), device=wire))
    longest = int(max(sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=wire)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)]).to(t.device)


def _wire(world: World) -> torch.device:
    """Where collective tensors must live: NCCL moves CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def shard(n: int, rank: int, size: int) -> slice:
    """Rank's contiguous part of n items (sizes differ by at most one; rank order is item order)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def on_main(fn: Any, world: World) -> Any:
    """fn() run by rank 0 alone, its result (or its exception) given to every rank.

    Reading and creating the run directory happen here: the other ranks may
    be on machines that do not share rank 0's disk.
    """
    if world.size == 1:
        return fn()
    result = error = None
    if world.main:
        try:
            result = fn()
        except Exception as e:  # every rank raises it, so that no rank waits for the others forever
            error = e
    result, error = broadcast((result, error), world)
    if error is not None:
        if isinstance(error, FmnistError) and not world.main:
            error.rank = 0  # rank 0 says it for every rank; the others stay quiet
        raise error
    return result


def launch(nproc: int, argv: list[str]) -> int:
    """`python -m fmnist ARGV` as `nproc` worker processes on this machine, started by torch's own launcher
    (torchrun's, run in this process); returns the exit code the command should end with.

    The workers speak (rank 0 says the result, an error or Ctrl-C once); the launcher stays silent: torch's
    log lines are switched off while it runs, and its SignalException (Ctrl-C or SIGTERM reached this process,
    and it has stopped the workers with the same signal) becomes the exit code 128 + the signal. A worker that a
    signal killed is a TrainError, said by the launcher since the killed process could not speak.
    """
    import logging
    import signal
    import uuid

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .errors import TrainError

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)  # torchrun --standalone's rendezvous
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    logging.disable(logging.CRITICAL)  # torch's "Received 2 death signal", "Sending process ... closing signal"
    try:
        elastic_launch(config, sys.executable)("-m", "fmnist", *argv)
        return 0
    except SignalException as e:  # the workers have had the same signal and are gone
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        spoke = sorted(rank for rank, f in e.failures.items() if f.exitcode > 0)  # a worker said why (rank 0 first)
        if spoke:
            return e.failures[spoke[0]].exitcode
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)  # the first to die: the cause
        raise TrainError(f"the worker process of rank {rank} was killed by {failure.signal_name()}, and the others "
                         "were stopped; continue the run with fmnist train --resume runs/<name> if it holds a "
                         "last.pt.") from None
    finally:
        logging.disable(logging.NOTSET)
        for s, h in handlers.items():
            if h is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, h)
