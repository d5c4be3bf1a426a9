"""Loss, accuracy, probabilities and confusion matrix of a model on a split, and of a saved run.

`scores(model, cfg, split, device)` is the one way a trained model is evaluated (its precision, memory format,
test-time augmentation and batching): by training's validation and test, `fmnist evaluate`, `fmnist plot` and
the report alike.

    fmnist evaluate runs/<name> [--split test|val] [--json]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import calibrate, data, devices, distributed, models, runs
from .config import TrainConfig


@torch.no_grad()
def evaluate(model: nn.Module, loader: data.BatchLoader, return_predictions: bool = False, tta: str | bool = "",
             bf16: bool = False, world: distributed.World = distributed.World(), features: bool = False):
    """(mean loss, accuracy) or, with return_predictions, (loss, acc, logits (N, classes)) and with `features`
    also {tap: (N, D_tap)} after them (every tap of models.taps_and_logits); `tta`: the views (see
    models.tta_logits; "": none); `bf16`: the forward passes under bfloat16 autocast, as a bf16 run trains (a
    convnet with TTA validated in 2.2 s instead of 4.7 s, to the same accuracy within 0.02 points, on a CPU with
    native bf16). With several processes,
    `loader` holds this rank's part of the split and the figures are all ranks' (the logits in the split's order)."""
    model.eval()
    loss_sum, correct, n, kept, feats = 0.0, 0, 0, [], []
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if features:
                taps, logits = models.taps_and_logits(model, x, tta=tta)
                feats.append({k: v.float().cpu() for k, v in taps.items()})
            else:
                logits = models.tta_logits(model, x, tta) if tta else model(x)
            logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        if return_predictions or features:
            kept.append(logits.cpu())
    loss_sum, correct, n = distributed.all_sum([loss_sum, correct, n], world)
    correct = int(correct)
    if features:
        return (loss_sum / n, correct / n, distributed.gather_rows(torch.cat(kept), world),
                {k: distributed.gather_rows(torch.cat([f[k] for f in feats]), world) for k in feats[0]})
    if return_predictions:
        return loss_sum / n, correct / n, distributed.gather_rows(torch.cat(kept), world)
    return loss_sum / n, correct / n


# Images per forward pass when evaluating: a convnet's 28x28 activations of 256 images stay in a CPU's cache, of
# 1,024 they do not: cnn-fast's six-view features of 20,000 images took 9.5 s at 256 against 15.1 s at 1,024
# (the same logits to the bit; AMD EPYC, AVX-512 BF16, 2 threads).
BATCH = 256


@dataclass
class Scores:
    """A model's figures on one split: mean loss, accuracy and, if asked for, the probabilities (N, classes), the
    logits (N, classes) and the features the OOD scores read, in the split's order."""

    loss: float
    accuracy: float
    labels: torch.Tensor  # (N,) the split's labels, in its order
    probabilities: torch.Tensor | None = None  # (N, classes): softmax of the logits (temperature 1)
    logits: torch.Tensor | None = None  # (N, classes)
    features: dict[str, torch.Tensor] | None = None  # tap -> (N, D_tap): see models.taps_and_logits

    def confusion(self) -> torch.Tensor:
        """(classes, classes) counts: row = true class, column = predicted class."""
        return confusion_matrix(self.labels, self.probabilities.argmax(1), self.probabilities.shape[1])


def scores(model: nn.Module, cfg: TrainConfig, split: tuple[torch.Tensor, torch.Tensor], device: torch.device,
           world: distributed.World = distributed.World(), probabilities: bool = False,
           features: bool = False) -> Scores:
    """The one way to evaluate a model trained with `cfg`: as it was validated while training, in its memory format
    (channels-last), its precision (bf16 where the run computes in it on `device`) and with its test-time
    augmentation, in batches of BATCH. Training's validation and test, `fmnist evaluate`, `fmnist plot`, the
    report and the calibration all come here. With several processes `split` is the whole split: each rank
    evaluates its part. `probabilities` keeps the logits and their softmax; `features` also every tap of
    models.taps_and_logits."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = split
    part = distributed.shard(len(y), world.rank, world.size)
    loader = data.BatchLoader(x[part], y[part], BATCH, device=device)
    bf16 = devices.use_bf16(cfg.precision, device)
    if features:
        loss, acc, logits, feats = evaluate(model, loader, tta=models.views(cfg), bf16=bf16, world=world, features=True)
        return Scores(loss, acc, y, logits.softmax(1), logits, feats)
    if probabilities:
        loss, acc, logits = evaluate(model, loader, True, tta=models.views(cfg), bf16=bf16, world=world)
        return Scores(loss, acc, y, logits.softmax(1), logits)
    loss, acc = evaluate(model, loader, tta=models.views(cfg), bf16=bf16, world=world)
    return Scores(loss, acc, y)


def unlabelled(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 images as a split for `scores`, with label 0 for all (their loss and accuracy mean
    nothing)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    return x, torch.zeros(len(x), dtype=torch.long)


def mahalanobis_stats(model: nn.Module, cfg: TrainConfig, splits: data.Splits, device: torch.device,
                      world: distributed.World = distributed.World(), small: bool = False
                      ) -> dict[str, calibrate.Mahalanobis]:
    """Tap -> class means and shared covariance of its features on up to calibrate.TRAIN_FEATURES training images
    (a seeded draw that leaves the global random state alone; 2,048 when `small`)."""
    x, y = splits.train
    take = min(len(y), 2048 if small else calibrate.TRAIN_FEATURES)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[:take]
    train = scores(model, cfg, (x[pick], y[pick]), device, world, features=True)
    return {tap: calibrate.fit_mahalanobis(f, train.labels, train.logits.shape[1]) for tap, f in train.features.items()
            if tap in calibrate.TAPS}


def ood_scores(cal: calibrate.Calibration, s: Scores) -> dict[str, torch.Tensor]:
    """Every OOD score (calibrate.METHODS) of evaluated images `s` (with features), by `cal`'s statistics."""
    return {m: cal.score(s.logits, s.features, m) for m in calibrate.METHODS}


def every_score(model: nn.Module, cfg: TrainConfig, splits: data.Splits, device: torch.device,
                world: distributed.World = distributed.World(), small: bool = False, val: Scores | None = None
                ) -> tuple[calibrate.Calibration, Scores]:
    """A Calibration that can compute every OOD score (no method chosen, no threshold), and the validation split's
    Scores with features it was fitted on: the temperature on the validation logits, the Mahalanobis statistics of
    every tap on training images, the combined score's scales and the tails score's tables on validation. `val`:
    those Scores where the caller has them already (as `cfg` evaluates the validation split)."""
    if val is None:
        val = scores(model, cfg, val_split(splits, small), device, world, features=True)
    every = calibrate.Calibration(calibrate.fit_temperature(val.logits, val.labels),
                                  mahalanobis=mahalanobis_stats(model, cfg, splits, device, world, small))
    own = calibrate.ood_logits(val.logits, val.features)
    parts = {p: calibrate.energy_score(own) if p == "energy" else every.mahalanobis_part(p, val.features)
             for p in calibrate.COMBINED}
    every.scale = {p: calibrate.fit_scale(v) for p, v in parts.items()}
    every.tails = {p: calibrate.fit_tail(v) for p, v in parts.items()}
    return every, val


PHOTO_VIEWS = "six"  # the views a photo's answer averages where the run's own are the mirror alone


def photo_calibration(model: nn.Module, cfg: TrainConfig, splits: data.Splits, device: torch.device,
                      world: distributed.World = distributed.World(), small: bool = False
                      ) -> tuple[str | None, float | None, float | None]:
    """For a run trained with the mirror as its only test-time view: the views a photo's answer averages, their
    temperature on the validation split and the validation accuracy they buy on its images reframed as photos'
    inputs are (preprocess.reframed). The views are kept only where they buy more than calibrate.PHOTO_GAIN there:
    the default MLP gained 0.1-0.5 points at seeds 0-2, mlp-fast (3 epochs) lost 0.16 and lost 0-1.3 points on
    photos (benchmarks/RESULTS.md, Photos). (None, None, gain) where they are not kept; (None, None, None) for a
    run with other views."""
    if models.views(cfg) != "mirror":
        return None, None, None
    from . import preprocess

    x, y = val_split(splits, small)
    bf16 = devices.use_bf16(cfg.precision, device)
    part = distributed.shard(len(y), world.rank, world.size)
    again = torch.from_numpy(np.stack([preprocess.reframed(a) for a in x[part].numpy()]))

    def accuracy(images: torch.Tensor, views: str) -> tuple[float, torch.Tensor]:
        _, acc, logits = evaluate(model, data.BatchLoader(images, y[part], BATCH, device=device), True, tta=views,
                                  bf16=bf16, world=world)
        return acc, logits

    gain = accuracy(again, PHOTO_VIEWS)[0] - accuracy(again, "mirror")[0]
    if not gain > calibrate.PHOTO_GAIN:
        return None, None, gain
    logits = accuracy(x[part], PHOTO_VIEWS)[1]
    return PHOTO_VIEWS, calibrate.fit_temperature(logits, y), gain


def fit_calibration(model: nn.Module, cfg: TrainConfig, splits: data.Splits, device: torch.device,
                    world: distributed.World = distributed.World(), small: bool = False
                    ) -> tuple[calibrate.Calibration, dict[str, Any]]:
    """The run's calibration, from the training and validation splits only (the test split is not touched).

    First, for a run with test-time augmentation, whether inference keeps it: only where its views buy at least
    calibrate.TTA_GAIN of validation accuracy over the plain image; everything below is then fitted on the
    outputs inference will give.

    The temperature on the validation logits; the Mahalanobis statistics of every tap on up to
    calibrate.TRAIN_FEATURES training images; each OOD score's threshold at calibrate.VAL_KEPT of the validation
    images, and the score that marks most of calibrate.validation_ood (a tenth of the validation split's size per
    kind, 10 to calibrate.VAL_OOD_PER_KIND) unsure at its threshold (ties: the higher AUROC). Returns it and the
    figures of the choice (for summary.json; with test-time augmentation also "val_accuracy_views", the
    validation accuracy with the views). `small`: a dry run's few images. Every rank takes part; all get the same
    result.
    """
    tta, gain, val, views_figure, trained = cfg.tta, None, None, {}, cfg
    if cfg.tta:  # both evaluations with features: the one inference keeps is the calibration's validation
        split, plain_cfg = val_split(splits, small), dataclasses.replace(cfg, tta=False)
        views = scores(model, cfg, split, device, world, features=True)
        plain = scores(model, plain_cfg, split, device, world, features=True)
        gain = views.accuracy - plain.accuracy
        tta = gain >= calibrate.TTA_GAIN
        cfg, val = (cfg, views) if tta else (plain_cfg, plain)
        views_figure = {"val_accuracy_views": views.accuracy}
    every, val = every_score(model, cfg, splits, device, world, small, val)
    temperature, stats = every.temperature, every.mahalanobis
    sets = calibrate.validation_ood(min(calibrate.VAL_OOD_PER_KIND, max(10, len(val.labels) // 10)), cfg.seed)
    ood = scores(model, cfg, unlabelled(np.concatenate(list(sets.values()))), device, world, features=True)
    real, other = ood_scores(every, val), ood_scores(every, ood)
    thresholds = {m: calibrate.threshold_for(real[m]) for m in calibrate.METHODS}
    caught = {m: float((other[m] > thresholds[m]).double().mean()) for m in calibrate.METHODS}
    aurocs = {m: calibrate.auroc(real[m], other[m]) for m in calibrate.METHODS}
    method = calibrate.choose(caught, aurocs, sum(len(v) for v in sets.values()))
    photo_views, photo_t, photo_gain = photo_calibration(model, trained, splits, device, world, small)
    cal = calibrate.Calibration(temperature, method, thresholds[method],
                                {t: stats[t] for t in calibrate.needs(method)},
                                every.scale if method == "combined" else {}, every.tails if method == "tails" else {},
                                tta, models.views(cfg) if tta else None, photo_views, photo_t)
    figures = {
        "val_ece": calibrate.calibration_error(val.probabilities, val.labels),
        "val_ece_calibrated": calibrate.calibration_error((val.logits / temperature).softmax(1), val.labels),
        "ood_val_unsure": caught,  # the share of the validation OOD set each score marks unsure at its threshold
        "ood_val_auroc": aurocs,
        **({"tta_val_gain": gain} if gain is not None else {}),  # validation accuracy the views buy
        **({"photo_views_val_gain": photo_gain} if photo_gain is not None else {}),  # ... a photo's views, reframed
        **views_figure,
    }
    return cal, figures


def val_split(splits: data.Splits, small: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split, or a dry run's first 2,048 images of it."""
    return splits.val if not small else tuple(s[:2048] for s in splits.val)


def per_class(labels: torch.Tensor, predictions: torch.Tensor, names: tuple[str, ...] = data.CLASSES,
              pairs: int = 5) -> dict[str, Any]:
    """Precision, recall, F1 and support of each class (torchmetrics; 0 where a class is never predicted or
    never present), their unweighted means, and the `pairs` most-confused (true, predicted) pairs with their
    counts and the share of the true class they take."""
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    k = len(names)
    y, p = labels.cpu().long(), predictions.cpu().long()
    figures = {f.__name__.removeprefix("multiclass_").removesuffix("_score"): f(p, y, k, average="none").tolist()
               for f in (multiclass_precision, multiclass_recall, multiclass_f1_score)}
    cm = confusion_matrix(y, p, k)
    support = cm.sum(1)
    table = {name: {"precision": figures["precision"][i], "recall": figures["recall"][i], "f1": figures["f1"][i],
                    "support": int(support[i])} for i, name in enumerate(names)}
    off = cm.clone().fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True, stable=True)[:pairs]
    confused = [{"true": names[int(i) // k], "predicted": names[int(i) % k], "count": int(off.flatten()[i]),
                 "share_of_true": float(off.flatten()[i] / max(int(support[int(i) // k]), 1))}
                for i in order if off.flatten()[i] > 0]
    macro = {m: sum(v) / k for m, v in figures.items()}
    return {"per_class": table, "macro": macro, "most_confused": confused}


def neuron_profile(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, neuron: int,
                   device: torch.device | str = "cpu", top: int = 9, batch_size: int = 1000) -> dict[str, Any]:
    """What first-layer `neuron` (1-based) responds to, over uint8 `images` (N, 28, 28) with `labels`:

    - "activation": its output for each image (the layer's output before the nonlinearity; a convnet
      filter's largest value over the image), (N,);
    - "top": the indices of the `top` images that excite it most, most first;
    - "per_class": its mean activation over each class's images, (classes,);
    - "votes": how each class's logit moves because of it, averaged over the images: the logits minus those
      with the neuron's output set to 0 (positive: it pushes towards that class), (classes,).
    """
    model = model.eval().to(device)
    layer = models.first_layer(model)
    k = neuron - 1
    if not 0 <= k < (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels):
        raise ValueError(f"the first layer has no neuron {neuron}")
    seen: list[torch.Tensor] = []
    silence = [False]

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        unit = out[:, k]
        seen.append((unit.flatten(1).amax(1) if unit.dim() > 1 else unit).detach().float().cpu())
        if silence[0]:
            out = out.clone()
            out[:, k] = 0
            return out
        return None

    handle = layer.register_forward_hook(hook)
    votes = torch.zeros(0)
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = data.normalize(torch.as_tensor(images[i:i + batch_size])).unsqueeze(1).to(device)
                silence[0] = False
                full = model(x).float()
                silence[0] = True
                without = model(x).float()
                seen.pop()  # the second pass's activations are the first's
                moved = (full - without).sum(0).cpu()
                votes = moved if votes.numel() == 0 else votes + moved
    finally:
        handle.remove()
    activation = torch.cat(seen)
    labels = torch.as_tensor(labels).long().cpu()
    classes = int(votes.numel())
    per_class = torch.zeros(classes).index_add_(0, labels, activation) / torch.bincount(
        labels, minlength=classes).clamp(min=1)
    return {"neuron": neuron, "activation": activation, "top": torch.argsort(activation, descending=True)[:top],
            "per_class": per_class, "votes": votes / len(images)}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    cm = torch.zeros(classes, classes, dtype=torch.long)
    cm.index_put_((labels.cpu().long(), predictions.cpu().long()), torch.ones_like(labels.cpu().long()),
                  accumulate=True)
    return cm


def load_splits(cfg: TrainConfig, data_dir: str | None = None) -> data.Splits:
    """The data splits a saved run was trained on, found from here (see runs.data_dir_for)."""
    return data.load(runs.data_dir_for(cfg.data_dir, data_dir), cfg.val_size, cfg.split_seed)


def evaluate_run(path: str | Path, split: str = "test", data_dir: str | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy and confusion matrix of a saved model on a split, as training measured
    it, and its calibration on the outputs inference gives (as summary.json's figures: without the test-time views
    where validation said they buy too little, and then also "accuracy_inference"): the expected calibration
    error before and after the run's temperature (1 for a run trained before fmnist calibrated: "calibrated" is
    then False) and the share of the split its OOD score marks unsure."""
    model, cfg, ckpt = runs.load_model(path)
    cal = runs.load_calibration(ckpt, Path(path))
    dev = devices.pick_device(device)
    splits = load_splits(cfg, data_dir)
    images = splits.test if split == "test" else splits.val
    with devices.cpu_share():
        s = scores(model.to(dev), cfg, images, dev, probabilities=True, features=True)
        dropped = cal.uses_tta(cfg.tta) != cfg.tta  # inference drops the views: its own outputs
        out = scores(model, dataclasses.replace(cfg, tta=False), images, dev, probabilities=True, features=True) \
            if dropped else s
    cm = s.confusion()
    recall = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    calibrated = (out.logits / cal.temperature).softmax(1)
    unsure = None if cal.threshold is None else float((cal.score(out.logits, out.features) > cal.threshold)
                                                      .double().mean())
    classes = per_class(s.labels, s.probabilities.argmax(1))
    return dict(checkpoint=str(path), split=split, images=len(s.labels), epoch=ckpt.get("epoch"),
                accuracy=s.accuracy, loss=s.loss, per_class_accuracy=dict(zip(data.CLASSES, recall)),
                per_class=classes["per_class"], macro=classes["macro"], most_confused=classes["most_confused"],
                confusion_matrix=cm.tolist(), calibrated="calibration" in ckpt, temperature=cal.temperature,
                **({"accuracy_inference": out.accuracy} if dropped else {}),
                ece=calibrate.calibration_error(out.probabilities, out.labels),
                ece_calibrated=calibrate.calibration_error(calibrated, s.labels), ood_method=cal.method,
                ood_threshold=cal.threshold, unsure=unsure)
