"""Where a run computes and how fast: the device, the precision policy, CPU threads and core claims.

Every training holds a claim on this machine's cores while it runs (a locked
file in the temp directory: the lock goes with the process, however it dies).
With `threads = 0` a run takes its share of the cores: the cores this process
may use, divided by the fmnist trainings running now. Two thread pools that
each take every core spin against each other; measured on a 2-core machine, a
default run beside two busy ones took 6.9x its quiet time instead of about 3x.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch

from .errors import DeviceError


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


def instruction_set() -> str:
    """The widest vector instructions this CPU offers for the arithmetic of training, in words: "AMX",
    "AVX-512 BF16", "AVX-512", "AVX2", "NEON" or "no AVX2": the CPU's flags where Linux lists them, else
    torch's own probe (`torch.backends.cpu.get_cpu_capability`). Benchmarks name it beside every figure. Where
    ONEDNN_MAX_CPU_ISA holds the kernels below what the CPU offers (a wider CPU made to compute as a narrower one
    does), it says both: "AVX2 (ONEDNN_MAX_CPU_ISA; the CPU has AMX)"."""
    offered = _offered()
    limit = _ISA_LIMITS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower())
    if limit is not None and offered in _ORDER and _ORDER.index(limit) < _ORDER.index(offered):
        return f"{limit} (ONEDNN_MAX_CPU_ISA; the CPU has {offered})"
    return offered


_ORDER = ("no AVX2", "AVX2", "AVX-512", "AVX-512 BF16", "AMX")  # narrowest first
_ISA_LIMITS = {"avx2": "AVX2", "avx2_vnni": "AVX2", "avx2_vnni_2": "AVX2", "avx512_core": "AVX-512",
               "avx512_core_vnni": "AVX-512", "avx512_core_bf16": "AVX-512 BF16", "avx512_core_amx": "AMX"}


def _offered() -> str:
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "NEON"
    info = Path("/proc/cpuinfo")
    if info.exists():
        words = set(info.read_text().split())
    else:  # no list of flags: torch's probe ("AVX2", "AVX512", "DEFAULT", ...) says what its kernels use
        words = {torch.backends.cpu.get_cpu_capability().lower().replace("avx512", "avx512f")}
    if {"amx_bf16", "amx_tile"} <= words:
        return "AMX"
    if "avx512_bf16" in words:
        return "AVX-512 BF16"
    if "avx512f" in words:
        return "AVX-512"
    if "avx2" in words:
        return "AVX2"
    return "no AVX2"


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
