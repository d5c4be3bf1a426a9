"""fmnist predict and export: the photo pipeline, hostile files, the Predictor API, ONNX and TorchScript exports."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fmnist, synthetic
from photos import write_photos
from PIL import Image

from fmnist import cli, data, export, predict, preprocess, train
from fmnist.config import TrainConfig
from fmnist.errors import ImageError, PredictError


@pytest.fixture(scope="module")
def run(trained_run) -> Path:
    return trained_run


def _png(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG", **kw)
    return out.getvalue()


def _raw_png(width: int, height: int, rows: int | None = None, extra: bytes = b"") -> bytes:
    """A 1-bit greyscale PNG written by hand: its header may promise far more pixels than it is worth."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + extra
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- hostile files

HOSTILE = {
    "not-an-image.png": (lambda: b"this is a text file\n", "not an image"),
    "empty.jpg": (lambda: b"", "not an image"),
    "truncated.png": (lambda: _png(Image.fromarray(synthetic(1, 0)[0][0]))[:80], "damaged or truncated"),
    "truncated.jpg": (lambda: _jpeg_cut(), "damaged or truncated"),
    "bomb.png": (lambda: _raw_png(30_000, 30_000), "decompression bomb"),  # 900 megapixels in 110 kB
    "tall-bomb.png": (lambda: _raw_png(100, 1_000_000, rows=10), "decompression bomb"),
    "text-bomb.png": (lambda: _raw_png(8, 8, extra=_ztxt(50_000_000)), "decompression bomb"),
}


def _jpeg_cut() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def _ztxt(size: int) -> bytes:
    body = b"Comment\x00\x00" + zlib.compress(b"a" * size)
    return struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_file_gets_its_own_error_and_the_others_are_classified(name, run, tmp_path, capsys):
    make, words = HOSTILE[name]
    good = tmp_path / "good.png"
    good.write_bytes(_png(Image.fromarray(synthetic(1, 0)[0][0])))
    bad = tmp_path / name
    bad.write_bytes(make())
    assert cli.main(["predict", str(run), str(good), str(bad), str(good), "--json"]) == 1  # a bug would raise
    out, err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert [rec["file"] for rec in recs] == [str(good), str(bad), str(good)]
    assert "label" in recs[0] and "label" in recs[2] and "label" not in recs[1]
    assert words in recs[1]["error"], recs[1]["error"]
    assert "1 could not be read" in err


def test_exit_codes_and_table(run, tmp_path, capsys):
    good = tmp_path / "shirt.png"
    good.write_bytes(_png(Image.fromarray(synthetic(1, 0)[0][0])))
    r = run_fmnist("predict", str(run), str(good))  # a real process: what a user sees
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["file", "class", "prob", "runners-up"]
    assert lines[1].startswith(str(good)) and len(lines) == 2
    assert "classified 1 of 1 files with pytorch" in r.stderr
    assert cli.main(["predict", str(run), str(tmp_path / "missing.png")]) == 2  # nothing could be classified
    assert "error: no such file" in capsys.readouterr().out
    for argv, words in (([str(tmp_path / "nothing"), str(good)], "does not exist"),
                        ([str(run), str(good), "--top-k", "11"], "--top-k 11"),
                        ([str(run), "-", "-"], "once")):
        assert cli.main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fmnist: error: ") and words in err and len(err.splitlines()) == 1


def test_directories_are_searched_recursively_in_order_and_stdin_is_read(run, tmp_path):
    x, _ = synthetic(4, 5)
    d = tmp_path / "in"
    (d / "b").mkdir(parents=True)
    (d / "a.png").write_bytes(_png(Image.fromarray(x[0])))
    (d / "b" / "c.jpg").write_bytes(_png(Image.fromarray(x[1])))  # a PNG named .jpg: the content decides
    (d / "b" / "README.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"")
    found, skipped = predict.find_images([d])
    assert found == [str(d / "a.png"), str(d / "b" / "c.jpg")] and skipped == 2
    r = run_fmnist("predict", str(run), str(d), "-", "--json", input=None, stdin=open(d / "a.png", "rb"))
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0, r.stderr
    assert [rec["file"] for rec in recs] == [str(d / "a.png"), str(d / "b" / "c.jpg"), "-"]
    assert recs[2]["top"] == recs[0]["top"]


def test_json_records_and_saved_inputs(run, tmp_path, capsys):
    x, y = synthetic(40, 7)
    d = tmp_path / "in"
    d.mkdir()
    for i, img in enumerate(x):
        (d / f"{i:02d}.png").write_bytes(_png(Image.fromarray(img)))
    out = tmp_path / "seen"
    assert cli.main(["predict", str(run), str(d), "--json", "--top-k", "4", "--save-inputs", str(out)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 40
    for rec, img in zip(recs, x):
        assert set(rec) == {"file", "label", "index", "probability", "top", "preprocess", "input", "unsure",
                            "ood_score"}
        assert rec["preprocess"] == "dataset" and len(rec["top"]) == 4
        probs = [t["probability"] for t in rec["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert rec["top"][0] == {"label": rec["label"], "probability": rec["probability"]}
        assert data.CLASSES[rec["index"]] == rec["label"]
        np.testing.assert_array_equal(np.asarray(Image.open(rec["input"])), img)
    assert np.mean([r["index"] for r in recs] == y) > 0.9  # the synthetic classes are easy
    sheet = Image.open(out / "overview.png")  # the first 24 files beside their inputs, 6 rows of 4
    assert sheet.format == "PNG" and sheet.height > 5 * 112 and len(list(out.iterdir())) == 40 + 2  # + .fmnist
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert cli.main(["predict", str(run), str(d), "--save-inputs", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_api_takes_paths_images_and_arrays_and_batches_agree(run, tmp_path):
    x, _ = synthetic(9, 8)
    path = tmp_path / "a.png"
    path.write_bytes(_png(Image.fromarray(x[0])))
    p = predict.Predictor(run, batch_size=2)
    recs = p.predict([path, Image.open(path), x[0], x[0].astype(np.float64), "missing.png"])
    assert [r.get("label") for r in recs[:4]] == [recs[0]["label"]] * 4
    assert recs[4] == {"file": "missing.png", "error": "no such file"}
    assert recs[0]["file"] == str(path) and recs[2]["file"] is None
    whole = predict.Predictor(run, batch_size=1024).probabilities(x)
    np.testing.assert_allclose(p.probabilities(x), whole, atol=1e-6)
    model = predict.Predictor(run).info
    assert model["model"] == "mlp" and model["config"]["hidden"] == [32]


def test_many_files_use_worker_processes_with_the_same_results(run, tmp_path):
    x, _ = synthetic(predict.PARALLEL_FROM + 6, 9)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i:03d}.png")
        paths[-1].write_bytes(_png(Image.fromarray(255 - img)) if i % 2 else b"junk")
    p = predict.Predictor(run)
    assert p.predict(paths, workers=2) == p.predict(paths, workers=1)


# ---------------------------------------------------------------- export

@pytest.mark.slow
def test_onnx_export_matches_pytorch_and_runs_without_torch(run, tmp_path):
    r = run_fmnist("export", str(run), "--json")  # onnx, onnxscript and onnxruntime are test requirements
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    onnx_path = run / "model.onnx"
    assert info["path"] == str(onnx_path) and info["check"]["images"] == 200  # the synthetic test split
    assert info["check"]["max_difference"] <= 1e-4 and info["check"]["argmax_agree"] == 200
    x, _ = synthetic(37, 11)
    exported, original = predict.Predictor(onnx_path), predict.Predictor(run)
    assert exported.classes == data.CLASSES and exported.info["config"]["hidden"] == [32]
    for n in (1, 37):  # any batch size
        np.testing.assert_allclose(exported.probabilities(x[:n]), original.probabilities(x[:n]), atol=1e-5)
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no torch in this deployment')\n")
    img = tmp_path / "a.png"
    img.write_bytes(_png(Image.fromarray(x[0])))
    code = "import sys, fmnist; sys.argv = ['fmnist'] + sys.argv[1:]; sys.exit(fmnist.main())"
    r = subprocess.run([sys.executable, "-c", code, "predict", str(onnx_path), str(img), "--json"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(blocker.parent), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["label"] == original.predict([img])[0]["label"] and "onnxruntime" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(blocker.parent)})
    assert r.returncode != 0  # the blocker works: the run above had no torch


def test_torchscript_export_and_a_refused_export_writes_nothing(run, tmp_path, capsys):
    assert cli.main(["export", str(run), "--format", "torchscript"]) == 0
    ts = predict.Predictor(run / "model.torchscript")
    x, _ = synthetic(5, 12)
    np.testing.assert_allclose(ts.probabilities(x), predict.Predictor(run).probabilities(x), atol=1e-6)
    assert cli.main(["export", str(run), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not list(run.glob("*.fmnist-tmp"))


def test_a_convnet_run_classifies_and_exports(tiny_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="cnn", model="cnn", channels=[4, 8],
                      epochs=1, batch_size=64, val_size=100, device="cpu", plots=False, threads=1)
    run = train.fit(cfg).dir
    x, _ = synthetic(6, 13)
    assert [r["file"] for r in predict.Predictor(run).predict(list(x))] == [None] * 6
    info = export.export(run)
    assert info["check"]["argmax_agree"] == info["check"]["images"] == 200
    temperature = json.loads((run / "summary.json").read_text())["temperature"]  # calibrated on validation
    with torch.inference_mode():
        logits = train_model(run)(data.normalize(torch.from_numpy(x)).unsqueeze(1))
        direct = torch.softmax(logits / temperature, 1).numpy()
    np.testing.assert_allclose(predict.Predictor(run / "model.onnx").probabilities(x), direct, atol=1e-5)


def train_model(run: Path):
    from fmnist import runs

    return runs.load_model(run)[0]


def test_a_foreign_onnx_model_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(PredictError, match="not exported by fmnist"):
        predict.Predictor(path)


# ---------------------------------------------------------------- real data

@pytest.mark.realdata
@pytest.mark.slow
def test_photos_of_test_images_keep_the_accuracy(real_dir, tmp_path):
    """Test images rendered as product photos (light background, enlarged, off-centre, JPEG/PNG/alpha)
    are classified within 3 points of the same images given raw; and the ONNX export agrees on real data."""
    cfg = TrainConfig(data_dir=str(real_dir), out_dir=str(tmp_path), name="real", epochs=4, device="cpu",
                      plots=False)
    run = train.fit(cfg).dir
    x, y = data.load_split(real_dir, "test")
    pick = np.random.default_rng(0).permutation(len(y))[:600]
    paths = write_photos(tmp_path / "photos", x[pick], seed=1)
    kinds = {p.suffix for p in paths}
    assert kinds == {".jpg", ".png"} and any(Image.open(p).mode == "RGBA" for p in paths if p.suffix == ".png")
    r = run_fmnist("predict", str(run), str(tmp_path / "photos"), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(rec["preprocess"] == "photo" for rec in recs)
    photo_acc = np.mean(np.array([rec["index"] for rec in recs]) == y[pick])
    raw_acc = np.mean(predict.Predictor(run).probabilities(x[pick]).argmax(1) == y[pick])
    assert raw_acc > 0.85 and abs(photo_acc - raw_acc) <= 0.03, (photo_acc, raw_acc)
    r = run_fmnist("export", str(run), "--json")
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)["check"]
    assert check == {**check, "images": 1000, "argmax_agree": 1000} and check["max_difference"] <= 1e-4


def test_the_names_callers_know_still_answer_from_predict():
    """serve and older scripts reach preprocessing and export through predict: the same objects, moved."""
    assert predict.prepare is preprocess.prepare and predict.open_image is preprocess.open_image
    assert predict.ImageError is ImageError and predict.PredictError is PredictError
    assert predict.export is export.export and predict._write_onnx is export._write_onnx
    with pytest.raises(AttributeError):
        predict.no_such_name  # noqa: B018


def _onnx(path: Path, nodes, out_shape, in_type=None, classes=10) -> Path:
    import onnx
    from onnx import TensorProto, helper

    in_type = TensorProto.FLOAT if in_type is None else in_type
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, ["N", 28, 28])],
                              [helper.make_tensor_value_info("y", in_type, out_shape)],
                              [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 784])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"classes": json.dumps([f"c{i}" for i in range(classes)]), "fmnist": "{}"})
    onnx.save(model, path)
    return path


def test_an_onnx_file_of_the_wrong_shape_or_type_is_refused_at_load(tmp_path):
    from onnx import TensorProto, helper

    identity = [helper.make_node("Identity", ["x"], ["y"])]
    flat = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    for path, words in (
            (_onnx(tmp_path / "image.onnx", identity, ["N", 28, 28]), "outputs of shape (2, 28, 28)"),
            (_onnx(tmp_path / "classes.onnx", flat, ["N", 784], classes=3), "its 3 classes need (2, 3)"),
            (_onnx(tmp_path / "double.onnx", identity, ["N", 28, 28], TensorProto.DOUBLE), "takes double pixels")):
        with pytest.raises(PredictError, match=words.replace("(", r"\(").replace(")", r"\)")):
            predict.Predictor(path)
        r = run_fmnist("predict", str(path), str(path))
        assert r.returncode == 2 and r.stderr.startswith("fmnist: error: ") and len(r.stderr.splitlines()) == 1


def _remove_chain(top: Path) -> None:
    """Remove a chain of nested 'd' folders from the bottom up (shutil.rmtree recurses: 1,100 levels were a
    RecursionError in pytest's own clean-up of old temporary folders)."""
    import os

    chain = [str(top)]
    while os.path.isdir(chain[-1] + "/d"):
        chain.append(chain[-1] + "/d")
    for folder in reversed(chain[1:]):
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


@pytest.mark.slow
def test_fifos_deep_folders_long_and_undecodable_names(run, tmp_path, capsys, request):
    import os

    good = _png(Image.fromarray(synthetic(1, 0)[0][0]))
    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / "pipe.png")  # named directly or found in the folder, it blocked for ever
    deep = str(d)
    request.addfinalizer(lambda: _remove_chain(d))
    for _ in range(1100):  # os.walk recursed: RecursionError
        deep += "/d"
        os.mkdir(deep)
    deep = Path(deep)
    (deep / "bottom.png").write_bytes(good)
    long = d / ("\u4e2d" * 80 + ".png")  # 80 characters, 240 bytes: 100 characters of it are too long to save
    long.write_bytes(good)
    found, _ = predict.find_images([d])
    assert found == [str(deep / "bottom.png"), str(d / "pipe.png"), str(long)]
    assert cli.main(["predict", str(run), str(d), str(d / "pipe.png"), "--json",
                     "--save-inputs", str(tmp_path / "seen")]) == 1
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ["error" in r for r in recs] == [False, True, False, True]
    assert "a FIFO, not a regular file" in recs[1]["error"] and Path(recs[2]["input"]).is_file()
    many = [str(long)] * 70 + [str(d / "pipe.png")]  # enough files for worker processes
    recs = run_model(run).predict(many, workers=2)
    assert "a FIFO" in recs[-1]["error"] and all("label" in r for r in recs[:-1])
    assert "larger than 0.0001 megapixels" in run_model(run).predict([str(long)], max_pixels=100)[0]["error"]

    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as f:
        f.write(good)
    r = subprocess.run([sys.executable, "-m", "fmnist", "predict", str(run), os.fsdecode(raw), "--json"],
                       capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    rec = json.loads(r.stdout.decode("utf-8"))  # valid UTF-8, valid JSON
    assert r.returncode == 0 and rec["file"].endswith("caf\\xe9-\\xff.png") and "label" in rec
    named = tmp_path / "caf\u00e9.png"
    named.write_bytes(good)
    for extra in ([], ["--json"]):
        r = subprocess.run([sys.executable, "-m", "fmnist", "predict", str(run), str(named), os.fsdecode(raw),
                            *extra], capture_output=True, text=True,
                           env={**os.environ, "PYTHONIOENCODING": "ascii"})
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "classified 2 of 2" in r.stderr
    assert json.loads(r.stdout.splitlines()[0])["file"] == str(named)


def run_model(run: Path) -> predict.Predictor:
    return predict.Predictor(run)


def test_a_file_name_that_starts_with_a_dash_gets_a_hint(run, capsys):
    assert cli.main(["predict", str(run), "-dash.png"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "put -- before a file name" in err
