"""fmnist explain: the maps against their definitions (IG's completeness, the temperature, the target), the command
on files and folders, its one-sentence refusals, and POST /explain under the service's limits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from fmnist import cli, data, explain, predict, serve


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Smooth(nn.Module):
    """A tiny random network on normalised images (tanh: smooth, so that 50 IG steps integrate it closely)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    return data.normalize(torch.from_numpy(np.asarray(pixels, np.uint8)))[:, None]


def test_integrated_gradients_add_up_to_the_logits_rise_from_the_black_baseline():
    model = Smooth().eval()
    pixels = synthetic(4, 1)[0]
    e = explain.explain(model, pixels, method="ig")
    with torch.no_grad():  # the oracle: the network itself, on the normalised image and on all-black
        rise = model(_normalised(pixels)) - model(_normalised(np.zeros((1, 28, 28))))
    expected = rise[np.arange(4), e.targets].numpy()
    np.testing.assert_allclose(e.attributions.sum((1, 2)), expected, rtol=2e-3, atol=2e-3)
    assert (e.predicted == e.targets).all() and e.attributions.shape == (4, 28, 28)
    assert np.allclose(e.attributions[pixels == 0], 0)  # a pixel equal to the baseline has no share


def test_a_run_explains_its_calibrated_logit_and_its_probabilities_are_predicts(trained_run, monkeypatch):
    monkeypatch.setattr(explain, "IG_STEPS", 400)  # a ReLU network's kinks: more steps for a close sum
    p = predict.Predictor(trained_run)
    pixels = synthetic(3, 2)[0]
    e = explain.explain(p, pixels)
    t = p.info["calibration"]["temperature"]
    assert abs(t - 1) > 0.05, t  # the run is calibrated: the map must be of the logit over its temperature
    with torch.no_grad():
        rise = (p.model(_normalised(pixels)) - p.model(_normalised(np.zeros((1, 28, 28))))) / t
    np.testing.assert_allclose(e.attributions.sum((1, 2)), rise[np.arange(3), e.targets].numpy(), rtol=5e-3)
    np.testing.assert_array_equal(e.probabilities, p.probabilities(pixels))  # the very numbers predict gives


@pytest.mark.parametrize("method", explain.METHODS)
def test_the_target_changes_the_map(method):
    model = Smooth().eval()
    pixels = synthetic(2, 3)[0]
    first = explain.explain(model, pixels, method=method, target=0)
    other = explain.explain(model, pixels, method=method, target="trouser")  # a name, in any case
    assert (first.targets == 0).all() and (other.targets == 1).all()
    assert not np.allclose(first.attributions, other.attributions)
    assert np.isfinite(first.attributions).all()
    if method == "saliency":
        assert (first.attributions >= 0).all()


def test_targets_are_names_or_indices_and_anything_else_is_one_sentence():
    classes = data.CLASSES
    assert explain.parse_target("Ankle-boot", classes) == 9 == explain.parse_target("9", classes)
    assert explain.parse_target("t-shirt/top", classes) == 0 and explain.parse_target(None, classes) is None
    for bad in ("hat", "10", "-1", ""):
        with pytest.raises(predict.PredictError, match="is not a class: give a name"):
            explain.parse_target(bad, classes)


def test_the_command_explains_a_folder_as_json_with_figures(trained_run, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    images = synthetic(2, 4)[0]
    (folder / "a.png").write_bytes(_png(images[0]))
    (folder / "sub" / "b.png").write_bytes(_png(images[1]))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "why"
    code = cli.main(["explain", str(trained_run), str(folder), "--json", "--out-dir", str(out), "--target", "3"])
    r = capsys.readouterr()
    assert code == 1, r.err  # one file could not be read: as fmnist predict says it
    recs = [json.loads(line) for line in r.out.splitlines()]
    assert [Path(x["file"]).name for x in recs] == ["a.png", "broken.png", "b.png"]
    bad = recs[1]
    assert set(bad) == {"file", "error"} and "not an image" in bad["error"]
    for rec in (recs[0], recs[2]):
        assert np.shape(rec["attribution"]) == (28, 28) and rec["method"] == "ig"
        assert rec["target"] == data.CLASSES[3] and rec["class"] in data.CLASSES and 0 < rec["probability"] <= 1
        assert Image.open(rec["figure"]).size[0] > 200  # the 28x28 input upscaled, with its map
    assert sorted(p.name for p in out.glob("*.png")) == ["1-a.png", "3-b.png"]
    assert "explained 2 of 3 files" in r.err and "passed over 1 files" in r.err


def _onnx(path: Path) -> Path:
    """The smallest model fmnist's Predictor loads as an export: (N, 28, 28) -> (N, 10) probabilities."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 784]),
                               helper.make_tensor("w", TensorProto.FLOAT, [784, 10], [0.0] * 7840)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"classes": json.dumps(list(data.CLASSES)), "fmnist": "{}"})
    onnx.save(model, path)
    return path


def test_an_exported_model_and_a_bad_target_are_refused_in_one_sentence(trained_run, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(_png(synthetic(1, 5)[0][0]))
    onnx_path = _onnx(tmp_path / "model.onnx")
    assert predict.Predictor(onnx_path).backend == "onnxruntime"  # a model that classifies, but has no gradients
    for argv, words in (([str(onnx_path), str(image)], ("exported model", "no gradients", "run directory")),
                        ([str(trained_run), str(image), "--target", "hat"], ("--target 'hat' is not a class",))):
        assert cli.main(["explain", *argv]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fmnist: error: ") and not captured.out, captured
        assert all(w in lines[0] for w in words), lines[0]
    app = serve.create_app(onnx_path)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/explain", files=[("file", ("a.png", image.read_bytes()))])
        assert r.status_code == 409 and "no gradients to explain" in r.json()["detail"]


def test_post_explain_answers_under_the_limits_of_predict(trained_run):
    key = "k" * 32
    policy = serve.Policy(api_keys=(key,), max_files=2, max_pixels=100 * 100, rate_limit="100000/minute")
    app = serve.create_app(trained_run, max_body=2**16, policy=policy)
    pixels = synthetic(1, 6)[0][0]
    png = ("file", ("a.png", _png(pixels)))
    auth = {"X-API-Key": key}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.post("/explain", files=[png]).status_code == 401  # the key, as every API route
        r = client.post("/explain?preprocess=dataset&method=occlusion&target=Bag", files=[png], headers=auth)
        rec = r.json()
        assert r.status_code == 200 and rec["method"] == "occlusion" and rec["target"] == "Bag"
        assert np.shape(rec["attribution"]) == (28, 28) and np.array_equal(rec["input"], pixels)
        both = client.post("/explain", files=[png, png], headers=auth).json()
        assert len(both) == 2 and both[0]["attribution"] == both[1]["attribution"]
        assert both[0]["class"] == client.post("/predict", files=[png], headers=auth).json()["label"]
        r = client.post("/explain", files=[png] * 3, headers=auth)
        assert r.status_code == 413 and "send at most 2" in r.json()["detail"]
        big = ("file", ("big.png", _png(np.zeros((101, 100), np.uint8))))
        r = client.post("/explain", files=[big], headers=auth)
        assert r.status_code == 413 and "100x101 pixels" in r.json()["detail"]
        r = client.post("/explain", files=[("file", ("n.bin", bytes(2**17)))], headers=auth)
        assert r.status_code == 413  # the body limit
        r = client.post("/explain", files=[("file", ("n.txt", b"hello"))], headers=auth)
        assert r.status_code == 400 and r.json()["detail"].startswith("n.txt: not an image")
        r = client.post("/explain?target=hat", files=[png], headers=auth)
        assert r.status_code == 422 and "is not a class" in r.json()["detail"]
        assert client.post("/explain?method=lime", files=[png], headers=auth).status_code == 422


def test_one_picture_of_any_size_is_one_image_and_a_batch_of_inputs_is_taken_as_it_is():
    model = Smooth().eval()
    inputs = synthetic(3, 7)[0]
    assert explain.explain(model, inputs).attributions.shape == (3, 28, 28)  # model inputs, used as they are
    big = np.asarray(Image.fromarray(inputs[0]).resize((56, 56)))  # a small dark picture: one image
    e = explain.explain(model, big, preprocess="dataset")
    assert e.pixels.shape == (1, 28, 28) and e.attributions.shape == (1, 28, 28)
