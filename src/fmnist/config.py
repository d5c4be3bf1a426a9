"""The training configuration: one dataclass, TOML in and out, presets.

Layers, later wins: field defaults < `--preset NAME` < `--config FILE.toml` <
command-line flags. Each `fmnist train` flag is one field (`--batch-size` is
`batch_size`). Unknown keys, values of the wrong type and values out of range
are errors, all found before anything is written.

The model's own arguments (`hidden`, `channels`, `activation`, `dropout`,
`batch_norm`) and `track_neurons` default to None, meaning "the model's own
default": each default is written once, in the model's factory (models.py), and
a run's config.toml holds the resolved values. This module imports nothing
else of fmnist.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("plateau", "onecycle", "cosine", "linear", "none")
PRECISIONS = ("fp32", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda", "mps")
MODEL_FIELDS = ("hidden", "channels", "blocks", "activation", "dropout", "batch_norm")
# Where the data lives, where the run goes and how it is shown are not part of what a run *is*:
# two configs that differ only in these train the same model.
NOT_IDENTITY = ("data_dir", "out_dir", "name", "plots", "tensorboard", "device", "threads", "dry_run")

SEED_MAX = 2**32 - 1  # numpy's and most tools' seed range; seed * 1_000_003 + epoch stays inside int64
MAX_WIDTH = 65_536  # neurons of one hidden layer; a wider layer would not fit a laptop's memory
MAX_LAYERS = 32
MAX_CHANNELS = 4_096
NAME_RE = re.compile(r"[^\W_][\w.+=-]{0,99}")  # a run name: one path component (letters of any script), no '..'


def _f(default: Any, help: str, kind: str) -> Any:
    """A field with its help text and kind: int, float, bool, str, ints (a list of ints)."""
    meta = {"help": help, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train (None: the model's own default, see `fmnist models`)
    model: str = _f("mlp", "model name (see `fmnist models`)", "str")
    hidden: list[int] | None = _f(None, "hidden layer widths, comma-separated (mlp: 256,128; cnn: the linear head, "
                                        "none by default; 0 for none)", "ints")
    channels: list[int] | None = _f(None, "cnn: channels of each conv block, comma-separated (default 32,64,128); "
                                          "resnet: of each stage (default 16,32,64)", "ints")
    blocks: int | None = _f(None, "resnet: residual blocks per stage (default 2)", "int")
    activation: str | None = _f(None, "hidden activation: relu, gelu, silu, tanh, sigmoid, leaky_relu "
                                      "(default relu)", "str")
    dropout: float | None = _f(None, "dropout probability (mlp: after each hidden layer; cnn: before the head; "
                                     "default 0)", "float")
    batch_norm: bool | None = _f(None, "batch normalisation in hidden layers (default on)", "bool")
    init: str = _f("xavier", "weight init: xavier, xavier_normal, kaiming, normal, default", "str")
    init_std: float = _f(0.01, "standard deviation of the 'normal' init", "float")
    # how
    epochs: int = _f(20, "number of epochs", "int")
    batch_size: int = _f(128, "training batch size (images)", "int")
    optimizer: str = _f("adamw", "sgd, adam or adamw", "str")
    lr: float = _f(3e-3, "learning rate (the peak rate for onecycle)", "float")
    momentum: float = _f(0.9, "SGD momentum, in [0, 1)", "float")
    nesterov: bool = _f(False, "Nesterov momentum for SGD (needs momentum > 0)", "bool")
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)", "float")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss, in [0, 1)", "float")
    schedule: str = _f("onecycle", "learning-rate schedule: plateau, onecycle, cosine, linear (warm-up, then down "
                                   "to 0), none", "str")
    warmup: float = _f(0.1, "linear: the fraction of the steps spent rising from 0 to lr, in [0, 1)", "float")
    plateau_factor: float = _f(0.5, "plateau: multiply the lr by this (in (0, 1)) when val loss stalls", "float")
    plateau_patience: int = _f(1, "plateau: epochs without improvement before reducing", "int")
    min_lr: float = _f(1e-5, "plateau/cosine: lowest learning rate", "float")
    teacher: str = _f("", "knowledge distillation: a trained run directory whose softened predictions the model "
                          "also learns from (empty: off)", "str")
    distill_temperature: float = _f(4.0, "distillation: the temperature that softens both models' predictions",
                                    "float")
    distill_weight: float = _f(0.5, "distillation: the weight of the teacher's targets against the labels, "
                                    "in [0, 1]", "float")
    ema: float = _f(0.0, "decay per step of an exponential moving average of the weights (e.g. 0.999; 0 = off): "
                          "validation, best.pt and the test use the average", "float")
    tta: bool = _f(False, "test-time augmentation: validation and test average the logits of the image, its "
                          "mirror and 1-pixel shifts", "bool")
    precision: str = _f("fp32", "fp32; bf16 (autocast, fp32 weights: faster where the hardware computes bfloat16, "
                                "AVX-512 BF16, AMX or a recent GPU; far slower where it does not); or auto: bf16 "
                                "where it is native, else fp32", "str")
    channels_last: bool = _f(False, "channels-last memory format for convolutions (faster on CPU)", "bool")
    bn_bias_lr_scale: float = _f(1.0, "multiply the learning rate of batch-norm biases by this (airbench's 64 for "
                                      "SGD; their weight decay is divided by it)", "float")
    compile: bool = _f(False, "torch.compile the model for training (a minute or more of compiling first; pays "
                              "off only for long runs, see benchmarks/RESULTS.md)", "bool")
    # data
    flip: bool = _f(True, "augment: random horizontal flips", "bool")
    translate: int = _f(0, "augment: random shifts of up to this many pixels (0 = off, at most 14)", "int")
    erase: float = _f(0.0, "augment: probability of random erasing (0 = off)", "float")
    val_size: int = _f(5000, "validation images held out of the training images", "int")
    split_seed: int = _f(0, "seed of the train/validation split", "int")
    data_dir: str = _f("", "directory with the four IDX files (default: search)", "str")
    # run
    seed: int = _f(0, "seed of initialisation, shuffling and augmentation", "int")
    track_neurons: list[int] | None = _f(None, "first-layer neurons to snapshot, 1-based (default: the model's: "
                                               "mlp 50, cnn 1,8)", "ints")
    device: str = _f("auto", "auto, cpu, cuda or mps", "str")
    threads: int = _f(0, "CPU threads (0 = this machine's cores, shared among the fmnist processes running on it)",
                      "int")
    name: str = _f("", "run name (default: <model>-<date>-<time>)", "str")
    out_dir: str = _f("runs", "parent directory of run directories", "str")
    dry_run: bool = _f(False, "a few batches per epoch and at most 2 epochs: a smoke test", "bool")
    plots: bool = _f(True, "write figures and report.html at the end", "bool")
    tensorboard: bool = _f(False, "also log to runs/<name>/tb/ for TensorBoard (pip install 'fmnist[tensorboard]')",
                           "bool")

    def model_kwargs(self) -> dict[str, Any]:
        """The model's own arguments that this config sets (None fields are left to the model)."""
        return {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}

    def validate(self) -> TrainConfig:
        """Check every value's range (not the model's names: runs.resolve does that with the registry)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v}.")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {name} '{getattr(self, name)}'; known: {', '.join(choices)}.")
        _at_least(self, 1, "epochs", "batch_size", "val_size")
        _at_least(self, 0, "plateau_patience", "threads", "translate")
        if self.epochs > 100_000:
            raise ConfigError("epochs must be at most 100000.")
        if self.batch_size > 1_000_000:
            raise ConfigError("batch_size must be at most 1000000.")
        for name in ("seed", "split_seed"):
            if not 0 <= getattr(self, name) <= SEED_MAX:
                raise ConfigError(f"{name} must be between 0 and {SEED_MAX}, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        for name in ("weight_decay", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.schedule in ("plateau", "cosine") and self.min_lr >= self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must be below lr ({self.lr}) for the {self.schedule} schedule.")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}.")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"plateau_factor must be between 0 and 1 (exclusive), got {self.plateau_factor}.")
        for name in ("momentum", "label_smoothing", "ema", "warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 0 <= self.erase <= 1:
            raise ConfigError(f"erase must be a probability in [0, 1], got {self.erase}.")
        if self.translate > 14:
            raise ConfigError(f"translate must be at most 14 pixels (half the image), got {self.translate}.")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs a momentum above 0; set --momentum or drop --nesterov.")
        if self.threads > 1024:
            raise ConfigError(f"threads must be at most 1024, got {self.threads}.")
        if self.hidden is not None:
            if len(self.hidden) > MAX_LAYERS or any(not 1 <= h <= MAX_WIDTH for h in self.hidden):
                raise ConfigError(f"hidden must list at most {MAX_LAYERS} widths, each between 1 and {MAX_WIDTH}, "
                                  f"got {self.hidden}.")
        if self.channels is not None:
            if not 1 <= len(self.channels) <= 4 or any(not 1 <= c <= MAX_CHANNELS for c in self.channels):
                raise ConfigError(f"channels must list 1 to 4 blocks (each halves the 28 pixels), each of "
                                  f"1 to {MAX_CHANNELS} channels, got {self.channels}.")
        if not 0 < self.bn_bias_lr_scale <= 1000:
            raise ConfigError(f"bn_bias_lr_scale must be in (0, 1000], got {self.bn_bias_lr_scale}.")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be positive, got {self.distill_temperature}.")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}.")
        if self.blocks is not None and not 1 <= self.blocks <= 16:
            raise ConfigError(f"blocks must be between 1 and 16 per stage, got {self.blocks}.")
        if self.track_neurons is not None:
            if any(n < 1 for n in self.track_neurons):
                raise ConfigError(f"track_neurons are 1-based, got {self.track_neurons}.")
            if len(set(self.track_neurons)) != len(self.track_neurons):
                raise ConfigError(f"track_neurons lists a neuron twice: {self.track_neurons}.")
        if self.name:
            check_name(self.name)
        if not self.out_dir.strip():
            raise ConfigError("out_dir must name a directory (it is empty).")
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is trained (two runs with equal identities train the same weights)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}


def _at_least(cfg: TrainConfig, low: int, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name} must be at least {low}, got {getattr(cfg, name)}.")


def check_name(name: str) -> str:
    """A run name is one plain path component: letters, digits and . _ + = -, at most 100 characters."""
    # \w also matches letters and digits of other scripts (café, 学習); never '/', '\\', ':' or a leading '.'.
    if not NAME_RE.fullmatch(name) or len(name.encode("utf-8", "replace")) > 200:  # file systems allow 255 bytes
        raise ConfigError(f"run name '{name[:120]}' is not a plain name: use letters, digits and . _ + = - "
                          "(at most 100 characters, no '/', not starting with '.').")
    return name


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_type(key: str, value: Any, where: str) -> Any:
    """Value coerced to the field's kind, or ConfigError."""
    kind = FIELDS[key].metadata["kind"]
    if value is None and FIELDS[key].default is None:  # "the model's own default" (never in TOML; in checkpoints)
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = is_int
    elif kind == "float":
        ok = is_int or isinstance(value, float)
        value = float(value) if ok else value
    elif kind == "ints":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if ok and key == "hidden" and value == [0]:  # `--hidden 0`: no hidden layer
            value = []
    else:
        ok = isinstance(value, str)
    if not ok:
        shown = {"ints": "a list of integers", "float": "a number"}.get(kind, kind)
        raise ConfigError(f"{where}: '{key}' should be {shown}, got {value!r}.")
    return value


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, where: str = "config") -> TrainConfig:
    """A copy of `base` with `values` applied; unknown keys are a ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of configuration fields.")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(FIELDS)}.")
    checked = {k: _check_type(k, v, where) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **checked)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; any problem with it is one ConfigError sentence naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a TOML file.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text (TOML files are UTF-8).") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}.") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path} cannot be read: {getattr(e, 'strerror', None) or e}.") from None


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
    # A TOML basic string: quote, backslash and control characters escaped.
    return '"' + "".join(c if c not in '"\\' and 0x1F < ord(c) != 0x7F else f"\\u{ord(c):04x}"
                         for c in str(v)) + '"'


def to_toml(cfg: TrainConfig | dict[str, Any]) -> str:
    """TOML text that `load` reads back into an equal config (None fields, "the model's default", are left out)."""
    d = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else cfg
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items() if v is not None)
