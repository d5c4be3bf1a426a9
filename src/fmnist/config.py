"""The training configuration: one dataclass, TOML in and out, presets.

Layers, later wins: field defaults < `--preset NAME` < `--config FILE.toml` <
command-line flags. Each `fmnist train` flag is one field (`--batch-size` is
`batch_size`). Unknown keys and values of the wrong type are errors.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("plateau", "onecycle", "cosine", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used."""


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("mlp", "model name (see `fmnist models`)")
    hidden: list[int] = _f([256, 128], "hidden layer widths, comma-separated")
    activation: str = _f("relu", "hidden activation: relu, gelu, silu, tanh, sigmoid, leaky_relu")
    dropout: float = _f(0.0, "dropout probability after each hidden layer")
    batch_norm: bool = _f(True, "batch normalisation in hidden layers")
    init: str = _f("xavier", "weight init: xavier, xavier_normal, kaiming, normal, default")
    init_std: float = _f(0.01, "standard deviation of the 'normal' init")
    # how
    epochs: int = _f(20, "number of epochs")
    batch_size: int = _f(128, "training batch size (images)")
    optimizer: str = _f("adamw", "sgd, adam or adamw")
    lr: float = _f(3e-3, "learning rate (the peak rate for onecycle)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    schedule: str = _f("onecycle", "learning-rate schedule: plateau, onecycle, cosine, none")
    plateau_factor: float = _f(0.5, "plateau: multiply the lr by this when val loss stalls")
    plateau_patience: int = _f(1, "plateau: epochs without improvement before reducing")
    min_lr: float = _f(1e-5, "plateau/cosine: lowest learning rate")
    # data
    flip: bool = _f(True, "augment: random horizontal flips")
    translate: int = _f(0, "augment: random shifts of up to this many pixels (0 = off)")
    erase: float = _f(0.0, "augment: probability of random erasing (0 = off)")
    val_size: int = _f(5000, "validation images held out of the 60,000 training images")
    split_seed: int = _f(0, "seed of the train/validation split")
    data_dir: str = _f("", "directory with the four IDX files (default: search)")
    # run
    seed: int = _f(0, "seed of initialisation, shuffling and augmentation")
    track_neurons: list[int] = _f([50], "first-hidden-layer neurons to snapshot (1-based)")
    device: str = _f("auto", "auto, cpu, cuda or mps")
    name: str = _f("", "run name (default: <model>-<date>-<time>)")
    out_dir: str = _f("runs", "parent directory of run directories")
    dry_run: bool = _f(False, "a few batches per epoch and at most 2 epochs: a smoke test")
    plots: bool = _f(True, "write figures and report.html at the end")
    tensorboard: bool = _f(False, "also log to runs/<name>/tb/ for TensorBoard (pip install 'fmnist[tensorboard]')")

    def model_kwargs(self) -> dict[str, Any]:
        return dict(activation=self.activation, dropout=self.dropout, batch_norm=self.batch_norm,
                    hidden=tuple(self.hidden))

    def validate(self) -> TrainConfig:
        from . import models

        if self.model not in models.names():
            raise ConfigError(f"unknown model '{self.model}'; known models: {', '.join(models.names())}.")
        if self.init not in models.INITS:
            raise ConfigError(f"unknown init '{self.init}'; known: {', '.join(models.INITS)}.")
        if self.activation not in models.ACTIVATIONS:
            raise ConfigError(f"unknown activation '{self.activation}'; known: {', '.join(models.ACTIVATIONS)}.")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {name} '{getattr(self, name)}'; known: {', '.join(choices)}.")
        for name in ("epochs", "batch_size", "val_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")
        if self.lr <= 0:
            raise ConfigError("lr must be positive.")
        for name in ("dropout", "erase", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1).")
        if self.translate < 0 or any(h < 1 for h in self.hidden):
            raise ConfigError("translate must be >= 0 and hidden widths >= 1.")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_type(key: str, value: Any, where: str) -> Any:
    """Value coerced to the field's type, or ConfigError."""
    default = getattr(TrainConfig(), key)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: '{key}' should be {type(default).__name__}, got {value!r}.")
    return value


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, where: str = "config") -> TrainConfig:
    """A copy of `base` with `values` applied; unknown keys are a ConfigError."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(FIELDS)}.")
    checked = {k: _check_type(k, v, where) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **checked)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}.") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}.") from None


def load(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    return from_dict(read_toml(path), base, where=str(path))


def presets() -> list[str]:
    root = resources.files("fmnist") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def preset(name: str, base: TrainConfig | None = None) -> TrainConfig:
    if name not in presets():
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(presets())}.")
    text = (resources.files("fmnist") / "presets" / f"{name}.toml").read_text()
    return from_dict(tomllib.loads(text), base, where=f"preset {name}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: TrainConfig | dict[str, Any]) -> str:
    """TOML text that `load` reads back into an equal config."""
    d = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else cfg
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items())
