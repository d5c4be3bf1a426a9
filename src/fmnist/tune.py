"""Hyperparameter search with Optuna, on one machine or many.

    fmnist tune --trials 30 --epochs 8 --out tune/        # embedded storage: tune/study.journal
    fmnist tune --storage postgresql://user@host/db ...   # many workers on many machines

Every trial is an ordinary `train.fit` run (in <out>/trials/trial_<n>/) that
reports its validation accuracy after each epoch, so the pruner (median by
default) stops poor trials early. The objective is the best validation
accuracy; the test split is never touched while tuning.

Storage follows Optuna's advice: a journal file (JournalFileBackend) for
several processes on one machine, which is the default, and an RDB server
(PostgreSQL, MySQL) for workers on many machines. A worker killed mid-trial:
the RDB storages have Optuna's heartbeat (a trial whose worker has not beaten
for `grace` seconds is failed); the journal file has none, so every worker
also records its host and process id on its trials, and a worker that starts
or finishes a trial fails the RUNNING trials of dead processes of its host.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from . import config as config_mod
from . import data, train
from .config import ConfigError, TrainConfig

# name -> a list (categorical choices) or {"low", "high", "log"?} (a float, or an int when both bounds are ints)
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "optimizer": ["sgd", "adam", "adamw"],
    "weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
    "batch_size": [64, 128, 256, 512],
    "depth": {"low": 1, "high": 3},  # hidden layers
    "width": [64, 128, 256, 512, 1024],  # choices for each hidden layer's width
    "dropout": {"low": 0.0, "high": 0.5},
    "batch_norm": [True, False],
    "flip": [True, False],
    "translate": {"low": 0, "high": 2},  # pixels
    "erase": {"low": 0.0, "high": 0.5},  # probability
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "schedule": ["onecycle", "plateau", "cosine", "none"],
}


class TuneError(RuntimeError):
    """A study that cannot be opened or run (unreachable storage, bad search space)."""


# ---------------------------------------------------------------- the search space

def load_space(path: str | Path | None) -> dict[str, Any]:
    """DEFAULT_SPACE with the entries of a TOML file replacing their namesakes.

    In the file, `name = [a, b]` is a categorical choice, `name = {low = .., high = .., log = true}`
    a range, and `name = value` fixes the value. Unknown names are a ConfigError.
    """
    space = dict(DEFAULT_SPACE)
    if path is None:
        return space
    where = f"search space {path}"
    for key, value in config_mod.read_toml(path).items():
        if key not in DEFAULT_SPACE:
            raise ConfigError(f"{where}: unknown key '{key}'; known keys: {', '.join(DEFAULT_SPACE)}.")
        if isinstance(value, dict):
            extra = set(value) - {"low", "high", "log"}
            if extra or not {"low", "high"} <= set(value) or not value["low"] <= value["high"]:
                raise ConfigError(f"{where}: '{key}' needs low <= high (and optionally log), got {value}.")
        elif isinstance(value, list) and not value:
            raise ConfigError(f"{where}: '{key}' has an empty list of choices.")
        space[key] = value
    return space


def _suggest(trial: optuna.Trial, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if isinstance(spec, dict):
        lo, hi, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool):
            return trial.suggest_int(name, lo, hi, log=log)
        return trial.suggest_float(name, float(lo), float(hi), log=log)
    return spec  # a fixed value


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The training config of one point of the space (depth/width_i become `hidden`)."""
    values = {k: v for k, v in params.items() if k in config_mod.FIELDS}
    widths = [int(params[f"width_{i}"]) for i in range(1, int(params["depth"]) + 1)]
    cfg = config_mod.from_dict({**values, "hidden": widths}, base, where="search space")
    return replace(cfg, track_neurons=[k for k in cfg.track_neurons if k <= widths[0]]).validate()


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    params = {name: _suggest(trial, name, spec) for name, spec in space.items() if name not in ("depth", "width")}
    depth = _suggest(trial, "depth", space["depth"])
    params["depth"] = depth
    for i in range(1, int(depth) + 1):
        params[f"width_{i}"] = _suggest(trial, f"width_{i}", space["width"])
    return params


def check_space(base: TrainConfig, space: dict[str, Any]) -> None:
    """Every categorical choice and range end must make a valid config: fail before any training."""
    for name, spec in space.items():
        if name in ("depth", "width"):
            continue
        values = spec if isinstance(spec, list) else [spec["low"], spec["high"]] if isinstance(spec, dict) else [spec]
        for v in values:
            try:
                config_mod.from_dict({name: v}, base, where="search space").validate()
            except ConfigError as e:
                raise ConfigError(f"search space: {name} = {v!r} is not usable ({e})") from None


# ---------------------------------------------------------------- storage and study

def open_storage(url: str | None, out: Path, heartbeat: int = 10) -> optuna.storages.BaseStorage:
    """An RDB storage for a URL with a scheme, else a journal file (default <out>/study.journal)."""
    if url and "://" in url:
        kw: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kw = {"connect_args": {"timeout": 60}}  # several local workers wait for the file lock
        else:
            kw = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        for attempt in range(3):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=heartbeat,
                                                      grace_period=3 * heartbeat)
            except Exception as e:  # sqlalchemy/driver errors: unreachable host, bad credentials, no driver
                # Workers starting together on a new database race to create Optuna's tables: the
                # loser sees a duplicate-key error, and a second try finds the tables there.
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if attempt == 2 or "driver" in reason.lower() or "import" in reason.lower():
                    raise TuneError(f"cannot open the study storage {url}: {reason[:300]}.") from None
                time.sleep(1 + attempt)
    path = Path(url) if url else out / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner '{name}'; known: median, hyperband, none.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and is gone; returns their numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # the heartbeat, where the storage has one
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and "pid" in t.user_attrs and not _pid_alive(t.user_attrs["pid"]):
            try:
                study.tell(t.number, state=TrialState.FAIL)
                failed.append(t.number)
            except (ValueError, RuntimeError):  # another worker got there first
                pass
    return failed


@dataclass
class TuneResult:
    study: optuna.Study
    best_config: TrainConfig | None
    best_toml: Path | None
    figures: list[Path]
    reaped: list[int]


def tune(base: TrainConfig, out: str | Path, trials: int | None = 20, timeout: float | None = None,
         study_name: str = "fmnist", storage: str | None = None, epochs: int = 8, seed: int = 0,
         space_file: str | None = None, pruner: str = "median", heartbeat: int = 10, verbose: bool = False,
         progress: bool = False) -> TuneResult:
    """Run (or continue) a study; write best.toml and the study's figures into `out`."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = load_space(space_file)
    base = replace(base, epochs=epochs, plots=False, tensorboard=False).validate()
    check_space(base, space)
    data.locate(base.data_dir or None)  # no data: say so before a study is created
    study = optuna.create_study(
        storage=open_storage(storage, out, heartbeat), study_name=study_name, direction="maximize",
        load_if_exists=True, pruner=make_pruner(pruner))
    # Seeded, but offset by the trials already there and by the process, so that a rerun or a
    # second worker on the same study does not propose the same points again.
    study.sampler = optuna.samplers.TPESampler(
        seed=(seed * 1_000_003 + len(study.get_trials(deepcopy=False)) * 7919 + os.getpid()) % 2**32)
    reaped = fail_dead_trials(study)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        cfg = trial_config(base, suggest(trial, space))
        cfg = replace(cfg, out_dir=str(out / "trials"), name=f"{study_name}-trial_{trial.number}")
        trial.set_user_attr("config", config_mod.to_toml(cfg))

        def report(row: dict) -> None:
            trial.report(row["val_acc"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        run_dir = Path(cfg.out_dir) / cfg.name
        if run_dir.exists():  # left by a study of the same name in another storage: start clean
            shutil.rmtree(run_dir)
        return train.fit(cfg, on_epoch=report, test=False).summary["best_val_accuracy"]

    bar = tqdm(total=trials, unit="trial", desc=f"study {study_name}", disable=not progress)

    def after_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        reaped.extend(fail_dead_trials(study))
        best = _best_value(study)
        bar.set_postfix_str(f"best val {best:.4f}" if best is not None else "")

    try:
        study.optimize(objective, n_trials=trials, timeout=timeout, catch=(train.TrainError,),
                       callbacks=[after_trial])
    finally:
        bar.close()
    best_cfg, best_toml = write_best(study, out)
    return TuneResult(study, best_cfg, best_toml, study_figures(study, out), reaped)


def _best_value(study: optuna.Study) -> float | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(t.value for t in done) if done else None


def write_best(study: optuna.Study, out: Path) -> tuple[TrainConfig | None, Path | None]:
    """<out>/best.toml: the best trial's full training config, ready for `fmnist train --config`."""
    if _best_value(study) is None:
        return None, None
    t = study.best_trial
    cfg = config_mod.from_dict(config_mod.tomllib.loads(t.user_attrs["config"]), where=f"trial {t.number}")
    cfg = replace(cfg, name="", out_dir="runs", plots=True)  # trials draw nothing; a retrained run should
    path = out / "best.toml"
    header = (f"# Best trial {t.number} of study '{study.study_name}': validation accuracy {t.value:.4f}\n"
              f"# after {cfg.epochs} epochs. Reproduce it with: fmnist train --config {path}\n")
    train.write_text(path, header + config_mod.to_toml(cfg))
    return cfg, path


def study_figures(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's own matplotlib figures: optimisation history and parameter importances."""
    from . import plots  # sets the Agg backend before optuna's matplotlib code runs

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib module experimental
        vis = optuna.visualization.matplotlib
        if complete:
            ax = vis.plot_optimization_history(study, target_name="best validation accuracy")
            ax.figure.set_size_inches(9, 5)
            figures.append(plots.save_figure(ax.figure, out / "optimization_history.png"))
        if len(complete) >= 2:
            try:
                ax = vis.plot_param_importances(study)
                ax.figure.set_size_inches(9, 6)
                figures.append(plots.save_figure(ax.figure, out / "param_importances.png"))
            except (RuntimeError, ValueError):  # e.g. every complete trial has the same value
                pass
    return figures
