"""Figures and the report, made from tiny runs on synthetic data."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmnist import config, train
from fmnist.config import TrainConfig

FIGURES = ["curves.png", "samples.png", "neuron_50.png", "neuron_7.png", "neuron_50.gif", "neuron_7.gif",
           "confusion_matrix.png", "mistakes.png", "neurons_atlas.png"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("plots")
    tiny = make_dataset(root / "tiny")
    cfg = TrainConfig(data_dir=str(tiny), out_dir=str(root), name="mlp", hidden=[64, 16], epochs=3, batch_size=64,
                      val_size=100, device="cpu", track_neurons=[50, 7], plots=True)
    return train.fit(cfg), tiny


def not_blank(path) -> None:
    img = Image.open(path)
    img.load()
    arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert min(img.size) >= 100, f"{path.name} is tiny: {img.size}"
    assert arr.std() > 5, f"{path.name} looks blank"


def test_every_figure_is_written_and_decodes(mlp_run):
    run, _ = mlp_run
    for name in FIGURES:
        p = run.dir / "plots" / name
        assert p.is_file(), name
        not_blank(p)


def test_gif_has_one_frame_per_snapshot(mlp_run):
    run, _ = mlp_run
    gif = Image.open(run.dir / "plots" / "neuron_50.gif")
    assert gif.n_frames == 4  # epochs 0..3
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    assert not np.array_equal(frames[0], frames[-1])  # the weights moved


def test_report_references_resolve_and_nothing_external(mlp_run):
    run, _ = mlp_run
    text = (run.dir / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', text)
    assert {s.split("/")[-1] for s in srcs} >= set(FIGURES)
    for s in srcs:
        assert (run.dir / s).is_file(), s
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "Test accuracy" in text or "test accuracy" in text
    assert "<table>" in text and "hidden = [64, 16]" in text


@pytest.mark.slow
def test_plot_command_redraws(mlp_run, tmp_path):
    run, tiny = mlp_run
    (run.dir / "plots" / "curves.png").unlink()
    r = subprocess.run([sys.executable, "-m", "fmnist", "plot", str(run.dir), "--data-dir", str(tiny)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    not_blank(run.dir / "plots" / "curves.png")


def test_plot_on_a_folder_that_is_not_a_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fmnist", "plot", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a finished fmnist run" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_plots_flag(tiny_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="np", hidden=[64], epochs=1,
                      val_size=100, device="cpu", plots=False)
    run = train.fit(cfg)
    assert not (run.dir / "plots").exists() and not (run.dir / "report.html").exists()


def test_cnn_shows_filters(tiny_dir, tmp_path):
    cfg = dataclasses.replace(config.preset("cnn-fast"), data_dir=str(tiny_dir), out_dir=str(tmp_path), name="cnn",
                              epochs=1, val_size=100, device="cpu", channels=[8, 16])
    run = train.fit(cfg)
    for name in ("neuron_1.png", "neuron_8.gif", "neurons_atlas.png"):
        not_blank(run.dir / "plots" / name)
    assert np.load(run.dir / "neurons.npz")["neuron_1"].shape == (2, 3, 3)


def test_tensorboard_logs(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="tb", hidden=[64], epochs=2,
                      val_size=100, device="cpu", plots=False, tensorboard=True)
    run = train.fit(cfg)
    acc = EventAccumulator(str(run.dir / "tb"))
    acc.Reload()
    assert len(acc.Scalars("accuracy/val")) == 2
    assert {"loss/train", "loss/val", "lr"} <= set(acc.Tags()["scalars"])
    assert "neuron_50" in acc.Tags()["images"]


def test_tensorboard_missing_says_how_to_get_it(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="tb", hidden=[64], epochs=1,
                      val_size=100, device="cpu", plots=False, tensorboard=True)
    with pytest.raises(train.TrainError, match=r"pip install 'fmnist\[tensorboard\]'"):
        train.fit(cfg)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_three_epoch_run_leaves_every_figure(real_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fmnist", "train", "--epochs", "3", "--track-neurons", "50,7",
                        "--data-dir", str(real_dir), "--out-dir", str(tmp_path), "--name", "r", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    for name in FIGURES:
        not_blank(run / "plots" / name)
    assert Image.open(run / "plots" / "neuron_50.gif").n_frames == 4
    text = (run / "report.html").read_text()
    for s in re.findall(r'src="([^"]+)"', text):
        assert (run / s).is_file()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".pdf", ".svg"])
def test_samples_in_every_format_even_with_few_images_per_class(tmp_path, suffix):
    from conftest import synthetic

    from fmnist import plots, runs

    images, labels = synthetic(25, 0)  # two or three images per class: fewer than a row holds
    labels[labels == 9] = 8  # and one class with none at all
    path = plots.samples(images, labels, tmp_path / f"s{suffix}")
    assert path.stat().st_size > 1000
    assert runs.made_by_fmnist(path) == (suffix == ".png")  # PNGs carry fmnist's name; others are not overwritten


@pytest.mark.slow
def test_a_thousand_snapshots_are_subsampled_and_the_title_says_so(tmp_path, monkeypatch):
    import time

    from fmnist import plots

    snaps = np.random.default_rng(0).normal(size=(1000, 28, 28)).astype(np.float32)
    seen = {}
    real = plots.save_figure

    def keep(fig, path):
        seen["panels"] = sum(1 for ax in fig.axes if ax.images)
        seen["title"] = fig._suptitle.get_text()
        seen["epochs"] = [ax.get_title() for ax in fig.axes if ax.images]
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    started = time.perf_counter()
    plots.neuron_evolution(snaps, 3, tmp_path / "n.png")
    plots.neuron_gif(snaps, 3, tmp_path / "n.gif")
    assert time.perf_counter() - started < 30  # two minutes before
    assert seen["panels"] == plots.MAX_PANELS and "35 of its 1000 snapshots" in seen["title"]
    assert seen["epochs"][0] == "initial (epoch 0)" and seen["epochs"][-1] == "epoch 999"
    assert Image.open(tmp_path / "n.gif").n_frames == plots.MAX_FRAMES
    not_blank(tmp_path / "n.png")


@pytest.mark.slow
def test_a_history_with_an_impossible_epoch_is_damaged_not_a_traceback(mlp_run, tmp_path):
    import json
    import shutil

    run, tiny = mlp_run
    copy = tmp_path / "copy"
    shutil.copytree(run.dir, copy)
    rows = [json.loads(line) for line in (copy / "history.jsonl").read_text().splitlines()]
    for key, value, words in (("epoch", 1e308, "epoch 1e+308, not a whole number"),
                              ("val_loss", 1e308, "val_loss 1e+308"), ("train_acc", 3.0, "train_acc 3")):
        bad = [dict(r) for r in rows]
        bad[1][key] = value
        (copy / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
        r = subprocess.run([sys.executable, "-m", "fmnist", "plot", str(copy), "--data-dir", str(tiny)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "is damaged: line 2 holds " + words in r.stderr, r.stderr
