"""The notebook tour, docs/tour.ipynb: committed without outputs, and run top to bottom on the real data (slow),
where what it prints and draws must be what the API gives."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour.ipynb"
FIGURES = ("augmentation", "samples", "curves", "neuron_50", "neuron_50_profile", "predict", "explain",
           "explain_photo")


def test_tour_is_committed_valid_and_without_outputs():
    nb = nbformat.read(TOUR, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert nb.metadata.kernelspec.name == "python3"


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"the tour printed nothing like {pattern!r}:\n{text[-3000:]}"
    return float(found.group(1))


@pytest.mark.slow
@pytest.mark.realdata
def test_tour_runs_on_the_real_data(real_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("FMNIST_DATA", str(real_dir))  # the data these tests found, found the CLI's way
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile folder lands here
    nb = nbformat.read(TOUR, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(FIGURES)
    written = list(tmp_path.glob("fmnist-tour-*"))
    assert len(written) == 1 and {p.stem for p in written[0].glob("*.png")} == set(FIGURES)

    assert "same as the Dataset's items: True | same labels: True" in text
    assert _number(r"normal  std of each layer's output: [\d.]+  [\d.]+  ([\d.]+)", text) < 0.05
    assert _number(r"xavier  std of each layer's output: [\d.]+  [\d.]+  ([\d.]+)", text) > 0.5
    test_accuracy = _number(r"test accuracy: ([\d.]+)\n", text)
    assert test_accuracy > 0.80  # 3 epochs of the default MLP: about 0.88
    assert _number(r"Predictor on the test split: ([\d.]+);", text) == test_accuracy
    assert re.search(r"neuron 50 snapshots: \(4, 28, 28\)", text)
    assert re.search(r"^Sneaker \(\d", text, re.M), "the example sneaker photo was not taken for a sneaker"
    assert _number(r"completeness gap: ([\d.]+)", text) < 0.05
    assert _number(r"tour finished: test accuracy ([\d.]+)", text) == test_accuracy
