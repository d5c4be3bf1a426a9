"""Fashion-MNIST on disk and in memory.

The data flows one way: the four IDX files are located (or downloaded and
verified), read and validated into uint8 arrays, split into train / validation
(stratified, seeded) and test, and served either by the plain per-sample
`FashionMNIST` Dataset or by the fast `BatchLoader`, which keeps a whole split
on the device as one uint8 tensor and augments whole batches at once.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import DataError
from .files import FILE_MODE

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN = 0.2860  # train split (60,000 images), pixels scaled to [0, 1]
STD = 0.3530  # same

# The dataset's official location (Zalando Research).
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# split -> (images file, labels file); names as published, without ".gz"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60_000, "test": 10_000}

# SHA-256 of the *decompressed* bytes, computed once from the real files, so a
# copy that a distribution recompressed (different .gz bytes) still verifies.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# the decompressed size of each file (IDX header + one byte per pixel or label): no genuine file inflates further,
# so a download or file that does is refused at this size instead of being inflated in memory (a gzip bomb)
SIZES = {name: (16 + COUNTS[split] * 28 * 28 if i == 0 else 8 + COUNTS[split])
         for split, names in FILES.items() for i, name in enumerate(names)}

MAX_IDX_BYTES = max(SIZES.values())  # the most read from one IDX file

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu: dataset-fashion-mnist
LOCAL_DIR = Path("data/fashion-mnist")  # relative to the working directory

# IDX type code -> numpy dtype (big-endian as the format prescribes)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------- IDX reading

def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (detected by magic, not name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            source = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
            start = source.read(4)
            if len(start) == 4 and start[:2] == b"\0\0" and start[2] in _IDX_TYPES:
                shape = source.read(4 * start[3])
                dims = [int.from_bytes(shape[i:i + 4], "big") for i in range(0, len(shape) - 3, 4)]
                declared = math.prod(dims) * np.dtype(_IDX_TYPES[start[2]]).itemsize
                start += shape
            else:
                declared = 0  # not IDX: parse_idx says so from these first bytes
            # one byte beyond what the header declares, enough for parse_idx to call the file longer than declared,
            # and never beyond the largest Fashion-MNIST file: a gzip bomb is not inflated into memory
            body = source.read(min(declared, MAX_IDX_BYTES) + 1)
            if source is not f and len(body) > declared:  # more than declared: a damaged deflate stream can
                seen = len(body)  # inflate to more; its check at the end tells (read on, a MiB at a time, kept not)
                while seen <= MAX_IDX_BYTES and (chunk := source.read(1 << 20)):
                    seen += len(chunk)
            if len(body) > MAX_IDX_BYTES:
                raise DataError(f"{path} holds more than {MAX_IDX_BYTES:,} bytes of IDX data, more than any "
                                "Fashion-MNIST file: it is not one.")
            return start + body
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an IDX file.") from None
    except DataError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"{path}: cannot be read as IDX or gzipped IDX ({reason}); replace it, for example "
                        "with `fmnist data --download`.") from None


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array, checking magic, type code, dims and size."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (wrong magic number).")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{name}: unknown IDX type code 0x{code:02x}.")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{name}: IDX header is truncated or declares no dimensions.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a forged header cannot overflow them
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        found = f"found {body} bytes" if body < expected else "found more"  # a file is read no further than that
        raise DataError(f"{name}: file is {'truncated' if body < expected else 'longer than declared'}: header "
                        f"declares {dims} ({expected} bytes of data), {found}.")
    # A writable copy in native byte order: torch cannot wrap read-only or big-endian arrays.
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzipped IDX file into a numpy array; a bad file raises DataError."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of `split` ("train" or "test")."""
    directory = Path(directory)
    arrays = []
    for stem in FILES[split]:
        p = _find_file(directory, stem)
        if p is None:
            raise DataError(f"{directory / stem}[.gz] is missing.")
        arrays.append((p, read_idx(p)))
    (ip, images), (lp, labels) = arrays
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{ip}: expected uint8 images of 28x28, found {images.dtype} {images.shape}.")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{lp}: expected a 1-D uint8 label file, found {labels.dtype} {labels.shape}.")
    if len(images) != len(labels):
        raise DataError(f"{ip} holds {len(images)} images but {lp} holds {len(labels)} labels.")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{lp}: label {int(labels.max())} is outside 0..9.")
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------- finding the data

def cache_dir() -> Path:
    """Per-user cache for downloads: $XDG_CACHE_HOME/fmnist or ~/.cache/fmnist."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist" / "fashion-mnist"


def has_files(directory: Path) -> bool:
    return all(_find_file(directory, s) is not None for pair in FILES.values() for s in pair)


def candidates(data_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """The places searched, in order, each with where it came from."""
    if data_dir is not None:  # an explicit choice is the only candidate: no silent fallback
        return [(Path(data_dir), "--data-dir")]
    if os.environ.get("FMNIST_DATA"):
        return [(Path(os.environ["FMNIST_DATA"]), "FMNIST_DATA")]
    return [
        (LOCAL_DIR, "working directory"),
        (cache_dir(), "user cache"),
        (SYSTEM_DIR, "system package dataset-fashion-mnist"),
    ]


def locate(data_dir: str | Path | None = None) -> Path:
    """The first directory holding all four files; DataError listing the places tried."""
    tried = candidates(data_dir)
    for path, _ in tried:
        if has_files(path):
            return path
    places = ", ".join(f"{p} ({why})" for p, why in tried)
    raise DataError(
        f"Fashion-MNIST not found in {places}; get it with `fmnist data --download` "
        f"or `apt-get install dataset-fashion-mnist`, or point --data-dir/FMNIST_DATA at the four IDX files."
    )


def _sha256_or_none(path: Path, limit: int | None = None) -> str | None:
    """SHA-256 of the decompressed content, inflated as a stream a MiB at a time; None when the file cannot be read
    or inflates beyond `limit` bytes (then no more than that was ever inflated)."""
    h, n = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            source = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
            while chunk := source.read(1 << 20):
                n += len(chunk)
                if limit is not None and n > limit:
                    return None
                h.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, ValueError):
        return None
    return h.hexdigest()


def verify(directory: str | Path) -> dict[str, bool]:
    """SHA-256 check of each of the four files (decompressed); False when absent or wrong."""
    directory = Path(directory)
    result = {}
    for stem, digest in SHA256.items():
        p = _find_file(directory, stem)
        result[stem] = p is not None and _sha256_or_none(p, SIZES.get(stem)) == digest
    return result


# ---------------------------------------------------------------- download

def _fetch(url: str, dest: Path, progress: bool, timeout: float) -> None:
    """Stream `url` into `dest`; an incomplete body raises OSError."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.removesuffix(".part"),
                  disable=not progress, leave=False) as bar:
            got = 0
            while chunk := r.read(1 << 16):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise OSError(f"connection closed after {got} of {total} bytes")


def download(dest: str | Path | None = None, base_url: str = OFFICIAL_URL, retries: int = 3,
             progress: bool = True, timeout: float = 60.0, backoff: float = 1.0) -> Path:
    """Fetch the four .gz files into `dest` (the user cache by default), verified.

    Each file goes to a temporary name, is checked against its SHA-256 and only
    then renamed into place, so an interrupted download never leaves a file that
    looks complete. Files already present and valid are kept.
    """
    dest = Path(dest) if dest is not None else cache_dir()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {dest}: {e.strerror or e}.") from None
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for stem, digest in SHA256.items():
        final = dest / (stem + ".gz")
        if final.is_file() and _sha256_or_none(final, SIZES.get(stem)) == digest:
            continue  # already here and verified; a damaged or foreign file is downloaded again
        problem = ""
        for attempt in range(retries):
            fd, tmp = tempfile.mkstemp(prefix=stem + ".", suffix=".part", dir=dest)
            os.close(fd)
            tmp = Path(tmp)
            try:
                _fetch(base_url + stem + ".gz", tmp, progress, timeout)
                got = _sha256_or_none(tmp, SIZES.get(stem))
                if got == digest:
                    os.chmod(tmp, FILE_MODE)
                    os.replace(tmp, final)
                    break
                problem = (f"the file is not valid gzip or inflates beyond the {SIZES.get(stem, 0):,} bytes of the "
                           "real file" if got is None else "checksum mismatch (the file is damaged or not the real "
                           "data)")
            except (urllib.error.URLError, OSError, ValueError) as e:
                problem = str(getattr(e, "reason", e))
            finally:
                tmp.unlink(missing_ok=True)
            if attempt + 1 < retries:
                time.sleep(backoff * 2 ** attempt)
        else:
            raise DataError(f"download of {base_url}{stem}.gz failed after {retries} tries: {problem}.")
    return dest


# ---------------------------------------------------------------- splits

@dataclass
class Splits:
    """uint8 images (N, 28, 28) and int64 labels for train, val and test."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    directory: Path
    digest: str = ""  # SHA-256 of the four files' arrays: which data this is, wherever it lies


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): val_size images drawn evenly from each class, seeded."""
    if not 0 <= val_size < len(labels):
        raise DataError(f"validation size {val_size} must be between 0 and {len(labels) - 1}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder apportionment so the per-class quotas add up to val_size exactly.
    exact = counts / counts.sum() * val_size
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: val_size - quota.sum()]] += 1
    val = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)
    ]) if val_size else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), bool)
    mask[val] = False
    return np.flatnonzero(mask), np.sort(val)


def load(data_dir: str | Path | None = None, val_size: int = 5000, split_seed: int = 0) -> Splits:
    """Locate, read, check and split the data."""
    directory = locate(data_dir)
    xtr, ytr = load_split(directory, "train")
    xte, yte = load_split(directory, "test")
    check_sizes(directory, len(ytr), len(yte), val_size)
    tr, va = stratified_split(ytr, val_size, split_seed)
    digest = hashlib.sha256()
    for a in (xtr, ytr, xte, yte):  # about 0.1 s for the real files
        digest.update(np.ascontiguousarray(a))
    t = torch.from_numpy
    return Splits(
        train=(t(xtr[tr]), t(ytr[tr])),
        val=(t(xtr[va]), t(ytr[va])),
        test=(t(xte), t(yte)),
        directory=directory,
        digest=digest.hexdigest(),
    )


MIN_TRAIN = 10  # training images left after the validation split: fewer cannot train anything


def check_sizes(directory: Path, n_train: int, n_test: int, val_size: int) -> None:
    """Sizes that parse but make no sense are errors before training, not surprises after it."""
    if n_train == 0 or n_test == 0:
        which = "training" if n_train == 0 else "test"
        raise DataError(f"the {which} files in {directory} hold no images.")
    if n_train < n_test:
        raise DataError(f"the training files in {directory} hold fewer images ({n_train:,}) than the test files "
                        f"({n_test:,}); are the train and t10k files swapped? (Fashion-MNIST has "
                        f"{COUNTS['train']:,} and {COUNTS['test']:,}.)")
    if val_size > n_train - MIN_TRAIN:
        raise DataError(f"--val-size {val_size:,} leaves fewer than {MIN_TRAIN} of the {n_train:,} training images "
                        f"in {directory} to train on; choose at most {max(n_train - MIN_TRAIN, 1):,}.")


# ---------------------------------------------------------------- the plain path

def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 28, 28) -> float32 standardised with the train MEAN/STD: (x/255 - MEAN)/STD."""
    return images.float().mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)


class FashionMNIST(torch.utils.data.Dataset):
    """Per-sample Dataset: item i is (normalised 1x28x28 float tensor, label).

    `transform`, if given, is applied to the normalised tensor. This is the
    plain, obviously-correct path, and the oracle that the BatchLoader is
    tested against.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels, self.transform = images, labels, transform

    @classmethod
    def from_dir(cls, data_dir: str | Path | None = None, split: str = "train",
                 transform: Callable | None = None) -> FashionMNIST:
        x, y = load_split(locate(data_dir), split)
        return cls(torch.from_numpy(x), torch.from_numpy(y), transform)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = normalize(self.images[i]).unsqueeze(0)  # (1, 28, 28)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


# ---------------------------------------------------------------- the fast path

@dataclass(frozen=True)
class Augment:
    """Batched augmentation switches; each draw is independent per image."""

    flip: bool = False  # horizontal flip with probability 1/2
    translate: int = 0  # shift by up to this many pixels in x and y (zero fill)
    erase: float = 0.0  # probability of erasing one random rectangle (set to the mean)
    photo: float = 0.0  # probability of a photo-like perturbation (see `photo_batch`)

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.erase > 0 or self.photo > 0


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch (B, 28, 28); returns uint8 for flip/translate/photo.

    Erasing is applied later, on the normalised batch (see `erase_batch`).
    """
    b, h, w = x.shape
    dev = x.device
    if aug.flip:
        flip = torch.rand(b, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    if aug.translate > 0:
        k = aug.translate
        padded = torch.nn.functional.pad(x, (k, k, k, k))  # (B, h+2k, w+2k), zero = background
        dy = torch.randint(0, 2 * k + 1, (b, 1), generator=gen, device=dev)
        dx = torch.randint(0, 2 * k + 1, (b, 1), generator=gen, device=dev)
        rows = (dy + torch.arange(h, device=dev))[:, :, None].expand(b, h, w + 2 * k)
        x = padded.gather(1, rows)  # (B, h, w+2k)
        cols = (dx + torch.arange(w, device=dev))[:, None, :].expand(b, h, w)
        x = x.gather(2, cols)  # (B, h, w)
    if aug.photo > 0:
        x = photo_batch(x, aug.photo, gen)
    return x


# What a photo leaves after the photo pipeline (find the product, flatten the background, invert, 28x28), in
# pixel levels of the inverted image (0 = background, 255 = the brightest product pixel): the ranges of the
# uniform draws of `photo_params`. Each chosen image gets all of them at once, each at its own strength.
PHOTO_ROTATE = 10.0  # degrees, either way (a slightly tilted phone)
PHOTO_SCALE = 0.1  # relative zoom, either way (the product found a little too tight or too loose)
PHOTO_GREY = 48.0  # most background level, at each of two opposite sides (grey paper, light falling off)
PHOTO_WHITE = 200.0  # least level of a full-white product pixel (contrast lost to grey paper or a dull light)
PHOTO_NOISE = 8.0  # most standard deviation of Gaussian pixel noise, in levels (sensor noise left by denoising)
PHOTO_SHADOW = 0.5  # most level of a soft shadow of the product's outline beside it, as a share of 255
PHOTO_SHADOW_SHIFT = 2.5  # most offset of that shadow in pixels, in x and in y (a drop shadow left as a grey rim)


@dataclass(frozen=True)
class PhotoParams:
    """Per-image parameters of `photo_apply`, each a float tensor of shape (B,)."""

    angle: torch.Tensor  # radians, counter-clockwise as the image is shown (row 0 at the top)
    scale: torch.Tensor  # > 1 enlarges the product
    grey0: torch.Tensor  # background level where the gradient starts ...
    grey1: torch.Tensor  # ... and where it ends
    direction: torch.Tensor  # radians: the gradient runs from grey0 to grey1 along this direction (x right, y down)
    white: torch.Tensor  # the level a 255 pixel becomes
    sigma: torch.Tensor  # noise standard deviation, in levels
    shadow: torch.Tensor  # the shadow's level, as a share of 255
    shadow_dx: torch.Tensor  # the shadow's offset in pixels, right ...
    shadow_dy: torch.Tensor  # ... and down

    def select(self, k: torch.Tensor) -> PhotoParams:
        return PhotoParams(*(getattr(self, f)[k] for f in self.__dataclass_fields__))


def photo_params(b: int, gen: torch.Generator, device: torch.device | str = "cpu") -> PhotoParams:
    """Draw the parameters of `b` images, uniform in the PHOTO_ ranges: one (B, 10) draw from `gen`."""
    u = torch.rand(b, 10, generator=gen, device=device)
    return PhotoParams(angle=(2 * u[:, 0] - 1) * math.radians(PHOTO_ROTATE), scale=1 + (2 * u[:, 1] - 1) * PHOTO_SCALE,
                       grey0=u[:, 2] * PHOTO_GREY, grey1=u[:, 3] * PHOTO_GREY, direction=u[:, 4] * 2 * math.pi,
                       white=PHOTO_WHITE + u[:, 5] * (255 - PHOTO_WHITE), sigma=u[:, 6] * PHOTO_NOISE,
                       shadow=u[:, 7] * PHOTO_SHADOW, shadow_dx=(2 * u[:, 8] - 1) * PHOTO_SHADOW_SHIFT,
                       shadow_dy=(2 * u[:, 9] - 1) * PHOTO_SHADOW_SHIFT)


def photo_apply(x: torch.Tensor, prm: PhotoParams, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Perturb every image of a uint8 batch (B, h, w) as `prm` says; uint8 out.

    In order: a turn and a zoom about the centre (one bilinear `grid_sample` for the batch with a matrix per
    image, zero outside); a shadow (the turned product's outline, moved by (shadow_dx, shadow_dy), blurred by
    two 3x3 means and at level `shadow`) wherever it is brighter than the product; the background lifted to a
    linear gradient from grey0 to grey1 and the product's levels squeezed between it and `white`; `sigma` x
    `noise` (standard normal, (B, h, w)) added; rounded and clipped to 0-255.
    """
    b, h, w = x.shape
    dev = x.device
    # Pixel centres in grid_sample's coordinates (align_corners=False): x right, y down, both in (-1, 1).
    ys = ((torch.arange(h, device=dev) * 2 + 1) / h - 1)[None, :, None]  # (1, h, 1)
    xs = ((torch.arange(w, device=dev) * 2 + 1) / w - 1)[None, None, :]  # (1, 1, w)
    # Each output pixel samples the input at the inverse of "turn by angle, zoom by scale": with y down, a
    # counter-clockwise turn on screen samples at R(angle) (x, y) / scale. (Written out: affine_grid costs
    # five times the sampling itself on a CPU.)
    cos = (torch.cos(prm.angle) / prm.scale)[:, None, None]
    sin = (torch.sin(prm.angle) / prm.scale)[:, None, None]
    grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], -1)  # (B, h, w, 2)
    # The shadow samples the same turn at points moved back by its offset, so it lands that far away.
    back = torch.stack([prm.shadow_dx * 2 / w, prm.shadow_dy * 2 / h], -1)[:, None, None, :]  # (B, 1, 1, 2)
    both = torch.nn.functional.grid_sample(x.float()[:, None].div_(255), torch.cat([grid, grid - back], 1),
                                           mode="bilinear", padding_mode="zeros", align_corners=False)  # (B,1,2h,w)
    f = both[:, 0, :h]  # (B, h, w) in [0, 1]
    outline = both[:, :, h:].mul(8).clamp_(max=1)  # (B, 1, h, w): 1 wherever the product is more than faint
    for _ in range(2):
        outline = torch.nn.functional.avg_pool2d(outline, 3, stride=1, padding=1, count_include_pad=False)
    f = torch.maximum(f, outline[:, 0].mul_(prm.shadow[:, None, None]))
    # The background: the position along `direction`, -1 to 1 across the image, as a fraction t in [0, 1].
    t = (xs * torch.cos(prm.direction)[:, None, None] + ys * torch.sin(prm.direction)[:, None, None])
    t = t.add_(1).mul_(0.5).clamp_(0, 1)  # (B, h, w)
    level = torch.lerp(prm.grey0[:, None, None], prm.grey1[:, None, None], t)
    out = torch.lerp(level, prm.white[:, None, None].expand(b, h, w), f)
    if noise is not None:
        out = noise.mul(prm.sigma[:, None, None]).add_(out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def photo_batch(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Each image of a uint8 batch (B, h, w) given a photo-like perturbation with probability `p` (see the
    PHOTO_ ranges): what the photo pipeline leaves of a grey, unevenly lit, noisy, tilted photo. The others
    are returned bit for bit."""
    b, h, w = x.shape
    chosen = torch.rand(b, generator=gen, device=x.device) < p
    prm = photo_params(b, gen, x.device)
    k = torch.nonzero(chosen)[:, 0]
    if len(k) == 0:
        return x
    noise = torch.randn(len(k), h, w, generator=gen, device=x.device)
    return x.index_copy(0, k, photo_apply(x[k], prm.select(k), noise))


def erase_batch(x: torch.Tensor, p: float, gen: torch.Generator,
                area: tuple[float, float] = (0.02, 0.25)) -> torch.Tensor:
    """Random erasing on a normalised batch (B, h, w): one rectangle per chosen image set to 0 (the mean)."""
    b, h, w = x.shape
    dev = x.device
    u = torch.rand(b, 5, generator=gen, device=dev)
    chosen = u[:, 0] < p
    frac = area[0] + (area[1] - area[0]) * u[:, 1]
    aspect = torch.exp((u[:, 2] - 0.5) * 2 * 1.0986)  # log-uniform in [1/3, 3]
    eh = (torch.sqrt(frac * aspect) * h).round().clamp(1, h).long()
    ew = (torch.sqrt(frac / aspect) * w).round().clamp(1, w).long()
    y0 = (u[:, 3] * (h - eh + 1)).long()
    x0 = (u[:, 4] * (w - ew + 1)).long()
    r = torch.arange(h, device=dev)[None, :, None]
    c = torch.arange(w, device=dev)[None, None, :]
    box = ((r >= y0[:, None, None]) & (r < (y0 + eh)[:, None, None])
           & (c >= x0[:, None, None]) & (c < (x0 + ew)[:, None, None]) & chosen[:, None, None])
    return x.masked_fill(box, 0.0)


def epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The seed of epoch `epoch`'s random draws in a run of `seed`: the one formula bit-equal resume rests on.

    Without `rank`: the draws every process shares (the shuffle, dropout). With it: rank `rank`'s own
    augmentation draws under torchrun. Inside int64 for any seed up to 2**32 - 1 and epoch up to 100,000.
    """
    base = seed * 1_000_003 + epoch
    return base if rank is None else base * 1009 + rank + 1


class BatchLoader:
    """A whole split on the device as one uint8 tensor, served in batches.

    Yields (x, y) with x float (B, 1, 28, 28) normalised and y int64 (B,).
    The shuffle and the augmentation draws of epoch e depend only on
    (seed, e), so any epoch can be replayed exactly (this is what makes a
    resumed run equal an uninterrupted one). No worker processes: on this
    dataset the per-sample DataLoader is the bottleneck, not the model.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
                 shuffle: bool = False, augment: Augment = Augment(), seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        # With several processes (torchrun), every rank draws the same permutation, cuts the same global
        # batches of `batch_size` images, and serves its own contiguous part of each; `global_count` is the
        # size of the global batch just served (the loss is scaled by it, so that the gradients that
        # DistributedDataParallel averages are those of one process at the global batch).
        self.rank, self.world_size, self.global_count = rank, world_size, 0
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.max_batches = seed, drop_last, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        return g

    def order(self, gen: torch.Generator | None = None) -> torch.Tensor:
        """The sample order of the current epoch."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=gen or self._generator(), device=self.device)

    def _batches(self) -> int:
        n = len(self.labels)
        if self.drop_last:
            return n // self.batch_size
        full = -(-n // self.batch_size)
        if full >= 2 and 0 < n % self.batch_size < 2 * self.world_size:
            full -= 1  # a last batch that would give a rank one image joins the one before: batch norm cannot
        return full    # train on one image

    def __len__(self) -> int:
        full = self._batches()
        return min(full, self.max_batches) if self.max_batches is not None else full

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self._generator()
        idx = self.order(gen)
        if self.world_size > 1:  # the permutation is shared; each rank's augmentation draws are its own
            gen = torch.Generator(device=self.device)
            gen.manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        last = self._batches() - 1
        for i in range(len(self)):
            end = len(idx) if i == last and not self.drop_last else (i + 1) * self.batch_size
            j = idx[i * self.batch_size:end]
            self.global_count = len(j)
            if self.world_size > 1:
                j = j[distributed.shard(len(j), self.rank, self.world_size)]
            x = self.images[j]
            if self.augment.active:
                x = augment_batch(x, self.augment, gen)
            x = normalize(x)
            if self.augment.erase > 0:
                x = erase_batch(x, self.augment.erase, gen)
            yield x.unsqueeze(1), self.labels[j]
