"""fmnist's fast path against the tutorial pipeline, in one process.

    python benchmarks/speed.py [--epochs 6] [--target 0.88] [--data-dir DIR]

Both train the default MLP from the same initial weights with AdamW at the
same learning rate (constant, no schedule; fmnist uses torch's fused AdamW
kernel, the tutorial the plain one), flip augmentation, on the
same 55,000 training images, and validate on the same 5,000 after each epoch.
The fast path uses fmnist's default batch size, the tutorial 64. Their epochs
alternate, so that a drift in the machine's speed hits both alike.
Printed: seconds per epoch of each, their ratio (median over the epochs),
training images per second, and the wall time (training + validation) each
needs to reach the target validation accuracy.

Measured (2-core x86_64 VM, torch 2.13.0 CPU, 6 epochs): see README.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tutorial_baseline as tut  # noqa: E402

from fmnist import data, devices, evaluate, models, runs, train  # noqa: E402
from fmnist.config import TrainConfig  # noqa: E402


class Contender:
    """One pipeline: a function training one epoch (returns seconds) and one validating (returns accuracy)."""

    def __init__(self, name, train_epoch, validate):
        self.name, self.train_epoch, self.validate = name, train_epoch, validate
        self.times, self.accs, self.reached, self.wall = [], [], None, 0.0

    def epoch(self, e: int, target: float, n_train: int) -> None:
        secs = self.train_epoch(e)
        t0 = time.perf_counter()
        acc = self.validate()
        self.wall += secs + time.perf_counter() - t0
        self.times.append(secs)
        self.accs.append(acc)
        if self.reached is None and acc >= target:
            self.reached = (e, self.wall)
        print(f"  {self.name:<9} epoch {e}: {secs:6.2f}s  {n_train / secs:8.0f} images/s  val acc {acc:.4f}",
              flush=True)


def race(cfg, splits, model0, epochs: int, target: float, seed: int) -> tuple[Contender, Contender]:
    """One race, fmnist against the tutorial, from the same initial weights; epochs alternate."""
    n_train = len(splits.train[1])
    fast_model = copy.deepcopy(model0)
    fast_opt = train.make_optimizer(cfg, fast_model)
    loader = data.BatchLoader(*splits.train, cfg.batch_size, shuffle=True, augment=data.Augment(flip=True),
                              seed=seed)
    val = data.BatchLoader(*splits.val, 1024)

    def fast_epoch(e):
        loader.set_epoch(e)
        return train.train_one_epoch(fast_model, loader, train.Step(fast_opt))[2]

    tut_model = copy.deepcopy(model0)
    tut_opt = torch.optim.AdamW(tut_model.parameters(), lr=cfg.lr)  # as a tutorial writes it
    tr_loader, va_loader = tut.loaders(splits)
    torch.manual_seed(seed)

    fast = Contender("fmnist", fast_epoch, lambda: evaluate.evaluate(fast_model, val)[1])
    base = Contender("tutorial", lambda e: tut.train_epoch(tut_model, tr_loader, tut_opt),
                     lambda: tut.val_accuracy(tut_model, va_loader))
    # Epochs alternate, so both pipelines see the same machine (a VM's speed drifts over a minute).
    for e in range(1, epochs + 1):
        base.epoch(e, target, n_train)
        fast.epoch(e, target, n_train)
    return base, fast


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--target", type=float, default=0.88)
    p.add_argument("--repeats", type=int, default=3, help="races to run; medians are reported")
    p.add_argument("--data-dir")
    args = p.parse_args()

    with devices.cpu_share():
        return run(args)


def run(args: argparse.Namespace) -> int:
    cfg = runs.resolve(TrainConfig())
    splits = data.load(args.data_dir, cfg.val_size, cfg.split_seed)
    n_train = len(splits.train[1])
    torch.manual_seed(0)
    model0 = models.init_weights(runs.build_model(cfg), cfg.init)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {cfg.model} {cfg.hidden}, "
          f"{cfg.optimizer} lr {cfg.lr}; fast path batch {cfg.batch_size}, baseline batch 64")

    epoch_ratios, reach_ratios = [], []
    for r in range(args.repeats):
        print(f"\nrace {r + 1}/{args.repeats}")
        base, fast = race(cfg, splits, model0, args.epochs, args.target, seed=r + 1)
        mb, mf = statistics.median(base.times), statistics.median(fast.times)
        epoch_ratios.append(mb / mf)
        print(f"  median epoch: tutorial {mb:.2f}s ({n_train / mb:.0f} images/s), "
              f"fmnist {mf:.2f}s ({n_train / mf:.0f} images/s) -> {mb / mf:.1f}x faster per epoch")
        for c in (base, fast):
            print(f"  time to {args.target:.0%} val: {c.name:<9} " + (f"{c.reached[1]:.1f}s (epoch {c.reached[0]})"
                  if c.reached else f"not reached in {args.epochs} epochs"))
        if base.reached and fast.reached:
            reach_ratios.append(base.reached[1] / fast.reached[1])
            print(f"  time-to-{args.target:.0%} ratio: {reach_ratios[-1]:.1f}x sooner")

    print(f"\nover {args.repeats} races: per-epoch speed-up median {statistics.median(epoch_ratios):.1f}x "
          f"(all: {', '.join(f'{x:.1f}' for x in epoch_ratios)})")
    if reach_ratios:
        print(f"time to {args.target:.0%} validation accuracy: median {statistics.median(reach_ratios):.1f}x sooner "
              f"(all: {', '.join(f'{x:.1f}' for x in reach_ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
