"""The learning-rate range test: a suggestion that survives a spiky loss, the sweep on real batches, and the
commands (fmnist lr-find, fmnist train --lr auto)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_dataset

from fmnist import cli, data, lr_find, runs
from fmnist.config import TrainConfig


def _curve(n: int = 100, spikes: bool = True, seed: int = 0) -> tuple[list[float], list[float], float]:
    """A range test's loss: flat at 2.3, falling between 1e-4 and 1e-2, lowest near 0.03, diverging past 0.3;
    noise, and (with `spikes`) sharp early spikes like a noisy first few hundred batches. -> (lrs, losses, the
    rate of the true lowest loss)."""
    rng = np.random.default_rng(seed)
    lrs = np.geomspace(1e-6, 10, n)
    x = np.log10(lrs)
    clean = 2.3 - 1.8 / (1 + np.exp(-(x + 3) * 2.5)) + 0.6 * np.maximum(0, x + 1.5) ** 2
    losses = clean + rng.normal(0, 0.04, n)
    if spikes:  # an early spike, the kind that fools the steepest-slope rule
        losses[10:15] += 3.0  # five batches three times as bad, near 1e-5
    return lrs.tolist(), losses.tolist(), float(lrs[int(np.argmin(clean))])


def _steepest(lrs: list[float], losses: list[float]) -> float:
    """The usual rule, for comparison: the steepest fall of the exponential moving average (beta 0.98)."""
    avg, s = 0.0, []
    for i, v in enumerate(losses):
        avg = 0.98 * avg + 0.02 * v
        s.append(avg / (1 - 0.98 ** (i + 1)))
    return lrs[int(np.argmin(np.gradient(np.array(s), np.log(lrs))))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_suggestion_survives_early_spikes(seed):
    lrs, losses, lowest = _curve(seed=seed)
    suggested, found_low = lr_find.suggest(lrs, losses)
    assert lowest / 2 <= found_low <= lowest * 2  # the lowest point found within a factor of 2 of the truth
    assert suggested == pytest.approx(found_low / 10)
    assert 1e-3 <= suggested <= 1e-2  # on the falling part of the curve
    fooled = _steepest(lrs, losses)
    assert fooled < 1e-4  # the steepest-slope rule lands just after the spike, a decade or more too low


def test_the_suggestion_without_spikes_and_with_a_non_finite_end():
    lrs, losses, lowest = _curve(spikes=False)
    assert lowest / 2 <= lr_find.suggest(lrs, losses)[1] <= lowest * 2
    cut = losses[:70] + [math.inf, math.nan]  # diverged to infinity: the curve ends there
    assert lr_find.suggest(lrs[:72], cut)[1] <= lrs[69]
    with pytest.raises(ValueError):
        lr_find.suggest(lrs[:4], losses[:4])


def test_sweep_on_real_batches_grows_the_rate_and_stops_when_it_diverges(tmp_path):
    tiny = make_dataset(tmp_path / "tiny")
    cfg = TrainConfig(data_dir=str(tiny), hidden=[32], batch_size=32, val_size=100, device="cpu", threads=1)
    splits = data.load(str(tiny), cfg.val_size, cfg.split_seed)
    found = lr_find.sweep(cfg, splits, torch.device("cpu"), start=1e-5, end=1e4, steps=60)
    assert found.stopped == "diverged" and len(found.lrs) < 60  # 1e4 with AdamW cannot train
    ratios = np.diff(np.log(found.lrs))
    assert np.allclose(ratios, math.log(1e9) / 59)  # exponential steps
    assert found.lrs[0] == pytest.approx(1e-5) and found.suggested_lr == pytest.approx(found.lowest_lr / 10)
    assert min(found.lrs) <= found.lowest_lr <= max(found.lrs)
    again = lr_find.sweep(cfg, splits, torch.device("cpu"), start=1e-5, end=1e4, steps=60)
    assert again.losses == found.losses  # the same seed, the same sweep


def test_lr_find_command_json_and_plot(tmp_path, capsys):
    tiny = make_dataset(tmp_path / "tiny")
    plot = tmp_path / "lr.png"
    argv = ["lr-find", "--data-dir", str(tiny), "--hidden", "32", "--batch-size", "32", "--val-size", "100",
            "--device", "cpu", "--threads", "1", "--steps", "40", "--plot", str(plot), "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suggested_lr"] == pytest.approx(out["lowest_lr"] / 10) and out["configured_lr"] == 3e-3
    assert len(out["lrs"]) == len(out["losses"]) == out["batches"] and plot.read_bytes()[:4] == b"\x89PNG"


def test_train_lr_auto_uses_and_records_the_suggestion(tmp_path, capsys):
    tiny = make_dataset(tmp_path / "tiny")
    argv = ["train", "--data-dir", str(tiny), "--out-dir", str(tmp_path / "runs"), "--name", "auto", "--hidden",
            "32", "--epochs", "1", "--batch-size", "64", "--val-size", "100", "--device", "cpu", "--threads", "1",
            "--no-plots", "--lr", "auto", "--quiet"]
    assert cli.main(argv) == 0
    run = tmp_path / "runs" / "auto"
    summary = runs.read_summary(run)
    assert runs.read_config(run).lr == pytest.approx(summary["lr_find"]["suggested_lr"])
    assert (run / "plots" / "lr_find.png").is_file()


@pytest.mark.parametrize("command", ["tune", "compare-init", "lr-find"])
def test_lr_auto_is_for_train_only(tmp_path, command, capsys):
    assert cli.main([command, "--lr", "auto", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--lr auto is for fmnist train" in err and "Traceback" not in err
