"""The data's own mistakes: likely label errors and duplicate images in the Fashion-MNIST files.

    fmnist audit [--data-dir D] [--folds 5] [--preset mlp-fast] [--out-dir audit] [--seed 0] [--flip 0.01] [--json]

Label errors, by confident learning (Northcutt, Jiang, Chuang 2021; the cleanlab package). Every image of both
files, the 60,000 of the training file (whatever validation split training holds out of them) and the 10,000 of
the test file, is one pool, cut into k folds stratified by label (a group of duplicates stays in one fold, so
that no model has seen a copy of an image it judges). k models of `--preset`, each trained by train.train_arrays
on the other k - 1 folds, give each image probabilities from a model that never saw it (out-of-fold).
`cleanlab.filter.find_label_issues` then flags the images whose given label the probabilities contradict.
One pool rather than train and test apart: each model learns from 80 % of 70,000 images instead of a test-only
model learning from 8,000, and the two files' images are judged by the same models. The flag is kept only where
the model gives the given label less than MAX_GIVEN (see there; above the floor of label smoothing).

Duplicates: exact ones by a hash of the 784 bytes; near ones by the cosine similarity of the mean-centred
images, at least NEAR (see there), found without comparing every pair: a projection onto the leading principal
components never lengthens a distance, so every pair close enough in full is also close in the projection, where
a k-d tree finds them; each such candidate is then checked in full. Pairs within the training file, within the
test file and across the two, with whether their labels agree.

Every image is named by its file ("train" or "test") and its index in that IDX file (0-59,999 and 0-9,999), the
position `data.load_split` reads it at: the validation split does not renumber anything here.

`--flip F` measures the detector: a seeded F of the training file's labels are changed (a copy; each to another
class drawn uniformly), the audit runs on them, and recall (flipped labels flagged / flipped) and precision
(flipped labels flagged / training images flagged) are reported. See benchmarks/RESULTS.md, "The data's own
mistakes".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from . import data, devices, evaluate, files, runs, train
from .config import TrainConfig
from .errors import ConfigError

FOLDS = 5  # models trained; each image is judged by the one whose training left its fold out
MAX_FOLDS = 20
PRESET = "mlp-fast"  # see benchmarks/RESULTS.md, "The data's own mistakes", for the convnet against it
# A flag is kept only where the out-of-fold probability of the given label is below this (plus the floor that label
# smoothing trains every class towards: see `given_limit`). cleanlab's flags alone (filter_by="low_self_confidence", as
# many as its confident joint estimates errors) include every image of the classes the model confuses (shirt,
# T-shirt, pullover, coat) that it leans the other way on: with mlp-fast and 1 % of the labels flipped (seed 0),
# 2,248 training images, 26 % of them flips. A label the model gives under 1 % is another matter: 726 flags, 71 %
# flips, 86 % of the flips among them. Chosen on flip seed 0 (0.001-0.1 tried), measured on seeds 1-3
# (benchmarks/RESULTS.md).
MAX_GIVEN = 0.01
NEAR = 0.995  # cosine similarity of mean-centred images: at and above, the same photo (a crop, a shade apart)
PCA_DIMS = 24  # principal components the candidates of near duplicates are searched in
PCA_SAMPLE = 5000  # images the components are computed from (any orthonormal basis keeps the guarantee)
SPLITS = ("train", "test")


@dataclass
class Pool:
    """Both files as one pool: images (N, 28, 28) uint8, labels (N,) int64, and where each came from."""

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray  # (N,) 0 = train file, 1 = test file
    index: np.ndarray  # (N,) the position in that file

    def name(self, i: int) -> dict[str, Any]:
        return {"split": SPLITS[int(self.split[i])], "index": int(self.index[i])}

    @classmethod
    def of(cls, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Pool:
        (xtr, ytr), (xte, yte) = train, test
        return cls(np.concatenate([xtr, xte]), np.concatenate([ytr, yte]).astype(np.int64),
                   np.repeat(np.array([0, 1], dtype=np.int8), [len(ytr), len(yte)]),
                   np.concatenate([np.arange(len(ytr)), np.arange(len(yte))]))


@dataclass
class Audit:
    """What `audit` found. issues and duplicates are lists of JSON-ready records (see `to_dict`)."""

    issues: list[dict[str, Any]]  # worst first: split, index, given, suggested, confidence, quality
    duplicates: list[dict[str, Any]]  # kind, where, similarity, labels_agree, images [{split, index, label}]
    groups: list[list[dict[str, Any]]]  # near duplicates joined through shared images: [{split, index, label}]
    counts: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    flip: dict[str, Any] | None = None  # with --flip: flipped, flagged, found, recall, precision
    probabilities: np.ndarray | None = field(default=None, repr=False)  # (N, 10) out-of-fold, pool order

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "counts": self.counts, "seconds": self.seconds,
                **({"flip": self.flip} if self.flip is not None else {}),
                "issues": self.issues, "duplicates": self.duplicates, "duplicate_groups": self.groups}


# ---------------------------------------------------------------- checks

def check(folds: int, flip: float) -> None:
    """A fold count or flip fraction that cannot be used, or a missing package, is one sentence."""
    for package in ("cleanlab", "sklearn", "scipy"):
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"fmnist audit needs cleanlab and scikit-learn ({package} is missing): "
                              "pip install 'fmnist[audit]'.") from None
    if not 2 <= folds <= MAX_FOLDS:
        raise ConfigError(f"--folds {folds}: choose between 2 and {MAX_FOLDS} folds (each image is judged by a "
                          "model trained on the other folds).")
    if not 0 <= flip < 0.5:
        raise ConfigError(f"--flip {flip}: the fraction of training labels to flip must be at least 0 and below "
                          "0.5 (0.01 flips 1 %).")


def check_pool(pool: Pool, folds: int, flip: float) -> None:
    """Too few images for the folds, or a flip fraction that flips no label, is one sentence."""
    n, n_train = len(pool.labels), int((pool.split == 0).sum())
    if n < 2 * folds or np.bincount(pool.labels).max() < folds:
        raise ConfigError(f"{n} images are too few for {folds} folds; choose fewer --folds.")
    if flip > 0 and round(flip * n_train) == 0:
        raise ConfigError(f"--flip {flip} of {n_train} training labels flips none; choose at least "
                          f"{0.5 / max(n_train, 1):.2g}.")


def model_config(preset: str, seed: int, threads: int = 0) -> TrainConfig:
    """The preset the folds train, at `seed`, with nothing written."""
    cfg = config_mod.preset(preset, TrainConfig())
    if cfg.teacher:
        raise ConfigError(f"--preset {preset} distils from a trained run, which has seen every fold; choose a preset "
                          "that trains from scratch (see `fmnist models`).")
    cfg = dataclasses.replace(cfg, seed=seed, plots=False, compile=False, threads=threads, name="audit")
    return runs.resolve(cfg.validate())


# ---------------------------------------------------------------- label errors

def fold_of(labels: np.ndarray, folds: int, seed: int, groups: list[np.ndarray] = ()) -> np.ndarray:
    """(N,) the fold of each image: stratified by label and seeded; every member of a group joins the fold of its
    first member."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.empty(len(labels), dtype=np.int64)
    cut = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer images than folds is missing from some: said by no one
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held) in enumerate(cut.split(np.zeros(len(labels)), labels)):
            fold[held] = k
    for g in groups:
        fold[g] = fold[g[0]]
    return fold


def out_of_fold(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, fold: np.ndarray, device: torch.device,
                progress: bool = False, echo: Callable[[str], None] = lambda s: None) -> np.ndarray:
    """(N, classes) probabilities of each image from the model trained on every fold but its own."""
    from tqdm import tqdm

    x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    probs = np.zeros((len(labels), len(data.CLASSES)), dtype=np.float32)
    folds = int(fold.max()) + 1
    for k in tqdm(range(folds), desc="folds", disable=not progress, unit="fold"):
        held = torch.from_numpy(np.flatnonzero(fold == k))
        kept = torch.from_numpy(np.flatnonzero(fold != k))
        start = time.perf_counter()
        model = train.train_arrays(cfg, x[kept], y[kept], device, progress=progress, desc=f"fold {k + 1}/{folds} ")
        s = evaluate.scores(model, cfg, (x[held], y[held]), device, probabilities=True)
        probs[held.numpy()] = s.probabilities.numpy()
        echo(f"fold {k + 1}/{folds}: trained on {len(kept):,} images, {100 * s.accuracy:.2f} % of its "
             f"{len(held):,} held-out labels agree with the model, {time.perf_counter() - start:.1f} s")
    return probs


def given_limit(cfg: TrainConfig) -> float:
    """The most out-of-fold probability of its given label a flagged image may have: MAX_GIVEN above the level that
    label smoothing trains every wrong class towards (label_smoothing / classes: 0.01 for the smoothed presets, whose
    models give hardly any class less)."""
    return MAX_GIVEN + cfg.label_smoothing / len(data.CLASSES)


def label_issues(labels: np.ndarray, probs: np.ndarray, max_given: float = MAX_GIVEN
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(indices flagged, worst first; every image's label quality): cleanlab's find_label_issues on out-of-fold
    `probs` (filter_by="low_self_confidence"), each flag kept only where the probability of the given label, its
    self-confidence (cleanlab's label quality score, by which the flags are ranked), is below `max_given`."""
    import cleanlab.filter
    import cleanlab.rank

    quality = cleanlab.rank.get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = cleanlab.filter.find_label_issues(labels, probs, filter_by="low_self_confidence", n_jobs=1)
    idx = np.flatnonzero(flagged & (quality < max_given))
    return idx[np.argsort(quality[idx], kind="stable")], quality


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a copy of `labels` with round(fraction x N) of them changed, the sorted indices changed): seeded, each to
    another class drawn uniformly."""
    rng = np.random.default_rng(seed)
    which = np.sort(rng.choice(len(labels), size=round(fraction * len(labels)), replace=False))
    out = labels.copy()
    classes = len(data.CLASSES)
    out[which] = (labels[which] + rng.integers(1, classes, size=len(which))) % classes
    return out, which


# ---------------------------------------------------------------- duplicates

def exact_duplicates(images: np.ndarray) -> list[np.ndarray]:
    """Groups (sorted index arrays, two or more) of images equal byte for byte."""
    seen: dict[bytes, list[int]] = {}
    for i, im in enumerate(images.reshape(len(images), -1)):
        seen.setdefault(hashlib.blake2b(im.tobytes(), digest_size=16).digest(), []).append(i)
    return [np.array(g) for g in seen.values() if len(g) > 1]


def _unit(images: np.ndarray) -> np.ndarray:
    """(N, 784) float32: each image in [0, 1], mean-centred, scaled to length 1 (a blank image stays 0)."""
    f = images.reshape(len(images), -1).astype(np.float32) / 255
    f -= f.mean(1, keepdims=True)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)
    return f


def near_duplicates(images: np.ndarray, threshold: float = NEAR, seed: int = 0) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for every pair of images whose mean-centred cosine similarity is at least
    `threshold` (byte-equal pairs included), the most alike first.

    For unit vectors |u - v|^2 = 2 - 2 cos, and an orthonormal projection never lengthens u - v: every pair within
    the radius in full is within it in the PCA_DIMS leading components, where a k-d tree lists the candidates.
    """
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    if len(images) < 2:
        return []
    f = torch.from_numpy(_unit(images))
    sample = f[torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:PCA_SAMPLE]]
    sample = sample - sample.mean(0)
    _, vectors = torch.linalg.eigh(sample.T @ sample)  # (784, 784), ascending eigenvalues: the last are leading
    proj = (f @ vectors[:, -PCA_DIMS:]).numpy()
    radius = float(np.sqrt(max(2 - 2 * threshold, 0.0))) * (1 + 1e-4)  # float32 rounding: never one too few
    near = NearestNeighbors(radius=radius, algorithm="kd_tree").fit(proj)
    cand = sparse.triu(near.radius_neighbors_graph(proj, mode="connectivity"), k=1).tocoo()
    sim = (f[cand.row] * f[cand.col]).sum(1).numpy()
    keep = sim >= threshold
    pairs = zip(cand.row[keep].tolist(), cand.col[keep].tolist(), sim[keep].tolist())
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))  # the most alike first


def duplicate_groups(pairs: list[tuple[int, int, float]], n: int) -> list[np.ndarray]:
    """The connected groups of `pairs` over n images, each a sorted index array of two or more."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return []
    i, j, _ = zip(*pairs)
    graph = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    return [np.flatnonzero(comp == c) for c in np.flatnonzero(sizes > 1)]


def _image(pool: Pool, k: int) -> dict[str, Any]:
    return {**pool.name(k), "label": data.CLASSES[pool.labels[k]]}


def _duplicate(pool: Pool, members: np.ndarray, similarity: float, kind: str) -> dict[str, Any]:
    """A duplicate record: where its images lie (within one file or across), whether the files' labels agree."""
    splits = set(pool.split[members].tolist())
    return {"kind": kind, "where": "across" if len(splits) > 1 else "within " + SPLITS[splits.pop()],
            "similarity": round(float(similarity), 5), "labels_agree": len(set(pool.labels[members].tolist())) == 1,
            "images": [_image(pool, k) for k in members]}


# ---------------------------------------------------------------- the whole audit

def audit(pool: Pool, cfg: TrainConfig, folds: int = FOLDS, flip: float = 0.0, device: torch.device | None = None,
          progress: bool = False, echo: Callable[[str], None] = lambda s: None, preset: str = "") -> Audit:
    """Label issues and duplicates of `pool`, its models trained with `cfg` (cfg.seed seeds the folds and the
    flips too). With `flip`, a copy of the training file's labels is flipped first and the flags are scored."""
    check(folds, flip)
    device = device or torch.device("cpu")
    with devices.cpu_share(cfg.threads) if device.type == "cpu" else contextlib.nullcontext():
        return _audit(pool, cfg, folds, flip, device, progress, echo, preset)


def _audit(pool: Pool, cfg: TrainConfig, folds: int, flip: float, device: torch.device, progress: bool,
           echo: Callable[[str], None], preset: str) -> Audit:
    start = time.perf_counter()
    check_pool(pool, folds, flip)
    n = len(pool.labels)
    labels, flipped = pool.labels, np.zeros(0, dtype=np.int64)
    train_idx = np.flatnonzero(pool.split == 0)
    if flip > 0:
        new, which = flip_labels(pool.labels[train_idx], flip, cfg.seed)
        labels = pool.labels.copy()
        labels[train_idx] = new
        flipped = train_idx[which]

    exact = exact_duplicates(pool.images)
    near = near_duplicates(pool.images, seed=cfg.seed)
    echo(f"duplicates: {len(exact)} groups of byte-equal images, {len(near)} pairs at similarity >= {NEAR} "
         f"({time.perf_counter() - start:.1f} s)")
    groups = duplicate_groups(near, n)
    fold = fold_of(labels, folds, cfg.seed, exact + groups)
    probs = out_of_fold(cfg, pool.images, labels, fold, device, progress, echo)
    flagged, quality = label_issues(labels, probs, given_limit(cfg))

    issues = [{**pool.name(i), "given": data.CLASSES[labels[i]], "suggested": data.CLASSES[int(probs[i].argmax())],
               "confidence": round(float(probs[i].max()), 4), "quality": round(float(quality[i]), 4),
               **({"flipped": bool(np.isin(i, flipped))} if flip > 0 else {})} for i in flagged]
    # the files' own labels (not the flipped copy); a near pair inside a group of byte-equal images is that group
    same = {int(k): g_id for g_id, g in enumerate(exact) for k in g}
    duplicates = [_duplicate(pool, g, 1.0, "exact") for g in exact]
    duplicates += [_duplicate(pool, np.array([i, j]), sim, "near") for i, j, sim in near
                   if same.get(i, -1) != same.get(j, -2)]
    near_records = [d for d in duplicates if d["kind"] == "near"]
    counts = {
        "images": {s: int((pool.split == k).sum()) for k, s in enumerate(SPLITS)},
        "flagged": {s: int((pool.split[flagged] == k).sum()) for k, s in enumerate(SPLITS)},
        "out_of_fold_accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
        "exact_duplicate_groups": len(exact),
        "near_duplicate_pairs": {w: sum(d["where"] == w for d in near_records)
                                 for w in ("within train", "within test", "across")},
        "near_duplicate_pairs_disagreeing": sum(not d["labels_agree"] for d in near_records),
    }
    named_groups = [[_image(pool, k) for k in g] for g in groups]
    result = None
    if flip > 0:
        train_flags = flagged[pool.split[flagged] == 0]
        found = int(np.isin(flipped, train_flags).sum())
        result = {"fraction": flip, "flipped": len(flipped), "flagged_train": len(train_flags), "found": found,
                  "recall": round(found / max(len(flipped), 1), 4),
                  "precision": round(found / max(len(train_flags), 1), 4)}
    settings = {"preset": preset, "model": cfg.model, "epochs": cfg.epochs, "folds": folds, "seed": cfg.seed,
                "flip": flip, "near_threshold": NEAR, "max_given": round(given_limit(cfg), 6),
                "filter": "cleanlab.filter.find_label_issues(filter_by='low_self_confidence')"}
    return Audit(issues, duplicates, named_groups, counts, settings, round(time.perf_counter() - start, 2), result,
                 probs)


# ---------------------------------------------------------------- files

WORST = 24  # label issues drawn in label_issues.png
TEST_SHOWN = 80  # flagged test images drawn in label_issues_test.png (the real files: about 50, all of them)
PAIRS = 20  # duplicate pairs drawn in duplicates_across.png


def run(data_dir: str | None, preset: str = PRESET, folds: int = FOLDS, out_dir: str | Path = "audit",
        seed: int = 0, flip: float = 0.0, device: str = "auto", threads: int = 0, progress: bool = False,
        echo: Callable[[str], None] = lambda s: None) -> tuple[Audit, dict[str, Path]]:
    """Audit the files in `data_dir` (found as every command finds them) and write the results into `out_dir`:
    audit.json (Audit.to_dict), out_of_fold.npz (the probabilities with each image's file and index), and the
    figures label_issues.png, label_issues_test.png and duplicates_across.png. Returns the audit and the paths."""
    check(folds, flip)
    cfg = model_config(preset, seed, threads)
    directory = data.locate(data_dir)
    pool = Pool.of(data.load_split(directory, "train"), data.load_split(directory, "test"))
    check_pool(pool, folds, flip)
    dev = devices.pick_device(device)
    out = files.claim_output_dir(out_dir, "audit")
    result = audit(pool, cfg, folds, flip, dev, progress, echo, preset)
    result.settings["data"] = str(directory.resolve())
    return result, write(result, pool, out)


def write(result: Audit, pool: Pool, out: Path) -> dict[str, Path]:
    """The audit's files in `out`, each written atomically."""
    from . import plots

    paths = {"json": out / "audit.json", "probabilities": out / "out_of_fold.npz"}
    files.write_json(paths["json"], result.to_dict())

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=result.probabilities, labels=pool.labels,
                                split=np.array(SPLITS)[pool.split], index=pool.index)

    files.atomic_write(paths["probabilities"], save)
    position = {(s, int(i)): k for k, (s, i) in enumerate(zip(pool.split, pool.index))}

    def image(rec: dict[str, Any]) -> np.ndarray:
        return pool.images[position[(SPLITS.index(rec["split"]), rec["index"])]]

    def issue_gallery(recs: list[dict[str, Any]], path: Path, title: str, cols: int = 8) -> Path:
        captions = [f"{r['split']} {r['index']}\ngiven: {r['given']}\nsuggested: {r['suggested']}\n"
                    f"{100 * r['confidence']:.1f}%" for r in recs]
        colors = ["tab:blue" if r.get("flipped") else "black" for r in recs]
        return plots.gallery(np.array([image(r) for r in recs]).reshape(-1, 28, 28), captions, path, title,
                             cols=cols, colors=colors)

    worst = result.issues[:WORST]
    paths["label_issues"] = issue_gallery(
        worst, out / "label_issues.png", f"The {len(worst)} likeliest label errors of {len(result.issues)} flagged "
        "(confidence: the out-of-fold probability of the suggested class)"
        + ("; blue: flipped on purpose (--flip)" if result.flip else ""))
    test = [r for r in result.issues if r["split"] == "test"]
    shown = f"the likeliest {TEST_SHOWN} of {len(test)}" if len(test) > TEST_SHOWN else f"all {len(test)}"
    paths["label_issues_test"] = issue_gallery(
        test[:TEST_SHOWN], out / "label_issues_test.png", f"Test images flagged as likely label errors: {shown}, "
        "likeliest first (confidence: the out-of-fold probability of the suggested class)", cols=10)
    across = [d for d in result.duplicates if d["where"] == "across"][:PAIRS]
    pictures, captions = [], []
    for d in across:
        for im in d["images"][:2]:
            pictures.append(image(im))
            captions.append(f"{im['split']} {im['index']}\n{im['label']}\nsimilarity {d['similarity']:.4f}")
    paths["duplicates_across"] = plots.gallery(
        np.array(pictures).reshape(-1, 28, 28), captions, out / "duplicates_across.png",
        f"Duplicates across the train and test files: {len(across)} of "
        f"{sum(d['where'] == 'across' for d in result.duplicates)} pairs, side by side", cols=8)
    return paths
