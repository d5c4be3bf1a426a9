"""Training: `fit(config)` runs one training into a run directory.

The loop, top to bottom, per epoch: seed from (seed, epoch), train, validate,
step the schedule, append a history row, snapshot the tracked neurons, save
`last.pt` atomically (and `best.pt` on a better validation accuracy). At the
end `best.pt` is reloaded and evaluated once on the test split.

Every random draw of epoch e depends only on (seed, e), and `last.pt` holds
everything else (weights, optimiser, schedule, history, snapshots), so a run
killed at any moment and resumed ends with the same weights as one that never
stopped (on the CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config as config_mod
from . import data, models
from .config import TrainConfig


class TrainError(RuntimeError):
    """A training that cannot go on (divergence, a bad run directory, a missing device)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; `run_dir` can be resumed."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


DRY_RUN_BATCHES = 5  # train batches per epoch in --dry-run (validation gets 2)


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]


# ---------------------------------------------------------------- small pieces

def pick_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; asking for one that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise TrainError(f"device '{name}' was asked for but is not available here; use --device cpu or auto.")
    return torch.device(name)


def use_all_cores() -> None:
    """Every core this process may use, and denormal floats flushed to zero.

    Adam's second-moment estimates of near-silent pixels sink into the denormal
    range, where x86 arithmetic is many times slower: flushing them made a
    default epoch about 1.5x faster on the 2-core test machine.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, data.FILE_MODE)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def make_optimizer(cfg: TrainConfig, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimiser of `cfg`, fused into one kernel where torch has one for the device.

    The default for-loop AdamW took a third of a CPU epoch of the default MLP;
    the fused one made the epoch about 1.25x faster (2-core test machine).
    """
    params = list(params)
    if cfg.optimizer == "sgd":
        cls, kw = torch.optim.SGD, dict(momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        cls, kw = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), {}
    if (device or torch.device("cpu")).type in ("cpu", "cuda"):
        try:
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, **kw)
        except (TypeError, RuntimeError):  # an older torch without a fused kernel: same maths, slower
            pass
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def make_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """(scheduler, per_batch) — onecycle steps every batch, the others once per epoch."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr), False
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=steps_per_epoch * epochs), True
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=cfg.min_lr), False
    return None, False


def build_model(cfg: TrainConfig) -> nn.Module:
    return models.create(cfg.model, **cfg.model_kwargs())


# ---------------------------------------------------------------- one epoch

def train_one_epoch(model: nn.Module, loader: data.BatchLoader, opt: torch.optim.Optimizer,
                    sched=None, label_smoothing: float = 0.0, progress: bool = False,
                    desc: str = "") -> tuple[float, float, float]:
    """(mean loss, accuracy, seconds) over the epoch; `sched` is stepped per batch if given."""
    from tqdm import tqdm

    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    n = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += loss.detach() * len(y)  # stays on the device: no sync per batch
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
    return loss_sum.item() / n, correct.item() / n, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: data.BatchLoader, return_predictions: bool = False):
    """(mean loss, accuracy) or, with return_predictions, (loss, acc, probabilities (N, 10))."""
    model.eval()
    loss_sum, correct, n, probs = 0.0, 0, 0, []
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        if return_predictions:
            probs.append(logits.softmax(1).cpu())
    if return_predictions:
        return loss_sum / n, correct / n, torch.cat(probs)
    return loss_sum / n, correct / n


# ---------------------------------------------------------------- the run

def _default_name(cfg: TrainConfig) -> str:
    return f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"checkpoint {path} does not exist.") from None
    except Exception as e:  # a damaged or foreign file: say which
        raise TrainError(f"{path} is not a readable fmnist checkpoint ({type(e).__name__}).") from None


def _write_derived(run_dir: Path, history: list[dict], neurons: dict[int, list[torch.Tensor]]) -> None:
    """history.jsonl and neurons.npz, both rebuilt from the checkpoint state."""
    write_text(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    arrays = {f"neuron_{k}": torch.stack(v).numpy() for k, v in neurons.items()}
    arrays["epochs"] = np.arange(len(next(iter(neurons.values())))) if neurons else np.zeros(0)

    def save_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(f, **arrays)

    atomic_write(run_dir / "neurons.npz", save_npz)


def fit(cfg: TrainConfig, resume: str | Path | None = None, progress: bool = False,
        echo: Callable[[str], None] = lambda s: None, command: str = "",
        on_epoch: Callable[[dict], None] | None = None, test: bool = True) -> Run:
    """Train `cfg` into runs/<name>/ (or continue the run in `resume`); returns the Run.

    `on_epoch(row)` is called after each epoch's checkpoint (a tuner reports and
    prunes there). With test=False the test split is not touched at all: the
    summary then has no test figures and no figures are drawn (for tuning,
    where every decision must rest on validation alone).
    """
    t_start = time.perf_counter()
    state: dict | None = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "last.pt").is_file():
            raise TrainError(f"{run_dir} holds no last.pt to resume from.")
        state = load_checkpoint(run_dir / "last.pt")
        cfg = config_mod.from_dict(state["config"], where=str(run_dir / "last.pt"))
    cfg.validate()
    epochs = min(cfg.epochs, 2) if cfg.dry_run else cfg.epochs
    device = pick_device(cfg.device)
    if device.type == "cpu":
        use_all_cores()

    splits = data.load(cfg.data_dir or None, cfg.val_size, cfg.split_seed)
    if resume is None:
        run_dir = Path(cfg.out_dir) / (cfg.name or _default_name(cfg))
        if (run_dir / "last.pt").exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             "or pick another --name.")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(cfg, name=run_dir.name)
    write_text(run_dir / "config.toml", config_mod.to_toml(cfg))

    torch.manual_seed(cfg.seed)
    model = models.init_weights(build_model(cfg), cfg.init, cfg.init_std).to(device)
    aug = data.Augment(cfg.flip, cfg.translate, cfg.erase)
    limit = DRY_RUN_BATCHES if cfg.dry_run else None
    train_loader = data.BatchLoader(*splits.train, cfg.batch_size, shuffle=True, augment=aug,
                                    seed=cfg.seed, device=device, max_batches=limit)
    val_loader = data.BatchLoader(*splits.val, 1024, device=device, max_batches=2 if cfg.dry_run else None)
    opt = make_optimizer(cfg, model.parameters(), device)
    sched, per_batch = make_schedule(cfg, opt, len(train_loader), epochs)

    tb = _tensorboard(run_dir) if cfg.tensorboard else None
    history: list[dict] = []
    neurons = {k: [t] for k, t in zip(cfg.track_neurons, models.neuron_weights(model, cfg.track_neurons))}
    best = {"val_acc": -1.0, "epoch": 0}
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        neurons = {int(k): list(v) for k, v in state["neurons"].items()}
        start_epoch = state["epoch"] + 1
        echo(f"resuming {run_dir} after epoch {state['epoch']}")
    _write_derived(run_dir, history, neurons)

    try:
        for epoch in range(start_epoch, epochs + 1):
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout draws: a function of (seed, epoch)
            train_loader.set_epoch(epoch)
            lr = opt.param_groups[0]["lr"]
            tr_loss, tr_acc, secs = train_one_epoch(
                model, train_loader, opt, sched if per_batch else None, cfg.label_smoothing,
                progress, desc=f"epoch {epoch}/{epochs}")
            val_loss, val_acc = evaluate(model, val_loader)
            if not (math.isfinite(tr_loss) and math.isfinite(val_loss)):
                raise TrainError(
                    f"training diverged at epoch {epoch} (loss is {tr_loss}); try a lower --lr. "
                    f"The last good checkpoint is {run_dir / 'last.pt'}.")
            if sched is not None and not per_batch:
                sched.step(val_loss) if cfg.schedule == "plateau" else sched.step()
            row = dict(epoch=epoch, lr=lr, train_loss=tr_loss, train_acc=tr_acc, val_loss=val_loss,
                       val_acc=val_acc, seconds=round(secs, 3))
            history.append(row)
            for k, t in zip(cfg.track_neurons, models.neuron_weights(model, cfg.track_neurons)):
                neurons[k].append(t)
            cfg_dict = dataclasses.asdict(cfg)
            if val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch}
                _save({"model": model.state_dict(), "config": cfg_dict, "epoch": epoch, "val_acc": val_acc},
                      run_dir / "best.pt")
            _save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict() if sched is not None else {},
                   "config": cfg_dict, "epoch": epoch, "history": history, "best": best,
                   "neurons": {str(k): torch.stack(v) for k, v in neurons.items()}},
                  run_dir / "last.pt")
            _write_derived(run_dir, history, neurons)
            if tb is not None:
                _log_tensorboard(tb, row, neurons)
            if on_epoch is not None:
                on_epoch(row)
            echo(f"epoch {epoch:3d}/{epochs}  lr {lr:.2e}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
                 f"val loss {val_loss:.4f} acc {val_acc:.4f}  {secs:.1f}s")
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    finally:
        if tb is not None:
            tb.close()

    # The test split, once, with the weights chosen on validation.
    final_first_layer = _first_layer_pictures(model)
    best_state = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best_state["model"])
    test_figures: dict[str, Any] = {}
    if test:
        n_test = 2048 if cfg.dry_run else len(splits.test[1])
        test_split = (splits.test[0][:n_test], splits.test[1][:n_test])
        test_loss, test_acc, test_probs = evaluate(model, data.BatchLoader(*test_split, 1024, device=device),
                                                   return_predictions=True)
        test_figures = dict(test_accuracy=test_acc, test_loss=test_loss)
    images_per_epoch = min(len(splits.train[1]), len(train_loader) * cfg.batch_size)  # fewer in a dry run
    summary = dict(
        **test_figures, best_val_accuracy=best["val_acc"],
        best_epoch=best["epoch"], epochs=len(history),
        wall_seconds=round(time.perf_counter() - t_start, 2),
        train_samples_per_second=round(len(history) * images_per_epoch
                                       / max(sum(r["seconds"] for r in history), 1e-9)),
        parameters=models.count_parameters(model), device=str(device), torch_version=torch.__version__,
        seed=cfg.seed, command=command or " ".join(["fmnist"] + sys.argv[1:]),
    )
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if cfg.plots and test:
        write_figures(run_dir, splits, test_probs, final_first_layer, is_conv(model))
    return Run(run_dir, summary, history)


# ---------------------------------------------------------------- figures and TensorBoard

def is_conv(model: nn.Module) -> bool:
    return isinstance(models.first_layer(model), nn.Conv2d)


def _first_layer_pictures(model: nn.Module) -> np.ndarray:
    count = models.first_layer(model).weight.shape[0]
    return models.neuron_weights(model, list(range(1, count + 1))).numpy()


def write_figures(run_dir: Path, splits: data.Splits, test_probs: torch.Tensor, first_layer: np.ndarray,
                  conv: bool) -> list[Path]:
    """Every figure into run_dir/plots/ and report.html (matplotlib is imported only now)."""
    from . import plots, report

    n = len(test_probs)
    paths = plots.plot_run(run_dir, splits.test[0][:n].numpy(), splits.test[1][:n].numpy(), test_probs.numpy(),
                           splits.train[0].numpy(), splits.train[1].numpy(), first_layer, conv)
    return [*paths, report.write(run_dir)]


def plot_existing(run_dir: str | Path, data_dir: str | None = None, device: str = "auto") -> list[Path]:
    """Figures and report of a finished run, recomputed from its files (`fmnist plot`)."""
    run_dir = Path(run_dir)
    missing = [f for f in ("best.pt", "last.pt", "history.jsonl", "summary.json", "neurons.npz")
               if not (run_dir / f).is_file()]
    if missing:
        raise TrainError(f"{run_dir} is not a finished fmnist run (no {missing[0]}).")
    model, cfg, _ = load_model(run_dir / "best.pt")
    last = load_checkpoint(run_dir / "last.pt")
    final = build_model(cfg)
    final.load_state_dict(last["model"])
    dev = pick_device(device)
    splits = data.load(data_dir or cfg.data_dir or None, cfg.val_size, cfg.split_seed)
    _, _, probs = evaluate(model.to(dev), data.BatchLoader(*splits.test, 1024, device=dev), return_predictions=True)
    return write_figures(run_dir, splits, probs, _first_layer_pictures(final), is_conv(final))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install 'fmnist[tensorboard]'.") from None
    return SummaryWriter(str(run_dir / "tb"))


def _log_tensorboard(tb, row: dict, neurons: dict[int, list[torch.Tensor]]) -> None:
    e = row["epoch"]
    for split in ("train", "val"):
        tb.add_scalar(f"loss/{split}", row[f"{split}_loss"], e)
        tb.add_scalar(f"accuracy/{split}", row[f"{split}_acc"], e)
    tb.add_scalar("lr", row["lr"], e)
    for k, snaps in neurons.items():
        w = snaps[-1]
        tb.add_image(f"neuron_{k}", ((w / w.abs().max().clamp(min=1e-12) + 1) / 2)[None], e)  # 0.5 = zero weight
    tb.flush()


# ---------------------------------------------------------------- evaluation of a saved model

def load_model(path: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """Model, config and checkpoint from a run directory (its best.pt) or a .pt file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
        if not path.is_file():
            raise TrainError(f"{path.parent} is not a run directory (no best.pt).")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainError(f"{path} is not an fmnist checkpoint.")
    cfg = config_mod.from_dict(ckpt["config"], where=str(path))
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def evaluate_checkpoint(path: str | Path, split: str = "test", data_dir: str | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy and confusion matrix of a saved model on a split."""
    model, cfg, ckpt = load_model(path)
    dev = pick_device(device)
    splits = data.load(data_dir or cfg.data_dir or None, cfg.val_size, cfg.split_seed)
    x, y = splits.test if split == "test" else splits.val
    loss, acc, probs = evaluate(model.to(dev), data.BatchLoader(x, y, 1024, device=dev), return_predictions=True)
    pred = probs.argmax(1)
    cm = torch.zeros(10, 10, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    return dict(checkpoint=str(path), split=split, images=len(y), epoch=ckpt.get("epoch"),
                accuracy=acc, loss=loss, per_class_accuracy=dict(zip(data.CLASSES, per_class)),
                confusion_matrix=cm.tolist())
