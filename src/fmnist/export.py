"""Export a trained run for use without fmnist's training code: ONNX (checked against PyTorch before it is
kept) and TorchScript.

    export("runs/mlp-s0")                 # -> runs/mlp-s0/model.onnx, read by Predictor or any onnxruntime
    export("runs/mlp-s0", "torchscript")  # -> runs/mlp-s0/model.torchscript
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PredictError
from .predict import Predictor, run_summary
from .preprocess import SIZE

EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript"}
CHECK_IMAGES = 1000  # test images on which an export must agree with PyTorch
CHECK_TOLERANCE = 1e-4  # the largest difference in probability allowed by that check


def export(run: str | Path, fmt: str = "onnx", data_dir: str | None = None) -> dict[str, Any]:
    """Write RUN/model.onnx (or RUN/model.torchscript) from RUN/best.pt, checked before it is kept.

    The exported model takes (N, 28, 28) float32 pixels from 0 to 255 (any N) and gives (N, classes)
    calibrated probabilities and (N,) out-of-distribution scores (models.PixelClassifier: the temperature and
    the score's statistics are constants in the graph, so onnxruntime alone computes both); its metadata names
    the classes and carries the run's configuration and calibration (the threshold above which a score is
    unsure). It is kept only if, on the run's first CHECK_IMAGES test images, its probabilities match PyTorch's
    within CHECK_TOLERANCE, every top class agrees, and its scores match within CHECK_TOLERANCE of their size.
    """
    import torch

    from . import data, files, models, runs

    if fmt not in EXPORT_FORMATS:
        raise PredictError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}.")
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir} is not a run directory: give the folder that holds best.pt.")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401 (torch.onnx's exporter)
        except ImportError:
            raise PredictError("exporting to ONNX needs onnx, onnxscript and onnxruntime: "
                               "pip install 'fmnist[onnx]'.") from None
    model, cfg, ckpt = runs.load_model(run_dir)
    cal = runs.load_calibration(ckpt, run_dir / "best.pt")
    wrapped = models.PixelClassifier(model, cal.inference_views(cfg), cal).eval()
    directory = data.locate(runs.data_dir_for(cfg.data_dir, data_dir))
    images = data.load_split(directory, "test")[0][:CHECK_IMAGES]
    pixels = images.astype(np.float32)
    with torch.inference_mode():
        expected, expected_scores = (t.numpy() for t in wrapped(torch.from_numpy(pixels)))
    meta = {"model": cfg.model, "config": dataclasses.asdict(cfg), "epoch": ckpt["epoch"],
            # one path for every input: a run directory's Predictor also answers photos with their own views
            "calibration": {k: v for k, v in cal.summary().items() if not k.startswith("photo_")},
            "input": "pixels: (N, 28, 28) float32, 0-255, a light object on black",
            "output": "probabilities: (N, classes) float32, calibrated; ood_score: (N,) float32, higher is less "
                      "like a Fashion-MNIST product, unsure above calibration.ood_threshold"}
    summary = run_summary(run_dir)
    if summary is not None:
        meta["summary"] = summary
    path = run_dir / EXPORT_FORMATS[fmt]
    check: dict[str, Any] = {}

    def write(tmp: str) -> None:
        (_write_onnx if fmt == "onnx" else _write_torchscript)(wrapped, tmp, list(data.CLASSES), meta)
        got, got_scores = Predictor(tmp, kind=fmt, batch_size=1024).outputs(pixels)
        diff = float(np.abs(got - expected).max()) if len(pixels) else 0.0
        agree = int((got.argmax(1) == expected.argmax(1)).sum())
        score_diff = float((np.abs(got_scores - expected_scores) / np.maximum(1.0, np.abs(expected_scores))).max()) \
            if len(pixels) else 0.0
        check.update(images=len(pixels), max_difference=diff, argmax_agree=agree, max_score_difference=score_diff)
        if not diff <= CHECK_TOLERANCE or agree != len(pixels) or not score_diff <= CHECK_TOLERANCE:
            raise PredictError(f"the exported model disagrees with PyTorch on {directory}'s test images "
                               f"(largest difference {diff:.2e}, {agree} of {len(pixels)} top classes agree, "
                               f"largest relative difference in the OOD score {score_diff:.2e}); "
                               f"{path} was not written.")

    files.remove_stale_temps(path)  # what an export killed before left
    try:
        files.atomic_write(path, write)
    except OSError as e:  # a full disk, a file size limit, a folder turned read-only
        raise PredictError(f"cannot write {path} ({e.strerror or e}); nothing was written: free some space or "
                           "check the folder, then export again.") from None
    return {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "check": check,
            "classes": list(data.CLASSES)}


def _write_onnx(wrapped, path: str, classes: list[str], meta: dict[str, Any]) -> None:
    import contextlib
    import logging

    import onnx
    import torch

    example = torch.zeros(2, SIZE, SIZE)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on torchvision's operators, which no fmnist model uses
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), path, input_names=["pixels"],
                              output_names=["probabilities", "ood_score"],
                              dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = onnx.load(path)
    for key, value in (("classes", json.dumps(classes)), ("fmnist", json.dumps(meta))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Fashion-MNIST classifier exported by fmnist: " + meta["input"] + " -> " + meta["output"]
    onnx.save(proto, path)


def _write_torchscript(wrapped, path: str, classes: list[str], meta: dict[str, Any]) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is in maintenance: onnx is the format to prefer
        traced = torch.jit.trace(wrapped, torch.zeros(2, SIZE, SIZE))
        extra = {"classes.json": json.dumps(classes), "fmnist.json": json.dumps(meta)}
        buffer = io.BytesIO()  # torch.jit.save's own writer aborts the process when the disk is full
        torch.jit.save(traced, buffer, _extra_files=extra)
    with open(path, "wb") as f:  # a full disk is an OSError here, said in one sentence
        f.write(buffer.getbuffer())
