"""Are fmnist explain's maps faithful? A deletion test: remove the pixels a map ranks first and watch the answer fall.

    python benchmarks/explain_faithfulness.py RUN_DIR [--images 1000] [--threads 1] [--json FILE]

On the first 1,000 images of the test split (in the file's order, no sampling),
for each method of explain.py (Integrated Gradients, saliency, occlusion) and a
random order (seeded, one permutation per image): rank the 784 pixels by the
map of the predicted class (largest attribution first; ties in a random order),
set the top 0, 5, 10, ..., 50 % of them to the baseline (0: black, "no product",
as explain.BASELINE), and record the calibrated probability of the class the
model first predicted. A faithful map makes that probability fall fast.
Reported per method: the mean probability at each step, the area under that
curve over 0-50 % removed (divided by 0.5, i.e. the mean probability over the
curve: lower is more faithful), the mean drop at 10 % removed, and that drop
over the random order's drop.

The goal it checks: on the default MLP, removing the top 10 % of pixels by IG
lowers the predicted class's probability at least twice as much as removing a
random 10 %. Results: benchmarks/RESULTS.md, "Why it answered: attribution
faithfulness".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fmnist import data, explain

STEPS = [k / 100 for k in range(0, 55, 5)]  # fractions of the 784 pixels removed
SEED = 0  # the random order's and the tie-breaks' seed


def order(attributions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 28, 28) maps -> (N, 784) pixel indices, largest attribution first, ties in a random order."""
    a = attributions.reshape(len(attributions), -1)
    tie = rng.random(a.shape)
    return np.lexsort((tie, -a), axis=-1)


def deletion_curve(p, pixels: np.ndarray, ranks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, len(STEPS)): the probability of `classes` with the first STEPS[k] of `ranks` set to the baseline."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float32)
    rows = np.arange(len(flat))[:, None]
    out = []
    for f in STEPS:
        x = flat.copy()
        n = round(f * flat.shape[1])
        if n:
            x[rows, ranks[:, :n]] = explain.BASELINE
        out.append(p.probabilities(x.reshape(-1, 28, 28))[np.arange(len(x)), classes])
    return np.stack(out, 1)


def measure(run: str, n: int, data_dir: str | None = None) -> dict:
    p = explain.predictor(run)
    cfg = p.info["config"]
    images, labels = data.load_split(data.locate(data_dir or cfg["data_dir"] or None), "test")
    pixels = images[:n]
    probs = p.probabilities(pixels.astype(np.float32))
    predicted = probs.argmax(1)
    rng = np.random.default_rng(SEED)
    results = {"run": Path(run).name, "model": cfg["model"], "images": len(pixels),
               "accuracy": float((predicted == labels[:n]).mean()), "steps": STEPS, "methods": {}}
    for method in (*explain.METHODS, "random"):
        start = time.perf_counter()
        if method == "random":
            ranks = np.argsort(rng.random((len(pixels), 784)), axis=1)
        else:
            a = explain.attribute(p, pixels, method, predicted)[0]
            ranks = order(a, rng)
        seconds = time.perf_counter() - start
        curve = deletion_curve(p, pixels, ranks, predicted)
        mean = curve.mean(0)
        results["methods"][method] = {
            "curve": [round(float(v), 4) for v in mean],
            "auc": round(float(np.trapezoid(mean, STEPS) / STEPS[-1]), 4),
            "drop_10": round(float(mean[0] - mean[STEPS.index(0.1)]), 4),
            "seconds": round(seconds, 1)}
    random_drop = results["methods"]["random"]["drop_10"]
    for m in results["methods"].values():
        m["ratio_to_random_10"] = round(m["drop_10"] / random_drop, 2) if random_drop > 0 else None
    return results


def table(r: dict) -> str:
    head = ("| method | p at 0 % | 10 % | 20 % | 30 % | 50 % | AUC (0-50 %) | drop at 10 % | drop / random's "
            "| seconds |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, m in r["methods"].items():
        c = m["curve"]
        at = [c[STEPS.index(f)] for f in (0.0, 0.1, 0.2, 0.3, 0.5)]
        rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in at) +
                    f" | {m['auc']:.3f} | {m['drop_10']:.3f} | {m['ratio_to_random_10']} | {m['seconds']} |")
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run directory (its best.pt)")
    ap.add_argument("--images", type=int, default=1000, help="the first N test images (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--data-dir", help="the dataset's folder, if not the run's")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = measure(args.run, args.images, args.data_dir)
    print(f"{r['run']} ({r['model']}), first {r['images']} test images, accuracy on them {r['accuracy']:.4f}")
    print(table(r))
    ig = r["methods"]["ig"]["ratio_to_random_10"]
    print(f"goal (IG's drop at 10 % >= 2x random's): {'met' if ig is not None and ig >= 2 else 'missed'} ({ig})")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
