"""Parallel `fmnist tune` workers on one machine: do they share its cores, or fight over them?

    python benchmarks/tune_workers.py [--trials 8] [--epochs 5] [--repeats 2] [--data-dir DIR]

Runs, in turn and `--repeats` times: one worker doing all the trials; two
workers doing half each on one journal (each takes its share of the cores,
the default); and two workers that each take every core (`--threads` = all
cores, how fmnist behaved before it shared them). The space fixes everything
but the learning rate, so every trial costs the same, and the pruner is off.
Prints the wall time of each and the median ratio to one worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = """\
lr = {low = 1e-3, high = 1e-2, log = true}
optimizer = "adamw"
weight_decay = 0.0
batch_size = 128
depth = 2
width = [256]
dropout = 0.0
batch_norm = true
flip = true
translate = 0
erase = 0.0
label_smoothing = 0.0
schedule = "onecycle"
"""


def study(out: Path, workers: int, trials: int, epochs: int, data_dir: str | None, threads: int) -> float:
    """Wall seconds for `workers` processes to run `trials` trials in all on one journal."""
    space = out.with_suffix(".space.toml")
    space.write_text(SPACE)
    cmd = [sys.executable, "-m", "fmnist", "tune", "--out-dir", str(out), "--space", str(space), "--epochs",
           str(epochs), "--pruner", "none", "--trials", str(trials // workers), "--quiet", "--seed", "0",
           "--threads", str(threads)] + (["--data-dir", data_dir] if data_dir else [])
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(workers)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a worker failed")
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8, help="trials in all (default: 8)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial (default: 5)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three set-ups (default: 2)")
    p.add_argument("--data-dir", help="directory with the IDX files (default: search)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    setups = {"1 worker": (1, 0), "2 workers, shared cores": (2, 0), f"2 workers, {cores} threads each": (2, cores)}
    times: dict[str, list[float]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (workers, threads) in setups.items():
                t = study(Path(tmp) / f"{r}-{workers}-{threads}", workers, args.trials, args.epochs, args.data_dir,
                          threads)
                times[name].append(t)
                print(f"round {r + 1}: {name:<28} {t:6.1f} s", flush=True)
    one = statistics.median(times["1 worker"])
    print(f"\n{args.trials} trials of {args.epochs} epochs, {cores} cores; medians over {args.repeats} rounds:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<28} {m:6.1f} s  ({m / one:.2f}x the time of 1 worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
