"""The run directory, the one contract between fmnist's parts.

    runs/<name>/  config.toml  history.jsonl  summary.json  best.pt  last.pt  neurons.npz  plots/  report.html

This module owns its paths and names, atomic writes, checkpoint save and load
(validated, weights only), reading and writing history, summary and neuron
snapshots, and loading a model from a run. Everything a user can get wrong
here (a damaged file, a foreign checkpoint, a name that is a path, a folder of
their own files) is a RunError: one sentence that names the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import calibrate, models
from . import config as config_mod
from .config import ConfigError, TrainConfig
from .files import (  # noqa: F401 (fmnist's file-writing rules, used here and re-exported)
    FILE_MODE,
    OUTPUT_MARKER,
    TEMP_GLOB,
    RunError,
    atomic_write,
    claim_output_dir,
    made_by_fmnist,
    overwritable,
    write_json,
    write_text,
)

# What fmnist itself writes into a run directory before its first epoch ends: a folder holding only
# these (and temp files) is a run that was stopped early, and may be started again.
LOCK_FILE = ".fmnist-lock"  # held (flock) by the one process training in a run directory
START_FILES = {"config.toml", "history.jsonl", "neurons.npz", "tb", LOCK_FILE}
CONFIG_HEADER = "# fmnist run configuration (train again with: fmnist train --config this-file)\n"
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
SUMMARY_NUMBERS = ("test_accuracy", "test_loss", "best_val_accuracy", "best_epoch", "epochs", "wall_seconds",
                   "train_samples_per_second", "parameters", "threads", "seed", "temperature", "test_ece",
                   "test_ece_calibrated", "test_unsure", "ood_threshold")


# ---------------------------------------------------------------- writing files

def clean_temp(directory: Path) -> list[Path]:
    """Remove temp files that a killed process left in a run directory (and its plots/)."""
    left = [*directory.glob(TEMP_GLOB), *(directory / "plots").glob(TEMP_GLOB)]
    for p in left:
        p.unlink(missing_ok=True)
    return left


# ---------------------------------------------------------------- names and folders

def default_name(cfg: TrainConfig) -> str:
    return f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def create(out_dir: str | Path, name: str) -> tuple[Path, bool, Any]:
    """The directory for a new run, out_dir/name, whether this call created it, and its lock (see `lock`).

    A name is one plain path component (never '..', '/', or absolute). fmnist
    writes only into a new or empty directory, or into one of its own runs that
    stopped before its first epoch ended; it refuses a finished or resumable run
    (use --resume), a run another process is training, and any other non-empty
    directory.
    """
    config_mod.check_name(name)
    run_dir = Path(out_dir) / name
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # /dev/null, a file: mkdir(exist_ok) said nothing
        raise RunError(f"--out-dir {out_dir} is not a directory; choose another --out-dir.")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
        return run_dir, True, lock(run_dir)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunError(f"cannot create the run directory {run_dir}: {e.strerror or e}; "
                       "choose another --out-dir.") from None
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a directory; choose another --name.")
    if (run_dir / "last.pt").exists():
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --name.")
    entries = {p.name for p in run_dir.iterdir() if not p.match(TEMP_GLOB)} - {LOCK_FILE}
    # best.pt without last.pt: a run whose first last.pt could not be written (a full disk); nothing to resume
    if entries and not (entries <= START_FILES | {"best.pt"} and is_run_config(run_dir / "config.toml")):
        raise RunError(f"{run_dir} is not empty and is not an fmnist run; choose another --name or --out-dir.")
    held = lock(run_dir)
    clean_temp(run_dir)  # only now: the temp files cannot be another live process's
    return run_dir, False, held


def lock(run_dir: Path):
    """An exclusive lock on a run directory for as long as the returned file stays open (None without flock).

    Two processes that train into one folder would overwrite each other's
    checkpoints; the second is refused instead. The lock goes with its process,
    however that process ends.
    """
    try:
        import fcntl
    except ImportError:  # no flock here (Windows): no protection against a second process
        return None
    try:
        f = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 (the open file is the lock)
    except OSError as e:
        raise RunError(f"cannot write into {run_dir}: {e.strerror or e}.") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(f"{run_dir} is in use by another fmnist process; wait for it, or choose another --name.") \
            from None
    return f


def is_run_config(path: Path) -> bool:
    """Whether `path` is a config.toml that fmnist wrote for a run (its first line says so)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline() == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """config.toml: the resolved config without its name (the folder is the name), so that
    `fmnist train --config RUN/config.toml` trains the same model again into a new run."""
    write_text(run_dir / "config.toml", CONFIG_HEADER + config_mod.to_toml(dataclasses.replace(cfg, name="")))


def is_run(run_dir: Path) -> bool:
    """Whether a folder is one of fmnist's runs (started, stopped, or finished)."""
    return (run_dir / "last.pt").is_file() or is_run_config(run_dir / "config.toml")


def remove_unstarted(run_dir: Path) -> None:
    """Delete what fmnist wrote for a run stopped before its first epoch ended (nothing there can be resumed)."""
    for name in (*START_FILES, *(("best.pt",) if not (run_dir / "last.pt").exists() else ())):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    clean_temp(run_dir)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # not empty: something else is in there, leave it


# ---------------------------------------------------------------- resolving a config

def resolve(cfg: TrainConfig) -> TrainConfig:
    """A checked config with the model's defaults filled in; raises ConfigError or ModelError.

    Every check that needs no data happens here, before anything is written:
    field ranges, the model's name and its own arguments, the init, the tracked
    neurons against the first layer's size, and the model's memory.
    """
    check_paths(data_dir=cfg.data_dir, out_dir=cfg.out_dir, teacher=cfg.teacher)
    cfg.validate()  # ranges and names, the init and activation among them
    kw = models.resolve_kwargs(cfg.model, cfg.model_kwargs())
    cfg = dataclasses.replace(cfg, **{k: kw.get(k) for k in config_mod.MODEL_FIELDS})
    with torch.device("meta"):  # shapes only: no memory, no time
        model = models.create(cfg.model, **cfg.model_kwargs())
    width = models.first_layer(model).weight.shape[0]
    if cfg.track_neurons is None:
        cfg = dataclasses.replace(cfg, track_neurons=[n for n in models.default_track(cfg.model) if n <= width] or [1])
    bad = [n for n in cfg.track_neurons if n > width]
    if bad:
        raise ConfigError(f"cannot track neuron {bad[0]}: the first layer of this {cfg.model} has neurons 1..{width}; "
                          "choose --track-neurons from that range.")
    if cfg.batch_size == 1 and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise ConfigError("batch norm cannot train on batches of one image; use --batch-size 2 or more, "
                          "or --no-batch-norm.")
    params = models.count_parameters(model)
    need = 16 * params  # float32 weights, gradients and two optimiser moments
    if need > _memory_bytes():
        raise ConfigError(f"this {cfg.model} has {params:,} parameters and needs about {need / 2**30:.0f} GiB to "
                          "train, more than this machine has; choose smaller --hidden or --channels.")
    return cfg


def check_paths(**paths: str | None) -> None:
    """ConfigError for a path (by its flag) that no file can have or that config.toml cannot hold: one with a NUL
    character, or bytes that are not UTF-8 (Python keeps them as lone surrogates, which TOML cannot write)."""
    for flag, value in paths.items():
        if not value:
            continue
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\0", "\\0")
        if "\0" in value:
            raise ConfigError(f"--{flag.replace('_', '-')} '{shown}' holds a NUL character, "
                              "which no path can hold; give the path again.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"--{flag.replace('_', '-')} '{shown}' is not UTF-8 text, which a run's config.toml "
                              "must be; choose a folder whose name is UTF-8.") from None


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 1 << 62


def data_dir_for(saved: str, given: str | None) -> str | None:
    """Where a saved run's data is looked for now: --data-dir, else FMNIST_DATA, else the saved place, else search.

    Where the data lives is not part of a run's identity: a run can be resumed,
    evaluated or plotted from anywhere.
    """
    if given:
        return given
    if os.environ.get("FMNIST_DATA"):
        return None  # data.locate reads it
    return saved or None


# ---------------------------------------------------------------- checkpoints

# what each kind of checkpoint holds: key -> type
_LAST = {"model": dict, "optimizer": dict, "scheduler": dict, "config": dict, "epoch": int, "history": list,
         "best": dict, "neurons": dict}
_BEST = {"model": dict, "config": dict, "epoch": int}


def save_checkpoint(obj: dict, path: Path) -> None:
    try:
        atomic_write(path, lambda p: torch.save(obj, p))
    except RuntimeError as e:  # torch reports a failed write (a full disk, a vanished folder) this way
        raise RunError(f"cannot write {path} ({str(e).strip().splitlines()[0][:100]}); is the disk full?") from None
    except OSError as e:  # the temp file itself, or the rename
        raise RunError(f"cannot write {path} ({e.strerror or e}); is the disk full?") from None


def load_checkpoint(path: str | Path, kind: str = "best") -> dict:
    """A checkpoint of `kind` ("best": weights and config; "last": everything a resume needs), validated.

    Loaded with weights_only=True: a file that would run code is refused, not run.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"checkpoint {path} does not exist.") from None
    except IsADirectoryError:
        raise RunError(f"{path} is a directory, not a checkpoint.") from None
    except Exception as e:  # a damaged or foreign file: say which
        raise RunError(f"{path} is not a readable fmnist checkpoint ({type(e).__name__}).") from None
    wanted = _LAST if kind == "last" else _BEST
    if not isinstance(ckpt, dict):
        raise RunError(f"{path} is not an fmnist checkpoint.")
    for key, typ in wanted.items():
        if not isinstance(ckpt.get(key), typ):
            what = "a last.pt that a run can resume from" if kind == "last" else "an fmnist checkpoint"
            raise RunError(f"{path} is not {what} (its '{key}' is missing or wrong).")
    return ckpt


def checkpoint_config(ckpt: dict, path: Path) -> TrainConfig:
    """The resolved config saved in a checkpoint."""
    try:
        # a run saved before outlier exposure or test-time augmentation existed trained without them
        return resolve(config_mod.from_dict({"outlier_exposure": 0.0, "tta": False, **ckpt["config"]},
                                            where=str(path)))
    except (ConfigError, models.ModelError) as e:
        raise RunError(f"{path} holds a configuration fmnist cannot use: {e}") from None


def check_pair(run_dir: Path, last_cfg: TrainConfig) -> None:
    """RunError unless the run's best.pt (if any) was trained with the same configuration as its last.pt."""
    best = Path(run_dir) / "best.pt"
    if best.is_file() and checkpoint_config(load_checkpoint(best), best).identity() != last_cfg.identity():
        raise RunError(f"{run_dir}: best.pt and last.pt come from different runs.")


def build_model(cfg: TrainConfig) -> nn.Module:
    return models.create(cfg.model, **cfg.model_kwargs())


def load_state(model: nn.Module, state: dict, path: Path) -> nn.Module:
    """model.load_state_dict(state), or a RunError saying that the weights do not fit the config."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"the weights in {path} do not match its configuration ({first[:160]}).") from None
    return model


def load_calibration(ckpt: dict, path: Path) -> calibrate.Calibration:
    """The calibration a best.pt holds (temperature, OOD score and threshold), or the neutral one for a run trained
    before fmnist calibrated (temperature 1, never unsure); RunError if it is damaged."""
    try:
        return calibrate.Calibration.from_dict(ckpt.get("calibration"))
    except ValueError as e:
        raise RunError(f"{path} holds a damaged calibration ({e}); train the run again.") from None


def load_model(path: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """Model (eval mode, CPU), config and checkpoint from a run directory (its best.pt) or a .pt file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
        if not path.is_file():
            raise RunError(f"{path.parent} is not a run directory (no best.pt).")
    elif not path.exists():
        raise RunError(f"{path} does not exist.")
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    model = load_state(build_model(cfg), ckpt["model"], path)
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise RunError(f"{path} holds weights that are not finite numbers (NaN or infinity): it cannot classify.")
    return model.eval(), cfg, ckpt


# ---------------------------------------------------------------- history, summary, neurons

def write_history(run_dir: Path, history: list[dict]) -> None:
    write_text(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def read_history(run_dir: Path, at_least: int = 0) -> list[dict]:
    """history.jsonl: one dict per epoch with every HISTORY_KEYS number; RunError if damaged or shorter."""
    path = Path(run_dir) / "history.jsonl"
    rows = []
    for i, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{path} is damaged: line {i} is not JSON.") from None
        if not isinstance(row, dict) or not all(_is_number(row.get(k)) for k in HISTORY_KEYS):
            raise RunError(f"{path} is damaged: line {i} lacks the numbers {', '.join(HISTORY_KEYS)}.")
        wrong = _implausible(row)
        if wrong:
            raise RunError(f"{path} is damaged: line {i} holds {wrong}.")
        rows.append(row)
    if len(rows) < at_least:
        raise RunError(f"{path} is damaged: it holds {len(rows)} epochs.")
    return rows


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json(Path(run_dir) / "summary.json", summary)


def read_summary(run_dir: Path, need: tuple[str, ...] = ("best_val_accuracy", "best_epoch", "epochs")) -> dict:
    """summary.json as a dict holding at least the numbers `need`; RunError if damaged."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(_read(path))
    except json.JSONDecodeError:
        raise RunError(f"{path} is damaged (not JSON); `fmnist train --resume` or a new run rewrites it.") from None
    if not isinstance(summary, dict) or not all(_is_number(summary.get(k)) for k in need):
        raise RunError(f"{path} is damaged: it lacks {', '.join(need)}.")
    wrong = [k for k in SUMMARY_NUMBERS if k in summary and not _is_number(summary[k])]
    if wrong:
        raise RunError(f"{path} is damaged: its '{wrong[0]}' is not a number.")
    return summary


def write_neurons(run_dir: Path, neurons: dict[int, list[torch.Tensor]]) -> None:
    """neurons.npz: neuron_<k> (epochs + 1, h, w) for each tracked neuron k, and `epochs` (0, 1, ...)."""
    arrays = {f"neuron_{k}": torch.stack(v).numpy() for k, v in neurons.items()}
    arrays["epochs"] = np.arange(len(next(iter(neurons.values())))) if neurons else np.zeros(0)

    def save_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(f, **arrays)

    atomic_write(Path(run_dir) / "neurons.npz", save_npz)


def read_neurons(run_dir: Path) -> dict[int, np.ndarray]:
    """Tracked neuron k -> its snapshots (epochs + 1, h, w); RunError if neurons.npz is damaged."""
    path = Path(run_dir) / "neurons.npz"
    if not path.is_file():
        raise RunError(f"{path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {int(k.split("_", 1)[1]): z[k] for k in z.files if k.startswith("neuron_")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise RunError(f"{path} is damaged ({type(e).__name__}).") from None
    if any(a.ndim != 3 or 0 in a.shape or not np.isfinite(a).all() for a in out.values()):
        raise RunError(f"{path} is damaged: a neuron's snapshots are not a finite (epochs, h, w) array.")
    return out


def read_config(run_dir: Path) -> TrainConfig:
    try:
        return config_mod.load(Path(run_dir) / "config.toml")
    except ConfigError as e:
        raise RunError(f"{run_dir} is not a usable run: {e}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__}).") from None


def _implausible(row: dict) -> str:
    """What no training writes into a history row (a figure's axis cannot hold it either), or ""."""
    epoch = row["epoch"]
    if epoch != int(epoch) or not 1 <= epoch <= 1_000_000:
        return f"epoch {epoch:g}, not a whole number from 1 to 1,000,000"
    for k in ("train_acc", "val_acc"):
        if not 0 <= row[k] <= 1:
            return f"{k} {row[k]:g}, not from 0 to 1"
    for k in ("lr", "train_loss", "val_loss", "seconds"):
        if not 0 <= row[k] <= 1e30:
            return f"{k} {row[k]:g}, not from 0 to 1e30"
    return ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
