"""Probabilities that mean what they say, and knowing when not to answer.

    T = fit_temperature(val_logits, val_labels)    # softmax(logits / T) is calibrated (Guo et al. 2017)
    calibration_error(probs, labels)               # expected calibration error, 15 bins (torchmetrics)
    ood = fit_ood(val_scores_by_method, ...)       # the out-of-distribution score to trust and its threshold

At the end of a training (`evaluate.fit_calibration`, called by
`train.finish`) the temperature is fitted on the validation split, the OOD
scores below are compared on the validation split against a validation set of
non-products that this module draws (`validation_ood`: shapes, smooth textures
and stripes, none of the kinds the benchmark tests on), and the one that
catches most of them is kept (`choose`: a score of several parts where it is
within two standard errors of the best), with the threshold that keeps
VAL_KEPT of the real validation images. Everything lands in best.pt's
"calibration" entry (and its figures in summary.json); `models.PixelClassifier`
applies it, so an exported model gives calibrated probabilities and the score
too.

Every score is "higher = less like Fashion-MNIST"; an image is unsure when its
score is above the threshold:

- msp: minus the largest calibrated probability (Hendrycks and Gimpel 2017);
- energy: minus logsumexp of the logits (Liu et al. 2020);
- mahalanobis: the smallest squared Mahalanobis distance of the penultimate
  features to a class mean, with one covariance shared by the classes, both
  fitted on training images (Lee et al. 2018, without input perturbation);
- combined: the largest of the energy and the Mahalanobis distances of the
  pixels and of the first layer's outputs (spatially averaged in a convnet),
  each first centred on its validation median and divided by its spread
  (95th percentile - median), after Lee et al.'s ensemble of layers. The
  energy catches blank, solid and noisy inputs that a class-mean distance
  finds ordinary; the distances catch strokes (digits, letters) the logits
  find ordinary;
- tails: the same three parts, each as how rare it is among the validation
  images: minus the log of the share of them that score at least as high
  (interpolated between TAIL_POINTS quantiles; beyond the highest, the excess
  over it in its spread, highest - median, is added); the largest counts. An
  image is then unsure when one part is rarer than a share that the threshold
  sets, whatever the shape of each part's tail, where the median and 95th
  percentile of "combined" assume the tails alike.

pytorch-ood has these scores, but it needs torchvision; they are a few lines
each, written here. The calibration error and AUROC come from torchmetrics.
Torch, numpy and Pillow only (no matplotlib).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

BINS = 15  # bins of the expected calibration error and the reliability diagram
METHODS = ("msp", "energy", "mahalanobis", "combined", "tails")
VAL_KEPT = 0.95  # the share of real validation images the threshold keeps (not unsure)
SHRINKAGE = 1e-3  # ridge added to the shared covariance, as a share of its mean variance (dead ReLU units)
TRAIN_FEATURES = 20_000  # training images at most whose features give the class means and covariance
TAIL_POINTS = 1000  # quantiles of each part's validation scores the tails score keeps (12 kB for three parts)
TTA_GAIN = 0.001  # of validation accuracy: what test-time augmentation must buy (0.1 point) for inference to pay for it
PHOTO_GAIN = 0.0  # of validation accuracy, the images reframed as photos: what a photo's own views must beat
EXPOSURE_PER_KIND = 500  # drawn images of each kind that outlier exposure trains on (2,500)
VAL_OOD_PER_KIND = 200  # images of each kind in the validation OOD set, at most (a tenth of the validation split)


# ---------------------------------------------------------------- temperature and calibration error

def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T) on (logits, labels).

    Optimised over log T (so T stays positive) with L-BFGS in float64; T = 1 changes nothing.
    """
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(nll)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error (top label, L1, `bins` equal-width bins of confidence): torchmetrics'."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs.float(), labels.long(), probs.shape[1], n_bins=bins, norm="l1"))


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per bin of confidence (the bins `calibration_error` uses): mean confidence, accuracy, image count.

    For the reliability diagram; a confidence of exactly 1.0 is counted in the last bin.
    """
    conf, pred = probs.float().max(1)
    right = (pred == labels.long()).double()
    index = (torch.bucketize(conf, torch.linspace(0, 1, bins + 1), right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf.double())
    right_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, right)
    safe = count.clamp(min=1)
    return {"confidence": (conf_sum / safe).numpy(), "accuracy": (right_sum / safe).numpy(),
            "count": count.long().numpy(), "edges": np.linspace(0, 1, bins + 1)}


# ---------------------------------------------------------------- out-of-distribution scores

def msp_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N,) minus the largest probability of softmax(logits / T)."""
    return -torch.softmax(logits.float() / temperature, dim=1).amax(1)


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """(N,) the free energy, -logsumexp(logits)."""
    return -torch.logsumexp(logits.float(), dim=1)


def mahalanobis_score(features: torch.Tensor, whiten: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N,) min over classes of |features @ whiten - centres[c]|^2, i.e. (f - mu_c)' S^-1 (f - mu_c).

    features (N, D), whiten (D, D) with whiten @ whiten' = S^-1, centres (C, D) = class means @ whiten.
    The differences are taken before squaring ((N, C, D) at once): |z|^2 - 2 z.m + |m|^2 would be quicker, but it
    cancels digits where whitened pixels are large, and an export would then disagree with PyTorch.
    """
    z = features.float() @ whiten
    return (z[:, None, :] - centres[None]).square().sum(2).amin(1)


@dataclass
class Mahalanobis:
    """The statistics of the Mahalanobis score: whiten (D, D), centres (C, D) (see mahalanobis_score)."""

    whiten: torch.Tensor
    centres: torch.Tensor


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, classes: int) -> Mahalanobis:
    """Class means and one shared covariance of training `features` (N, D), as whitening statistics.

    The covariance gets a small ridge (SHRINKAGE of its mean variance): ReLU features have dead units, and
    without it the inverse would not exist.
    """
    f, y = features.float().cpu(), labels.long().cpu()
    means = torch.zeros(classes, f.shape[1]).index_add_(0, y, f)
    means /= torch.bincount(y, minlength=classes).clamp(min=1).float()[:, None]
    centred = f - means[y]
    cov = (centred.t() @ centred).double() / max(len(f) - classes, 1)  # (D, D); float32 products, 4x sooner
    cov += SHRINKAGE * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov), dtype=torch.float64)
    # cov = L L' (Cholesky, 10x sooner than an eigendecomposition at D = 784): whiten = L'^-1, whiten whiten' = cov^-1
    lower = torch.linalg.cholesky(cov)
    whiten = torch.linalg.solve_triangular(lower, torch.eye(len(cov), dtype=torch.float64), upper=False).t()
    means = means.double()
    return Mahalanobis(whiten.float(), (means @ whiten).float())


TAPS = ("pixels", "first", "penultimate")  # where features are taken: models.taps_and_logits
COMBINED = ("energy", "pixels", "first")  # the combined score's parts: the energy, and Mahalanobis of two taps


OWN_LOGITS = "logits"  # a tap: the logits of the image alone, where the answer averages its mirror's too


def ood_logits(logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits the OOD score reads: the image's own where the answer's average its mirror's (models.
    taps_and_logits), else the answer's."""
    return taps.get(OWN_LOGITS, logits)


PARTS = {"msp": 1, "energy": 1, "mahalanobis": 1, "combined": 3, "tails": 3}  # the views of the input each reads


def choose(caught: dict[str, float], aurocs: dict[str, float], images: int) -> str:
    """The OOD score to keep: of those within two standard errors of the one that marks most of the `images`
    validation non-products unsure (`caught`), the one with most parts, then most caught, then the best AUROC.

    The validation non-products cannot hold every kind a user will show (strokes such as letters are absent):
    a score that reads several views of the input is kept unless a single view does measurably better there.
    Where outlier exposure trained the logits, the energy alone and tails caught about as many validation
    non-products (within about a point of 600), and the energy let through letters that tails catches.
    """
    best = max(caught.values())
    margin = 2 * math.sqrt(best * (1 - best) / max(images, 1))
    near = [m for m in caught if caught[m] >= best - margin]
    return max(near, key=lambda m: (PARTS.get(m, 1), caught[m], aurocs.get(m, 0.0)))


def needs(method: str) -> tuple[str, ...]:
    """The taps whose Mahalanobis statistics `method` uses."""
    combined = ("pixels", "first")
    return {"mahalanobis": ("penultimate",), "combined": combined, "tails": combined}.get(method, ())


@dataclass
class Calibration:
    """What a run knows about its own answers: best.pt's "calibration" entry, applied by models.PixelClassifier.

    A run trained before fmnist calibrated has none: temperature 1, the max-softmax score and no threshold
    (never unsure).
    """

    temperature: float = 1.0
    method: str = "msp"  # the OOD score (one of METHODS)
    threshold: float | None = None  # scores above it are unsure; None: no decision (an uncalibrated run)
    mahalanobis: dict[str, Mahalanobis] = field(default_factory=dict)  # tap -> statistics (what `method` needs)
    scale: dict[str, tuple[float, float]] = field(default_factory=dict)  # combined: part -> (centre, spread)
    tails: dict[str, torch.Tensor] = field(default_factory=dict)  # tails: part -> (K,) its validation quantiles
    # whether inference averages the test-time augmentation's views (None: as the run was validated, its config's
    # `tta`); False where they bought less than TTA_GAIN on validation. Everything above was fitted that way.
    tta: bool | None = None
    # the views it averages where it keeps them (models.VIEWS; None: a run calibrated before the views followed the
    # training's augmentation, whose views were airbench's six)
    views: str | None = None
    # the views a photo's answer averages (None: as any other input's), and their temperature (fitted on the
    # validation split with those views): a photo's input is centred and scaled by preprocessing, not registered
    # as the dataset's images are; where the run's own views are the mirror alone and its validation images
    # reframed so say they pay (evaluate.photo_calibration), averaging 1-pixel shifts too answered about a point
    # more photos right (benchmarks/RESULTS.md, Photos)
    photo_views: str | None = None
    photo_temperature: float | None = None

    def score(self, logits: torch.Tensor, taps: dict[str, torch.Tensor], method: str | None = None
              ) -> torch.Tensor:
        """(N,) the OOD score `method` (default: the run's) of logits (N, classes) and taps (tap -> (N, D_tap)).

        The one copy of the formula: evaluation, the benchmark and the exported model (PixelClassifier) call it.
        """
        method = method or self.method
        logits = ood_logits(logits, taps)
        if method == "msp":
            return msp_score(logits, self.temperature)
        if method == "energy":
            return energy_score(logits)
        if method == "mahalanobis":
            return self.mahalanobis_part("penultimate", taps)
        parts = [(energy_score(logits) if part == "energy" else self.mahalanobis_part(part, taps)) for part in COMBINED]
        if method == "tails":  # each part as its rarity among the validation images, the largest counts
            return torch.stack([tail_score(p, self.tails[k]) for k, p in zip(COMBINED, parts)]).amax(0)
        # combined: each part as a multiple of its spread on the validation split, the largest counts
        return torch.stack([(p - self.scale[k][0]) / self.scale[k][1] for k, p in zip(COMBINED, parts)]).amax(0)

    def mahalanobis_part(self, tap: str, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        stats = self.mahalanobis[tap]
        return mahalanobis_score(taps[tap], stats.whiten, stats.centres)

    def to_dict(self) -> dict:
        """Plain values and tensors, as torch.load(weights_only=True) reads them back."""
        return {"temperature": float(self.temperature), "method": self.method, "threshold": self.threshold,
                "mahalanobis": {k: {"whiten": v.whiten.contiguous(), "centres": v.centres.contiguous()}
                                for k, v in self.mahalanobis.items()},
                "scale": {k: [float(c), float(w)] for k, (c, w) in self.scale.items()},
                "tails": {k: v.contiguous() for k, v in self.tails.items()}, "tta": self.tta,
                **({"views": self.views} if self.views is not None else {}),
                **({"photo_views": self.photo_views, "photo_temperature": float(self.photo_temperature)}
                   if self.photo_views else {})}

    @classmethod
    def from_dict(cls, d: object) -> Calibration:
        """The Calibration a checkpoint holds (None: a run from before calibration); ValueError (the caller names
        the file) if it is damaged. Whether the statistics fit the model is models.PixelClassifier's to check."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError("its calibration is not a table")
        t, method, threshold = d.get("temperature"), d.get("method"), d.get("threshold")
        if not (_number(t) and t > 0):
            raise ValueError("its temperature is not a positive number")
        if method not in METHODS:
            raise ValueError(f"its out-of-distribution score '{method}' is not one of {', '.join(METHODS)}")
        if threshold is not None and not _number(threshold):
            raise ValueError("its out-of-distribution threshold is not a number")
        stats, scale = {}, {}
        for tap in needs(method):
            entry = (d.get("mahalanobis") or {}).get(tap)
            w, c = (entry.get("whiten"), entry.get("centres")) if isinstance(entry, dict) else (None, None)
            if not (isinstance(w, torch.Tensor) and isinstance(c, torch.Tensor) and w.ndim == 2 and c.ndim == 2
                    and w.shape[0] == w.shape[1] == c.shape[1] and w.is_floating_point() and c.is_floating_point()
                    and bool(torch.isfinite(w).all()) and bool(torch.isfinite(c).all())):
                raise ValueError(f"its Mahalanobis statistics of the {tap} features are missing or damaged")
            stats[tap] = Mahalanobis(w.float(), c.float())
        if method == "combined":
            for part in COMBINED:
                pair = (d.get("scale") or {}).get(part)
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_number(v) for v in pair)
                        and pair[1] > 0):
                    raise ValueError(f"its scale of the {part} score is missing or damaged")
                scale[part] = (float(pair[0]), float(pair[1]))
        tails = {}
        if method == "tails":  # an entry written before this score existed has none, and needs none
            for part in COMBINED:
                v = (d.get("tails") or {}).get(part)
                if not (isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) >= 2 and v.is_floating_point()
                        and bool(torch.isfinite(v).all()) and bool((v[1:] >= v[:-1]).all()) and v[-1] > v[len(v) // 2]):
                    raise ValueError(f"its validation scores of the {part} part are missing or damaged")
                tails[part] = v.float()
        tta = d.get("tta")
        if tta is not None and not isinstance(tta, bool):
            raise ValueError("its test-time augmentation setting is not true or false")
        views = d.get("views")
        if views is not None and views not in ("mirror", "six"):
            raise ValueError(f"its test-time views '{views}' are not mirror or six")
        photo_views, photo_t = d.get("photo_views"), d.get("photo_temperature")
        if photo_views is not None and (photo_views not in ("mirror", "six") or not (_number(photo_t) and photo_t > 0)):
            raise ValueError("its views for photos or their temperature are damaged")
        return cls(float(t), method, None if threshold is None else float(threshold), stats, scale, tails, tta,
                   views, photo_views, None if photo_views is None else float(photo_t))

    def summary(self) -> dict:
        """The figures a person reads (summary.json, export metadata): no tensors."""
        return {"temperature": self.temperature, "ood_method": self.method, "ood_threshold": self.threshold,
                **({"inference_tta": self.tta} if self.tta is not None else {}),
                **({"inference_views": self.views} if self.tta and self.views else {}),
                **({"photo_views": self.photo_views, "photo_temperature": self.photo_temperature}
                   if self.photo_views else {})}

    def uses_tta(self, trained_with: bool) -> bool:
        """Whether inference averages the test-time augmentation's views, for a run whose config says
        `trained_with`."""
        return trained_with if self.tta is None else self.tta and trained_with

    def inference_views(self, cfg) -> str:
        """The views inference averages for a run of config `cfg` ("": none; see models.tta_logits)."""
        if not self.uses_tta(cfg.tta):
            return ""
        return self.views or "six"


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fit_scale(scores: torch.Tensor) -> tuple[float, float]:
    """(centre, spread) of a part of the combined score on real images: the median and 95th percentile - median."""
    centre, top = torch.quantile(scores.double(), torch.tensor([0.5, VAL_KEPT], dtype=torch.float64)).tolist()
    return centre, max(top - centre, 1e-6)


def fit_tail(scores: torch.Tensor, points: int = TAIL_POINTS) -> torch.Tensor:
    """(points,) evenly spaced quantiles, 0 to 1, of a part of the tails score on real (validation) images: its
    table for tail_score."""
    return torch.quantile(scores.double(), torch.linspace(0, 1, points, dtype=torch.float64)).float().contiguous()


def tail_score(scores: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N,) how rare each score is among the real ones whose quantiles `table` (K,) holds: -log(share of them at
    least as high), the share interpolated linearly between quantiles and 1 / K above the highest, plus there the
    excess over it in units of (highest - median), so the order of far scores is kept.

    Continuous, so an export's rounding moves it as little as it moves the score; the rank is a sum of clamped
    ratios over the (N, K - 1) gaps rather than searchsorted, which every exporter takes.
    """
    s, k = scores.float()[:, None], len(table)
    gaps = (table[1:] - table[:-1]).clamp(min=1e-12)
    below = ((s - table[None, :-1]) / gaps[None]).clamp(0, 1).sum(1)  # (N,) 0 at the lowest quantile, K - 1 at the top
    top = table[-1]
    beyond = (scores.float() - top).clamp(min=0) / (top - table[k // 2])
    return math.log(k) - torch.log(k - below) + beyond


def threshold_for(scores: torch.Tensor, kept: float = VAL_KEPT) -> float:
    """The score below which `kept` of `scores` (real images) lie: images above it are unsure."""
    return float(torch.quantile(scores.double(), kept))


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve of telling `out_scores` (positive) from `in_scores` by score: torchmetrics'."""
    from torchmetrics.functional.classification import binary_auroc

    # torchmetrics takes scores outside [0, 1] for logits and squashes them with a sigmoid, which ties large
    # scores (a Mahalanobis distance of 300 and one of 3,000 both become 1.0); their ranks, scaled into [0, 1],
    # keep the order and the ties, and so the AUROC.
    _, rank = torch.unique(torch.cat([in_scores, out_scores]).double(), return_inverse=True)
    s = rank.double() / max(int(rank.max()), 1)
    t = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
    return float(binary_auroc(s, t))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, kept: float = VAL_KEPT) -> float:
    """The share of `out_scores` accepted as real when the threshold keeps `kept` of `in_scores` (FPR at 95 % TPR,
    with real images as the positives)."""
    return float((out_scores <= threshold_for(in_scores, kept)).double().mean())


# ---------------------------------------------------------------- a validation set of non-products

@functools.lru_cache(maxsize=4)  # the same for every run of a seed: drawn once per process
def validation_ood(per_kind: int = VAL_OOD_PER_KIND, seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are not Fashion-MNIST products, as `fmnist predict` would see them: kind -> (N, 28, 28) uint8.

    Drawn here (no downloads, numpy and Pillow only) and passed through preprocessing as a photo would be:
    "shapes" (random polygons, ellipses and strokes on white), "textures" (smooth coloured random fields) and
    "stripes" (gratings and checkerboards at random angles and periods). None of these kinds is among the sets
    benchmarks/ood.py tests on (digits, letters, photos, noise, blank and solid images), so choosing the score
    here does not flatter the test. Sides of 40 to 120 pixels: preprocessing a phone-size photo costs more and
    tells the scores nothing more. The arrays are shared between callers (cached): do not change them.
    """
    from PIL import Image, ImageDraw

    from .preprocess import prepare

    rng = np.random.default_rng(seed)

    def shapes() -> Image.Image:
        side = int(rng.integers(40, 120))
        im = Image.new("RGB", (side, side), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            colour = tuple(int(c) for c in rng.integers(0, 200, 3))
            pts = [tuple(float(v) for v in rng.uniform(0.1 * side, 0.9 * side, 2)) for _ in range(int(
                rng.integers(3, 7)))]
            kind = rng.integers(3)
            if kind == 0:
                draw.polygon(pts, fill=colour)
            elif kind == 1:
                box = sorted([pts[0][0], pts[1][0]]), sorted([pts[0][1], pts[1][1]])
                draw.ellipse([box[0][0], box[1][0], box[0][1] + 2, box[1][1] + 2], fill=colour)
            else:
                draw.line(pts, fill=colour, width=int(rng.integers(2, max(3, side // 12))))
        return im

    def textures() -> Image.Image:
        side, cells = int(rng.integers(40, 120)), int(rng.integers(2, 7))
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)

    def stripes() -> Image.Image:
        side = int(rng.integers(40, 120))
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, side / 2)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        wave = np.sin(2 * np.pi * u / period)
        if rng.random() < 0.5:  # a checkerboard: the product of two gratings at right angles
            wave = wave * np.sin(2 * np.pi * (-xx * np.sin(angle) + yy * np.cos(angle)) / period)
        lo, hi = sorted(rng.integers(0, 256, 2))
        return Image.fromarray(np.where(wave > 0, hi, lo).astype(np.uint8), "L")

    return {name: np.stack([prepare(make())[0] for _ in range(per_kind)])
            for name, make in (("shapes", shapes), ("textures", textures), ("stripes", stripes))}


@functools.lru_cache(maxsize=4)  # the same for every run of a seed: drawn once per process
def exposure_ood(per_kind: int = EXPOSURE_PER_KIND, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-products that outlier exposure trains on (`--outlier-exposure`), as `fmnist predict` would see them:
    kind -> (N, 28, 28) uint8.

    Other kinds than `validation_ood`'s, from another random stream, so that choosing among the scores there
    still measures how a score does on kinds it has not seen: "strokes" (1-3 pen strokes, Bezier curves or
    polylines of random width: dark ink on paper, or light on black at thumbnail size, some enlarged blurred),
    "blobs" (one smooth filled shape, a thresholded blurred noise field), "noise" (uniform, Gaussian,
    salt-and-pepper or blurred and stretched; grey or colour), "gradients" (linear or radial, a little noise) and
    "patches" (1/f^b noise textures, from smooth to grainy). Nothing is downloaded, no font or dataset is used.
    The arrays are shared between callers (cached): do not change them.
    """
    import cv2
    from PIL import Image, ImageDraw

    from .preprocess import prepare

    rng = np.random.default_rng((seed, 1))  # validation_ood draws from default_rng(seed): a different stream

    def point(side: int) -> tuple[float, float]:
        x, y = rng.uniform(0.1 * side, 0.9 * side, 2)
        return float(x), float(y)

    def curve(side: int) -> list[tuple[float, float]]:  # a cubic Bezier curve through 24 points
        p = np.array([point(side) for _ in range(4)])
        t = np.linspace(0, 1, 24)[:, None]
        c = (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3]
        return [(float(x), float(y)) for x, y in c]

    def strokes() -> Image.Image:
        small = rng.random() < 0.5  # light on black at thumbnail size (the dataset path), or ink on paper (photo)
        side = int(rng.integers(8, 29)) if small else int(rng.integers(40, 160))
        paper, ink = (0, int(rng.integers(150, 256))) if small else (int(rng.integers(200, 256)),
                                                                    int(rng.integers(0, 90)))
        im = Image.new("L", (side, side), paper)
        draw = ImageDraw.Draw(im)
        width = max(1, int(side * rng.uniform(0.04, 0.15)))
        for _ in range(int(rng.integers(1, 4))):
            line = curve(side) if rng.random() < 0.6 else [point(side) for _ in range(int(rng.integers(2, 6)))]
            draw.line(line, fill=ink, width=width, joint="curve")
        return im.resize((28, 28), Image.Resampling.BICUBIC) if small and rng.random() < 0.5 else im

    def blobs() -> Image.Image:
        side = int(rng.integers(28, 120))
        f = cv2.GaussianBlur(rng.standard_normal((side, side)), (0, 0), side * rng.uniform(0.05, 0.2))
        yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
        f = f / max(f.std(), 1e-9) - 4 * (xx ** 2 + yy ** 2) * rng.uniform(1, 6)  # a bowl keeps it off the edges
        mask = f > np.quantile(f, rng.uniform(0.6, 0.9))
        back, fill = (0, int(rng.integers(120, 256))) if rng.random() < 0.5 else (int(rng.integers(200, 256)),
                                                                                  int(rng.integers(0, 150)))
        return Image.fromarray(np.where(mask, fill, back).astype(np.uint8))

    def noise() -> Image.Image:
        side = int(rng.integers(28, 160))
        shape = (side, side, 3) if rng.random() < 0.5 else (side, side)
        kind = rng.integers(4)
        if kind == 0:
            a = rng.uniform(0, 256, shape)
        elif kind == 1:
            a = rng.normal(rng.uniform(30, 220), rng.uniform(5, 80), shape)
        elif kind == 2:
            a = np.where(rng.random(shape) < rng.uniform(0.05, 0.5), 255.0, rng.uniform(0, 120))
        else:
            a = cv2.GaussianBlur(rng.uniform(0, 256, shape), (0, 0), rng.uniform(0.7, 3))
            a = (a - a.mean()) * rng.uniform(2, 8) + rng.uniform(60, 200)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def gradients() -> Image.Image:
        side = int(rng.integers(28, 160))
        yy, xx = np.mgrid[0:side, 0:side] / side
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * np.pi)
            g = xx * np.cos(angle) + yy * np.sin(angle)
        else:
            cy, cx = rng.uniform(0, 1, 2)
            g = np.hypot(xx - cx, yy - cy)
        g = (g - g.min()) / max(np.ptp(g), 1e-9)
        lo, hi = sorted(rng.uniform(0, 255, 2))
        return Image.fromarray(np.clip(lo + (hi - lo) * g + rng.normal(0, rng.uniform(0, 10), g.shape), 0, 255)
                               .astype(np.uint8))

    def patches() -> Image.Image:
        side = int(rng.integers(28, 160))
        fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
        amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / side) ** rng.uniform(0.5, 2.5)  # 1/f^b, b 0.5 to 2.5
        f = np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((side, side)))).real
        f = (f - f.mean()) / max(f.std(), 1e-9)
        return Image.fromarray(np.clip(f * rng.uniform(20, 70) + rng.uniform(60, 200), 0, 255).astype(np.uint8))

    kinds = (("strokes", strokes), ("blobs", blobs), ("noise", noise), ("gradients", gradients),
             ("patches", patches))
    return {name: np.stack([prepare(make())[0] for _ in range(per_kind)]) for name, make in kinds}
