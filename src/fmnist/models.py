"""Models by name, and the weight-initialisation schemes compared in the course project.

    model = create("mlp", hidden=(256, 128), dropout=0.1)
    init_weights(model, "xavier")

Every model takes (B, 1, 28, 28) normalised images and returns (B, 10) logits.
Each model registers its factory (whose keyword defaults are the model's
defaults), the first-layer neurons a run follows, and its own part of `fmnist
tune`'s search space.

Names of activations and inits are checked once, by `TrainConfig.validate`
(config.py holds them, so that `--help` needs no torch); this module builds
what they name.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import calibrate
from .config import ACTIVATIONS, INITS  # noqa: F401 (the names; models.INITS is config.INITS)
from .data import MEAN, STD
from .errors import ModelError


@dataclass(frozen=True)
class SearchSpace:
    """A model's own part of `fmnist tune`'s search space (the common fields are tune.py's).

    `layers` = (argument, count, width): the list argument the search builds, from a number of layers
    drawn from entries[count] and, for each layer i, a width drawn from entries[width] (the trial parameter
    width_i); ("hidden", "depth", "width") gives hidden = [width_1, ..., width_depth]. Every other entry is
    an argument of the model, searched as it is. An entry is a list (categorical choices), a range
    {"low", "high", "log"?} (whole numbers when both ends are), or one fixed value.
    """
    layers: tuple[str, str, str]
    entries: dict[str, Any]


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TRACK: dict[str, tuple[int, ...]] = {}  # name -> first-layer neurons tracked by default (1-based)
_SPACE: dict[str, SearchSpace] = {}


def register(name: str, space: SearchSpace, track: tuple[int, ...] = (1,)) -> Callable:
    """Decorator: make a model factory available to `create(name)`.

    The factory's keyword defaults are the model's defaults (written once, there);
    `space` is what `fmnist tune --model name` searches of the model's own settings;
    `track` lists the first-layer neurons that a run follows unless told otherwise.
    """
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        argument, count, width = space.layers
        takes = inspect.signature(factory).parameters
        if argument not in takes or count not in space.entries or width not in space.entries or any(
                k not in takes for k in space.entries if k not in (count, width)):
            raise ValueError(f"the search space of model '{name}' names settings the model does not take")
        _REGISTRY[name] = factory
        _TRACK[name] = tuple(track)
        _SPACE[name] = space
        return factory
    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ModelError(f"unknown model '{name}'; known models: {', '.join(names())}.")


def defaults(name: str) -> dict[str, Any]:
    """The keyword arguments `name` takes, with their defaults."""
    _check_name(name)
    return {k: p.default for k, p in inspect.signature(_REGISTRY[name]).parameters.items()
            if p.default is not inspect.Parameter.empty}


def default_track(name: str) -> list[int]:
    _check_name(name)
    return list(_TRACK[name])


def search_space(name: str) -> SearchSpace:
    """Model `name`'s own search space (a copy: the caller may change its entries)."""
    _check_name(name)
    return copy.deepcopy(_SPACE[name])


def resolve_kwargs(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every argument of model `name`: the given ones over the factory's defaults.

    An argument the model does not take is a ModelError that says which ones it does.
    """
    known = defaults(name)
    extra = sorted(set(given) - set(known))
    if extra:
        raise ModelError(f"model '{name}' takes no '{extra[0]}'; its settings are: {', '.join(known)}.")
    out = {**known, **given}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def create(name: str, **kw) -> nn.Module:
    """Build a registered model; an unknown name or argument is a ModelError.

    The values are trusted: `TrainConfig.validate` checks them (an unknown activation here is a KeyError).
    """
    resolve_kwargs(name, kw)
    return _REGISTRY[name](**kw)


def _activation(name: str) -> nn.Module:
    return getattr(nn, ACTIVATIONS[name])()


class MLP(nn.Module):
    """784 -> hidden... -> 10, each hidden layer Linear [-> BatchNorm] -> act [-> Dropout]."""

    def __init__(self, hidden: tuple[int, ...] | list[int], activation: str, dropout: float, batch_norm: bool,
                 in_features: int = 28 * 28, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2), and outside autograd (evaluation, inference) the same values as the maximum of the four
    strided views: PyTorch's CPU kernel also computes the indices a backward pass needs, and on a channels-last
    batch of 256 cnn-fast images at 28x28 took 2.8 ms against 0.9 ms (bf16; 29 against 4.6 ms at 1,024)."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # an odd row or column is dropped, as there
        columns = torch.maximum(x[..., 0::2], x[..., 1::2])
        return torch.maximum(columns[..., 0::2, :], columns[..., 1::2, :])


class CNN(nn.Module):
    """A compact convnet that spends few multiply-adds at full resolution (airbench's block shape).

    Each block: conv (c_in -> c) at the current size, 2x2 max-pool, BN, act, then
    conv (c -> c) at the halved size, BN, act. The only full-resolution (28x28)
    convolution is the first, from 1 channel: about 2 % of the network's work,
    where a classic two-conv first block spends about 40 % there. The default
    (32, 64, 128) costs 12.4M multiply-adds per image, against 18.3M for fmnist's
    earlier (32, 64) two-conv-per-block CNN (benchmarks/RESULTS.md compares them).
    Then flatten and a linear head.

    `stem` "stride": the first block's conv and max-pool become one 4x4 conv of
    stride 2, so that nothing runs at 28x28 but that conv's 14x14 outputs. The
    full-size max-pool does no arithmetic but took a fifth of the training step
    on a CPU (benchmarks/RESULTS.md, "Less work outside the epochs").

    `stem` "whiten": the first conv has no padding, so 28 pixels become 26, then
    13, 6 and 3 after the pools: every later layer works on fewer pixels (the
    7x7 maps become 6x6), 1.2-1.3x a training step on a CPU. Its first filters
    start as airbench's patch whitening (`whiten_stem`) and are trained as the
    others.
    """

    def __init__(self, channels: tuple[int, ...] | list[int], activation: str, dropout: float,
                 hidden: tuple[int, ...] | list[int], batch_norm: bool, classes: int = 10, stem: str = "pool"):
        super().__init__()

        def norm_act(c: int) -> list[nn.Module]:
            return ([nn.BatchNorm2d(c)] if batch_norm else []) + [_activation(activation)]

        layers: list[nn.Module] = []
        c_in, side = 1, 28
        for i, c in enumerate(channels):
            if i == 0 and stem == "stride":
                layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1, bias=not batch_norm), *norm_act(c)]
            elif i == 0 and stem == "whiten":
                layers += [nn.Conv2d(c_in, c, 3, bias=not batch_norm), MaxPool2x2(), *norm_act(c)]
                side = 28 - 2
            else:
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm), MaxPool2x2(), *norm_act(c)]
            layers += [nn.Conv2d(c, c, 3, padding=1, bias=not batch_norm), *norm_act(c)]
            c_in, side = c, side // 2
        layers += [nn.Flatten()]
        width = c_in * side * side
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# The course project follows the 50th neuron of the first hidden layer.
@register("mlp", track=(50,), space=SearchSpace(("hidden", "depth", "width"), {
    "depth": {"low": 1, "high": 3},  # hidden layers
    "width": [64, 128, 256, 512, 1024],  # choices for each hidden layer's width (neurons)
}))
def mlp(hidden=(256, 128), activation="relu", dropout=0.0, batch_norm=True) -> nn.Module:
    """784 -> hidden... -> 10; the default is fmnist's default MLP (chosen on validation, see README)."""
    return MLP(tuple(hidden), activation, dropout, batch_norm)


@register("cnn", track=(1, 8), space=SearchSpace(("channels", "stages", "channels"), {
    "stages": {"low": 2, "high": 3},  # conv blocks, each halving the resolution: 28 -> 14 -> 7 (-> 3)
    "channels": [16, 32, 64, 128],  # choices for each block's channels
}))
def cnn(channels=(32, 64, 128), hidden=(), activation="gelu", dropout=0.0, batch_norm=True, stem="pool"
        ) -> nn.Module:
    """Blocks of `channels` (each conv, max-pool, BN-act, conv, BN-act; with `stem` "stride" the first block's
    conv and pool are one 4x4 conv of stride 2; with "whiten" its conv has no padding and starts as a patch
    whitening), then a linear head of `hidden` widths."""
    return CNN(tuple(channels), activation, dropout, tuple(hidden), batch_norm, stem=stem)


def whiten_stem(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Start the first conv of a `stem="whiten"` CNN as airbench's patch whitening of uint8 training `images`
    (N, 28, 28): the eigenvectors of the covariance of their normalised k x k patches, largest eigenvalues first,
    each scaled by 1 / sqrt(eigenvalue + eps), and their negatives (the max-pool after the conv keeps only the
    larger side of a direction). A 3x3 patch has 9 directions, so 18 filters start so and any others keep their
    initialisation. Deterministic in `images`, so every rank of a distributed run computes the same. Without it
    cnn-fast's validation accuracy was 0.3 points lower at seed 0 in bf16 and in fp32 (benchmarks/RESULTS.md)."""
    conv = first_layer(model)
    c, k = conv.weight.shape[0], conv.weight.shape[-1]
    x = ((images.double() / 255 - MEAN) / STD).unsqueeze(1)  # data.normalize's, in float64 for the covariance
    patches = F.unfold(x, k).transpose(1, 2).reshape(-1, k * k)
    values, vectors = torch.linalg.eigh(torch.cov(patches.t()))  # ascending
    take = min(c // 2, k * k)
    values, vectors = values.flip(0)[:take], vectors.flip(1)[:, :take].t()
    filters = vectors / torch.sqrt(values.clamp(min=0) + eps).unsqueeze(1)
    with torch.no_grad():
        conv.weight[: 2 * take].copy_(torch.cat([filters, -filters]).reshape(2 * take, 1, k, k))


VIEWS = ("mirror", "six")  # test-time augmentation's views: the mirror; or it and 1-pixel shifts, airbench's six


def views(cfg) -> str:
    """The views a run's test-time augmentation averages ("" where its config has none): the augmentations it
    trained with. Shifted views only for a network trained on shifts: the default MLP (flips, no shifts) lost 0.3
    to 1.0 points of validation accuracy to them and gained 0.2 from the mirror alone (benchmarks/RESULTS.md,
    Photos)."""
    return "" if not cfg.tta else "six" if cfg.translate > 0 else "mirror"


def _views(tta: str | bool | None) -> str:
    """"" (none) or one of VIEWS; True: "six" (what `tta` meant before it named its views)."""
    if tta is True:
        return "six"
    if not tta:
        return ""
    if tta not in VIEWS:
        raise ValueError(f"unknown test-time views '{tta}'; choose one of {', '.join(VIEWS)}")
    return tta


def tta_logits(model: nn.Module, x: torch.Tensor, views: str | bool = "six") -> torch.Tensor:
    """Test-time augmentation. "six", as airbench's: half the mean logits of the image and its mirror, half the
    same for the image shifted 1 pixel up-left and 1 pixel down-right (edges repeated); "mirror": the mean of the
    image's and its mirror's. x: (B, 1, 28, 28). `model` may also give a tuple of tensors (taps_and_logits'
    features): each is averaged alike, in its dtype."""
    def each(f, a, b):  # f on two tensors, or on each pair of two tuples' tensors
        return tuple(f(p, q) for p, q in zip(a, b)) if isinstance(a, tuple) else f(a, b)

    def mirrored(v: torch.Tensor):
        return each(lambda p, q: 0.5 * (p + q), model(v), model(v.flip(-1)))

    if _views(views) == "mirror":
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifted = each(lambda p, q: 0.5 * (p + q), mirrored(padded[..., 0:h, 0:w]), mirrored(padded[..., 2:h + 2, 2:w + 2]))
    return each(lambda p, q: 0.5 * p + 0.5 * q, mirrored(x), shifted)


def taps_and_logits(model: nn.Module, x: torch.Tensor, taps: tuple[str, ...] = calibrate.TAPS,
                    tta: str | bool = "", own: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({tap: (B, D_tap)}, (B, classes) logits) of normalised images x (B, 1, 28, 28): the features the OOD scores
    read. Taps: "pixels" (the normalised input, flattened), "first" (the first activation's output, averaged over
    space in a convnet), "penultimate" (what the last Linear layer takes). The logits are model(x)'s, and with
    `tta` (the views: see tta_logits) tta_logits(model, x, tta)'s, to the bit. The taps are averaged over the six
    views the same way, in their own dtype. With the mirror alone the OOD score reads the image alone: the taps are
    its own, and so are the logits its energy reads (tap calibrate.OWN_LOGITS), while the logits returned average
    its mirror's too. Averaged with its mirror, a digit or a letter looks more like a garment: the default MLP
    with the mirror in every part of its score marked 2.9-3.0 points fewer of benchmarks/ood.py's non-products
    unsure, and with it in the energy alone the comparison on validation kept the energy, which lets strokes
    through (benchmarks/RESULTS.md, Photos). `own`: the same with any views (a photo's answer averages six views,
    its score reads the image alone, as the run's mirror-view answers do: see PixelClassifier's `photo`)."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential) or not isinstance(net[-1], nn.Linear):
        raise ModelError(f"{type(model).__name__} does not end in a Linear layer, so it has no penultimate "
                         "features for the out-of-distribution score.")
    acts = tuple(getattr(nn, a) for a in ACTIVATIONS.values())
    first = next((i for i, m in enumerate(net) if isinstance(m, acts)), 0)
    wanted = [t for t in calibrate.TAPS if t in taps]  # in the order the network reaches them

    def run(v: torch.Tensor) -> tuple[torch.Tensor, ...]:  # every tap, then the logits
        outs = [v.flatten(1)] if "pixels" in wanted else []
        h = v
        for i, m in enumerate(net):
            if i == len(net) - 1 and "penultimate" in wanted:
                outs.append(h.flatten(1))
            h = m(h)
            if i == first and "first" in wanted:
                outs.append(h.mean((2, 3)) if h.ndim == 4 else h)
        return (*outs, h)

    if own or _views(tta) == "mirror":
        out = run(x)
        alone = {**dict(zip(wanted, out[:-1])), calibrate.OWN_LOGITS: out[-1]}
        if not tta:
            return alone, out[-1]
        return alone, 0.5 * (out[-1] + model(x.flip(-1))) if _views(tta) == "mirror" else tta_logits(model, x, tta)
    out = tta_logits(run, x, tta) if tta else run(x)
    return dict(zip(wanted, out[:-1])), out[-1]


class PixelClassifier(nn.Module):
    """A model for use outside training: (N, 28, 28) pixels 0-255 in; (N, classes) calibrated probabilities and
    (N,) out-of-distribution scores out (higher: less like a Fashion-MNIST product; see calibrate.py).

    The dataset's normalisation, the run's temperature and its out-of-distribution score (with its statistics as
    constants) are folded in, so that an exported model (ONNX, TorchScript) takes what an image decoder gives and
    needs nothing of fmnist. Without a calibration (a run trained before fmnist calibrated): temperature 1 and the
    max-softmax score.
    """

    def __init__(self, model: nn.Module, tta: str | bool = "", calibration: calibrate.Calibration | None = None,
                 photo: bool = False):
        super().__init__()
        # tta: the views, as the calibration says (Calibration.inference_views): where validation found them worth
        # their cost. `photo`: the classifier of inputs made from photos (Calibration.photo_views): its answers
        # average those views, at their own temperature, and its score is the image's alone, as the run's own
        self.model, self.photo = model, photo
        cal = calibration or calibrate.Calibration()
        if photo and not cal.photo_views:
            raise ValueError("this calibration has no views for photos")
        # the answers' temperature; the OOD score keeps the run's (max-softmax reads it; its threshold was fitted so)
        self.tta, self.temperature = (cal.photo_views, cal.photo_temperature) if photo else (_views(tta),
                                                                                             cal.temperature)
        self.taps = calibrate.needs(cal.method)
        for tap in self.taps:  # the statistics as buffers: they follow .to(device) and are constants in an export
            self.register_buffer(f"whiten_{tap}", cal.mahalanobis[tap].whiten.clone())
            self.register_buffer(f"centres_{tap}", cal.mahalanobis[tap].centres.clone())
        self.tail_parts = tuple(cal.tails)  # the tails score's validation scores of each part, likewise
        for part in self.tail_parts:
            self.register_buffer(f"tail_{part}", cal.tails[part].clone())
        self.calibration = dataclasses.replace(cal, mahalanobis={}, tails={})  # temperature, method, threshold, scales

    @staticmethod
    def normalise(pixels: torch.Tensor) -> torch.Tensor:
        """(N, 28, 28) pixels 0-255 -> (N, 1, 28, 28) normalised, as data.normalize."""
        return pixels.unsqueeze(1) * (1.0 / (255.0 * STD)) - MEAN / STD

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 28, 28) pixels 0-255 -> (N, classes) calibrated logits (divided by the run's temperature, with TTA
        where the run uses it): the probabilities forward() gives are their softmax; explain.py attributes them."""
        x = self.normalise(pixels)
        logits = (tta_logits(self.model, x, self.tta) if self.tta else self.model(x)).float()
        t = self.temperature
        return logits / t if t != 1.0 else logits

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise(pixels)  # (N, 1, 28, 28)
        if self.taps or self.tta == "mirror" or self.photo:  # the score reads the image's own logits (see
            taps, logits = taps_and_logits(self.model, x, self.taps, self.tta, own=self.photo)  # taps_and_logits)
            taps = {k: v.float() for k, v in taps.items()}
        else:
            taps, logits = {}, tta_logits(self.model, x, self.tta) if self.tta else self.model(x)
        logits = logits.float()
        cal = dataclasses.replace(self.calibration, mahalanobis={
            tap: calibrate.Mahalanobis(getattr(self, f"whiten_{tap}"), getattr(self, f"centres_{tap}"))
            for tap in self.taps}, tails={part: getattr(self, f"tail_{part}") for part in self.tail_parts})
        t = self.temperature
        return torch.softmax(logits / t if t != 1.0 else logits, dim=1), cal.score(logits, taps)


class ResidualBlock(nn.Module):
    """conv-BN-act-conv-BN plus the input (a 1x1 conv where the shape changes), then act: ResNet's basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str, batch_norm: bool):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm), norm(c_out), _activation(activation),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not batch_norm), norm(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=not batch_norm), norm(c_out))
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 28x28: a 3x3 stem, stages of `blocks` residual blocks (each stage after the first
    halves the resolution: 28, 14, 7, 4), global average pooling and a linear head."""

    def __init__(self, channels: tuple[int, ...] | list[int], blocks: int, activation: str, dropout: float,
                 batch_norm: bool, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels[0]))
        layers.append(_activation(activation))
        c_in = channels[0]
        for stage, c in enumerate(channels):
            for b in range(blocks):
                layers.append(ResidualBlock(c_in, c, 2 if stage > 0 and b == 0 else 1, activation, batch_norm))
                c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(c_in, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("resnet", track=(1, 8), space=SearchSpace(("channels", "stages", "channels"), {
    "stages": {"low": 2, "high": 3},  # stages, each after the first halving the resolution: 28, 14, 7
    "channels": [16, 32, 64],  # choices for each stage's width (channels)
    "blocks": {"low": 1, "high": 3},  # residual blocks per stage
}))
def resnet(channels=(16, 32, 64), blocks=2, activation="relu", dropout=0.0, batch_norm=True) -> nn.Module:
    """Stages of `channels` widths, `blocks` residual blocks each (the default: 2x3 blocks, a ResNet-14)."""
    return ResNet(tuple(channels), blocks, activation, dropout, batch_norm)


def init_weights(model: nn.Module, scheme: str = "xavier", std: float = 0.01) -> nn.Module:
    """Re-initialise every Linear and Conv2d weight; biases go to zero (except 'default').

    xavier: Glorot uniform; xavier_normal: Glorot normal; kaiming: He normal (fan_in, relu);
    normal: N(0, std^2), the "plain random" init of the course project;
    default: PyTorch's own (Kaiming-uniform with a=sqrt(5)), left untouched.
    (`scheme` is one of INITS, checked by TrainConfig.validate.)
    """
    if scheme == "default":
        return model
    fill = {"xavier": nn.init.xavier_uniform_, "xavier_normal": nn.init.xavier_normal_,
            "kaiming": functools.partial(nn.init.kaiming_normal_, nonlinearity="relu"),
            "normal": functools.partial(nn.init.normal_, mean=0.0, std=std)}[scheme]
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fill(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def first_layer(model: nn.Module) -> nn.Module:
    """The first Linear or Conv2d: the layer whose neurons see the pixels."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return m
    raise ModelError("model has no Linear or Conv2d layer")


def neuron_weights(model: nn.Module, neurons: list[int]) -> torch.Tensor:
    """Incoming weights of 1-based `neurons` of the first layer, as pictures.

    For an MLP: (K, 28, 28), the 784 weights of each hidden neuron. For a CNN:
    (K, kh, kw), the (channel-averaged) kernel of each first-layer filter.
    """
    layer = first_layer(model)
    w = layer.weight.detach()
    # The neurons are checked against the layer once, before a run starts (runs.resolve); index_select
    # raises on a neuron outside the layer rather than wrapping around as w[-1] would.
    picked = w.index_select(0, torch.tensor([n - 1 for n in neurons], dtype=torch.long, device=w.device))
    if isinstance(layer, nn.Linear):
        side = int(round(w.shape[1] ** 0.5))
        return picked.reshape(len(neurons), side, side).cpu().clone()
    return picked.mean(dim=1).cpu().clone()


def first_layer_pictures(model: nn.Module) -> torch.Tensor:
    """Every first-layer neuron as a picture: (N, 28, 28) for an MLP, (N, kh, kw) for a CNN."""
    return neuron_weights(model, list(range(1, first_layer(model).weight.shape[0] + 1)))


def is_conv(model: nn.Module) -> bool:
    return isinstance(first_layer(model), nn.Conv2d)


def macs_per_image(model: nn.Module) -> int:
    """Multiply-adds of one 1x28x28 image through the model, counted by torch's FlopCounterMode on the meta
    device (shapes only, nothing computed): FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.zeros(1, 1, 28, 28, device="meta"))
    return counter.get_total_flops() // 2


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
