"""Training: `fit(config)` runs one training into a run directory.

`fit` reads top to bottom: open the run (new, resumed, or continued after a
torchrun restart), check everything a user can get wrong (teacher, data), claim
the run directory, build a `Training` (the dataclass that holds a training's
state), restore it from last.pt, and then per epoch: `train_epoch`, `validate`,
`checkpoint`. At the end, `finish` evaluates best.pt once on the test split,
calibrates it on the validation split (temperature, out-of-distribution score
and threshold: evaluate.fit_calibration), writes summary.json and draws the
figures.

Every random draw of epoch e depends only on (seed, e) (data.epoch_seed), and
`last.pt` holds everything else (weights, optimiser, schedule, history,
snapshots), so a run killed at any moment and resumed ends with the same
weights as one that never stopped (on the CPU: last.pt also keeps the number of
threads, since float sums split over another number of threads round
differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import calibrate, data, devices, distributed, evaluate, files, models, runs
from .config import TrainConfig
from .errors import Interrupted, RunError, TrainError

DRY_RUN_BATCHES = 5  # train batches per epoch in --dry-run (validation gets 2)
WHITEN_IMAGES = 1_000  # a whitening stem's covariance: 676,000 patches of 9 pixels, 49 MB in float64
DIVERGED = 1e4  # a mean loss above this has diverged even where it stays finite (the loss starts near ln 10)
BF16_NOTE = ("note: this CPU has no native bfloat16 arithmetic (AVX-512 BF16 or AMX): --precision bf16 trains "
             "correctly but far slower than fp32 here (a convnet: about 10x slower on an AVX2-only machine)")


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
        self.bf16 = devices.use_bf16(trained.precision, device) and (
            device.type != "cpu" or devices.native_bf16())

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

@dataclass
class Step:
    """How one batch is learned from: the optimiser and everything that goes with its step."""

    optimizer: torch.optim.Optimizer
    schedule: Any = None  # stepped after every batch (onecycle, linear); None where it steps per epoch or is absent
    ema: Any = None  # an AveragedModel updated after every step, or None
    bf16: bool = False  # the forward pass under bfloat16 autocast
    label_smoothing: float = 0.0
    teacher: nn.Module | None = None  # distillation from this model's logits at `distill`
    distill: tuple[float, float] = (4.0, 0.5)  # (temperature, weight of the teacher's targets)
    world: distributed.World = distributed.World()
    outliers: torch.Tensor | None = None  # normalised drawn non-products (M, 1, 28, 28) on the device, or None
    exposure: float = 0.0  # the weight of their loss: cross-entropy to the uniform distribution


def train_one_epoch(model: nn.Module, loader: data.BatchLoader, step: Step, progress: bool = False,
                    desc: str = "") -> tuple[float, float, float]:
    """(mean loss, accuracy, seconds) over one pass of `loader`, taking `step` after every batch.

    With several processes (`step.world`), each rank's loss is scaled so that the gradients
    DistributedDataParallel averages are the global batch's, and the figures are all ranks'.
    """
    from tqdm import tqdm

    model.train()
    start = time.perf_counter()
    world, device = step.world, loader.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    if step.outliers is not None:  # this epoch's draws of them, replayable like the loader's (a resumed run), and
        drawn = torch.Generator(device=device)  # shared by the processes like its shuffle: each takes its part
        drawn.manual_seed(data.epoch_seed(loader.seed, loader.epoch) + 7)
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=step.bf16):
            exposed = 0.0  # the drawn non-products' loss; the loss reported is the real images' alone
            if step.outliers is None:
                logits = model(x)
            else:  # half as many drawn non-products, in the same forward pass: batch norm sees both alike
                pick = torch.randint(len(step.outliers), (max(1, loader.global_count // 2),), generator=drawn,
                                     device=device)
                drawn_count = len(pick)
                if world.size > 1:
                    pick = pick[distributed.shard(drawn_count, world.rank, world.size)]
                both = model(torch.cat([x, step.outliers[pick]]))
                logits = both[:len(y)]
                # Hendrycks et al. 2019: their softmax towards uniform (a process's part may be empty: its sum,
                # then the global mean)
                uniform = -F.log_softmax(both[len(y):].float(), dim=1).mean(1)
                exposed = step.exposure * (uniform.sum() * world.size / drawn_count if world.size > 1 else
                                           uniform.mean())
            if step.teacher is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=step.label_smoothing)
            else:
                with torch.autocast(device.type, enabled=False):
                    taught = step.teacher(x)  # the teacher sees the same augmented batch
                loss = distill_loss(logits.float(), taught, y, *step.distill, label_smoothing=step.label_smoothing)
        step.optimizer.zero_grad(set_to_none=True)
        if world.size > 1:  # this rank's share of the global batch's mean loss, times world size
            (loss * (len(y) * world.size / loader.global_count) + exposed).backward()
        else:
            (loss + exposed).backward()
        step.optimizer.step()
        if step.ema is not None:
            step.ema.update_parameters(model)
        if step.schedule is not None:
            step.schedule.step()
        loss_sum += loss.detach() * len(y)  # stays on the device: no sync per batch
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
    loss_total, right, seen = distributed.all_sum([loss_sum.item(), correct.item(), n], world)
    return loss_total / seen, right / seen, time.perf_counter() - start


def diverged(loss: float) -> bool:
    """Whether a mean loss says the training has diverged: not finite, or past DIVERGED (with outlier exposure a
    learning rate far too high gave a loss of 3e19 that stayed finite)."""
    return not math.isfinite(loss) or loss > DIVERGED


# ---------------------------------------------------------------- a training's state

@dataclass
class Training:
    """Everything one training holds while it runs. The loop in `fit` passes it to each step."""

    cfg: TrainConfig
    run_dir: Path
    world: distributed.World
    splits: data.Splits
    model: nn.Module  # the network: its weights are trained, snapshotted and saved in last.pt
    wrapped: nn.Module  # the same network as the training step calls it (in DDP, compiled); same parameters
    step: Step  # optimiser, per-batch schedule, EMA, precision, teacher
    schedule: Any  # the learning-rate scheduler (also in `step` when it steps per batch), or None
    train_loader: data.BatchLoader
    epochs: int  # this run's last epoch (at most 2 in a dry run)
    echo: Callable[[str], None]
    progress: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    neurons: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # tracked neuron -> one picture an epoch
    best: dict[str, Any] = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    start_epoch: int = 1
    tb: Any = None  # a TensorBoard SummaryWriter, or None

    @property
    def device(self) -> torch.device:
        return self.train_loader.device

    @property
    def evaluated(self) -> nn.Module:
        """The network that validation, best.pt and the test use: the EMA average if there is one."""
        return self.step.ema.module if self.step.ema is not None else self.model


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
    started = time.perf_counter()
    world, device = distributed.start(cfg.device)
    if not world.main:  # one voice: rank 0's
        echo, progress = (lambda s: None), False
    out_dir, ended = cfg.out_dir, False
    try:
        cfg, resumed, saved, device = open_run(cfg, resume, world, device, echo)
        teacher = load_teacher(cfg, device)  # before anything is written: a missing teacher is one sentence
        splits = load_data(cfg, resumed, saved, data_dir)
        if cfg.tensorboard and world.main:
            _summary_writer()  # a missing package is said before anything is written
        run_dir, created, held = claim_run(cfg, resumed, world)
        cfg = dataclasses.replace(cfg, name=run_dir.name)
        try:
            with cpu_threads(cfg, saved, world, device):
                if cfg.precision == "bf16" and device.type == "cpu" and not devices.native_bf16():
                    echo(BF16_NOTE)
                t = build(cfg, run_dir, world, splits, device, teacher)
                t.echo, t.progress = echo, progress
                restore(t, saved)
                start_files(t)
                try:
                    for epoch in range(t.start_epoch, t.epochs + 1):
                        row = train_epoch(t, epoch)
                        validate(t, row)
                        checkpoint(t, row)
                        if on_epoch is not None:
                            on_epoch(row)
                        echo(f"epoch {epoch:3d}/{t.epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
                             f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
                             f"{row['seconds']:.1f}s")
                finally:
                    if t.tb is not None:
                        t.tb.close()
                run = finish(t, test, command, started)
                ended = True
                return run
        except KeyboardInterrupt:
            if not world.main:
                raise
            raise interrupted(cfg, run_dir, made_here=created) from None
        except RuntimeError as e:
            if world.size > 1 and _lost_peer(e):  # another rank died (killed, out of memory): gloo's traceback
                last = run_dir / "last.pt"
                how = ("run the same command again" if not last.is_file()
                       else f"continue with: fmnist train --resume {run_dir}" if _last_attempt()
                       else f"torchrun starts it again from {last} if --max-restarts allows, or continue with: "
                            f"fmnist train --resume {run_dir}")
                raise TrainError(f"another process of this training stopped ({_first_line(e)}); {how}.") from None
            if "memory" in str(e).lower() and ("allocat" in str(e).lower() or "out of" in str(e).lower()):
                raise TrainError(f"out of memory while training ({str(e).splitlines()[0][:120]}); "
                                 "choose a smaller --batch-size or model.") from None
            raise
        finally:
            if held is not None:
                held.close()  # the run directory is free for the next process
    finally:
        if world.main and (ended or isinstance(sys.exc_info()[1], KeyboardInterrupt) or _last_attempt()):
            _drop_restart_note(out_dir)  # no attempt of this launch comes after this one
        if world.size > 1:
            distributed.stop()


# ---------------------------------------------------------------- before the loop

def open_run(cfg: TrainConfig, resume: str | Path | None, world: distributed.World, device: torch.device,
             echo: Callable[[str], None]) -> tuple[TrainConfig, Path | None, dict | None, torch.device]:
    """(config, run to continue or None, its last.pt, device): the run a torchrun restart or --resume continues,
    with its saved config, or the given config resolved for a new run."""
    if resume is None:
        resume = distributed.on_main(lambda: _restarted_run(cfg), world)
        if resume is not None:
            echo(f"torchrun restarted this training: continuing {resume}")
    if resume is None:
        cfg = runs.resolve(cfg)
        if cfg.data_dir:  # a relative path means "from here": keep it meaningful from anywhere
            cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()))
        if cfg.teacher:  # likewise
            cfg = dataclasses.replace(cfg, teacher=str(Path(cfg.teacher).resolve()))
        saved = None
    else:
        saved, cfg = distributed.on_main(lambda: _resume_state(Path(resume)), world)
        if world.size == 1:  # one process continues on the device the run chose (torchrun's group is set up)
            device = devices.pick_device(cfg.device)

    def check_batch() -> None:
        if cfg.batch_size % world.size:
            raise TrainError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                             f"{world.size} processes; choose a multiple of {world.size}.")

    distributed.on_main(check_batch, world)
    return cfg, (Path(resume) if resume is not None else None), saved, device


def load_data(cfg: TrainConfig, resumed: Path | None, saved: dict | None, data_dir: str | None) -> data.Splits:
    """The splits to train on; a resumed run's data must be the data it was trained on."""
    at = runs.data_dir_for(cfg.data_dir, data_dir) if resumed is not None else (cfg.data_dir or None)
    splits = data.load(at, cfg.val_size, cfg.split_seed)
    if saved is not None and saved.get("data", splits.digest) != splits.digest:
        raise RunError(f"{splits.directory} does not hold the data that {resumed} was trained on (the files "
                       "differ); point --data-dir at that data.")
    return splits


def claim_run(cfg: TrainConfig, resumed: Path | None, world: distributed.World) -> tuple[Path, bool, Any]:
    """(run directory, whether this call made it, its lock or None): a new run directory made by rank 0, or the
    resumed one, locked."""
    if resumed is not None:
        if not world.main:
            return resumed, False, None
        held = runs.lock(resumed)
        runs.clean_temp(resumed)
        return resumed, False, held
    created, held = False, None

    def create() -> str:
        nonlocal created, held
        made, created, held = runs.create(cfg.out_dir, cfg.name or runs.default_name(cfg))
        _note_for_restarts(cfg.out_dir, made.name)
        return made.name

    return Path(cfg.out_dir) / distributed.on_main(create, world), created, held


def cpu_threads(cfg: TrainConfig, saved: dict | None, world: distributed.World, device: torch.device):
    """The claim on this machine's cores that the training holds while it runs (nothing on a GPU).

    Float sums split over another number of threads round differently: a resumed run keeps its thread count.
    """
    if device.type != "cpu":
        return contextlib.nullcontext()
    kept = (saved or {}).get("threads", 0) if (saved or {}).get("world_size", 1) == world.size else 0
    per_process = max(1, devices.cores() // world.local_size) if world.size > 1 else 0
    return devices.cpu_share(cfg.threads or kept or per_process)


def interrupted(cfg: TrainConfig, run_dir: Path, made_here: bool) -> Interrupted:
    """What Ctrl-C leaves: a finished run whose figures were being drawn, a run to resume, or nothing (a run
    directory this training made, stopped before its first epoch ended, is removed)."""
    if (run_dir / "summary.json").is_file() and not (run_dir / "report.html").is_file() and cfg.plots:
        return Interrupted(run_dir, resumable=False, drawing=True)
    if (run_dir / "last.pt").is_file():
        return Interrupted(run_dir, resumable=True)
    if made_here:
        runs.remove_unstarted(run_dir)
    return Interrupted(run_dir, resumable=False)


# torchrun's --max-restarts starts the same command again after a worker dies: the new attempt continues the
# run the first one created, which a note in out_dir names (one per torchrun launch, by its run id).
def _restart_note(out_dir: str) -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return Path(out_dir) / f".torchrun-{run_id}" if run_id else None


def _note_for_restarts(out_dir: str, name: str) -> None:
    """The run's name and torchrun's own process (this worker's parent), which the note outlives only if that
    process was killed: the next launch into out_dir then removes it (_drop_stale_notes)."""
    note = _restart_note(out_dir)
    if note is not None:
        _drop_stale_notes(out_dir)
        runs.write_text(note, f"{name}\n{os.getppid()}\n")


def _drop_stale_notes(out_dir: str) -> None:
    for note in Path(out_dir).glob(".torchrun-*"):
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            lines = note.read_text(encoding="utf-8").splitlines()
            if len(lines) >= 2 and lines[1].isdigit() and not files.process_alive(int(lines[1])):
                note.unlink()


def _lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group is gone."""
    text = str(e)
    return any(w in text for w in ("gloo", "Connection reset", "Connection closed", "Broken pipe", "NCCL"))


def _first_line(e: BaseException) -> str:
    line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line.split("] ", 1)[-1].split(". ", 1)[0][:100].rstrip(". ")  # gloo's lines start with its source file


def _last_attempt() -> bool:
    """Whether torchrun starts no further attempt after this one ends, however it ends."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) >= int(
            os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    except ValueError:
        return True


def _drop_restart_note(out_dir: str) -> None:
    note = _restart_note(out_dir)
    if note is not None:
        with contextlib.suppress(OSError, ValueError):
            note.unlink(missing_ok=True)


def _restarted_run(cfg: TrainConfig) -> Path | None:
    """The run a torchrun restart continues, or None (not a restart, or its run never finished an epoch)."""
    note = _restart_note(cfg.out_dir)
    if note is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 or not note.is_file():
        return None
    run_dir = Path(cfg.out_dir) / (note.read_text().splitlines() or [""])[0].strip()
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


def new_model(cfg: TrainConfig, device: torch.device, world: distributed.World = distributed.World(),
              images: torch.Tensor | None = None) -> nn.Module:
    """`cfg`'s network, initialised from `cfg.seed` as every training starts it, on `device` in its memory format.
    A whitening stem is set from the first WHITEN_IMAGES of the uint8 training `images`."""
    torch.manual_seed(cfg.seed)
    model = models.init_weights(runs.build_model(cfg), cfg.init, cfg.init_std)
    if cfg.stem == "whiten":
        if images is None:
            raise TrainError("a whitening stem needs the training images to be set from.")
        models.whiten_stem(model, images[:WHITEN_IMAGES])
    model = model.to(device)
    if world.size > 1 and device.type == "cuda":  # batch statistics over all ranks' images (no CPU kernel)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_loader(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 world: distributed.World = distributed.World()) -> data.BatchLoader:
    """The shuffled, augmented loader that `cfg` trains on, over uint8 `images` (N, 28, 28) and `labels` (N,)."""
    return data.BatchLoader(images, labels, cfg.batch_size, shuffle=True, augment=data.Augment(
        cfg.flip, cfg.translate, cfg.erase, cfg.photo_aug), seed=cfg.seed, device=device,
        max_batches=DRY_RUN_BATCHES if cfg.dry_run else None, rank=world.rank, world_size=world.size)


def make_step(cfg: TrainConfig, model: nn.Module, batches: int, epochs: int, device: torch.device,
              teacher: nn.Module | None = None, world: distributed.World = distributed.World()) -> tuple[Step, Any]:
    """(the Step every batch takes, the learning-rate scheduler or None) for `model`, `batches` a epoch."""
    opt = make_optimizer(cfg, model, device)
    schedule, per_batch = make_schedule(cfg, opt, batches, epochs)
    step = Step(opt, schedule if per_batch else None, make_ema(cfg, model), devices.use_bf16(cfg.precision, device),
                cfg.label_smoothing, teacher, (cfg.distill_temperature, cfg.distill_weight), world)
    if cfg.outlier_exposure > 0:
        drawn = torch.cat([torch.from_numpy(a) for a in calibrate.exposure_ood(seed=cfg.seed).values()])
        step.outliers = data.normalize(drawn).unsqueeze(1).to(device)
        step.exposure = cfg.outlier_exposure
    return step, schedule


def build(cfg: TrainConfig, run_dir: Path, world: distributed.World, splits: data.Splits, device: torch.device,
          teacher: nn.Module | None) -> Training:
    """A new training's state: the initialised network, its optimiser, schedule, EMA and loaders."""
    epochs = min(cfg.epochs, 2) if cfg.dry_run else cfg.epochs
    model = new_model(cfg, device, world, splits.train[0])
    loader = train_loader(cfg, *splits.train, device, world)
    step, schedule = make_step(cfg, model, len(loader), epochs, device, teacher, world)
    wrapped = distributed.ddp(model) if world.size > 1 else model
    if cfg.compile:
        wrapped = _compiled(wrapped)
    neurons = {k: [w] for k, w in zip(cfg.track_neurons, models.neuron_weights(model, cfg.track_neurons))}
    return Training(cfg, run_dir, world, splits, model, wrapped, step, schedule, loader, epochs,
                    echo=lambda s: None, progress=False, neurons=neurons)


def train_arrays(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 progress: bool = False, desc: str = "") -> nn.Module:
    """`cfg`'s model trained on uint8 `images` (N, 28, 28) and `labels` (N,) for its epochs, as `fit` trains it
    (initialisation, loader, optimiser, schedule, EMA, precision, the same random draws per epoch), but in memory:
    no run directory, no validation, no test. A plateau schedule steps on the training loss (there is no
    validation split to watch). Returns the network in eval mode: the EMA average where `cfg` keeps one. For the
    models that k-fold cross-validation trains (audit); distillation and torch.compile are not taken."""
    if cfg.teacher or cfg.compile:
        raise TrainError("training on given images takes no --teacher and no --compile.")
    epochs = min(cfg.epochs, 2) if cfg.dry_run else cfg.epochs
    model = new_model(cfg, device, images=images)
    loader = train_loader(cfg, images, labels, device)
    step, schedule = make_step(cfg, model, len(loader), epochs, device)
    for epoch in range(1, epochs + 1):
        torch.manual_seed(data.epoch_seed(cfg.seed, epoch))  # dropout draws: a function of (seed, epoch)
        loader.set_epoch(epoch)
        loss, _, _ = train_one_epoch(model, loader, step, progress, f"{desc}epoch {epoch}/{epochs}".strip())
        if diverged(loss):
            raise TrainError(f"training diverged at epoch {epoch} (loss is {loss}); try a lower --lr.")
        if schedule is not None and step.schedule is None:
            schedule.step(loss) if cfg.schedule == "plateau" else schedule.step()
    return (step.ema.module if step.ema is not None else model).eval()


def restore(t: Training, saved: dict | None) -> None:
    """Continue from a last.pt: weights, EMA, optimiser, schedule, history, best epoch and neuron snapshots."""
    if saved is None:
        return
    last = t.run_dir / "last.pt"
    runs.load_state(t.model, saved["model"], last)
    try:
        if t.step.ema is not None:
            t.step.ema.load_state_dict(saved["ema"])
        t.step.optimizer.load_state_dict(saved["optimizer"])
        if t.schedule is not None:
            t.schedule.load_state_dict(saved["scheduler"])
        t.history, t.best = list(saved["history"]), dict(saved["best"])
        t.neurons = {int(k): list(v) for k, v in saved["neurons"].items()}
    except (ValueError, KeyError, TypeError, RuntimeError):
        raise RunError(f"{last} is damaged or foreign: its optimiser, schedule or history do not fit "
                       "its configuration.") from None
    t.start_epoch = saved["epoch"] + 1
    t.echo(f"resuming {t.run_dir} after epoch {saved['epoch']}")
    if saved.get("world_size", 1) != t.world.size:
        t.echo(f"note: this run trained on {saved.get('world_size', 1)} process(es) and continues on "
               f"{t.world.size}: it is a correct continuation, but not bit-equal to a run that never stopped")


def start_files(t: Training) -> None:
    """Rank 0 writes config.toml, the history and neurons so far, and opens TensorBoard. Nothing is written before
    `restore`: a foreign last.pt leaves the run as it was."""
    if not t.world.main:
        return
    runs.write_config(t.run_dir, t.cfg)
    t.tb = _tensorboard(t.run_dir) if t.cfg.tensorboard else None
    runs.write_history(t.run_dir, t.history)
    runs.write_neurons(t.run_dir, t.neurons)


# ---------------------------------------------------------------- the loop's steps

def train_epoch(t: Training, epoch: int) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's history row (its validation figures still None)."""
    torch.manual_seed(data.epoch_seed(t.cfg.seed, epoch))  # dropout draws: a function of (seed, epoch)
    t.train_loader.set_epoch(epoch)
    lr = t.step.optimizer.param_groups[0]["lr"]
    loss, acc, secs = train_one_epoch(t.wrapped, t.train_loader, t.step, t.progress, f"epoch {epoch}/{t.epochs}")
    # validate() fills in the validation figures; the keys stand in history.jsonl's column order
    return dict(epoch=epoch, lr=lr, train_loss=loss, train_acc=acc, val_loss=None, val_acc=None,
                seconds=round(secs, 3))


def validate(t: Training, row: dict[str, Any]) -> None:
    """Validation loss and accuracy into `row`; the schedule's epoch step; the history and neuron snapshots."""
    distributed.average_buffers(t.model, t.world)
    if t.step.ema is not None:
        distributed.average_buffers(t.step.ema.module, t.world)
    cfg = t.cfg if t.cfg.epoch_tta else dataclasses.replace(t.cfg, tta=False)
    scores = evaluate.scores(t.evaluated, cfg, evaluate.val_split(t.splits, t.cfg.dry_run), t.device, t.world)
    if diverged(row["train_loss"]) or diverged(scores.loss):
        last = f"The last good checkpoint is {t.run_dir / 'last.pt'}." if row["epoch"] > 1 else "No epoch was saved."
        raise TrainError(f"training diverged at epoch {row['epoch']} (loss is {row['train_loss']}); try a lower "
                         f"--lr. {last}")
    if t.schedule is not None and t.step.schedule is None:
        t.schedule.step(scores.loss) if t.cfg.schedule == "plateau" else t.schedule.step()
    row.update(val_loss=scores.loss, val_acc=scores.accuracy)
    t.history.append(row)
    for k, w in zip(t.cfg.track_neurons, models.neuron_weights(t.model, t.cfg.track_neurons)):
        t.neurons[k].append(w)


def checkpoint(t: Training, row: dict[str, Any]) -> None:
    """Rank 0 writes best.pt if validation improved, then last.pt, the history and snapshots, TensorBoard."""
    improved = row["val_acc"] > t.best["val_acc"]
    if improved:
        t.best = {"val_acc": row["val_acc"], "epoch": row["epoch"]}
    if not t.world.main:
        return
    try:
        _save_checkpoints(t, row, improved)
    except RunError as e:  # a full disk: what the run can do next
        if (t.run_dir / "last.pt").is_file():
            e.hint = f"Free some space, then continue with: fmnist train --resume {t.run_dir}"
        else:
            e.hint = "Free some space, then run the same command again (the run starts over)."
        raise
    runs.write_history(t.run_dir, t.history)
    runs.write_neurons(t.run_dir, t.neurons)
    if t.tb is not None:
        _log_tensorboard(t.tb, row, t.neurons)


def _save_checkpoints(t: Training, row: dict[str, Any], improved: bool) -> None:
    cfg_dict, digest = dataclasses.asdict(t.cfg), t.splits.digest
    if improved:
        runs.save_checkpoint({"model": _plain(t.evaluated.state_dict()), "config": cfg_dict, "epoch": row["epoch"],
                              "val_acc": row["val_acc"], "data": digest}, t.run_dir / "best.pt")
    ema = t.step.ema
    runs.save_checkpoint({"model": t.model.state_dict(), "optimizer": t.step.optimizer.state_dict(),
                          "scheduler": t.schedule.state_dict() if t.schedule is not None else {},
                          "config": cfg_dict, "epoch": row["epoch"], "history": t.history, "best": t.best,
                          "data": digest, **({"ema": ema.state_dict()} if ema is not None else {}),
                          "threads": torch.get_num_threads() if t.device.type == "cpu" else 0,
                          "world_size": t.world.size,
                          "neurons": {str(k): torch.stack(v) for k, v in t.neurons.items()}},
                         t.run_dir / "last.pt")


def finish(t: Training, test: bool, command: str, started: float) -> Run:
    """The test split, once, with the weights chosen on validation; the calibration (on validation) into best.pt;
    summary.json; the figures."""
    cfg, world = t.cfg, t.world
    best_state = distributed.on_main(lambda: runs.load_checkpoint(t.run_dir / "best.pt")["model"], world)
    best = runs.load_state(runs.build_model(cfg).to(t.device), best_state, t.run_dir / "best.pt")
    figures: dict[str, Any] = {}
    scores = None
    if test:
        split = _test_split(t)
        # with the features the OOD score reads: the logits are the same to the bit (models.taps_and_logits)
        scores = evaluate.scores(best, cfg, split, t.device, world, probabilities=True, features=True)
        figures = dict(test_accuracy=scores.accuracy, test_loss=scores.loss)
    cal, cal_figures = calibrate_best(t, best, scores)
    views = cal_figures.pop("val_accuracy_views", None)
    plain_epochs = cfg.tta and not cfg.epoch_tta  # the calibration measured best.pt with its views
    val_acc = views if plain_epochs else t.best["val_acc"]
    history = t.history
    images_per_epoch = min(len(t.splits.train[1]), len(t.train_loader) * cfg.batch_size)  # fewer in a dry run
    summary = dict(
        **figures, best_val_accuracy=val_acc, best_epoch=t.best["epoch"], epochs=len(history),
        **({"best_val_accuracy_plain": t.best["val_acc"]} if plain_epochs else {}),
        wall_seconds=round(time.perf_counter() - started, 2),
        train_samples_per_second=round(len(history) * images_per_epoch
                                       / max(sum(r["seconds"] for r in history), 1e-9)),
        parameters=models.count_parameters(best), macs_per_image=models.macs_per_image(best),
        device=str(t.device), threads=torch.get_num_threads(), precision="bf16" if t.step.bf16 else "fp32",
        world_size=world.size, backend=world.backend or "none", global_batch=cfg.batch_size,
        batch_per_process=cfg.batch_size // world.size,
        torch_version=torch.__version__, seed=cfg.seed, command=command or " ".join(["fmnist"] + sys.argv[1:]),
        **cal_figures,
    )
    if world.main:
        best_ckpt = runs.load_checkpoint(t.run_dir / "best.pt")  # the weights stay as they are: only added to
        runs.save_checkpoint({**best_ckpt, "calibration": cal.to_dict()}, t.run_dir / "best.pt")
        runs.write_summary(t.run_dir, summary)
        if cfg.plots and scores is not None:
            from . import report

            report.draw(t.run_dir, splits=t.splits, scores=scores, final_model=t.model)
    return Run(t.run_dir, summary, history)


def _test_split(t: Training) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as the run evaluates it (a dry run: its first 2,048 images)."""
    return t.splits.test if not t.cfg.dry_run else tuple(s[:2048] for s in t.splits.test)


def calibrate_best(t: Training, best: nn.Module, scores: evaluate.Scores | None
                   ) -> tuple[calibrate.Calibration, dict[str, Any]]:
    """best.pt's calibration, fitted on the training and validation splits (evaluate.fit_calibration), and its
    figures for summary.json: the temperature, the OOD score and threshold and how the scores compared on
    validation; with the test's `scores` (logits and features), the expected calibration error before and after
    the temperature and the share of the test split marked unsure (after every choice is made), on the outputs
    inference gives (without test-time augmentation where validation said it buys too little: then also the
    test accuracy inference has)."""
    cal, val = evaluate.fit_calibration(best, t.cfg, t.splits, t.device, t.world, small=t.cfg.dry_run)
    figures: dict[str, Any] = {**cal.summary()}
    if scores is not None and cal.uses_tta(t.cfg.tta) != t.cfg.tta:  # inference drops the views: its own outputs
        scores = evaluate.scores(best, dataclasses.replace(t.cfg, tta=False), _test_split(t), t.device, t.world,
                                 probabilities=True, features=True)
        figures.update(test_accuracy_inference=scores.accuracy)
    if scores is not None:
        figures.update(
            test_ece=calibrate.calibration_error(scores.probabilities, scores.labels),
            test_ece_calibrated=calibrate.calibration_error((scores.logits / cal.temperature).softmax(1),
                                                            scores.labels),
            test_unsure=float((cal.score(scores.logits, scores.features) > cal.threshold).double().mean()))
    figures.update(val)
    return cal, figures


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
