"""Hyperparameter search with Optuna, on one machine or many.

    fmnist tune --trials 30 --epochs 10 --out-dir tune/    # embedded storage: tune/study.journal
    fmnist tune --storage postgresql://user@host/db ...    # many workers on many machines

Every trial is an ordinary `train.fit` run (in <out>/trials/<study>-trial_<n>/) that
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
A failed trial of a dead worker is queued again with the same parameters (as
Optuna's RetryFailedTrialCallback does), and the worker that takes it up
continues the run from that trial's last.pt instead of starting over.

Workers on one machine share its cores: each trial takes its share of them
(see devices.cpu_share), or `--threads N`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from . import config as config_mod
from . import data, models, runs, train
from .config import TrainConfig
from .errors import ConfigError, TuneError

# The fields every model is tuned on: name -> a list (categorical choices), {"low", "high", "log"?} (a float, or
# an int when both bounds are ints) or a fixed value. Each model adds its own (models.search_space: the MLP its
# depth and widths, the CNN its stages and their channels, the ResNet its stages, channels and blocks).
COMMON_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "optimizer": ["sgd", "adam", "adamw"],
    "weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
    "batch_size": [64, 128, 256, 512],
    "dropout": {"low": 0.0, "high": 0.5},
    "batch_norm": [True, False],
    "flip": [True, False],
    "translate": {"low": 0, "high": 2},  # pixels
    "erase": {"low": 0.0, "high": 0.5},  # probability
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "schedule": ["onecycle", "plateau", "cosine", "none"],
}


MAX_RETRIES = 2  # a trial whose worker died is queued again at most this often


# ---------------------------------------------------------------- the search space

def default_space(model: str) -> dict[str, Any]:
    """What `fmnist tune --model MODEL` searches: the common fields, then the model's own."""
    return {**COMMON_SPACE, **models.search_space(model).entries}


def load_space(path: str | Path | None, model: str = "mlp") -> dict[str, Any]:
    """default_space(model) with the entries of a TOML file replacing their namesakes.

    In the file, `name = [a, b]` is a categorical choice, `name = {low = .., high = .., log = true}`
    a range, and `name = value` fixes the value. A name outside the model's space (`depth` for the
    resnet, whose layers are `stages`) is a ConfigError.
    """
    space = default_space(model)
    if path is None:
        return space
    where = f"search space {path}"
    for key, value in config_mod.read_toml(path, what="search space").items():
        if key not in space:
            raise ConfigError(f"{where}: '{key}' is not in the search space of the {model}; its keys are: "
                              f"{', '.join(space)}.")
        if isinstance(value, dict):
            extra = set(value) - {"low", "high", "log"}
            lo, hi = value.get("low"), value.get("high")
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
            if extra or not numbers or not lo <= hi or not isinstance(value.get("log", False), bool):
                raise ConfigError(f"{where}: '{key}' needs numbers low <= high (and optionally log = true or "
                                  f"false), got {value}.")
            if value.get("log") and lo <= 0:
                raise ConfigError(f"{where}: '{key}' has log = true, so low must be above 0, got {lo}.")
        elif isinstance(value, list) and not value:
            raise ConfigError(f"{where}: '{key}' has an empty list of choices.")
        elif isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise ConfigError(f"{where}: the choices of '{key}' must be plain values, got {value}.")
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


def suggest(trial: optuna.Trial, space: dict[str, Any], model: str) -> dict[str, Any]:
    """A point of the space: every entry's value, then the model's number of layers and each layer's width
    (`depth`, `width_1`, ..., for the mlp)."""
    _, count, width = models.search_space(model).layers
    params = {name: _suggest(trial, name, spec) for name, spec in space.items() if name not in (count, width)}
    params[count] = _suggest(trial, count, space[count])
    for i in range(1, int(params[count]) + 1):
        params[f"{width}_{i}"] = _suggest(trial, f"{width}_{i}", space[width])
    return params


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The training config of one point of the space, for base's model.

    The point's values replace base's; the model's layers (depth and width_1, ..., width_depth for the
    mlp: its `hidden`) become its list argument. Tracked neurons that this trial's first layer lacks are
    left out. A name that is neither a config field nor the model's layers is a ConfigError.
    """
    argument, count, width = models.search_space(base.model).layers
    layers = [f"{width}_{i}" for i in range(1, int(params.get(count, 0)) + 1)]
    values = {k: v for k, v in params.items() if k != count and k not in layers}
    unknown = sorted(set(values) - set(config_mod.FIELDS))
    if unknown:
        raise ConfigError(f"search space: '{unknown[0]}' is not a setting of the {base.model}.")
    if count in params:
        values[argument] = [int(params[k]) for k in layers]
    cfg = config_mod.from_dict(values, base, where="search space").validate()
    if cfg.track_neurons is not None and count in params:  # keep the neurons this trial's first layer has
        with torch.device("meta"):  # shapes only
            first = models.first_layer(models.create(cfg.model, **cfg.model_kwargs())).weight.shape[0]
        cfg = replace(cfg, track_neurons=[k for k in cfg.track_neurons if k <= first] or None)
    return cfg


def _ends(spec: Any) -> list[Any]:
    """The values of a space entry that decide whether all of it is usable: choices, range ends, the fixed value."""
    return list(spec) if isinstance(spec, list) else [spec["low"], spec["high"]] if isinstance(spec, dict) else [spec]


def check_space(base: TrainConfig, space: dict[str, Any]) -> None:
    """Every choice and range end must make a valid config: fail before a study or a trial exists.

    Each value is tried alone, on base: an entry's value with base's other fields, a number of layers
    with the narrowest width, a width at the fewest layers. (A combination of usable values can still be
    unusable, such as the widest layers at the largest depth; such a trial fails with its reason, and
    the study goes on.)
    """
    _, count, width = models.search_space(base.model).layers
    for name in (count, width):
        for v in _ends(space[name]):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"search space: {name} = {v!r} is not usable (a whole number, at least 1).")
    fewest, narrowest = min(_ends(space[count])), min(_ends(space[width]))
    points = [(name, v, {name: v}) for name, spec in space.items() if name not in (count, width)
              for v in _ends(spec)]
    points += [(count, n, {count: n, **{f"{width}_{i}": narrowest for i in range(1, n + 1)}})
               for n in _ends(space[count])]
    points += [(width, w, {count: fewest, **{f"{width}_{i}": w for i in range(1, fewest + 1)}})
               for w in _ends(space[width])]
    for name, v, point in points:
        try:
            runs.resolve(trial_config(base, point))
        except (ConfigError, models.ModelError) as e:
            raise ConfigError(f"search space: {name} = {v!r} is not usable ({str(e).rstrip('.')}).") from None


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
                                                      grace_period=3 * heartbeat,
                                                      heartbeat_stale_trial_callback=retry_trial)
            except Exception as e:  # sqlalchemy/driver errors: unreachable host, bad credentials, no driver
                # Workers starting together on a new database race to create Optuna's tables: the
                # loser sees a duplicate-key error, and a second try finds the tables there.
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if attempt == 2 or "driver" in reason.lower() or "import" in reason.lower():
                    raise TuneError(f"cannot open the study storage {url}: {reason[:300]}.") from None
                time.sleep(1 + attempt)
    path = Path(url) if url else out / "study.journal"
    if path.is_dir():
        raise TuneError(f"the study storage {path} is a directory; give a journal file path or an RDB URL.")
    if not _is_journal(path):
        raise TuneError(f"{path} is not an Optuna journal file, and fmnist will not write into it; "
                        "give a new file name or an RDB URL.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(
            str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    except Exception as e:  # a file that is not a journal, or a folder that cannot be made
        raise TuneError(f"cannot open the study storage {path} as an Optuna journal file "
                        f"({_first_line(e)}).") from None


def _is_journal(path: Path) -> bool:
    """A missing or empty file, or one whose first line is a journal record (JSON with an op_code)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
    except FileNotFoundError:
        return True
    except OSError:
        return True  # unreadable: let the journal backend say why
    if not first:
        return True
    try:
        return "op_code" in json.loads(first)
    except (ValueError, TypeError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


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
            except (ValueError, RuntimeError):  # another worker got there first
                continue
            failed.append(t.number)
            retry_trial(study, t)
    return failed


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a trial whose worker died again, with its parameters and the number of the run to continue."""
    retries = trial.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number),
                                                  "retries": retries + 1})


@dataclass
class TuneResult:
    study: optuna.Study
    best_config: TrainConfig | None
    best_toml: Path | None
    figures: list[Path]
    reaped: list[int]


def tune(base: TrainConfig, out: str | Path, trials: int | None = 20, timeout: float | None = None,
         study_name: str = "fmnist", storage: str | None = None, space_file: str | None = None,
         pruner: str = "median", heartbeat: int = 10, verbose: bool = False, progress: bool = False) -> TuneResult:
    """Run (or continue) a study; write best.toml and the study's figures into `out`.

    Each trial trains `base` (its epochs, seed and every field the space does
    not set) with the parameters the sampler proposes.
    """
    from tqdm import tqdm

    out = Path(out)
    # Optuna logs a failed trial with its traceback; fmnist says why in one line instead (see TuneResult.failed).
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if trials is not None and not 1 <= trials <= 100_000:
        raise ConfigError(f"--trials must be between 1 and 100000, got {trials}.")
    if timeout is not None and not (timeout > 0 and timeout < float("inf")):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}.")
    if not 1 <= heartbeat <= 3600:
        raise ConfigError(f"--heartbeat must be between 1 and 3600 seconds, got {heartbeat}.")
    if not study_name or len(study_name) > 200:
        raise ConfigError("--study needs a name of 1 to 200 characters.")
    if not config_mod.NAME_RE.fullmatch(f"{study_name}-trial_0"):  # trial run directories are named after it
        raise ConfigError(f"--study '{study_name[:120]}' cannot name trial folders: use letters, digits and "
                          ". _ + = - (no '/', not starting with '.').")
    base = replace(base, plots=False, tensorboard=False).validate()
    space = load_space(space_file, base.model)
    check_space(base, space)
    data.load(base.data_dir or None, base.val_size, base.split_seed)  # data problems: said before a study exists
    out = runs.claim_output_dir(out, "tune", legacy=("study.journal",))
    try:
        study = optuna.create_study(
            storage=open_storage(storage, out, heartbeat), study_name=study_name, direction="maximize",
            load_if_exists=True, pruner=make_pruner(pruner))
    except (TuneError, ConfigError):
        raise
    except Exception as e:  # a storage that opened but cannot hold a study (a damaged journal, a foreign DB)
        raise TuneError(f"cannot open study '{study_name}' in its storage ({_first_line(e)}).") from None
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", space)
    elif json.dumps(saved, sort_keys=True) != json.dumps(json.loads(json.dumps(space)), sort_keys=True):
        raise TuneError(f"study '{study_name}' searches another space than this one; rerun it with the --space it "
                        "was created with, or start a new --study.")
    seed = base.seed
    # Seeded, but offset by the trials already there and by the process, so that a rerun or a
    # second worker on the same study does not propose the same points again.
    study.sampler = optuna.samplers.TPESampler(
        seed=(seed * 1_000_003 + len(study.get_trials(deepcopy=False)) * 7919 + os.getpid()) % 2**32)
    reaped = fail_dead_trials(study)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        cfg = trial_config(base, suggest(trial, space, base.model))
        number = trial.user_attrs.get("retry_of", trial.number)  # a retried trial continues its first run
        cfg = replace(cfg, out_dir=str(out / "trials"), name=f"{study_name}-trial_{number}")
        trial.set_user_attr("config", config_mod.to_toml(cfg))

        def report(row: dict) -> None:
            trial.report(row["val_acc"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        run_dir = Path(cfg.out_dir) / cfg.name
        if "retry_of" in trial.user_attrs and (run_dir / "last.pt").is_file():
            try:
                return _continue(run_dir, trial, report)
            except runs.RunError:  # its files are damaged: train it again from the start
                pass
        if run_dir.exists():  # left by a study of the same name in another storage, or damaged: start clean
            if not runs.is_run(run_dir):
                raise TuneError(f"{run_dir} is not an fmnist run, and trial {trial.number} needs that folder; "
                                "choose another --out-dir or --study.")
            shutil.rmtree(run_dir)
        try:
            return train.fit(cfg, on_epoch=report, test=False).summary["best_val_accuracy"]
        except (train.TrainError, ConfigError, models.ModelError) as e:
            trial.set_user_attr("error", " ".join(str(e).split()))  # the trial fails; the study goes on
            raise

    bar = tqdm(total=trials, unit="trial", desc=f"study {study_name}", disable=not progress)

    def after_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        reaped.extend(fail_dead_trials(study))
        best = _best_value(study)
        bar.set_postfix_str(f"best val {best:.4f}" if best is not None else "")

    try:
        # A trial that diverges, or whose combination of values cannot be trained, fails; the study goes on.
        study.optimize(objective, n_trials=trials, timeout=timeout,
                       catch=(train.TrainError, ConfigError, models.ModelError),
                       callbacks=[after_trial])
    finally:
        bar.close()
    best_cfg, best_toml = write_best(study, out)
    return TuneResult(study, best_cfg, best_toml, study_figures(study, out), reaped)


def _continue(run_dir: Path, trial: optuna.Trial, report) -> float:
    """Continue the run of a trial whose worker died: replay its epochs to the pruner, then train on."""
    if (run_dir / "summary.json").is_file():  # it had finished; only the verdict was lost
        return runs.read_summary(run_dir)["best_val_accuracy"]
    for row in runs.read_history(run_dir):
        trial.report(row["val_acc"], row["epoch"])
    return train.fit(TrainConfig(), resume=run_dir, on_epoch=report, test=False).summary["best_val_accuracy"]


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
    runs.write_text(path, header + config_mod.to_toml(cfg))
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
                # PED-ANOVA, Optuna's default from 5.0, named so that 4.9 (whose default, fANOVA, needs
                # scikit-learn) draws the same figure.
                ax = vis.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
                ax.figure.set_size_inches(9, 6)
                figures.append(plots.save_figure(ax.figure, out / "param_importances.png"))
            except (RuntimeError, ValueError):  # e.g. every complete trial has the same value
                pass
    return figures
