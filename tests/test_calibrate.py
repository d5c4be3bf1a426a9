"""Calibrated probabilities and the unsure flag: the maths against oracles, a run that stores its calibration,
and every output (Predictor, export, `fmnist predict`, `fmnist evaluate`) that applies it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fmnist import calibrate, cli, data, evaluate, models, predict, runs

# ---------------------------------------------------------------- the maths, against oracles


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_the_logits_were_made_with(true_t):
    """Labels drawn from softmax(z); the model reports z / T: fitting finds T again."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20_000, 10, generator=g)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    fitted = calibrate.fit_temperature(z / true_t, labels)
    assert fitted == pytest.approx(1 / true_t, rel=0.04)
    assert calibrate.fit_temperature(z, labels) == pytest.approx(1.0, rel=0.04)


def test_calibration_error_matches_a_hand_computation():
    # confidences 0.95, 0.95 (bin 14: one right -> accuracy 0.5, gap 0.45), 0.55 (bin 8: right, gap 0.45),
    # 0.35 (bin 5: wrong, gap 0.35): ECE = (2 * 0.45 + 0.45 + 0.35) / 4 = 0.425
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.25, 0.55, 0.20], [0.35, 0.33, 0.32]])
    labels = torch.tensor([0, 1, 1, 2])
    assert calibrate.calibration_error(probs, labels) == pytest.approx(0.425, abs=1e-6)
    table = calibrate.reliability(probs, labels)
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    np.testing.assert_allclose(table["accuracy"][[5, 8, 14]], [0.0, 1.0, 0.5])


def test_the_reliability_table_gives_the_library_s_calibration_error():
    g = torch.Generator().manual_seed(1)
    probs = (2 * torch.randn(3000, 10, generator=g)).softmax(1).clamp(max=0.999)
    labels = torch.randint(0, 10, (3000,), generator=g)
    t = calibrate.reliability(probs, labels)
    gap = float(np.sum(np.abs(t["accuracy"] - t["confidence"]) * t["count"]) / t["count"].sum())
    assert gap == pytest.approx(calibrate.calibration_error(probs, labels), abs=1e-5)


def test_mahalanobis_score_equals_the_textbook_formula():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(4000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    y = torch.randint(0, 3, (4000,), generator=g)
    stats = calibrate.fit_mahalanobis(f, y, 3)
    means = torch.stack([f[y == c].mean(0) for c in range(3)]).double()
    centred = f.double() - means[y]
    cov = centred.t() @ centred / (len(f) - 3)
    cov += calibrate.SHRINKAGE * cov.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g).double()
    want = torch.stack([((x - m) @ torch.linalg.inv(cov) * (x - m)).sum(1) for m in means], 1).amin(1)
    torch.testing.assert_close(calibrate.mahalanobis_score(x.float(), stats.whiten, stats.centres), want.float(),
                               rtol=1e-4, atol=1e-4)


def test_threshold_keeps_the_asked_share_and_fpr_counts_what_it_accepts():
    scores = torch.arange(1000.0)
    t = calibrate.threshold_for(scores)
    assert float((scores <= t).double().mean()) == pytest.approx(0.95, abs=0.002)
    assert calibrate.fpr_at_tpr(scores, torch.tensor([0.0, 10.0, 2000.0, 3000.0])) == 0.5
    assert calibrate.auroc(scores, scores + 5000) == pytest.approx(1.0)  # far beyond [0, 1]: no sigmoid ties
    assert calibrate.auroc(scores, scores) == pytest.approx(0.5)


def test_tail_score_is_the_share_of_real_scores_at_least_as_high():
    """Against oracles: the exact share on evenly spaced scores, the empirical share on a large normal sample."""
    even = torch.arange(1001.0)  # quantiles at 0, 1, ..., 1000 when K = 1001: the share above s is (1000 - s) / 1001
    table = calibrate.fit_tail(even, points=1001)
    s = torch.tensor([0.0, 250.0, 900.5, 1000.0])
    torch.testing.assert_close(calibrate.tail_score(s, table), -torch.log((1001 - s) / 1001), rtol=1e-5, atol=1e-5)
    # above the highest: the top's score plus the excess in units of (highest - median) = 500
    torch.testing.assert_close(calibrate.tail_score(torch.tensor([1250.0]), table),
                               torch.tensor([math.log(1001) + 0.5]), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(200_000, generator=g)
    table = calibrate.fit_tail(real)
    k = calibrate.TAIL_POINTS
    for q in (0.5, 0.9, 0.99):  # the share read from K quantiles: 1 at the lowest, 1 / K at the highest
        x = torch.quantile(real, q)
        assert float(calibrate.tail_score(x[None], table)) == pytest.approx(-math.log(1 - q * (k - 1) / k), rel=0.01)
    far = torch.sort(10 * torch.randn(500, generator=g)).values  # the score never falls as the part grows
    assert bool((calibrate.tail_score(far, table).diff() >= 0).all())


def _tails_entry() -> dict:
    g = torch.Generator().manual_seed(4)
    stats = {t: calibrate.fit_mahalanobis(torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g), 3)
             for t in ("pixels", "first")}
    tails = {p: calibrate.fit_tail(torch.randn(400, generator=g).exp()) for p in calibrate.COMBINED}
    return calibrate.Calibration(1.3, "tails", 2.5, stats, {}, tails).to_dict()


def test_a_tails_calibration_round_trips_and_a_damaged_one_is_refused():
    entry = _tails_entry()
    cal = calibrate.Calibration.from_dict(entry)
    g = torch.Generator().manual_seed(5)
    logits, taps = torch.randn(7, 3, generator=g), {t: torch.randn(7, 6, generator=g) for t in ("pixels", "first")}
    parts = [calibrate.energy_score(logits), cal.mahalanobis_part("pixels", taps), cal.mahalanobis_part("first", taps)]
    want = torch.stack([calibrate.tail_score(v, entry["tails"][p]) for p, v in zip(calibrate.COMBINED, parts)]).amax(0)
    torch.testing.assert_close(cal.score(logits, taps), want)
    for damage in (lambda t: t.flip(0), lambda t: t[:1], lambda t: torch.full_like(t, float("nan")), lambda t: None):
        bad = {**entry, "tails": {**entry["tails"], "first": damage(entry["tails"]["first"])}}
        with pytest.raises(ValueError, match="first part"):
            calibrate.Calibration.from_dict(bad)


def test_a_combined_entry_written_before_the_tails_score_still_loads():
    old = {k: v for k, v in _tails_entry().items() if k != "tails"}
    old.update(method="combined", scale={"energy": [-8.0, 2.0], "pixels": [700.0, 300.0], "first": [200.0, 90.0]})
    cal = calibrate.Calibration.from_dict(old)
    assert cal.method == "combined" and cal.tails == {} and cal.scale["pixels"] == (700.0, 300.0)


@pytest.mark.parametrize("name, kw", [("mlp", {"hidden": [16, 8]}), ("cnn", {"channels": [4, 8]}),
                                      ("resnet", {"channels": [4, 8], "blocks": 1})])
def test_taps_leave_the_logits_bit_identical(name, kw):
    """The test split is evaluated with the features: its figures must stay those of the plain evaluation."""
    torch.manual_seed(0)
    model = models.create(name, **kw).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                taps, logits = models.taps_and_logits(model, x, tta=True)
                assert torch.equal(logits, models.tta_logits(model, x))
        taps, logits = models.taps_and_logits(model, x)
        assert torch.equal(logits, model(x))
    assert set(taps) == set(calibrate.TAPS) and taps["pixels"].shape == (5, 784)
    assert all(t.ndim == 2 and len(t) == 5 for t in taps.values())



def test_choose_keeps_the_score_of_several_parts_unless_a_single_one_does_measurably_better():
    aurocs = dict.fromkeys(calibrate.METHODS, 0.9)
    close = {"msp": 0.90, "energy": 0.943, "mahalanobis": 0.03, "combined": 0.64, "tails": 0.932}
    assert calibrate.choose(close, aurocs, 600) == "tails"  # 1.1 points below, two standard errors are 1.9
    assert calibrate.choose(close, aurocs, 60_000) == "energy"  # the same gap is measurable on 60,000 images
    apart = {"msp": 0.20, "energy": 0.60, "mahalanobis": 0.965, "combined": 0.66, "tails": 0.69}
    assert calibrate.choose(apart, aurocs, 600) == "mahalanobis"  # cnn-fast's: a single view far ahead
    tie = dict(close, combined=0.932)
    assert calibrate.choose(tie, dict(aurocs, combined=0.95), 600) == "combined"  # then the better AUROC


def test_outlier_exposure_teaches_the_model_to_tell_kinds_it_never_saw(tiny_dir, tmp_path):
    """Trained with drawn non-products (strokes, blobs, noise, gradients, noise textures), the energy tells the
    validation non-products (shapes, textures, stripes: other kinds) from real images better than without."""
    from fmnist import train
    from fmnist.config import TrainConfig

    other = np.concatenate(list(calibrate.validation_ood(50, 0).values()))
    x, y = data.load_split(data.locate(str(tiny_dir)), "test")
    separation = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name=f"oe{weight}", hidden=[32], epochs=8,
                          batch_size=64, val_size=100, device="cpu", plots=False, threads=1,
                          outlier_exposure=weight)
        model, _, _ = runs.load_model(train.fit(cfg).dir)
        with torch.no_grad():
            real = model(data.normalize(torch.from_numpy(x)).unsqueeze(1))
            drawn = model(data.normalize(torch.from_numpy(other)).unsqueeze(1))
        assert (real.argmax(1).numpy() == y).mean() > 0.95
        separation[weight] = calibrate.auroc(calibrate.energy_score(real), calibrate.energy_score(drawn))
    assert separation[1.0] > separation[0.0] + 0.05, separation  # 0.84 -> 0.95 when written


def test_a_run_saved_before_outlier_exposure_resumes_without_it(trained_run, tmp_path):
    ckpt = runs.load_checkpoint(trained_run / "last.pt", "last")
    assert runs.checkpoint_config(ckpt, trained_run / "last.pt").outlier_exposure > 0  # today's default
    old = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "outlier_exposure"})
    assert runs.checkpoint_config(old, tmp_path / "last.pt").outlier_exposure == 0.0

# ---------------------------------------------------------------- a run that stores its calibration


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny run, for tests that change its files."""
    out = tmp_path_factory.mktemp("calibrated") / "r"
    shutil.copytree(trained_run, out)
    return out


def _test_images(run_dir: Path, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    cfg = runs.read_config(run_dir)
    x, y = data.load_split(data.locate(cfg.data_dir), "test")
    return x[:n], y[:n]


def test_the_run_stores_its_calibration_and_predictor_applies_the_temperature(run):
    ckpt = runs.load_checkpoint(run / "best.pt")
    cal = calibrate.Calibration.from_dict(ckpt["calibration"])
    summary = runs.read_summary(run)
    assert summary["temperature"] == cal.temperature and cal.temperature != 1.0
    assert summary["ood_method"] == cal.method and summary["ood_threshold"] == cal.threshold
    for key in ("test_ece", "test_ece_calibrated", "val_ece", "val_ece_calibrated", "test_unsure"):
        assert 0 <= summary[key] <= 1
    model, _, _ = runs.load_model(run)
    x, _ = _test_images(run)
    with torch.no_grad():
        logits = model(data.normalize(torch.from_numpy(x)).unsqueeze(1))
    for source in (run, run / "best.pt"):  # a run directory and a bare checkpoint
        got = predict.Predictor(source).probabilities(x)
        np.testing.assert_allclose(got, (logits / cal.temperature).softmax(1).numpy(), atol=1e-6)
        assert not np.allclose(got, logits.softmax(1).numpy(), atol=1e-4)


def test_the_threshold_keeps_about_95_percent_of_validation(run):
    model, cfg, ckpt = runs.load_model(run)
    cal = runs.load_calibration(ckpt, run)
    splits = evaluate.load_splits(cfg)
    val = evaluate.scores(model, cfg, splits.val, torch.device("cpu"), features=True)
    kept = float((cal.score(val.logits, val.features) <= cal.threshold).double().mean())
    assert kept == pytest.approx(calibrate.VAL_KEPT, abs=0.011)  # 100 images: the quantile sits between two


def test_the_exported_model_gives_the_predictor_s_calibrated_outputs(run):
    pytest.importorskip("onnxruntime")
    from fmnist import export

    result = export.export(run, "onnx")
    assert result["check"]["max_score_difference"] <= export.CHECK_TOLERANCE
    x, _ = _test_images(run)
    x = np.concatenate([x, np.full((2, 28, 28), 255, np.uint8)])  # and two that are no product
    direct, exported = predict.Predictor(run), predict.Predictor(result["path"])
    (p, s), (q, t) = direct.outputs(x), exported.outputs(x)
    np.testing.assert_allclose(q, p, atol=1e-5)
    np.testing.assert_allclose(t, s, rtol=1e-4, atol=1e-4)
    assert exported.threshold == direct.threshold is not None
    assert [direct.record(a, ood_score=b)["unsure"] for a, b in zip(p, s)] == \
        [exported.record(a, ood_score=b)["unsure"] for a, b in zip(q, t)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_computes_the_tails_score(run, tmp_path, fmt):
    """The run's calibration replaced by a tails one (fitted as training fits it): the export's check passes and
    its scores are PyTorch's."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from fmnist import export

    tails = tmp_path / "tails"
    shutil.copytree(run, tails)
    model, cfg, ckpt = runs.load_model(tails)
    every, val = evaluate.every_score(model, cfg, evaluate.load_splits(cfg), torch.device("cpu"), small=True)
    threshold = calibrate.threshold_for(every.score(val.logits, val.features, "tails"))
    cal = calibrate.Calibration(every.temperature, "tails", threshold,
                                {t: every.mahalanobis[t] for t in calibrate.needs("tails")}, {}, every.tails)
    runs.save_checkpoint({**ckpt, "calibration": cal.to_dict()}, tails / "best.pt")
    result = export.export(tails, fmt)
    assert result["check"]["max_score_difference"] <= export.CHECK_TOLERANCE
    x, _ = _test_images(tails)
    (p, s), (q, t) = predict.Predictor(tails).outputs(x), predict.Predictor(result["path"]).outputs(x)
    np.testing.assert_allclose(q, p, atol=1e-5)
    np.testing.assert_allclose(t, s, rtol=1e-4, atol=1e-4)
    assert len(np.unique(s)) > len(s) // 2  # a real spread of scores, not one constant


def _with_threshold(run: Path, threshold: float) -> None:
    ckpt = runs.load_checkpoint(run / "best.pt")
    ckpt["calibration"]["threshold"] = threshold
    runs.save_checkpoint(ckpt, run / "best.pt")


def test_unsure_records_say_so_in_json_and_in_the_table(run, tmp_path, capsys):
    from PIL import Image

    x, _ = _test_images(run, 1)
    product, solid = tmp_path / "product.png", tmp_path / "solid.png"
    Image.fromarray(x[0]).save(product)
    Image.new("RGB", (120, 90), (40, 160, 90)).save(solid)
    p = predict.Predictor(run)
    kept, refused = p.outputs(np.stack([predict.prepare(product)[0], predict.prepare(solid)[0]]))[1]
    assert kept < refused  # the score ranks a flat green sheet as less of a product than a real image
    _with_threshold(run, float((kept + refused) / 2))
    try:
        assert cli.main(["predict", str(run), str(product), str(solid), "--json", "--quiet"]) == 0
        recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["unsure"] for r in recs] == [False, True]
        assert all(isinstance(r["ood_score"], float) for r in recs)
        assert cli.main(["predict", str(run), str(product), str(solid), "--quiet"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert "does not look like a Fashion-MNIST product" in table[2] and str(solid) in table[2]
        assert f"its guess: {recs[1]['label']} {recs[1]['probability']:.2f}" in table[2]  # the guess, labelled so
        assert "does not look" not in table[1] and recs[0]["label"] in table[1]
    finally:
        _with_threshold(run, runs.read_summary(run)["ood_threshold"])


def test_fmnist_evaluate_reports_the_calibration(run, capsys):
    assert cli.main(["evaluate", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    summary = runs.read_summary(run)
    assert r["calibrated"] and r["temperature"] == summary["temperature"]
    # the same to a millionth (an error of 0.01 % can differ in its last digits: on AVX-512 the two paths round
    # the softmax apart by a few 1e-9, and relative to such a small error that failed a relative tolerance)
    assert r["ece"] == pytest.approx(summary["test_ece"], abs=1e-6) and r["ece_calibrated"] == pytest.approx(
        summary["test_ece_calibrated"], abs=1e-6)
    assert r["unsure"] == pytest.approx(summary["test_unsure"])
    assert cli.main(["evaluate", str(run)]) == 0
    assert f"temperature {summary['temperature']:.3f}" in capsys.readouterr().out


def test_an_old_run_without_calibration_still_predicts_evaluates_and_plots(run, tmp_path, capsys):
    from fmnist import report

    old = tmp_path / "old"
    shutil.copytree(run, old)
    config = (old / "config.toml").read_text()
    (old / "config.toml").write_text(config.replace("tta = true", "tta = false", 1))
    for name in ("last.pt", "best.pt"):  # trained when the default had no test-time views
        ckpt = runs.load_checkpoint(old / name)
        ckpt["config"]["tta"] = False
        runs.save_checkpoint(ckpt, old / name)
    ckpt = runs.load_checkpoint(old / "best.pt")
    del ckpt["calibration"]
    runs.save_checkpoint(ckpt, old / "best.pt")
    summary = {k: v for k, v in runs.read_summary(old).items() if "ece" not in k and "ood" not in k
               and k not in ("temperature", "test_unsure")}
    runs.write_summary(old, summary)
    x, _ = _test_images(old)
    p = predict.Predictor(old)
    assert p.threshold is None
    model, _, _ = runs.load_model(old)
    with torch.no_grad():
        logits = model(data.normalize(torch.from_numpy(x)).unsqueeze(1))
    np.testing.assert_allclose(p.probabilities(x), logits.softmax(1).numpy(), atol=1e-6)  # temperature 1
    assert [r["unsure"] for r in p.predict(list(x[:3]))] == [False] * 3
    assert cli.main(["evaluate", str(old)]) == 0
    assert "calibration: none" in capsys.readouterr().out
    drawn = report.draw(old, device="cpu")
    assert (old / "plots" / "reliability.png") in drawn


def test_a_model_exported_before_calibration_still_predicts(trained_run, tmp_path):
    """An export from before: one output (probabilities), no calibration in its metadata: never unsure."""
    from fmnist import export

    model, cfg, _ = runs.load_model(trained_run)

    class ProbabilitiesOnly(torch.nn.Module):  # what PixelClassifier returned before it gave the score too
        def __init__(self):
            super().__init__()
            self.inner = models.PixelClassifier(model)

        def forward(self, pixels):
            return self.inner(pixels)[0]

    path = tmp_path / "old.torchscript"
    export._write_torchscript(ProbabilitiesOnly().eval(), str(path), list(data.CLASSES), {"model": cfg.model})
    p = predict.Predictor(path)
    x, _ = _test_images(trained_run, 4)
    probs, scores = p.outputs(x)
    assert scores is None and probs.shape == (4, 10)
    recs = p.predict(list(x))
    assert [(r["unsure"], r["ood_score"]) for r in recs] == [(False, None)] * 4


@pytest.mark.parametrize("bar, kept, model, translate", [  # a bar every run clears, and one none does
    (-1.0, True, "cnn", 1), (1.0, False, "cnn", 1), (-1.0, True, "mlp", 0)])
def test_inference_keeps_test_time_augmentation_only_where_validation_says_it_pays(tiny_dir, tmp_path, monkeypatch,
                                                                                   bar, kept, model, translate):
    from fmnist import train
    from fmnist.config import TrainConfig

    monkeypatch.setattr(calibrate, "TTA_GAIN", bar)
    net = {"channels": [4, 8]} if model == "cnn" else {"hidden": [16]}
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="c", model=model, translate=translate,
                      tta=True, epochs=1, batch_size=64, val_size=100, plots=False, threads=1, **net)
    run = train.fit(cfg)
    s = run.summary
    views = "six" if translate else "mirror"  # the shifted views only for a network trained on shifts
    assert s["inference_tta"] is kept and -1 <= s["tta_val_gain"] <= 1
    assert s.get("inference_views") == (views if kept else None)
    assert ("test_accuracy_inference" in s) is not kept  # the test accuracy inference has, where it differs
    p = predict.Predictor(run.dir)
    x = _test_images(run.dir, 16)[0]
    model, _, _ = runs.load_model(run.dir)
    normalised = data.normalize(torch.from_numpy(x)[:, None])
    with torch.no_grad():
        if not kept:
            logits = model(normalised)
        elif views == "mirror":
            logits = (model(normalised) + model(normalised.flip(-1))) / 2
        else:
            logits = models.tta_logits(model, normalised)
    want = (logits / s["temperature"]).softmax(1).numpy()
    np.testing.assert_allclose(p.probabilities(x), want, atol=1e-5)
    cal = calibrate.Calibration.from_dict(runs.load_checkpoint(run.dir / "best.pt")["calibration"])
    assert cal.tta is kept and cal.views == (views if kept else None)
    if views == "mirror":  # the answer averages the mirror; the OOD score reads the image alone
        with torch.no_grad():
            alone = models.PixelClassifier(model, "", cal)(torch.from_numpy(x).float())[1].numpy()
        np.testing.assert_allclose(p.outputs(x)[1], alone, rtol=1e-5, atol=1e-5)
    # a photo's input, centred and scaled by preprocessing, is answered with six views at their own temperature
    # where the run's own views are the mirror (kept or not) and they buy accuracy on the validation images
    # reframed as a photo's are; its score is the same as any input's
    assert ("photo_views_val_gain" in s) is (views == "mirror")
    photo_kept = views == "mirror" and s["photo_views_val_gain"] > calibrate.PHOTO_GAIN
    assert cal.photo_views == ("six" if photo_kept else None)
    assert s.get("photo_views") == cal.photo_views
    photos = np.arange(len(x)) % 2 == 0
    both, scores = p.outputs(x, photos)
    if photo_kept:
        with torch.no_grad():
            six = models.tta_logits(model, normalised, "six")
        np.testing.assert_allclose(both[photos], (six / cal.photo_temperature).softmax(1).numpy()[photos], atol=1e-5)
        assert cal.photo_temperature == s["photo_temperature"] > 0
    else:
        np.testing.assert_allclose(both[photos], want[photos], atol=1e-5)
    np.testing.assert_allclose(both[~photos], want[~photos], atol=1e-5)
    np.testing.assert_allclose(scores, p.outputs(x)[1], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_from_before_test_time_augmentation_existed_trained_without_it(run):
    ckpt = runs.load_checkpoint(run / "best.pt")
    assert runs.checkpoint_config(ckpt, run).tta is True  # today's default
    del ckpt["config"]["tta"]
    assert runs.checkpoint_config(ckpt, run).tta is False


def test_a_calibration_from_before_the_views_were_named_keeps_airbenchs_six():
    from fmnist.config import TrainConfig

    cfg = TrainConfig(tta=True, translate=0)  # today such a run would average the mirror alone
    old = calibrate.Calibration(tta=True).to_dict()
    assert "views" not in old
    assert calibrate.Calibration.from_dict(old).inference_views(cfg) == "six"
    assert calibrate.Calibration.from_dict({**old, "views": "mirror"}).inference_views(cfg) == "mirror"
    assert calibrate.Calibration.from_dict({**old, "tta": False}).inference_views(cfg) == ""
    with pytest.raises(ValueError, match="views"):
        calibrate.Calibration.from_dict({**old, "views": "nine"})


@pytest.mark.parametrize("bar, kept", [(-1.0, True), (1.0, False)])
def test_a_photo_s_views_are_kept_only_where_the_reframed_validation_images_say_they_pay(run, monkeypatch, bar,
                                                                                         kept):
    monkeypatch.setattr(calibrate, "PHOTO_GAIN", bar)
    model, cfg, _ = runs.load_model(run)
    splits = data.load(cfg.data_dir, cfg.val_size, cfg.split_seed)
    views, temperature, gain = evaluate.photo_calibration(model, cfg, splits, torch.device("cpu"))
    assert -1 <= gain <= 1 and (views == "six") is kept and (temperature is not None and temperature > 0) is kept
    six = dataclasses.replace(cfg, translate=2)  # a run that averages six views already gets none for photos
    assert evaluate.photo_calibration(model, six, splits, torch.device("cpu")) == (None, None, None)


def test_reframing_a_dataset_image_trims_rescales_and_centres_it_as_a_photo_s_input():
    from fmnist import preprocess

    x = np.zeros((28, 28), np.uint8)
    x[4:20, 10:16] = 200  # a product off centre, 16 rows tall
    again = preprocess.reframed(x)
    rows, cols = np.flatnonzero(again.max(1) > 100), np.flatnonzero(again.max(0) > 100)
    assert rows[-1] - rows[0] + 1 >= 26  # its longest edge fills the 28 pixels, as a photo's would
    assert abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1 and abs(again.astype(int).max() - 200) <= 30
    assert preprocess.reframed(np.zeros((28, 28), np.uint8)).max() == 0  # nothing in, nothing out


def test_predict_answers_a_photo_with_its_own_views_and_a_dataset_image_with_the_run_s(run, tmp_path, capsys):
    from PIL import Image

    run = Path(shutil.copytree(run, tmp_path / "r"))
    ckpt = runs.load_checkpoint(run / "best.pt")  # photo views whatever the tiny run's validation said of them
    ckpt["calibration"].update(photo_views="six", photo_temperature=1.5)
    runs.save_checkpoint(ckpt, run / "best.pt")
    x, _ = _test_images(run, 1)
    cal = calibrate.Calibration.from_dict(runs.load_checkpoint(run / "best.pt")["calibration"])
    assert cal.photo_views == "six"
    raw, shot = tmp_path / "raw.png", tmp_path / "shot.png"
    Image.fromarray(x[0]).save(raw)
    Image.fromarray(255 - np.kron(x[0], np.ones((8, 8), np.uint8))).save(shot)  # dark on white, 224 px: a photo
    p = predict.Predictor(run)
    # the tiny run is sure of everything: a photo temperature of 10,000 makes the photo path's answers all but
    # uniform, so that which path answered shows
    p.photo_classifier.temperature = 1e4
    recs = p.predict([raw, shot], top_k=10)
    assert [r["preprocess"] for r in recs] == ["dataset", "photo"]
    assert recs[0]["probability"] > 0.5 and recs[1]["probability"] < 0.11
    inputs = np.stack([predict.prepare(raw)[0], predict.prepare(shot)[0]]).astype(np.float32)
    plain, as_photo = p.outputs(inputs), p.outputs(inputs, np.array([False, True]))
    for rec, probs in zip(recs, as_photo[0]):
        assert {t["label"]: t["probability"] for t in rec["top"]} == pytest.approx(
            dict(zip(p.classes, probs.astype(float))), abs=1e-6)
    assert [r["ood_score"] for r in recs] == pytest.approx(list(plain[1]), abs=1e-3)  # the score: the image's own


def test_a_damaged_photo_calibration_is_refused_and_an_old_one_answers_photos_as_any_input():
    good = calibrate.Calibration(photo_views="six", photo_temperature=1.2).to_dict()
    back = calibrate.Calibration.from_dict(good)
    assert (back.photo_views, back.photo_temperature) == ("six", 1.2)
    for bad in ({"photo_views": "seven"}, {"photo_temperature": -1.0}, {"photo_temperature": "hot"}):
        with pytest.raises(ValueError, match="photos"):
            calibrate.Calibration.from_dict({**good, **bad})
    old = calibrate.Calibration().to_dict()
    assert "photo_views" not in old and calibrate.Calibration.from_dict(old).photo_views is None
    with pytest.raises(ValueError, match="photos"):
        models.PixelClassifier(models.create("mlp"), "", calibrate.Calibration(), photo=True)
