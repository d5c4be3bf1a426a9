"""Which learning rate: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; fastai's and Lightning's `lr_find`).

    found = lr_find.sweep(cfg, splits, device)   # -> Sweep: rates, losses, the smoothed loss, a suggestion

From a fresh network initialised as the training would be, the learning rate
grows exponentially from `start` to `end` over `steps` batches of the training
split (with the run's optimiser, batch size, augmentation and precision); the
sweep stops once a moving average of the loss exceeds DIVERGE times its lowest
value.

The suggestion: a tenth of the rate at which the loss, smoothed without lag
(`smooth`: a centred running median, then a mean), is lowest. The rule most
tools default to, the steepest slope of the loss, is fooled by a noisy curve
(an early spike is followed by the steepest fall of all, at a rate far too
small; Lightning's users meet it often), and a moving average smooths spikes
into long bumps, it does not remove them. The minimum of a median-smoothed
loss moves little with noise, and a tenth of it lies on the falling part of
the curve, where training is fast and stable. `suggest` takes the raw losses,
so the rule is tested on deliberately spiky curves (tests/test_lr_find.py).

Distillation is left out of the sweep (the teacher's targets do not change
which rate the network can take); the sweep's weights are thrown away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import data, devices, models, runs, train
from .config import TrainConfig

START, END, STEPS = 1e-6, 10.0, 100  # the sweep's default range and length (batches)
BETA = 0.9  # the moving average that decides when to stop: its weight on the past (about ten batches count)
DIVERGE = 4.0  # stop once that average exceeds this many times its lowest
WINDOW = 0.1  # the share of the sweep the suggestion's centred smoothing spans
SKIP = 0.1  # the first tenth of the sweep is not a candidate for the minimum (the average is still settling)


@dataclass
class Sweep:
    """One range test: each batch's rate, raw loss and smoothed loss, the suggestion and why the sweep ended."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    lowest_lr: float  # where the smoothed loss is lowest (the suggestion is a tenth of it)
    stopped: str  # "diverged" or "end of range"

    def to_dict(self) -> dict:
        return asdict(self)


def smooth(losses: list[float]) -> list[float]:
    """The losses smoothed without lag: a centred running median (an isolated spike does not move it), then a
    centred running mean of it, each over WINDOW of the sweep (at least 5 points); the ends use what they have.
    (A moving average, as fastai and Lightning smooth, lags behind a falling loss by its length, and on an
    exponential sweep that moves the lowest point a decade towards the divergence.)"""
    n = len(losses)
    half = max(2, round(WINDOW * n / 2))
    a = np.asarray(losses, dtype=np.float64)
    med = np.array([np.median(a[max(0, i - half):i + half + 1]) for i in range(n)])
    return [float(med[max(0, i - half):i + half + 1].mean()) for i in range(n)]


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(the suggested rate, the rate of the lowest smoothed loss) of a sweep's raw `losses` at rates `lrs`.

    A tenth of where the smoothed loss is lowest, the first SKIP of the sweep left out; a loss that is not
    finite ends the curve there. Too short a sweep (under 5 finite points) is a ValueError.
    """
    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    if finite < 5:
        raise ValueError(f"the sweep has {finite} finite losses; it needs at least 5")
    s = smooth(losses[:finite])
    first = min(int(SKIP * finite), finite - 1)
    low = min(range(first, finite), key=s.__getitem__)
    return lrs[low] / 10, lrs[low]


def sweep(cfg: TrainConfig, splits: data.Splits, device: torch.device, start: float = START, end: float = END,
          steps: int = STEPS, echo=lambda s: None) -> Sweep:
    """The range test of `cfg`'s model, optimiser, batch size, augmentation and precision on the training split."""
    if not (0 < start < end) or steps < 5:
        raise ValueError("the sweep needs 0 < start < end and at least 5 steps")
    torch.manual_seed(cfg.seed)
    model = models.init_weights(runs.build_model(cfg), cfg.init, cfg.init_std).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = train.make_optimizer(cfg, model, device)
    ratios = [group["lr"] / cfg.lr for group in opt.param_groups]  # batch-norm biases may have their own multiple
    loader = data.BatchLoader(*splits.train, cfg.batch_size, shuffle=True, augment=data.Augment(
        cfg.flip, cfg.translate, cfg.erase, cfg.photo_aug), seed=cfg.seed, device=device)
    bf16 = devices.use_bf16(cfg.precision, device)
    gamma = (end / start) ** (1 / (steps - 1))
    lrs, losses = [], []
    best, avg, stopped, epoch = math.inf, 0.0, "end of range", 0
    while len(lrs) < steps and stopped != "diverged":
        loader.set_epoch(epoch)
        for x, y in loader:
            lr = start * gamma ** len(lrs)
            for group, ratio in zip(opt.param_groups, ratios):
                group["lr"] = lr * ratio
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            avg = BETA * avg + (1 - BETA) * value
            smoothed = avg / (1 - BETA ** len(lrs))
            best = min(best, smoothed)
            if len(lrs) % 10 == 0:
                echo(f"lr {lr:.2e}  loss {value:.4f}  smoothed {smoothed:.4f}")
            if not math.isfinite(value) or smoothed > DIVERGE * best:
                stopped = "diverged"
                break
            if len(lrs) == steps:
                break
        epoch += 1
    suggested, lowest = suggest(lrs, losses)
    finite = [v if math.isfinite(v) else float("nan") for v in losses]
    return Sweep(lrs, losses, smooth(finite), suggested, lowest, stopped)
