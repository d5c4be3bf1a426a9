"""Training: `fit(config)` runs one training into a run directory.

The loop, top to bottom, per epoch: seed from (seed, epoch), train, validate,
step the schedule, append a history row, snapshot the tracked neurons, save
`last.pt` atomically (and `best.pt` on a better validation accuracy). At the
end `best.pt` is reloaded and evaluated once on the test split.

Every random draw of epoch e depends only on (seed, e), and `last.pt` holds
everything else (weights, optimiser, schedule, history, snapshots), so a run
killed at any moment and resumed ends with the same weights as one that never
stopped (on the CPU: last.pt also keeps the number of threads, since float
sums split over another number of threads round differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data, distributed, models, runs
from .config import TrainConfig
from .errors import Interrupted, RunError, TrainError
from .evaluate import evaluate

DRY_RUN_BATCHES = 5  # train batches per epoch in --dry-run (validation gets 2)


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]


# ---------------------------------------------------------------- small pieces

def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimiser of `cfg` for `model`'s parameters, fused into one kernel where torch has one for the device.

    The default for-loop AdamW took a third of a CPU epoch of the default MLP;
    the fused one made the epoch about 1.25x faster (2-core test machine).
    With `bn_bias_lr_scale` != 1 the batch-norm biases form a second group with
    that multiple of the learning rate and the weight decay divided by it.
    """
    bn_biases = {id(m.bias) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    params: list = list(model.parameters())
    if cfg.bn_bias_lr_scale != 1 and bn_biases:
        params = [{"params": [p for p in params if id(p) not in bn_biases]},
                  {"params": [p for p in params if id(p) in bn_biases], "lr": cfg.lr * cfg.bn_bias_lr_scale,
                   "weight_decay": cfg.weight_decay / cfg.bn_bias_lr_scale}]
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
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps_per_epoch * epochs), True
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=cfg.min_lr), False
    if cfg.schedule == "linear":  # airbench's: up from 0 for the warm-up steps, then straight down to 0
        total = steps_per_epoch * epochs
        rise = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0

        def factor(step: int) -> float:
            if step < rise:
                return (step + 1) / rise
            return max(0.0, (total - step) / max(1, total - rise))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor), True
    return None, False


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                 weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - weight) x cross-entropy with the labels + weight x T^2 x KL(teacher || student) at temperature T
    (Hinton, Vinyals, Dean 2015; T^2 keeps the soft targets' gradients on the labels' scale)."""
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature**2 * soft


class Teacher(nn.Module):
    """A trained model, frozen, run as it was trained: in its memory format and precision (a channels-last bf16
    convnet teaching an fp32 MLP costs a third of the fp32 teacher's time where the CPU computes bfloat16)."""

    def __init__(self, model: nn.Module, trained: TrainConfig, device: torch.device):
        super().__init__()
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.channels_last = trained.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bf16 = distributed.use_bf16(trained.precision, device) and (
            device.type != "cpu" or distributed.native_bf16())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()


def load_teacher(cfg: TrainConfig, device: torch.device) -> Teacher | None:
    """The teacher run's best model, frozen, or None without --teacher."""
    if not cfg.teacher:
        return None
    try:
        teacher, trained, _ = runs.load_model(cfg.teacher)
    except RunError as e:
        raise TrainError(f"--teacher: {e} Train the teacher first (for the mlp-best preset: fmnist train "
                         "--preset cnn-fast --name cnn-fast) or point --teacher at a trained run.") from None
    return Teacher(teacher, trained, device)


def make_ema(cfg: TrainConfig, model: nn.Module):
    """An exponential moving average of the weights (and batch-norm statistics), or None.

    torch's AveragedModel: the first update copies the weights, each later one
    moves the average (1 - ema) of the way to them.
    """
    if cfg.ema == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


# ---------------------------------------------------------------- one epoch

def train_one_epoch(model: nn.Module, loader: data.BatchLoader, opt: torch.optim.Optimizer,
                    sched=None, label_smoothing: float = 0.0, progress: bool = False,
                    desc: str = "", ema=None, bf16: bool = False, teacher: nn.Module | None = None,
                    distill: tuple[float, float] = (4.0, 0.5),
                    world: distributed.World = distributed.World()) -> tuple[float, float, float]:
    """(mean loss, accuracy, seconds) over the epoch; `sched` is stepped per batch if given, `ema` updated
    after every step; `bf16`: the forward pass under bfloat16 autocast; `teacher`: distillation at
    `distill` = (temperature, weight). With several processes (`world`), each rank's loss is scaled so that
    the gradients DistributedDataParallel averages are the global batch's, and the figures are all ranks'."""
    from tqdm import tqdm

    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    n = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            else:
                with torch.autocast(loader.device.type, enabled=False):
                    taught = teacher(x)  # the teacher sees the same augmented batch
                loss = distill_loss(logits.float(), taught, y, *distill, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        if world.size > 1:  # this rank's share of the global batch's mean loss, times world size
            (loss * (len(y) * world.size / loader.global_count)).backward()
        else:
            loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        if sched is not None:
            sched.step()
        loss_sum += loss.detach() * len(y)  # stays on the device: no sync per batch
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
    loss_total, right, seen = distributed.all_sum([loss_sum.item(), correct.item(), n], world)
    return loss_total / seen, right / seen, time.perf_counter() - start


# ---------------------------------------------------------------- the run

def fit(cfg: TrainConfig, resume: str | Path | None = None, progress: bool = False,
        echo: Callable[[str], None] = lambda s: None, command: str = "",
        on_epoch: Callable[[dict], None] | None = None, test: bool = True,
        data_dir: str | None = None) -> Run:
    """Train `cfg` into <out_dir>/<name>/ (or continue the run in `resume`); returns the Run.

    Everything a user can get wrong is found before the run directory is
    created: the config's ranges, the model's arguments, the data and its sizes.
    `data_dir` says where the data is now when resuming (it is not part of a
    run's identity). `on_epoch(row)` is called after each epoch's checkpoint (a
    tuner reports and prunes there). With test=False the test split is not
    touched at all: the summary then has no test figures and no figures are
    drawn (for tuning, where every decision must rest on validation alone).
    """
    t_start = time.perf_counter()
    world, device = distributed.start(cfg.device)
    if not world.main:  # one voice: rank 0's
        echo, progress = (lambda s: None), False
    try:
        return _fit_in_world(cfg, resume, progress, echo, command, on_epoch, test, data_dir, world, device, t_start)
    finally:
        if world.size > 1:
            distributed.stop()


def _fit_in_world(cfg, resume, progress, echo, command, on_epoch, test, data_dir, world, device, t_start) -> Run:
    state: dict | None = None
    if resume is None:
        resume = distributed.on_main(lambda: _restarted_run(cfg), world)
        if resume is not None:
            echo(f"torchrun restarted this training: continuing {resume}")
    if resume is not None:
        run_dir = Path(resume)
        state, cfg = distributed.on_main(lambda: _resume_state(run_dir), world)
        data_at = runs.data_dir_for(cfg.data_dir, data_dir)
        if world.size == 1:  # one process continues on the device the run chose (torchrun's group is set up)
            device = distributed.pick_device(cfg.device)
    else:
        cfg = runs.resolve(cfg)
        if cfg.data_dir:  # a relative path means "from here": keep it meaningful from anywhere
            cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()))
        if cfg.teacher:  # likewise
            cfg = dataclasses.replace(cfg, teacher=str(Path(cfg.teacher).resolve()))
        data_at = cfg.data_dir or None

    def check_batch() -> None:
        if cfg.batch_size % world.size:
            raise TrainError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                             f"{world.size} processes; choose a multiple of {world.size}.")

    distributed.on_main(check_batch, world)
    teacher = load_teacher(cfg, device)  # before anything is written: a missing teacher is one sentence
    splits = data.load(data_at, cfg.val_size, cfg.split_seed)
    if state is not None and state.get("data", splits.digest) != splits.digest:
        raise RunError(f"{splits.directory} does not hold the data that {run_dir} was trained on (the files differ); "
                       "point --data-dir at that data.")
    if cfg.tensorboard and world.main:
        _summary_writer()  # a missing package is said before anything is written
    created, held = False, None
    if resume is None:
        def create() -> str:
            nonlocal created, held
            made, created, held = runs.create(cfg.out_dir, cfg.name or runs.default_name(cfg))
            _note_for_restarts(cfg.out_dir, made.name)
            return made.name

        run_dir = Path(cfg.out_dir) / distributed.on_main(create, world)
        cfg = dataclasses.replace(cfg, name=run_dir.name)
    elif world.main:
        held = runs.lock(run_dir)
        runs.clean_temp(run_dir)
    # Float sums split over another number of threads round differently: a resumed run keeps its thread count.
    saved = (state or {}).get("threads", 0) if (state or {}).get("world_size", 1) == world.size else 0
    threads = cfg.threads or saved or (max(1, distributed.cores() // world.local_size) if world.size > 1 else 0)
    share = distributed.cpu_share(threads) if device.type == "cpu" else contextlib.nullcontext()
    try:
        with share:
            return _fit(cfg, run_dir, state, splits, device, progress, echo, command, on_epoch, test, t_start,
                        teacher, world)
    except KeyboardInterrupt:
        if not world.main:
            raise
        if (run_dir / "summary.json").is_file() and not (run_dir / "report.html").is_file() and cfg.plots:
            raise Interrupted(run_dir, resumable=False, drawing=True) from None
        if (run_dir / "last.pt").is_file():
            raise Interrupted(run_dir, resumable=True) from None
        if resume is None and created:  # stopped before its first epoch ended: leave no half-started run behind
            runs.remove_unstarted(run_dir)
        raise Interrupted(run_dir, resumable=False) from None
    except RuntimeError as e:
        if "memory" in str(e).lower() and ("allocat" in str(e).lower() or "out of" in str(e).lower()):
            raise TrainError(f"out of memory while training ({str(e).splitlines()[0][:120]}); "
                             "choose a smaller --batch-size or model.") from None
        raise
    finally:
        if held is not None:
            held.close()  # the run directory is free for the next process


# torchrun's --max-restarts starts the same command again after a worker dies: the new attempt continues the
# run the first one created, which a note in out_dir names (one per torchrun launch, by its run id).
def _restart_note(out_dir: str) -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return Path(out_dir) / f".torchrun-{run_id}" if run_id else None


def _note_for_restarts(out_dir: str, name: str) -> None:
    note = _restart_note(out_dir)
    if note is not None:
        runs.write_text(note, name + "\n")


def _restarted_run(cfg: TrainConfig) -> Path | None:
    """The run a torchrun restart continues, or None (not a restart, or its run never finished an epoch)."""
    note = _restart_note(cfg.out_dir)
    if note is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 or not note.is_file():
        return None
    run_dir = Path(cfg.out_dir) / note.read_text().strip()
    if (run_dir / "last.pt").is_file():
        return run_dir
    if run_dir.is_dir():
        runs.remove_unstarted(run_dir)  # died before its first epoch ended: start it again under its name
    return None


def _resume_state(run_dir: Path) -> tuple[dict, TrainConfig]:
    """The validated last.pt of a run to resume and its config, or a RunError that says why there is none."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a run directory; `--resume` takes a folder such as runs/<name>.")
    if not (run_dir / "last.pt").is_file():
        if (run_dir / "config.toml").is_file():
            raise RunError(f"{run_dir} stopped before its first epoch ended, so there is nothing to resume; "
                           "start it again with the same command.")
        raise RunError(f"{run_dir} holds no last.pt to resume from.")
    state = runs.load_checkpoint(run_dir / "last.pt", "last")
    cfg = runs.checkpoint_config(state, run_dir / "last.pt")
    runs.check_pair(run_dir, cfg)
    done = state["epoch"]
    total = state["config"].get("epochs")
    if isinstance(total, int) and done >= total and (run_dir / "summary.json").is_file():
        raise RunError(f"{run_dir} has finished all its {total} epochs; there is nothing to resume.")
    return state, cfg


def _fit(cfg: TrainConfig, run_dir: Path, state: dict | None, splits: data.Splits, device: torch.device,
         progress: bool, echo: Callable[[str], None], command: str, on_epoch: Callable[[dict], None] | None,
         test: bool, t_start: float, teacher: nn.Module | None = None,
         world: distributed.World = distributed.World()) -> Run:
    epochs = min(cfg.epochs, 2) if cfg.dry_run else cfg.epochs
    if cfg.precision == "bf16" and device.type == "cpu" and not distributed.native_bf16():
        echo("note: this CPU has no native bfloat16 arithmetic (AVX-512 BF16 or AMX): --precision bf16 trains "
             "correctly but far slower than fp32 here (a convnet: about 10x slower on an AVX2-only machine)")
    bf16 = distributed.use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = models.init_weights(runs.build_model(cfg), cfg.init, cfg.init_std).to(device)
    if world.size > 1 and device.type == "cuda":  # batch statistics over all ranks' images (no CPU kernel)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(cfg, model)
    trained = model  # what the training step calls; it shares model's parameters, and checkpoints use model
    if world.size > 1:
        trained = distributed.ddp(model)
    if cfg.compile:
        trained = _compiled(trained)
    aug = data.Augment(cfg.flip, cfg.translate, cfg.erase)
    limit = DRY_RUN_BATCHES if cfg.dry_run else None
    train_loader = data.BatchLoader(*splits.train, cfg.batch_size, shuffle=True, augment=aug, seed=cfg.seed,
                                    device=device, max_batches=limit, rank=world.rank, world_size=world.size)
    val_part = _part(splits.val, 2 * 1024 if cfg.dry_run else None, world)  # each rank validates its part
    val_loader = data.BatchLoader(*val_part, 1024, device=device)
    opt = make_optimizer(cfg, model, device)
    sched, per_batch = make_schedule(cfg, opt, len(train_loader), epochs)

    history: list[dict] = []
    neurons = {k: [t] for k, t in zip(cfg.track_neurons, models.neuron_weights(model, cfg.track_neurons))}
    best = {"val_acc": -1.0, "epoch": 0}
    start_epoch = 1
    if state is not None:
        last = run_dir / "last.pt"
        runs.load_state(model, state["model"], last)
        try:
            if ema is not None:
                ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            history, best = list(state["history"]), dict(state["best"])
            neurons = {int(k): list(v) for k, v in state["neurons"].items()}
        except (ValueError, KeyError, TypeError, RuntimeError):
            raise RunError(f"{last} is damaged or foreign: its optimiser, schedule or history do not fit "
                           "its configuration.") from None
        start_epoch = state["epoch"] + 1
        echo(f"resuming {run_dir} after epoch {state['epoch']}")
        if state.get("world_size", 1) != world.size:
            echo(f"note: this run trained on {state.get('world_size', 1)} process(es) and continues on {world.size}: "
                 "it is a correct continuation, but not bit-equal to a run that never stopped")
    # Nothing is written before the state above has been restored: a foreign last.pt leaves the run as it was.
    tb = None
    if world.main:
        runs.write_config(run_dir, cfg)
        tb = _tensorboard(run_dir) if cfg.tensorboard else None
        runs.write_history(run_dir, history)
        runs.write_neurons(run_dir, neurons)

    try:
        for epoch in range(start_epoch, epochs + 1):
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout draws: a function of (seed, epoch)
            train_loader.set_epoch(epoch)
            lr = opt.param_groups[0]["lr"]
            tr_loss, tr_acc, secs = train_one_epoch(
                trained, train_loader, opt, sched if per_batch else None, cfg.label_smoothing,
                progress, desc=f"epoch {epoch}/{epochs}", ema=ema, bf16=bf16,
                teacher=teacher, distill=(cfg.distill_temperature, cfg.distill_weight), world=world)
            kept = ema.module if ema is not None else model  # what validation, best.pt and the test use
            distributed.average_buffers(model, world)
            if ema is not None:
                distributed.average_buffers(ema.module, world)
            val_loss, val_acc = evaluate(kept, val_loader, tta=cfg.tta, bf16=bf16, world=world)
            if not (math.isfinite(tr_loss) and math.isfinite(val_loss)):
                last = f"The last good checkpoint is {run_dir / 'last.pt'}." if epoch > 1 else "No epoch was saved."
                raise TrainError(f"training diverged at epoch {epoch} (loss is {tr_loss}); try a lower --lr. {last}")
            if sched is not None and not per_batch:
                sched.step(val_loss) if cfg.schedule == "plateau" else sched.step()
            row = dict(epoch=epoch, lr=lr, train_loss=tr_loss, train_acc=tr_acc, val_loss=val_loss,
                       val_acc=val_acc, seconds=round(secs, 3))
            history.append(row)
            for k, t in zip(cfg.track_neurons, models.neuron_weights(model, cfg.track_neurons)):
                neurons[k].append(t)
            cfg_dict = dataclasses.asdict(cfg)
            improved = val_acc > best["val_acc"]
            if improved:
                best = {"val_acc": val_acc, "epoch": epoch}
            if world.main:
                _save(run_dir, model, kept, opt, sched, ema, cfg_dict, epoch, val_acc, improved, history, best,
                      splits, neurons, device, world, tb, row)
            if on_epoch is not None:
                on_epoch(row)
            echo(f"epoch {epoch:3d}/{epochs}  lr {lr:.2e}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
                 f"val loss {val_loss:.4f} acc {val_acc:.4f}  {secs:.1f}s")
    finally:
        if tb is not None:
            tb.close()
    return _finish(cfg, run_dir, model, splits, device, test, best, history, train_loader, t_start, command,
                   bf16, world)


def _part(split: tuple[torch.Tensor, torch.Tensor], limit: int | None, world: distributed.World):
    """This rank's contiguous part of a split (the first `limit` images of it, if given)."""
    x, y = split
    if limit is not None:
        x, y = x[:limit], y[:limit]
    part = distributed.shard(len(y), world.rank, world.size)
    return x[part], y[part]


def _save(run_dir, model, kept, opt, sched, ema, cfg_dict, epoch, val_acc, improved, history, best, splits,
          neurons, device, world, tb, row) -> None:
    """Rank 0's writes after an epoch: best.pt if better, last.pt, history and neuron snapshots, TensorBoard."""
    if improved:
        runs.save_checkpoint({"model": _plain(kept.state_dict()), "config": cfg_dict, "epoch": epoch,
                              "val_acc": val_acc, "data": splits.digest}, run_dir / "best.pt")
    runs.save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict() if sched is not None else {},
                          "config": cfg_dict, "epoch": epoch, "history": history, "best": best,
                          "data": splits.digest, **({"ema": ema.state_dict()} if ema is not None else {}),
                          "threads": torch.get_num_threads() if device.type == "cpu" else 0,
                          "world_size": world.size,
                          "neurons": {str(k): torch.stack(v) for k, v in neurons.items()}},
                         run_dir / "last.pt")
    runs.write_history(run_dir, history)
    runs.write_neurons(run_dir, neurons)
    if tb is not None:
        _log_tensorboard(tb, row, neurons)


def _finish(cfg, run_dir, final_model, splits, device, test, best, history, train_loader, t_start, command, bf16,
            world) -> Run:
    """The test split, once, with the weights chosen on validation; summary.json; the figures."""
    best_state = distributed.on_main(lambda: runs.load_checkpoint(run_dir / "best.pt")["model"], world)
    model = runs.load_state(runs.build_model(cfg).to(device), best_state, run_dir / "best.pt")
    if cfg.channels_last:  # tested as it was validated (fmnist evaluate does the same)
        model = model.to(memory_format=torch.channels_last)
    test_figures: dict[str, Any] = {}
    test_probs = None
    if test:
        test_part = _part(splits.test, 2048 if cfg.dry_run else None, world)
        test_loss, test_acc, test_probs = evaluate(model, data.BatchLoader(*test_part, 1024, device=device),
                                                   return_predictions=True, tta=cfg.tta, bf16=bf16, world=world)
        test_figures = dict(test_accuracy=test_acc, test_loss=test_loss)
    images_per_epoch = min(len(splits.train[1]), len(train_loader) * cfg.batch_size)  # fewer in a dry run
    summary = dict(
        **test_figures, best_val_accuracy=best["val_acc"],
        best_epoch=best["epoch"], epochs=len(history),
        wall_seconds=round(time.perf_counter() - t_start, 2),
        train_samples_per_second=round(len(history) * images_per_epoch
                                       / max(sum(r["seconds"] for r in history), 1e-9)),
        parameters=models.count_parameters(model), macs_per_image=models.macs_per_image(model),
        device=str(device), threads=torch.get_num_threads(),
        precision="bf16" if bf16 else "fp32",
        world_size=world.size, backend=world.backend or "none", global_batch=cfg.batch_size,
        batch_per_process=cfg.batch_size // world.size,
        torch_version=torch.__version__, seed=cfg.seed, command=command or " ".join(["fmnist"] + sys.argv[1:]),
    )
    if world.main:
        runs.write_summary(run_dir, summary)
        if cfg.plots and test:
            from . import report

            report.draw(run_dir, splits=splits, test_probs=test_probs, final_model=final_model)
    return Run(run_dir, summary, history)


def _compiled(model: nn.Module) -> nn.Module:
    """torch.compile(model), or a TrainError that says why this machine cannot (no C++ compiler for the CPU)."""
    if not hasattr(torch, "compile"):
        raise TrainError("--compile needs torch 2.0 or later.")
    if model.parameters().__next__().device.type == "cpu":
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise TrainError("--compile on the CPU needs a C++ compiler (g++ or clang++) on the PATH; install one "
                             "or drop --compile.")
    return torch.compile(model)


def _plain(state: dict) -> dict:
    """A state dict in the standard (contiguous) layout: a channels-last run's best.pt loads anywhere."""
    return {k: v.contiguous() for k, v in state.items()}


# ---------------------------------------------------------------- TensorBoard

def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install 'fmnist[tensorboard]'.") from None
    return SummaryWriter


def _tensorboard(run_dir: Path):
    return _summary_writer()(str(run_dir / "tb"))


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
