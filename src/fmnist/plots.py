"""Every figure of a run, with matplotlib (Agg backend, imported here only).

    plot_run(run_dir, history, summary, neurons, ...)  # arrays in, runs/<name>/plots/*.png, *.gif out

report.draw(run_dir) gathers those arrays from a run directory and its data.

Figures: curves.png (loss, accuracy, learning rate), samples.png (a row of
training images per class), neuron_<k>.png and .gif (a tracked neuron's
incoming weights at every epoch), neurons_atlas.png (every first-layer neuron
at the last epoch), confusion_matrix.png, mistakes.png and reliability.png
(test split); `explanation` draws fmnist explain's figure of one image, `gallery` fmnist audit's
figures (label issues, duplicate pairs).
Grids of many small pictures are tiled into one array and drawn with a single
imshow: one axes per picture would make the atlas take seconds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import __version__  # noqa: E402
from .data import CLASSES  # noqa: E402
from .runs import atomic_write  # noqa: E402

DPI = 110
DIVERGING = "RdBu_r"  # red = positive weight, blue = negative, white = 0
MAX_PANELS = 35  # snapshots drawn in neuron_<k>.png (5 rows of 7); more are subsampled evenly, and the title says so
MAX_FRAMES = 200  # frames of neuron_<k>.gif (100 s at 2 frames a second)


def save_figure(fig, path: Path) -> Path:
    """Save atomically (temp file + rename) and close the figure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = path.suffix.lstrip(".").lower()
        meta = {"Software": f"fmnist {__version__}"} if fmt == "png" else {}  # how fmnist knows its own files
        kw = {"metadata": meta} if meta else {}  # JPEG takes no metadata at all, not even an empty dict
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt, **kw))
        return path
    finally:
        plt.close(fig)


def tile(pictures: np.ndarray, cols: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """(N, h, w) -> one (rows*(h+gap)-gap, cols*(w+gap)-gap) mosaic; gaps and empty cells are `fill`."""
    n, h, w = pictures.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), fill, dtype=np.float32)
    for i, p in enumerate(pictures):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = p
    return out


# ---------------------------------------------------------------- training curves

def curves(history: list[dict], path: Path, test_accuracy: float | None = None,
           best_epoch: int | None = None, title: str = "") -> Path:
    ep = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(ep, [r["train_loss"] for r in history], "o-", ms=3, label="train")
    ax_loss.plot(ep, [r["val_loss"] for r in history], "o-", ms=3, label="validation")
    ax_loss.set(title="Loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    ax_acc.plot(ep, [100 * r["train_acc"] for r in history], "o-", ms=3, label="train")
    ax_acc.plot(ep, [100 * r["val_acc"] for r in history], "o-", ms=3, label="validation")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if test_accuracy is not None:
        ax_acc.axhline(100 * test_accuracy, color="k", ls=":", lw=1)
        ax_acc.annotate(f"test {100 * test_accuracy:.2f}%", (ep[0], 100 * test_accuracy), xytext=(2, 4),
                        textcoords="offset points", fontsize=9)
    ax_lr.plot(ep, [r["lr"] for r in history], "o-", ms=3, color="tab:purple")
    ax_lr.set(title="Learning rate (at the start of each epoch)", xlabel="epoch", ylabel="learning rate")
    if min(r["lr"] for r in history) > 0:
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        if best_epoch:
            ax.axvline(best_epoch, color="tab:green", ls="--", lw=1, label=f"best val (epoch {best_epoch})")
        ax.legend(fontsize=9)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if len(ep) <= 25:
            ax.set_xticks(ep)
            ax.tick_params(axis="x", labelsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- data

def samples(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 12, seed: int = 0) -> Path:
    """A grid of real images: one row per class, labelled with the class name."""
    images, labels = np.asarray(images), np.asarray(labels)
    rng = np.random.default_rng(seed)
    blank = np.zeros((1, 28, 28), dtype=np.float32)  # a class with fewer images than per_class: empty cells
    rows = []
    for c in range(10):
        mine = np.flatnonzero(labels == c)
        picked = images[rng.choice(mine, min(per_class, len(mine)), replace=False)].astype(np.float32)
        rows.append(np.concatenate([picked, np.repeat(blank, per_class - len(picked), axis=0)]))
    mosaic = tile(np.concatenate(rows), per_class, gap=2, fill=0)
    fig, ax = plt.subplots(figsize=(per_class * 0.75 + 1.6, 8.4))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([c * 30 + 14 for c in range(10)], [f"{c}  {name}" for c, name in enumerate(CLASSES)])
    ax.set_xticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title("Fashion-MNIST training images, one row per class")
    return save_figure(fig, path)


# ---------------------------------------------------------------- what the neurons learned

def shown_snapshots(count: int, most: int) -> np.ndarray:
    """The indices of at most `most` of `count` snapshots, evenly spread, the first and the last among them."""
    return np.arange(count) if count <= most else np.unique(np.linspace(0, count - 1, most).round().astype(int))


def neuron_evolution(snapshots: np.ndarray, neuron: int, path: Path, conv: bool = False, cols: int = 7) -> Path:
    """A tracked neuron's incoming weights at every snapshot (at most MAX_PANELS of them, evenly spread, the title
    says so), one shared symmetric colour scale."""
    shown = shown_snapshots(len(snapshots), MAX_PANELS)
    n = len(shown)
    cols = min(cols, n)
    rows = -(-n // cols)
    vmax = float(np.abs(snapshots).max()) or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.9 * cols + 1.2, 7.5), 2.05 * rows + 0.9), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            e = int(shown[i])
            im = ax.imshow(snapshots[e], cmap=DIVERGING, vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title("initial (epoch 0)" if e == 0 else f"epoch {e}", fontsize=9)
    h, w = snapshots[0].shape
    what = f"Filter {neuron} of the first convolution ({h}x{w} kernel, averaged over input channels)" if conv else \
        f"Neuron {neuron} of the first hidden layer: its {h * w} incoming weights as a {h}x{w} picture"
    when = "before training and after each epoch" if n == len(snapshots) else \
        f"{n} of its {len(snapshots)} snapshots, evenly spread from before training to the last epoch"
    fig.suptitle(f"{what},\n{when} (one colour scale for all panels)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    return save_figure(fig, path)


def neuron_gif(snapshots: np.ndarray, neuron: int, path: Path, size: int = 280, ms_per_frame: int = 500) -> Path:
    """The same as an animation: one frame per snapshot (at most MAX_FRAMES, evenly spread), epoch written on each."""
    from PIL import Image, ImageDraw

    vmax = float(np.abs(snapshots).max()) or 1.0
    cmap = matplotlib.colormaps[DIVERGING]
    frames = []
    for e in shown_snapshots(len(snapshots), MAX_FRAMES):
        w = snapshots[e]
        rgb = (cmap(Normalize(-vmax, vmax)(w))[..., :3] * 255).astype(np.uint8)
        img = Image.fromarray(rgb).resize((size, size), Image.NEAREST)
        canvas = Image.new("RGB", (size, size + 24), "white")
        canvas.paste(img, (0, 24))
        ImageDraw.Draw(canvas).text((6, 5), f"neuron {neuron}, epoch {e}", fill="black")
        frames.append(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=ms_per_frame, loop=0))
    return path


def atlas(weights: np.ndarray, path: Path, conv: bool = False, epoch: int | None = None) -> Path:
    """Every first-layer neuron (or filter) as a small picture, each on its own symmetric scale."""
    n = len(weights)
    scale = np.abs(weights).reshape(n, -1).max(1)[:, None, None]
    pictures = weights / np.where(scale > 0, scale, 1.0)
    cols = int(np.ceil(np.sqrt(n)))
    mosaic = tile(pictures, cols, gap=2)
    side = 10 if not conv else 6
    fig, ax = plt.subplots(figsize=(side, side * mosaic.shape[0] / mosaic.shape[1] + 0.8))
    cmap = matplotlib.colormaps[DIVERGING].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    when = f" after epoch {epoch}" if epoch is not None else ""
    if conv:
        ax.set_title(f"All {n} filters of the first convolution{when}\n"
                     "(this model has no fully connected first layer; kernels averaged over input channels)")
    else:
        ax.set_title(f"Incoming weights of all {n} neurons of the first hidden layer{when}\n"
                     "(each picture on its own scale: red positive, blue negative; reading order = neuron number)")
    return save_figure(fig, path)


# ---------------------------------------------------------------- test-set results

def confusion_matrix(cm: np.ndarray, path: Path, title: str = "") -> Path:
    cm = np.asarray(cm)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9.5, 8))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(10):
        for j in range(10):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(10), CLASSES, rotation=40, ha="right")
    ax.set_yticks(range(10), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(title or f"Test confusion matrix: {cm.sum()} images, accuracy {100 * acc:.2f}%\n"
                          "(colour: fraction of the true class; numbers: image counts)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the row")
    fig.tight_layout()
    return save_figure(fig, path)


def mistakes(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path, n: int = 24,
             cols: int = 8) -> Path:
    """The n most confidently wrong test images: true class, predicted class and its probability."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.75 * cols, 2.25 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[pred[i]]}\n{100 * probs[i, pred[i]]:.1f}%",
                     fontsize=8, color="firebrick")
    fig.suptitle(f"The {len(wrong)} most confidently wrong test images (of {len(np.flatnonzero(pred != labels))} "
                 "mistakes)")
    fig.tight_layout()
    return save_figure(fig, path)


def gallery(images: np.ndarray, captions: list[str], path: Path, title: str, cols: int = 8,
            colors: list[str] | None = None) -> Path:
    """Small images (N, 28, 28) uint8 with a caption under each, `cols` a row (an empty one says there are none):
    the worst label issues of `fmnist audit` (given, suggested, confidence) or its duplicate pairs side by side."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.3 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (ax, im, text) in enumerate(zip(axes.flat, images, captions)):
        ax.imshow(im, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(text, fontsize=7, color=(colors or ["black"] * n)[k])
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "none found", ha="center", va="center", transform=axes.flat[0].transAxes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def reliability(before: dict, after: dict | None, path: Path, ece: tuple[float, float | None] = (0.0, None),
                temperature: float | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin (calibrate.reliability's tables), before and after
    temperature scaling, with the share of images in each bin below. `after` None: a run without a temperature."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6.4, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.asarray(before["edges"])
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    shown = [("raw softmax", before, "tab:red", ece[0])]
    if after is not None:
        shown.append((f"temperature {temperature:.3g}", after, "tab:blue", ece[1]))
    width = (edges[1] - edges[0]) / (len(shown) + 1)
    for k, (name, table, colour, e) in enumerate(shown):
        used = np.asarray(table["count"]) > 0
        conf, acc = np.asarray(table["confidence"])[used], np.asarray(table["accuracy"])[used]
        ax.plot(conf, acc, "o-", color=colour, ms=4, label=f"{name}: ECE {100 * e:.2f}%")
        share = np.asarray(table["count"]) / max(np.sum(table["count"]), 1)
        ax_n.bar(edges[:-1] + (k + 0.5) * width, share, width=width, align="edge", color=colour, alpha=0.8)
    ax.set(ylabel="accuracy in the bin", xlim=(0, 1), ylim=(0, 1.02),
           title="Reliability on the test split (15 bins of confidence)"
           + ("" if after is not None else "\n(no temperature: a run from before calibration)"))
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    ax_n.set(xlabel="confidence (largest probability)", ylabel="share of images", yscale="log")
    ax_n.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def neuron_profile(profile: dict, images: np.ndarray, labels: np.ndarray, path: Path, kind: str = "neuron") -> Path:
    """What one first-layer neuron responds to (evaluate.neuron_profile): the nine test images that excite it
    most, its mean activation per class, and how it moves each class's logit."""
    fig = plt.figure(figsize=(12, 4.2))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 1, 1])
    ax_img, ax_act, ax_vote = (fig.add_subplot(grid[0, i]) for i in range(3))
    top = np.asarray(profile["top"])[:9]
    pictures = np.zeros((9, 28, 28), np.float32)
    pictures[:len(top)] = images[top]
    ax_img.imshow(tile(pictures, 3, gap=2, fill=0), cmap="gray", vmin=0, vmax=255)
    for i, idx in enumerate(top):
        r, c = divmod(i, 3)
        ax_img.text(c * 30 + 1, r * 30 + 27, CLASSES[int(labels[idx])].split("/")[0][:8], color="yellow", fontsize=7)
    ax_img.set_title(f"the 9 test images that excite {kind} {profile['neuron']} most", fontsize=10)
    ax_img.axis("off")
    short = [c.split("/")[0][:8] for c in CLASSES]
    y = np.arange(len(CLASSES))
    act = np.asarray(profile["per_class"])
    ax_act.barh(y, act, color=np.where(act >= 0, "tab:red", "tab:blue"))
    ax_act.set(yticks=y, yticklabels=short, title="mean activation per class", xlabel="its input to the "
               "nonlinearity" if kind == "neuron" else "its largest response")
    ax_act.invert_yaxis()
    votes = np.asarray(profile["votes"])
    ax_vote.barh(y, votes, color=np.where(votes >= 0, "tab:red", "tab:blue"))
    ax_vote.set(yticks=y, yticklabels=short, title="how it moves each class's logit",
                xlabel="logit with it minus logit without it (mean)")
    ax_vote.invert_yaxis()
    for ax in (ax_act, ax_vote):
        ax.axvline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, path)


def explanation(pixels: np.ndarray, attribution: np.ndarray, title: str, path: Path, method: str = "ig") -> Path:
    """fmnist explain's figure: the 28x28 input the model saw (shown 8x), and the same input under the attribution
    (red: pushed towards the class, blue: against; one scale symmetric about 0; the stronger, the more opaque)."""
    a = np.asarray(attribution, np.float64)
    scale = attribution_scale(a)
    fig, (ax_in, ax_map) = plt.subplots(1, 2, figsize=(5.6, 3.0))
    for ax, brightest in ((ax_in, 255), (ax_map, 255 / 0.6)):  # under the map, the input dimmed to 60 %
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=brightest, interpolation="nearest")
        ax.set_axis_off()
    shown = ax_map.imshow(a, cmap=DIVERGING, vmin=-scale, vmax=scale, interpolation="nearest",
                          alpha=0.9 * np.sqrt(np.minimum(np.abs(a) / scale, 1)))  # 0: the input shows through
    ax_in.set_title("what the model saw", fontsize=9)
    ax_map.set_title(f"why ({METHOD_NAMES.get(method, method)})", fontsize=9)
    bar = fig.colorbar(shown, ax=ax_map, fraction=0.046, pad=0.04)
    bar.set_label("towards the class (red) / against (blue)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


METHOD_NAMES = {"ig": "integrated gradients", "saliency": "saliency", "occlusion": "occlusion"}


def attribution_scale(a: np.ndarray) -> float:
    """The colour scale's end: the 99th percentile of |attribution| (the few strongest pixels would otherwise
    leave every other one pale), as the page's Why? draws it."""
    return float(np.percentile(np.abs(a), 99)) or float(np.abs(a).max()) or 1.0


def lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggested: float, lowest: float,
            path: Path, title: str = "") -> Path:
    """The learning-rate range test: each batch's loss and its moving average against the rate (log scale),
    with the lowest smoothed loss and the suggestion (a tenth of its rate) marked."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.plot(lrs, losses, color="tab:grey", alpha=0.45, lw=1, label="loss of each batch")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label="smoothed: a centred median, then mean")
    ax.axvline(lowest, color="tab:red", ls=":", lw=1.2, label=f"lowest average at {lowest:.2g}")
    ax.axvline(suggested, color="tab:green", lw=2, label=f"suggested: a tenth, {suggested:.2g}")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # the divergence at the end would squash the interesting part
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.05 * abs(low), max(first, low) * 1.6 + 1e-9)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title=title or "Learning-rate range test (Smith 2017)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- all of a run

def plot_run(run_dir: str | Path, history: list[dict], summary: dict, neurons: dict[int, np.ndarray],
             test_images: np.ndarray, test_labels: np.ndarray, test_probs: np.ndarray, confusion: np.ndarray,
             train: tuple[np.ndarray, np.ndarray], first_layer: np.ndarray, conv: bool,
             calibration: dict | None = None) -> list[Path]:
    """Write every figure of the run into run_dir/plots/; returns their paths. `confusion`: the test split's
    (10, 10) counts as evaluate computed them; `train`: the training split's (images, labels); `calibration`:
    reliability()'s arguments (before, after, ece, temperature) for reliability.png, or None for no diagram."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    paths = [
        curves(history, out / "curves.png", summary.get("test_accuracy"), summary.get("best_epoch"),
               title=f"{run_dir.name}"),
        samples(*train, out / "samples.png"),
    ]
    for k, snaps in sorted(neurons.items()):
        paths.append(neuron_evolution(snaps, k, out / f"neuron_{k}.png", conv=conv))
        paths.append(neuron_gif(snaps, k, out / f"neuron_{k}.gif"))
    paths.append(atlas(first_layer, out / "neurons_atlas.png", conv=conv, epoch=len(history)))
    paths.append(confusion_matrix(confusion, out / "confusion_matrix.png"))
    paths.append(mistakes(test_images, test_labels, test_probs, out / "mistakes.png"))
    if calibration is not None:
        paths.append(reliability(calibration["before"], calibration["after"], out / "reliability.png",
                                 calibration["ece"], calibration["temperature"]))
    return paths


# ---------------------------------------------------------------- experiments

def init_comparison(results: dict, path: Path, zoom_epochs: int = 5) -> Path:
    """Validation accuracy and loss per epoch for each init: mean line, ± std band over seeds.

    A third panel zooms on the first epochs, where initialisation matters most.
    """
    fig, (ax_acc, ax_zoom, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.6))
    for init, r in results["inits"].items():
        acc = 100 * np.array([run["val_acc"] for run in r["runs"]])
        loss = np.array([run["val_loss"] for run in r["runs"]])
        ep = np.arange(1, acc.shape[1] + 1)
        for ax, y in ((ax_acc, acc), (ax_zoom, acc), (ax_loss, loss)):
            m, s = y.mean(0), y.std(0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])
            line, = ax.plot(ep, m, "o-", ms=3, label=init)
            ax.fill_between(ep, m - s, m + s, color=line.get_color(), alpha=0.18)
    n = len(next(iter(results["inits"].values()))["runs"])
    ax_acc.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax_zoom.set(title=f"The first {zoom_epochs} epochs", xlabel="epoch", ylabel="accuracy (%)")
    ax_zoom.set_xlim(0.8, zoom_epochs + 0.2)
    lo = min(100 * min(run["val_acc"][0] for run in r["runs"]) for r in results["inits"].values())
    hi = max(100 * max(run["val_acc"][:zoom_epochs]) for r in results["inits"].values() for run in r["runs"])
    ax_zoom.set_ylim(lo - 0.5, hi + 0.5)
    ax_loss.set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_zoom, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, title="init")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Weight initialisation compared: mean over {n} seed{'s' if n > 1 else ''}, band = ± 1 std")
    fig.tight_layout()
    return save_figure(fig, path)
