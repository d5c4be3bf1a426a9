"""Per-class precision, recall and F1, and the most-confused pairs, against figures counted by hand."""

from __future__ import annotations

import pytest
import torch

from fmnist import evaluate


def test_per_class_figures_and_most_confused_pairs():
    names = ("a", "b", "c")
    # true a: 3 right, 1 called b; true b: 2 right, 2 called c; true c: 1 right; nothing called a wrongly
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    r = evaluate.per_class(labels, preds, names, pairs=5)
    a, b, c = (r["per_class"][n] for n in names)
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 0.75, 4)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 0.5 and b["support"] == 4
    assert c["precision"] == pytest.approx(1 / 3) and c["recall"] == 1.0 and c["support"] == 1
    assert c["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert r["macro"]["recall"] == pytest.approx((0.75 + 0.5 + 1) / 3)
    # the pairs: most errors first, only pairs that happened
    assert [(p["true"], p["predicted"], p["count"]) for p in r["most_confused"]] == [("b", "c", 2), ("a", "b", 1)]
    assert r["most_confused"][0]["share_of_true"] == 0.5


def test_a_class_never_predicted_or_absent_is_zero_not_nan():
    r = evaluate.per_class(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), ("a", "b", "c"))
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert r["per_class"]["c"]["support"] == 0 and r["per_class"]["c"]["f1"] == 0.0
    assert r["most_confused"] == [{"true": "b", "predicted": "a", "count": 1, "share_of_true": 1.0}]


def test_evaluate_run_gives_them_for_a_saved_run(trained_run):
    from fmnist import data, runs

    cfg = runs.read_config(trained_run)
    r = evaluate.evaluate_run(trained_run, "test", data_dir=cfg.data_dir, device="cpu")
    assert list(r["per_class"]) == list(data.CLASSES)
    for name, figures in r["per_class"].items():  # recall is the per-class accuracy fmnist always gave
        assert figures["recall"] == pytest.approx(r["per_class_accuracy"][name])
    assert sum(f["support"] for f in r["per_class"].values()) == r["images"]
    cm = torch.tensor(r["confusion_matrix"])
    top = r["most_confused"][0] if r["most_confused"] else None
    off = cm.clone().fill_diagonal_(0)
    if top:
        assert top["count"] == int(off.max())


def test_fmnist_evaluate_prints_the_table_and_the_pairs(trained_run, capsys):
    from fmnist import cli, data, runs

    cfg = runs.read_config(trained_run)
    assert cli.main(["evaluate", str(trained_run), "--data-dir", cfg.data_dir, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("per class"))
    assert lines[head].split()[2:6] == ["precision", "recall", "F1", "images"]
    rows = [line.split() for line in lines[head + 1:head + 1 + len(data.CLASSES)]]
    assert [r[-1] for r in rows] and all(r[-1].isdigit() for r in rows)
    assert lines[head + 1 + len(data.CLASSES)].split()[0] == "mean"
    assert "confusion matrix" in out


def test_neuron_profile_of_an_mlp_neuron_matches_its_definition(trained_run):
    import copy

    from fmnist import data, models, runs

    model, cfg, _ = runs.load_model(trained_run / "best.pt")
    x, y = evaluate.load_splits(cfg).test
    p = evaluate.neuron_profile(model, x, y, 5, batch_size=64)
    layer = models.first_layer(model)
    xn = data.normalize(x).unsqueeze(1)
    with torch.no_grad():
        pre = layer(xn.flatten(1))[:, 4]  # neuron 5's input to its nonlinearity
        silenced = copy.deepcopy(model).eval()
        models.first_layer(silenced).weight[4] = 0
        models.first_layer(silenced).bias[4] = 0
        moved = (model(xn) - silenced(xn)).mean(0)
    assert torch.allclose(p["activation"], pre, atol=1e-5)
    assert torch.equal(p["top"], torch.argsort(pre, descending=True)[:9])
    for c in range(10):
        assert p["per_class"][c] == pytest.approx(float(pre[y == c].mean()), abs=1e-5)
    assert torch.allclose(p["votes"], moved, atol=1e-5)  # silencing it = zeroing its weights and bias
    with pytest.raises(ValueError):
        evaluate.neuron_profile(model, x, y, layer.out_features + 1)


def test_neuron_profile_of_a_conv_filter_is_its_largest_response():
    from fmnist import data, models

    torch.manual_seed(0)
    model = models.create("cnn", channels=[4, 8]).eval()
    x = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    y = torch.arange(20) % 10
    p = evaluate.neuron_profile(model, x, y, 3)
    with torch.no_grad():
        fmap = models.first_layer(model)(data.normalize(x).unsqueeze(1))[:, 2]
    assert torch.allclose(p["activation"], fmap.flatten(1).amax(1), atol=1e-5)
    assert p["votes"].shape == (10,) and p["top"].shape == (9,)
