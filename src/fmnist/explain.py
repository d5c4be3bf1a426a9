"""Why the model answered: which pixels of the 28x28 input it saw pushed it towards a class, and which against.

    e = explain("runs/default", ["shoe.jpg", "shirt.png"])      # a run, a best.pt, a Predictor or an nn.Module
    e.attributions   # (N, 28, 28) float32: each pixel's share in the target class's calibrated logit
    e.pixels         # (N, 28, 28) uint8: the input the model saw (preprocess.prepare, as fmnist predict)
    e.targets, e.predicted, e.probabilities, e.classes
    explain(model, test_images, method="occlusion", target="Sneaker")  # (N, 28, 28) arrays are used as they are

Methods (Captum, imported here only and only when first used):

- ``ig``, Integrated Gradients (Sundararajan, Taly, Yan 2017), the default: the
  gradient averaged along the straight path from the baseline to the image,
  times (image - baseline). Its attributions add up to f(image) - f(baseline)
  (completeness), so a map says how the logit was built from "no product".
- ``saliency`` (Simonyan, Vedaldi, Zisserman 2014): the gradient's magnitude,
  |d logit / d pixel|: where a small change would move the answer most. Never
  negative, and blind to a pixel's own value.
- ``occlusion`` (Zeiler, Fergus 2014): the fall of the logit when a 4x4 patch
  is set to the baseline, averaged over the patches (stride 2) that cover the
  pixel. Model-agnostic; 169 model calls per image.

What is explained is the target class's calibrated logit: the model's logit
over the run's temperature, with test-time augmentation where the run uses it
(models.PixelClassifier.logits), so exactly what the probability fmnist predict
reports is the softmax of. A logit rather than the probability: near 1 the
probability saturates and its gradients vanish; the temperature only scales the
map. Attributions are in units of that logit (saliency: logit per grey level).

The baseline, "no product", is the all-black input (every pixel 0; normalised,
-MEAN/STD = -0.81): what a blank white background becomes through the dataset's
pipeline (negated, white turns to 0) and the background of every Fashion-MNIST
image. Not the normalised zero (a uniform grey of level 73, which the model
reads as a faint product) nor the mean training image (it holds the average
product's silhouette, so the product's own shape would count for little).
Occlusion fills its patches with it, and benchmarks/explain_faithfulness.py
removes pixels to it.

An exported model (ONNX, TorchScript) cannot be explained: it gives
probabilities only, without the gradients and logits these methods need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PredictError
from .predict import Predictor, _name, _prepare_all
from .preprocess import MAX_PIXELS, PREPROCESS, SIZE, prepare

METHODS = ("ig", "saliency", "occlusion")
BASELINE = 0.0  # grey level 0-255 of "no product": black, the dataset's background (see the module docstring)
IG_STEPS = 50  # points on the path from baseline to image (Gauss-Legendre, Captum's default)
IG_CHUNK = 2048  # images x steps per model call: bounds memory (a CNN's activations at 2,048 images: ~100 MB)
WINDOW = 4  # px: the occlusion patch, each side
STRIDE = 2  # px: between occlusion patches (13 x 13 = 169 patches on 28 x 28)
BATCH = 64  # images explained together by the command line and the service


@dataclasses.dataclass
class Explanation:
    """The attributions of N images, with what the model said of them."""

    method: str
    classes: tuple[str, ...]
    pixels: np.ndarray  # (N, 28, 28) uint8: the inputs the model saw
    attributions: np.ndarray  # (N, 28, 28) float32: positive pushed towards the target class, negative against
    targets: np.ndarray  # (N,) int: the class each map explains (the predicted one unless a target was given)
    probabilities: np.ndarray  # (N, classes) calibrated, as fmnist predict gives them

    @property
    def predicted(self) -> np.ndarray:
        """(N,) the class the model chose for each image."""
        return self.probabilities.argmax(1)

    def record(self, i: int) -> dict[str, Any]:
        """Image i as a JSON-ready dict: "class", "index", "probability" (of the predicted class), "target",
        "target_index", "target_probability", "method", "attribution" (28 rows of 28 floats)."""
        p, t = int(self.predicted[i]), int(self.targets[i])
        return {"class": self.classes[p], "index": p, "probability": round(float(self.probabilities[i, p]), 6),
                "target": self.classes[t], "target_index": t,
                "target_probability": round(float(self.probabilities[i, t]), 6), "method": self.method,
                "attribution": _rounded(self.attributions[i])}


def _rounded(a: np.ndarray) -> list[list[float]]:
    """A map as lists of floats with 6 significant digits (the float32 tail is noise in JSON)."""
    return [[float(f"{v:.6g}") for v in row] for row in np.asarray(a, np.float64)]


def predictor(model: Any, device: str = "cpu") -> Predictor:
    """A Predictor that can be explained: `model` as Predictor() takes it (run directory, .pt, nn.Module), or a
    Predictor. An exported model is refused in one sentence."""
    p = model if isinstance(model, Predictor) else Predictor(model, device=device)
    if p.pixel_classifier is None:
        raise PredictError(f"{p.source} is an exported model ({p.backend}), which gives probabilities only and no "
                           "gradients to explain: give its run directory or best.pt instead.")
    return p


def parse_target(target: str | int | None, classes: tuple[str, ...]) -> int | None:
    """--target as given (a class name in any case, spaces or hyphens alike, or an index) -> its index; None: the
    predicted class. One sentence if it names no class."""
    if target is None:
        return None
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if 0 <= k < len(classes):
            return k
    else:
        key = text.lower().replace("-", " ").replace("_", " ")
        for k, name in enumerate(classes):
            if name.lower().replace("-", " ") == key:
                return k
    raise PredictError(f"--target '{text}' is not a class: give a name ({', '.join(classes)}) or an index from 0 "
                       f"to {len(classes) - 1}.")


def attribute(p: Predictor, pixels: np.ndarray, method: str = "ig", targets: np.ndarray | int | None = None,
              photos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 28, 28) pixels 0-255 -> ((N, 28, 28) attributions, (N,) targets, (N, classes) probabilities).

    targets: one class for all, one per image, or None for each image's predicted class. The probabilities are
    p.outputs()'s, the very numbers fmnist predict reports; `photos` (N,) bool: the inputs made from photos,
    explained as predict answers them (Predictor.photo_classifier)."""
    if method not in METHODS:
        raise PredictError(f"unknown method '{method}': choose one of {', '.join(METHODS)}.")
    p = predictor(p)
    x = np.ascontiguousarray(np.asarray(pixels, np.float32).reshape(-1, SIZE, SIZE))
    probs = p.outputs(x, photos)[0]
    if targets is None:
        t = probs.argmax(1)
    else:
        t = np.broadcast_to(np.asarray(targets, np.int64), (len(x),)).copy()
        if len(t) and not (0 <= t.min() and t.max() < len(p.classes)):
            raise PredictError(f"a target must be a class index from 0 to {len(p.classes) - 1}.")
    if not len(x):
        return np.zeros((0, SIZE, SIZE), np.float32), t.astype(np.int64), probs
    t = t.astype(np.int64)
    if photos is None or p.photo_classifier is None or not np.any(photos):
        return _captum(p.pixel_classifier, x, method, t), t, probs
    of = np.asarray(photos, bool).reshape(-1)
    a = np.zeros(x.shape, np.float32)
    for rows, module in ((~of, p.pixel_classifier), (of, p.photo_classifier)):
        if rows.any():
            a[rows] = _captum(module, np.ascontiguousarray(x[rows]), method, t[rows])
    return a, t, probs


def _captum(module: Any, x: np.ndarray, method: str, targets: np.ndarray) -> np.ndarray:
    import torch

    try:
        import captum.attr
    except ImportError:
        raise PredictError("explaining a model needs Captum: pip install 'fmnist[explain]'.") from None

    device = next(module.parameters()).device
    inputs = torch.from_numpy(x).to(device).requires_grad_()
    target = torch.from_numpy(targets).to(device)
    with torch.enable_grad():  # also when a caller runs under no_grad
        if method == "ig":
            a = captum.attr.IntegratedGradients(module.logits).attribute(
                inputs, baselines=BASELINE, target=target, n_steps=IG_STEPS,
                internal_batch_size=max(IG_STEPS, IG_CHUNK // IG_STEPS * IG_STEPS))
        elif method == "saliency":
            a = captum.attr.Saliency(module.logits).attribute(inputs, target=target, abs=True)
        else:
            with torch.no_grad():  # occlusion only runs the model
                a = captum.attr.Occlusion(module.logits).attribute(
                    inputs, sliding_window_shapes=(WINDOW, WINDOW), strides=(STRIDE, STRIDE), baselines=BASELINE,
                    target=target, perturbations_per_eval=max(1, IG_CHUNK // len(x)))
    return a.detach().float().cpu().numpy()


def explain(model: Any, images: Any, method: str = "ig", target: str | int | None = None,
            preprocess: str = "auto", device: str = "cpu") -> Explanation:
    """Attributions for images, in the notebook's way: one call, arrays back.

    model: a run directory, a .pt checkpoint, an nn.Module (normalised images in, logits out) or a Predictor.
    images: a list of paths, bytes, PIL images or arrays (each made the model's input by preprocess.prepare, as
    fmnist predict does), or one (N, 28, 28) / (28, 28) array of model inputs (0-255, light on black: test images
    as data.py reads them), used as they are. target: a class name or index for every image; None: each
    image's predicted class. An image that cannot be read raises ImageError naming it."""
    from .errors import ImageError

    p = predictor(model, device)
    if preprocess not in PREPROCESS:
        raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
    if isinstance(images, np.ndarray) and images.shape[-2:] == (SIZE, SIZE) and images.ndim in (2, 3):
        pixels, photo = images.reshape(-1, SIZE, SIZE), None
    else:
        if isinstance(images, (str, Path, bytes, np.ndarray)) or not isinstance(images, Iterable):
            images = [images]  # one image (an array here is one picture of any size, not a batch)
        prepared = []
        for item in images:
            try:
                prepared.append(prepare(item, preprocess))
            except ImageError as e:
                raise ImageError(f"{_name(item) or 'an image'}: {e}") from None
        pixels = np.stack([px for px, _ in prepared]) if prepared else np.zeros((0, SIZE, SIZE), np.uint8)
        photo = np.array([chosen == "photo" for _, chosen in prepared], bool)
    a, t, probs = attribute(p, pixels, method, parse_target(target, p.classes), photo)
    shown = np.clip(np.asarray(pixels, np.float64).round(), 0, 255).astype(np.uint8)
    return Explanation(method, tuple(p.classes), shown, a, t, probs)


def iter_explain(p: Predictor, items: list[Any], method: str = "ig", target: str | int | None = None,
                 preprocess: str = "auto", max_pixels: int = MAX_PIXELS) -> Iterator[dict[str, Any]]:
    """fmnist explain's records, one per item in order, as each batch is explained: {"file", "error"} for an item
    that is not a usable image (predict's sentence), else {"file", "preprocess", **Explanation.record(),
    "pixels": (28, 28) uint8} (the pixels for the figure; not JSON)."""
    if method not in METHODS:
        raise PredictError(f"unknown method '{method}': choose one of {', '.join(METHODS)}.")
    if preprocess not in PREPROCESS:
        raise PredictError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESS)}.")
    p = predictor(p)
    k = parse_target(target, p.classes)
    batch: list[tuple[Any, np.ndarray, str]] = []

    def flush() -> Iterator[dict[str, Any]]:
        if not batch:
            return
        pixels = np.stack([b[1] for b in batch])
        a, t, probs = attribute(p, pixels, method, k, np.array([b[2] == "photo" for b in batch]))
        e = Explanation(method, tuple(p.classes), pixels, a, t, probs)
        for i, (item, px, chosen) in enumerate(batch):
            yield {"file": _name(item), "preprocess": chosen, **e.record(i), "pixels": px}
        batch.clear()

    for item, (pixels, chosen) in zip(items, _prepare_all(items, preprocess, None, max_pixels)):
        if pixels is None:
            yield from flush()
            yield {"file": _name(item), "error": chosen}
            continue
        batch.append((item, pixels, chosen))
        if len(batch) == BATCH:
            yield from flush()
    yield from flush()
