"""Knowing when not to answer: how often a run says "unsure" on images that are not Fashion-MNIST products.

    python3 benchmarks/ood.py RUN_DIR [--json FILE]

Makes its sets offline (nothing is downloaded), each passed through fmnist's
preprocessing (`--preprocess auto`) as `fmnist predict` would see the file:

    digits    scikit-learn's bundled 8x8 digits, enlarged to 28x28, light on dark
    numbers   0-9 drawn with PIL's default font (several sizes), dark on white paper
    letters   A-Z and a-z, likewise
    photos    scikit-image's bundled photographs, whole (people, a cat, coffee, a rocket, coins, the moon...)
    crops     random crops of those photographs
    faces     scikit-image's bundled faces (lfw_subset), 25x25
    noise     uniform and Gaussian noise, grey and colour, 28 to 300 pixels
    blank     white or black images of any size
    solid     one random colour each

and measures, against the raw 28x28 test split (the positives): AUROC and the
false-positive rate at 95 % true-positive rate (FPR95: the share of a set
accepted as products when 95 % of real test images are) for each score
(calibrate.METHODS: max-softmax, energy, Mahalanobis, combined, tails), the
share of each set marked unsure by `fmnist predict` (the run's own score and
threshold, through Predictor), and
the expected calibration error on the test split before and after the run's
temperature. Only the scores' comparison is fitted here (the Mahalanobis
statistics, as the run fits them); the run's threshold was chosen on the
validation split. Results: benchmarks/RESULTS.md, "Calibration and
out-of-distribution".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fmnist import calibrate, evaluate, predict, runs
from fmnist.preprocess import prepare

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "moon", "coins", "clock", "brick", "grass", "gravel", "cell", "page", "text")


def _prepared(images) -> np.ndarray:
    return np.stack([prepare(im)[0] for im in images])


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    d = load_digits().images  # (1797, 8, 8), 0-16, light on dark
    return _prepared(Image.fromarray((d[i] * (255 / 16)).round().astype(np.uint8)).resize((28, 28),
                     Image.Resampling.BICUBIC) for i in range(len(d)))


def glyphs(chars: str, rng: np.random.Generator, per_char: int = 6) -> np.ndarray:
    out = []
    for ch in chars:
        for _ in range(per_char):
            size = int(rng.integers(16, 120))
            font = ImageFont.load_default(size=size)
            canvas = Image.new("RGB", (2 * size, 2 * size), tuple(int(v) for v in rng.integers(225, 256, 3)))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            ImageDraw.Draw(canvas).text((size // 2, size // 4), ch, fill=ink, font=font)
            out.append(canvas)
    return _prepared(out)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    return a if a.dtype == np.uint8 else (255 * (a - a.min()) / max(np.ptp(a), 1e-9)).astype(np.uint8)


def photos() -> np.ndarray:
    return _prepared(_photo(n) for n in PHOTOS)


def crops(rng: np.random.Generator, per_photo: int = 40) -> np.ndarray:
    out = []
    for name in PHOTOS:
        a = _photo(name)
        h, w = a.shape[:2]
        for _ in range(per_photo):
            side = int(rng.integers(min(h, w) // 6, min(h, w) // 2))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            out.append(a[y:y + side, x:x + side])
    return _prepared(out)


def faces() -> np.ndarray:
    import skimage.data

    f = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]
    return _prepared((255 * f).round().astype(np.uint8))


def noise(rng: np.random.Generator, n: int = 300) -> np.ndarray:
    out = []
    for i in range(n):
        side = int(rng.integers(28, 300))
        shape = (side, side, 3) if i % 2 else (side, side)
        a = rng.integers(0, 256, shape) if i % 4 < 2 else rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), shape)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return _prepared(out)


def blank(rng: np.random.Generator, n: int = 40) -> np.ndarray:
    return _prepared(np.full((int(rng.integers(28, 400)),) * 2, 255 * (i % 2), np.uint8) for i in range(n))


def solid(rng: np.random.Generator, n: int = 100) -> np.ndarray:
    return _prepared(np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (int(rng.integers(28, 400)),) * 2
                                     + (3,)) for _ in range(n))


def ood_sets(seed: int = 0) -> dict[str, np.ndarray]:
    """Set name -> (N, 28, 28) uint8, as `fmnist predict` would see each image."""
    rng = np.random.default_rng(seed)
    return {"digits": digits(), "numbers": glyphs("0123456789", rng, 12),
            "letters": glyphs("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", rng, 4),
            "photos": photos(), "crops": crops(rng), "faces": faces(), "noise": noise(rng), "blank": blank(rng),
            "solid": solid(rng)}


def product_photos(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Real test products as studio photos (tests/photos.py's render: enlarged, off-centre on white, JPEG or
    PNG), through preprocessing: they should stay answered."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from photos import render

    rng = np.random.default_rng(seed)
    return _prepared(render(pixels, rng)[0] for pixels in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a trained run directory")
    ap.add_argument("--photos", type=int, default=1000, help="test products rendered as photos (default 1000)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    run_dir = Path(args.run)
    torch.set_num_threads(2)
    model, cfg, ckpt = runs.load_model(run_dir)
    cal = runs.load_calibration(ckpt, run_dir)
    if cal.threshold is None:
        sys.exit(f"{run_dir} has no calibration (trained before fmnist calibrated): train it again.")
    splits = evaluate.load_splits(cfg)
    dev = torch.device("cpu")
    sets = ood_sets()
    test_x = splits.test[0].numpy()
    products = product_photos(test_x[:args.photos])
    # every score, with the statistics fitted as the run fits them (the run keeps only its own score's)
    every = evaluate.every_score(model, cfg, splits, dev)[0]
    test = evaluate.scores(model, cfg, splits.test, dev, features=True)
    real = evaluate.ood_scores(every, test)
    p = predict.Predictor(run_dir)
    test_probs, test_scores = p.outputs(test_x)
    ece = {"before": calibrate.calibration_error(test.probabilities, test.labels),
           "after": calibrate.calibration_error(torch.from_numpy(test_probs), test.labels)}
    rows = {}
    for name, images in sets.items():
        other = evaluate.ood_scores(every, evaluate.scores(model, cfg, evaluate.unlabelled(images), dev,
                                                           features=True))
        rows[name] = {"images": len(images),
                      "auroc": {m: calibrate.auroc(real[m], other[m]) for m in calibrate.METHODS},
                      "fpr95": {m: calibrate.fpr_at_tpr(real[m], other[m]) for m in calibrate.METHODS},
                      "unsure": _unsure(p, images)}
    result = {"run": str(run_dir), "method": cal.method, "threshold": cal.threshold, "temperature": cal.temperature,
              "test_ece": ece, "raw_test_unsure": float(np.mean(test_scores > cal.threshold)),
              "product_photos_unsure": _unsure(p, products), "sets": rows,
              "all_images_unsure": _unsure(p, np.concatenate(list(sets.values()))),
              "mean_of_sets_unsure": float(np.mean([r["unsure"] for r in rows.values()]))}
    print(f"{run_dir}: score {cal.method}, threshold {cal.threshold:.4g}, temperature {cal.temperature:.3f}")
    print(f"test ECE (15 bins) {ece['before']:.2%} before, {ece['after']:.2%} after temperature scaling")
    print(f"unsure: {result['raw_test_unsure']:.1%} of the raw test split, {result['product_photos_unsure']:.1%} "
          f"of {len(products)} test products rendered as photos; {result['all_images_unsure']:.1%} of all "
          f"{sum(len(v) for v in sets.values()):,} non-product images ({result['mean_of_sets_unsure']:.1%} as "
          "the mean of the sets)\n")
    names = " / ".join(calibrate.METHODS)
    print(f"| set | images | AUROC {names} | FPR95 {names} | unsure |")
    print("| --- | ---: | --- | --- | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['images']} | " + " / ".join(f"{r['auroc'][m]:.3f}" for m in calibrate.METHODS)
              + " | " + " / ".join(f"{r['fpr95'][m]:.1%}" for m in calibrate.METHODS) + f" | {r['unsure']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _unsure(p: predict.Predictor, images: np.ndarray) -> float:
    """The share of 28x28 inputs whose Predictor record (what `fmnist predict` prints) is unsure."""
    probs, scores = p.outputs(images)
    return float(np.mean([p.record(a, ood_score=b)["unsure"] for a, b in zip(probs, scores)]))


if __name__ == "__main__":
    main()
