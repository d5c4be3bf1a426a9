from __future__ import annotations

import dataclasses
import gzip
import math

import numpy as np
import pytest
import torch
from conftest import idx_bytes, make_dataset, synthetic, write_idx

from fmnist import data
from fmnist.data import Augment, BatchLoader, DataError, FashionMNIST

# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    x, _ = synthetic(20, 0)
    p = write_idx(tmp_path / "img", x, gz=gz)
    np.testing.assert_array_equal(data.read_idx(p), x)


def test_gzip_detected_by_content_not_name(tmp_path):
    x, _ = synthetic(5, 0)
    p = tmp_path / "images-no-suffix"
    p.write_bytes(gzip.compress(idx_bytes(x)))
    np.testing.assert_array_equal(data.read_idx(p), x)


def test_truncated_file(tmp_path):
    x, _ = synthetic(10, 0)
    p = tmp_path / "img"
    p.write_bytes(idx_bytes(x)[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)


def test_truncated_gzip_stream(tmp_path):
    x, _ = synthetic(50, 0)
    p = tmp_path / "img.gz"
    p.write_bytes(gzip.compress(idx_bytes(x))[:-500])
    with pytest.raises(DataError, match=str(p)):
        data.read_idx(p)


def test_wrong_magic(tmp_path):
    x, _ = synthetic(3, 0)
    p = tmp_path / "img"
    p.write_bytes(idx_bytes(x, magic=b"\x12\x34"))
    with pytest.raises(DataError, match="magic"):
        data.read_idx(p)


def test_unknown_type_code(tmp_path):
    x, _ = synthetic(3, 0)
    p = tmp_path / "img"
    p.write_bytes(idx_bytes(x, type_code=0x42))
    with pytest.raises(DataError, match="type code 0x42"):
        data.read_idx(p)


def test_longer_than_declared(tmp_path):
    x, _ = synthetic(3, 0)
    p = tmp_path / "img"
    p.write_bytes(idx_bytes(x) + b"\x00" * 7)
    with pytest.raises(DataError, match="longer than declared"):
        data.read_idx(p)


def test_mismatched_counts(tmp_path):
    d = make_dataset(tmp_path / "d")
    _, y = synthetic(599, 1)
    write_idx(d / "train-labels-idx1-ubyte", y)
    with pytest.raises(DataError, match="600 images but .* 599 labels"):
        data.load_split(d, "train")


def test_labels_out_of_range(tmp_path):
    d = make_dataset(tmp_path / "d")
    _, y = synthetic(600, 1)
    y[17] = 10
    write_idx(d / "train-labels-idx1-ubyte", y)
    with pytest.raises(DataError, match="label 10 is outside 0..9"):
        data.load_split(d, "train")


def test_wrong_image_shape(tmp_path):
    d = make_dataset(tmp_path / "d")
    write_idx(d / "train-images-idx3-ubyte", np.zeros((600, 28, 27), np.uint8))
    with pytest.raises(DataError, match="28x28"):
        data.load_split(d, "train")


# ---------------------------------------------------------------- locating


def test_locate_explicit_dir_wins(tiny_dir, monkeypatch, tmp_path):
    other = make_dataset(tmp_path / "other")
    monkeypatch.setenv("FMNIST_DATA", str(other))
    assert data.locate(tiny_dir) == tiny_dir
    assert data.locate() == other


def test_locate_explicit_dir_never_falls_back(tmp_path):
    with pytest.raises(DataError) as e:
        data.locate(tmp_path / "nothing-here")
    msg = str(e.value)
    assert "nothing-here" in msg and "--download" in msg and "dataset-fashion-mnist" in msg
    assert "\n" not in msg


def test_locate_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(DataError) as e:
        data.locate()
    for place in ("data/fashion-mnist", str(tmp_path / "cache"), str(tmp_path / "system")):
        assert place in str(e.value)


def test_locate_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", make_dataset(tmp_path / "system"))
    assert data.locate() == tmp_path / "system"
    make_dataset(data.cache_dir())
    assert data.locate() == data.cache_dir()
    make_dataset(tmp_path / "data" / "fashion-mnist", gz=False)
    assert data.locate() == data.LOCAL_DIR


# ---------------------------------------------------------------- split and Dataset


def test_stratified_split():
    labels = np.repeat(np.arange(10), 600)
    tr, va = data.stratified_split(labels, 500, seed=3)
    assert len(va) == 500 and len(tr) == 5500
    assert not set(tr) & set(va)
    assert (np.bincount(labels[va], minlength=10) == 50).all()
    tr2, va2 = data.stratified_split(labels, 500, seed=3)
    np.testing.assert_array_equal(va, va2)
    _, va3 = data.stratified_split(labels, 500, seed=4)
    assert not np.array_equal(va, va3)


def test_stratified_split_uneven_classes_adds_up():
    labels = np.array([0] * 7 + [1] * 13 + [2] * 3)
    tr, va = data.stratified_split(labels, 5, seed=0)
    assert len(va) == 5 and len(tr) == 18


def test_dataset_items_are_normalised_tensors():
    x, y = synthetic(30, 0)
    ds = FashionMNIST(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    assert len(ds) == 30
    img, label = ds[7]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert label == int(y[7])
    expected = (x[7].astype(np.float32) / 255 - data.MEAN) / data.STD
    np.testing.assert_allclose(img[0].numpy(), expected, rtol=1e-6)


def test_dataset_transform_applied():
    x, y = synthetic(4, 0)
    ds = FashionMNIST(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), transform=lambda t: t.flip(-1))
    plain = FashionMNIST(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    assert torch.equal(ds[2][0], plain[2][0].flip(-1))


# ---------------------------------------------------------------- the fast path against the oracle


@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_loader_matches_dataset(shuffle):
    x, y = synthetic(301, 5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    ds = FashionMNIST(xt, yt)
    loader = BatchLoader(xt, yt, batch_size=64, shuffle=shuffle, seed=9)
    loader.set_epoch(4)
    order = loader.order()
    xs, ys = zip(*loader)
    xs, ys = torch.cat(xs), torch.cat(ys)
    assert xs.shape == (301, 1, 28, 28) and len(loader) == 5
    expected_x = torch.stack([ds[int(i)][0] for i in order])
    expected_y = torch.tensor([ds[int(i)][1] for i in order])
    assert torch.equal(xs, expected_x)
    assert torch.equal(ys, expected_y)
    if shuffle:
        assert sorted(order.tolist()) == list(range(301)) and order.tolist() != list(range(301))


def test_batch_loader_epochs_are_reproducible_and_differ():
    x, y = synthetic(200, 5)
    aug = Augment(flip=True, translate=2, erase=0.5)
    loader = BatchLoader(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), 50, True, aug, seed=1)

    def epoch(e):
        loader.set_epoch(e)
        return torch.cat([b for b, _ in loader])

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_is_per_image():
    x = torch.from_numpy(synthetic(400, 0)[0])
    out = data.augment_batch(x, Augment(flip=True), torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 120 < int(mirrored.sum()) < 280  # about half, each drawn on its own


def test_translate_shifts_each_image_within_k():
    x = torch.zeros(300, 28, 28, dtype=torch.uint8)
    x[:, 14, 14] = 255  # one bright pixel in the middle
    out = data.augment_batch(x, Augment(translate=2), torch.Generator().manual_seed(0))
    pos = out.flatten(1).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    assert (out.flatten(1).sum(1) == 255).all()  # moved, not lost or duplicated
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # all 5x5 shifts occur


def test_erase_sets_one_rectangle_to_the_mean():
    x = torch.ones(500, 28, 28)
    out = data.erase_batch(x, 0.5, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).sum(1)
    hit = erased > 0
    assert 180 < int(hit.sum()) < 320
    for i in torch.nonzero(hit)[:20, 0]:
        rows = torch.nonzero((out[i] == 0).any(1))[:, 0]
        cols = torch.nonzero((out[i] == 0).any(0))[:, 0]
        assert erased[i] == len(rows) * len(cols)  # a filled rectangle
        assert 0.01 * 784 <= erased[i] <= 0.3 * 784


@pytest.mark.realdata
def test_real_data_loads_and_verifies(real_dir):
    assert all(data.verify(real_dir).values())
    s = data.load(real_dir)
    assert len(s.train[1]) == 55_000 and len(s.val[1]) == 5_000 and len(s.test[1]) == 10_000
    assert (torch.bincount(s.val[1]) == 500).all()
    x = s.train[0].float() / 255
    assert abs(x.mean().item() - data.MEAN) < 2e-3


@pytest.mark.realdata
def test_real_fast_loader_equals_dataset(real_dir):
    s = data.load(real_dir)
    ds = FashionMNIST(*s.val)
    loader = BatchLoader(*s.val, batch_size=1000, shuffle=True, seed=2)
    order = loader.order()
    xb, yb = next(iter(loader))
    for k in (0, 1, 999):
        img, label = ds[int(order[k])]
        assert torch.equal(xb[k], img) and int(yb[k]) == label


def test_dataset_from_dir(tiny_dir):
    ds = FashionMNIST.from_dir(tiny_dir, "test")
    x, y = data.load_split(tiny_dir, "test")
    assert len(ds) == 200
    img, label = ds[3]
    assert label == int(y[3]) and torch.equal(img[0], data.normalize(torch.from_numpy(x[3])))


def test_every_epoch_and_rank_draws_from_its_own_seed():
    """data.epoch_seed is the one formula for an epoch's draws: distinct per (seed, epoch) and per rank, inside
    int64 at the largest seed and epoch a config allows, and the one the loader's shuffle uses."""
    from fmnist.config import SEED_MAX

    seeds = {data.epoch_seed(s, e, r) for s in (0, 1, 2) for e in range(1, 50) for r in (None, 0, 1, 2)}
    assert len(seeds) == 3 * 49 * 4
    assert data.epoch_seed(SEED_MAX, 100_000, 1023) < 2**63
    x, y = torch.zeros(50, 28, 28, dtype=torch.uint8), torch.arange(50) % 10
    loader = data.BatchLoader(x, y, 10, shuffle=True, seed=7)
    loader.set_epoch(3)
    assert torch.equal(loader.order(), torch.randperm(50, generator=torch.Generator().manual_seed(
        data.epoch_seed(7, 3))))


# ---------------------------------------------------------------- photo-like augmentation

def _params(b: int = 1, **kw) -> data.PhotoParams:
    """Identity parameters for `b` images, with the named ones set (a number: the same for each image)."""
    base = dict(angle=0.0, scale=1.0, grey0=0.0, grey1=0.0, direction=0.0, white=255.0, sigma=0.0, shadow=0.0,
                shadow_dx=0.0, shadow_dy=0.0)
    base.update(kw)
    return data.PhotoParams(**{k: torch.full((b,), float(v)) for k, v in base.items()})


def _bar(b: int = 1) -> torch.Tensor:
    x = torch.zeros(b, 28, 28, dtype=torch.uint8)
    x[:, 13:15, 6:22] = 255  # a horizontal bar through the centre, 16 x 2
    return x


def test_photo_off_draws_nothing_and_leaves_batches_as_before():
    x = torch.from_numpy(synthetic(64, 0)[0])
    assert not Augment(photo=0.0).active
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = data.augment_batch(x, Augment(flip=True, photo=0.0), g)
    flip = torch.rand(64, generator=ref) < 0.5  # what flip alone draws, and nothing else
    assert torch.equal(g.get_state(), ref.get_state())
    assert torch.equal(out, torch.where(flip[:, None, None], x.flip(-1), x))


def test_photo_identity_parameters_change_nothing_and_a_quarter_turn_is_rot90():
    x = torch.from_numpy(synthetic(8, 1)[0])
    assert torch.equal(data.photo_apply(x, _params(8)), x)  # bilinear samples land on pixel centres
    bar = _bar()
    turned = data.photo_apply(bar, _params(angle=math.pi / 2))
    assert torch.equal(turned, torch.rot90(bar, 1, (1, 2)))  # counter-clockwise as shown: the bar stands up
    assert turned[0, 6:22, 13:15].eq(255).all() and turned.sum() == bar.sum()


def _bar_angle(img: torch.Tensor) -> float:
    """Angle in degrees of the principal axis of a bright shape, counter-clockwise as shown (y up)."""
    w = img.double()
    r, c = torch.meshgrid(torch.arange(28.0, dtype=torch.double), torch.arange(28.0, dtype=torch.double),
                          indexing="ij")
    m = w.sum()
    x, y = c - (w * c).sum() / m, -(r - (w * r).sum() / m)
    cxx, cyy, cxy = (w * x * x).sum() / m, (w * y * y).sum() / m, (w * x * y).sum() / m
    return math.degrees(0.5 * math.atan2(2 * cxy, cxx - cyy))


def test_photo_turns_and_zooms_by_the_drawn_amounts():
    prm = data.photo_params(200, torch.Generator().manual_seed(0))
    flat = dataclasses.replace(prm, grey0=torch.zeros(200), grey1=torch.zeros(200), white=torch.full((200,), 255.0),
                               sigma=torch.zeros(200), shadow=torch.zeros(200))
    out = data.photo_apply(_bar(200), flat)
    measured = torch.tensor([_bar_angle(im) for im in out])
    drawn = torch.rad2deg(prm.angle)
    assert (measured - drawn).abs().max() < 1.0  # degrees
    assert drawn.abs().max() <= data.PHOTO_ROTATE and drawn.min() < -8 and drawn.max() > 8
    length = (out.float() / 255).sum((1, 2)) / 2  # the bar's area / its thickness (both scale)
    ratio = (length / 16) ** 0.5  # area grows with scale squared
    assert (ratio - prm.scale).abs().max() < 0.03
    assert ((prm.scale - 1).abs() <= data.PHOTO_SCALE + 1e-6).all()


def test_photo_background_gradient_and_contrast():
    zero = torch.zeros(1, 28, 28, dtype=torch.uint8)
    out = data.photo_apply(zero, _params(grey0=10, grey1=40, direction=0)).float()[0]  # left 10 -> right 40
    assert (out == out[:1]).all()  # constant down each column
    assert out[0, 0] == 11 and out[0, -1] == 39 and (out[0].diff() >= 0).all()
    down = data.photo_apply(zero, _params(grey0=10, grey1=40, direction=math.pi / 2)).float()[0]
    assert torch.equal(down, out.T)  # direction pi/2 runs down the image
    full = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    assert data.photo_apply(full, _params(grey0=30, grey1=30, white=210)).eq(210).all()
    half = torch.full((1, 28, 28), 128, dtype=torch.uint8)  # 30 + (210 - 30) x 128/255 = 120.35
    assert data.photo_apply(half, _params(grey0=30, grey1=30, white=210)).eq(120).all()


def test_photo_noise_has_the_asked_standard_deviation():
    zero = torch.zeros(64, 28, 28, dtype=torch.uint8)
    noise = torch.randn(64, 28, 28, generator=torch.Generator().manual_seed(0))
    out = data.photo_apply(zero, _params(64, grey0=100, grey1=100, sigma=5), noise).float() - 100
    assert abs(out.mean().item()) < 0.05
    assert abs(out.std().item() - 5.0) < 0.06  # rounding adds 1/12 to the variance


def test_photo_shadow_is_a_soft_copy_on_the_side_it_is_moved_to():
    bar = _bar()  # rows 13-14, columns 6-21
    faint = bar // 4  # a dark product casts the same shadow as a bright one: its outline's
    for product in (bar, faint):
        out = data.photo_apply(product, _params(shadow=0.4, shadow_dx=2, shadow_dy=0)).float()[0]
        assert torch.equal(out[13:15, 6:22], product[0, 13:15, 6:22].float())  # the product itself stays on top
        right, left = out[12:16, 22:26], out[12:16, 0:5]
        assert right.max() > 40 and right.max() <= 0.4 * 255 + 1  # a grey rim at most `shadow` bright ...
        assert left.max() == 0 and out[:10].max() == 0 and out[18:].max() == 0  # ... only where it was moved
    down = data.photo_apply(bar, _params(shadow=0.4, shadow_dx=0, shadow_dy=2)).float()[0]
    assert down[15:17, 8:20].min() > 40 and down[:11].max() == 0


def test_photo_draws_stay_in_their_ranges():
    prm = data.photo_params(5000, torch.Generator().manual_seed(1))
    for v, lo, hi in [(prm.grey0, 0, data.PHOTO_GREY), (prm.grey1, 0, data.PHOTO_GREY),
                      (prm.white, data.PHOTO_WHITE, 255), (prm.sigma, 0, data.PHOTO_NOISE),
                      (prm.direction, 0, 2 * math.pi), (prm.shadow, 0, data.PHOTO_SHADOW),
                      (prm.shadow_dx, -data.PHOTO_SHADOW_SHIFT, data.PHOTO_SHADOW_SHIFT),
                      (prm.shadow_dy, -data.PHOTO_SHADOW_SHIFT, data.PHOTO_SHADOW_SHIFT)]:
        assert v.min() >= lo and v.max() <= hi
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo)  # the whole range is used


def test_photo_batch_perturbs_about_p_and_leaves_the_rest():
    x = torch.from_numpy(synthetic(1000, 2)[0])
    out = data.photo_batch(x, 0.3, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    changed = (out != x).flatten(1).any(1)
    assert 240 < int(changed.sum()) < 360
    assert torch.equal(data.photo_batch(x, 0.0, torch.Generator().manual_seed(0)), x)


def test_loader_with_photo_is_in_range_finite_and_reproducible():
    x, y = synthetic(128, 4)
    images, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    aug = Augment(flip=True, translate=1, erase=0.2, photo=0.5)

    def epoch(seed, e):
        loader = BatchLoader(images, labels, 64, True, aug, seed=seed)
        loader.set_epoch(e)
        return torch.cat([b for b, _ in loader])

    a = epoch(0, 1)
    assert torch.isfinite(a).all()
    assert a.min() >= -data.MEAN / data.STD - 1e-6 and a.max() <= (1 - data.MEAN) / data.STD + 1e-6
    assert torch.equal(a, epoch(0, 1))
    assert not torch.equal(a, epoch(0, 2)) and not torch.equal(a, epoch(1, 1))
    plain = BatchLoader(images, labels, 64, True, dataclasses.replace(aug, photo=0.0), seed=0)
    plain.set_epoch(1)
    assert not torch.equal(a, torch.cat([b for b, _ in plain]))


def test_training_passes_photo_aug_to_the_loader(tiny_dir, tmp_path):
    from fmnist import distributed, runs, train
    from fmnist.config import TrainConfig

    cfg = runs.resolve(TrainConfig(data_dir=str(tiny_dir), hidden=[8], epochs=1, val_size=100, device="cpu",
                                   photo_aug=0.25, translate=1, erase=0.1, track_neurons=[1]))
    t = train.build(cfg, tmp_path, distributed.World(), data.load(tiny_dir, val_size=100), torch.device("cpu"),
                    None)
    assert t.train_loader.augment == Augment(flip=True, translate=1, erase=0.1, photo=0.25)


def test_a_gzip_bomb_as_a_data_file_is_read_no_further_than_its_header_says(tmp_path):
    import gzip
    import tracemalloc
    import zlib

    x, _ = synthetic(3, 0)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    p = tmp_path / "train-images-idx3-ubyte.gz"  # a real header, then 200 MB of zeros in 200 kB
    p.write_bytes(b"".join([deflate.compress(idx_bytes(x)), *(deflate.compress(bytes(1 << 20)) for _ in range(200)),
                            deflate.flush()]))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="longer than declared"):
            data.read_idx(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # read whole, it took 200 MB
    big = np.zeros((61_000, 28, 28), np.uint8)  # declares more than any Fashion-MNIST file
    p.write_bytes(gzip.compress(idx_bytes(big), 1))
    with pytest.raises(DataError, match="more than any Fashion-MNIST file"):
        data.read_idx(p)
