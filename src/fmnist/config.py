"""The training configuration: one dataclass, TOML in and out, presets.

Layers, later wins: field defaults < `--preset NAME` < `--config FILE.toml` <
command-line flags. Each `fmnist train` flag is one field (`--batch-size` is
`batch_size`). Unknown keys, values of the wrong type and values out of range
are errors, all found before anything is written. Each field's range (its
choices, or its bounds) is written once, in its metadata (`_f`): `--help`
shows it (`describe`) and `TrainConfig.validate` checks it (`check_value`).

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
INITS = ("xavier", "xavier_normal", "kaiming", "normal", "default")  # models.init_weights applies them
STEMS = ("pool", "stride", "whiten")  # cnn: how models.CNN's first block halves the image
# name -> its torch.nn module, which models.py builds (the names live here so that `--help` needs no torch)
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh", "sigmoid": "Sigmoid",
               "leaky_relu": "LeakyReLU"}
MODEL_FIELDS = ("hidden", "channels", "blocks", "activation", "dropout", "batch_norm", "stem")
# Where the data lives, where the run goes and how it is shown are not part of what a run *is*:
# two configs that differ only in these train the same model.
NOT_IDENTITY = ("data_dir", "out_dir", "name", "plots", "tensorboard", "device", "threads", "dry_run")

SEED_MAX = 2**32 - 1  # numpy's and most tools' seed range; data.epoch_seed stays inside int64 below it
MAX_WIDTH = 65_536  # neurons of one hidden layer; a wider layer would not fit a laptop's memory
MAX_LAYERS = 32
MAX_CHANNELS = 4_096
MAX_STAGES = 4  # conv blocks or stages: each halves the 28 pixels (28, 14, 7, 3)
NAME_RE = re.compile(r"[^\W_][\w.+=-]{0,99}")  # a run name: one path component (letters of any script), no '..'


def _f(default: Any, help: str, kind: str, *, choices: tuple[str, ...] | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, lt: float | None = None,
       items: tuple[int, int] | None = None) -> Any:
    """A field with its help text, its kind (int, float, bool, str, ints: a list of ints) and its range.

    The range is written here once; `--help` shows it (`describe`) and `TrainConfig.validate` checks it:
    `choices` for a name, bounds ge/gt/le/lt for a number (for ints: for each of its items), and `items`,
    the least and most items of a list. None (a model setting left to the model) is never out of range.
    """
    meta = {"help": help, "kind": kind, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "items": items}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train (None: the model's own default, see `fmnist models`)
    model: str = _f("mlp", "model name (see `fmnist models`)", "str")
    hidden: list[int] | None = _f(None, "hidden layer widths, comma-separated (mlp: 256,128; cnn: the linear head, "
                                        "none by default; 0 for none)", "ints", ge=1, le=MAX_WIDTH,
                                  items=(0, MAX_LAYERS))
    channels: list[int] | None = _f(None, "cnn: channels of each conv block, comma-separated (default 32,64,128); "
                                          "resnet: of each stage (default 16,32,64); each block or stage halves "
                                          "the 28 pixels", "ints", ge=1, le=MAX_CHANNELS, items=(1, MAX_STAGES))
    blocks: int | None = _f(None, "resnet: residual blocks per stage (default 2)", "int", ge=1, le=16)
    activation: str | None = _f(None, "hidden activation, the model's own by default (see `fmnist models`)", "str",
                                choices=tuple(ACTIVATIONS))
    dropout: float | None = _f(None, "dropout probability (mlp: after each hidden layer; cnn: before the head; "
                                     "default 0)", "float", ge=0, lt=1)
    batch_norm: bool | None = _f(None, "batch normalisation in hidden layers (default on)", "bool")
    stem: str | None = _f(None, "cnn: how the first block halves the 28 pixels: pool (a 3x3 conv, then 2x2 "
                                "max-pool; default), stride (one 4x4 conv of stride 2: less work at 28x28) or whiten "
                                "(the 3x3 conv without padding, started as a patch whitening: 26 -> 13 pixels)", "str",
                          choices=STEMS)
    init: str = _f("xavier", "weight init", "str", choices=INITS)
    init_std: float = _f(0.01, "standard deviation of the 'normal' init", "float", gt=0)
    # how
    epochs: int = _f(20, "number of epochs", "int", ge=1, le=100_000)
    batch_size: int = _f(128, "training batch size (images)", "int", ge=1, le=1_000_000)
    optimizer: str = _f("adamw", "optimiser", "str", choices=OPTIMIZERS)
    lr: float = _f(3e-3, "learning rate (the peak rate for onecycle)", "float", gt=0)
    momentum: float = _f(0.9, "SGD momentum", "float", ge=0, lt=1)
    nesterov: bool = _f(False, "Nesterov momentum for SGD (needs momentum > 0)", "bool")
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)", "float", ge=0)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss", "float", ge=0, lt=1)
    schedule: str = _f("onecycle", "learning-rate schedule (linear: warm-up, then down to 0)", "str",
                       choices=SCHEDULES)
    warmup: float = _f(0.1, "linear: the fraction of the steps spent rising from 0 to lr", "float", ge=0, lt=1)
    plateau_factor: float = _f(0.5, "plateau: multiply the lr by this when val loss stalls", "float", gt=0, lt=1)
    plateau_patience: int = _f(1, "plateau: epochs without improvement before reducing", "int", ge=0)
    min_lr: float = _f(1e-5, "plateau/cosine: lowest learning rate", "float", ge=0)
    teacher: str = _f("", "knowledge distillation: a trained run directory whose softened predictions the model "
                          "also learns from (empty: off)", "str")
    distill_temperature: float = _f(4.0, "distillation: the temperature that softens both models' predictions",
                                    "float", gt=0)
    distill_weight: float = _f(0.5, "distillation: the weight of the teacher's targets against the labels",
                               "float", ge=0, le=1)
    ema: float = _f(0.0, "decay per step of an exponential moving average of the weights (e.g. 0.999; 0 = off): "
                          "validation, best.pt and the test use the average", "float", ge=0, lt=1)
    tta: bool = _f(True, "test-time augmentation: validation and test average the logits of the image and its "
                         "mirror (and of it shifted by 1 pixel, where the run trains on shifts); inference keeps "
                         "them where they buy 0.1 point of validation accuracy", "bool")
    epoch_tta: bool = _f(True, "with --tta: validate each epoch with the views too (off: each epoch's validation "
                               "sees the plain images, a sixth of the work with six views, and best.pt's accuracy "
                               "with the views is measured once, at the end)", "bool")
    precision: str = _f("fp32", "bf16 is autocast with fp32 weights: faster where the hardware computes bfloat16 "
                                "(AVX-512 BF16, AMX or a recent GPU), far slower where it does not; auto: bf16 "
                                "where it is native, else fp32", "str", choices=PRECISIONS)
    channels_last: bool = _f(False, "channels-last memory format for convolutions (faster on CPU)", "bool")
    bn_bias_lr_scale: float = _f(1.0, "multiply the learning rate of batch-norm biases by this (airbench's 64 for "
                                      "SGD; their weight decay is divided by it)", "float", gt=0, le=1000)
    compile: bool = _f(False, "torch.compile the model for training (a minute or more of compiling first; pays "
                              "off only for long runs, see benchmarks/RESULTS.md)", "bool")
    # data
    flip: bool = _f(True, "augment: random horizontal flips", "bool")
    translate: int = _f(0, "augment: random shifts of up to this many pixels (0 = off; 14 is half the image)",
                        "int", ge=0, le=14)
    erase: float = _f(0.0, "augment: probability of random erasing (0 = off)", "float", ge=0, le=1)
    photo_aug: float = _f(0.0, "augment: probability of a photo-like perturbation: a grey or uneven background, "
                               "lower contrast, pixel noise, a soft shadow beside the product, a tilt of up to 10 "
                               "degrees and a zoom in or out by up to a tenth (0 = off)", "float", ge=0, le=1)
    outlier_exposure: float = _f(0.25, "weight of outlier exposure: each batch also holds half as many drawn "
                                       "non-products (strokes, blobs, noise, gradients, noise textures) whose "
                                       "softmax is pulled towards uniform, so that the run knows when not to "
                                       "answer (0 = off)", "float", ge=0, le=10)
    val_size: int = _f(5000, "validation images held out of the training images", "int", ge=1)
    split_seed: int = _f(0, "seed of the train/validation split", "int", ge=0, le=SEED_MAX)
    data_dir: str = _f("", "directory with the four IDX files (default: search)", "str")
    # run
    seed: int = _f(0, "seed of initialisation, shuffling and augmentation", "int", ge=0, le=SEED_MAX)
    track_neurons: list[int] | None = _f(None, "first-layer neurons to snapshot, 1-based (default: the model's: "
                                               "mlp 50, cnn 1,8)", "ints", ge=1)
    device: str = _f("auto", "where to train", "str", choices=DEVICES)
    threads: int = _f(0, "CPU threads (0 = this machine's cores, shared among the fmnist processes running on it)",
                      "int", ge=0, le=1024)
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
        """Check every value against its field's range, and the rules between fields (not the model's names:
        runs.resolve does that with the registry)."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        if self.schedule in ("plateau", "cosine") and self.min_lr >= self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must be below lr ({self.lr}) for the {self.schedule} schedule.")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs a momentum above 0; set --momentum or drop --nesterov.")
        if self.track_neurons is not None and len(set(self.track_neurons)) != len(self.track_neurons):
            raise ConfigError(f"track_neurons lists a neuron twice: {self.track_neurons}.")
        if self.name:
            check_name(self.name)
        if not self.out_dir.strip():
            raise ConfigError("out_dir must name a directory (it is empty).")
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is trained (two runs with equal identities train the same weights)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}


def describe(name: str) -> str:
    """The range of field `name` in words, from its metadata: "one of sgd, adam, adamw", "in [0, 1)",
    "from 1 to 100000", "positive", "a list of 1 to 4 values, each from 1 to 4096"; "" if it has none."""
    meta = FIELDS[name].metadata
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    each = _bounds(meta["ge"], meta["gt"], meta["le"], meta["lt"])
    if meta["kind"] != "ints":
        return each
    least, most = meta["items"] or (0, None)
    count = f"{least} to {most} " if least and most else f"at most {most} " if most else ""
    return f"a list of {count}values" + (f", each {each}" if each else "")


def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else ""
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else ""
    if low and high:
        return f"from {ge} to {le}" if ge is not None and le is not None else f"in {low}, {high}"
    if low:
        return f"at least {ge}" if ge is not None else "positive" if gt == 0 else f"above {gt}"
    if high:
        return f"at most {le}" if le is not None else f"below {lt}"
    return ""


def check_value(name: str, value: Any) -> None:
    """ConfigError, one sentence, if `value` is outside field `name`'s range (None: the model's own default)."""
    meta = FIELDS[name].metadata
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}.")
    if meta["choices"]:
        if value not in meta["choices"]:
            raise ConfigError(f"unknown {name} '{value}'; known: {', '.join(meta['choices'])}.")
        return
    values = value if meta["kind"] == "ints" else [value]
    least, most = meta["items"] or (0, None)
    ok = all((meta["ge"] is None or v >= meta["ge"]) and (meta["gt"] is None or v > meta["gt"])
             and (meta["le"] is None or v <= meta["le"]) and (meta["lt"] is None or v < meta["lt"]) for v in values)
    if not ok or len(values) < least or (most is not None and len(values) > most):
        raise ConfigError(f"{name} must be {describe(name)}, got {value}.")


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
    """`base` with preset `name` applied."""
    if name not in presets():
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(presets())}.")
    values = tomllib.loads((resources.files("fmnist") / "presets" / f"{name}.toml").read_text())
    return from_dict(values, base, where=f"preset {name}")


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
