"""Shared fixtures: IDX files made by the tests, and the real data when it is installed."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist import data


def idx_bytes(array: np.ndarray, type_code: int = 0x08, magic: bytes = b"\x00\x00") -> bytes:
    """Encode an array as IDX (uint8 payload)."""
    header = magic + bytes([type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True, **kw) -> Path:
    raw = idx_bytes(array, **kw)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake Fashion-MNIST: class c has a bright bar at rows 2c+2..2c+5 over noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 2: 2 * c + 6, 4:24] = 200
    return images, labels.astype(np.uint8)


def make_dataset(directory: Path, n_train: int = 600, n_test: int = 200, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = synthetic(n, seed)
        img_name, lbl_name = data.FILES[split]
        write_idx(directory / img_name, x, gz=gz)
        write_idx(directory / lbl_name, y, gz=gz)
    return directory


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A data directory with 600 train / 200 test synthetic images."""
    return make_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def real_dir() -> Path:
    try:
        return data.locate()
    except data.DataError:
        if os.environ.get("FMNIST_REQUIRE_DATA"):
            pytest.fail("FMNIST_REQUIRE_DATA is set but the real Fashion-MNIST files cannot be found")
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    """Tests choose their data explicitly; a user's FMNIST_DATA must not leak in."""
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.delenv("FMNIST_MIRROR", raising=False)


def run_fmnist(*argv: str, **kw) -> subprocess.CompletedProcess:
    """`python -m fmnist ARGV` in a real process, output captured."""
    return subprocess.run([sys.executable, "-m", "fmnist", *argv], capture_output=True, text=True, timeout=300, **kw)


def assert_one_sentence(r: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: exit code 2, one line on stderr naming `words`, no traceback."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fmnist: error: ")
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small MLP trained on synthetic data (class c is a bright bar at rows 2c+2..2c+5), with history and
    neuron snapshots: what predict, export and serve read."""
    from fmnist import train
    from fmnist.config import TrainConfig

    tmp = tmp_path_factory.mktemp("trained")
    tiny = make_dataset(tmp / "tiny")
    cfg = TrainConfig(data_dir=str(tiny), out_dir=str(tmp / "runs"), name="r", hidden=[32], epochs=3,
                      batch_size=64, val_size=100, device="cpu", plots=False, threads=1, track_neurons=[5])
    return train.fit(cfg).dir
