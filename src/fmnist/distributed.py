"""Devices and CPU threads: where a run computes, and how fmnist processes on one machine share its cores.

Every training holds a claim on this machine's cores while it runs (a locked
file in the temp directory: the lock goes with the process, however it dies).
With `threads = 0` a run takes its share of the cores: the cores this process
may use, divided by the fmnist trainings running now. Two thread pools that
each take every core spin against each other; measured on a 2-core machine, a
default run beside two busy ones took 6.9x its quiet time instead of about 3x.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import DeviceError, FmnistError


def pick_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; asking for one that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise DeviceError(f"device '{name}' was asked for but is not available here; use --device cpu or auto.")
    return torch.device(name)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions and matrix products natively (oneDNN says so)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume it does, as torch itself would
        return True


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run of `precision` computes in bfloat16 on `device` ("auto": where it is native)."""
    if precision == "bf16":
        return True
    if precision != "auto" or device.type == "mps":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_bf16()


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _claims_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"fmnist-{uid}-cores"


@contextlib.contextmanager
def cpu_share(threads: int = 0) -> Iterator[int]:
    """Hold a claim on this machine's cores and set torch's threads; yields the thread count.

    threads > 0 is used as it is; 0 means cores() // (fmnist trainings holding a
    claim now, this one included), at least 1. Denormal floats are flushed to
    zero: Adam's second moments of near-silent pixels sink into the denormal
    range, where x86 arithmetic crawls (about 1.5x per default epoch here).
    """
    torch.set_flush_denormal(True)
    claim = _claim()
    try:
        n = threads or max(1, cores() // max(1, _live_claims()))
        torch.set_num_threads(n)
        yield n
    finally:
        if claim is not None:
            _release(claim)


_CLAIMS = itertools.count(1)  # this process's claims, numbered (an object's id() can repeat once it is freed)


def _claim() -> tuple[IO, Path] | None:
    """A locked file of this process and its path, or None without file locks (all cores are then used)."""
    try:
        import fcntl

        d = _claims_dir()
        d.mkdir(mode=0o700, exist_ok=True)
        name = f"{os.getpid()}-{next(_CLAIMS)}"  # unique while it is held, also among one process's claims
        f = open(d / (name + ".new"), "w")  # held open: the lock lives with it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(d / (name + ".new"), d / name)  # only locked files carry a claim's name
        return f, d / name
    except (ImportError, OSError):
        return None


def _release(claim: tuple[IO, Path]) -> None:
    f, path = claim
    path.unlink(missing_ok=True)
    f.close()


def _live_claims() -> int:
    """Claims whose process is alive: their files are locked. Files of dead processes are removed."""
    try:
        import fcntl
    except ImportError:
        return 1
    live = 0
    for p in _claims_dir().glob("*[0-9]"):
        try:
            with open(p, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    live += 1  # locked: its process runs
                    continue
                p.unlink(missing_ok=True)  # unlocked: left by a process that died
                fcntl.flock(f, fcntl.LOCK_UN)
        except OSError:
            continue
    return live


# ---------------------------------------------------------------- many processes (torchrun)

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
