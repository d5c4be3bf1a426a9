"""report.html from a run directory's files, made by the test (no training, no figures drawn: the page only
names them): the cards, one history row per epoch with the best one marked, every neuron's figure in numeric
order, HTML escaped, figures referenced relative to the run, and the page written atomically."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from fmnist import report, runs
from fmnist.config import TrainConfig

COMMAND = "fmnist train --name '<script>alert(1)</script>' --lr 0.01 && echo \"done\""


def _run(tmp_path: Path, name: str = "r", neurons: tuple[int, ...] = (50, 7, 100), best: int = 2,
         **summary) -> Path:
    run_dir = tmp_path / name
    (run_dir / "plots").mkdir(parents=True)
    cfg = runs.resolve(TrainConfig(hidden=[128, 64], lr=0.01, seed=3, data_dir="/data/<fm>&co"))
    runs.write_config(run_dir, cfg)
    runs.write_history(run_dir, [{"epoch": e, "lr": 0.01, "train_loss": 1 / e, "train_acc": 0.5 + e / 10,
                                  "val_loss": 1.5 / e, "val_acc": (0.61, 0.83, 0.79)[e - 1], "seconds": 1.25 * e}
                                 for e in (1, 2, 3)])
    summary = {"test_accuracy": 0.8123, "test_loss": 0.5, "best_val_accuracy": 0.83, "best_epoch": best,
               "epochs": 3, "wall_seconds": 12.34, "train_samples_per_second": 12345, "parameters": 109386,
               "device": "cpu <AVX2>", "torch_version": "2.13.0", "command": COMMAND, **summary}
    runs.write_summary(run_dir, {k: v for k, v in summary.items() if v is not None})  # None: left out
    for k in neurons:
        (run_dir / "plots" / f"neuron_{k}.png").write_bytes(b"png")
    (run_dir / "plots" / "neuron_7.gif").write_bytes(b"gif")
    return run_dir


def _rows(page: str) -> list[str]:
    history = page.split("<h2>History</h2>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*><td>.*?</tr>", history)


def test_the_cards_say_the_runs_figures(tmp_path):
    page = report.write(_run(tmp_path)).read_text(encoding="utf-8")
    cards = dict(re.findall(r'<div class="card">([^<]+)<b>([^<]*)</b></div>', page))
    assert cards["test accuracy"] == "81.23%" and cards["best validation accuracy"] == "83.00%"
    assert cards["best epoch"] == "2 / 3" and cards["wall time"] == "12.3 s"
    assert cards["training speed"] == "12,345 images/s" and cards["parameters"] == "109,386"
    assert cards["device"] == "cpu &lt;AVX2&gt;"
    untested = report.write(_run(tmp_path, "untested", test_accuracy=None)).read_text()  # e.g. a tuning trial
    assert "not tested" in untested


def test_one_history_row_per_epoch_and_only_the_best_is_marked(tmp_path):
    for best in (1, 2, 3):
        page = report.write(_run(tmp_path, f"best{best}", best=best)).read_text()
        rows = _rows(page)
        assert [int(re.search(r"<td>(\d+)</td>", r).group(1)) for r in rows] == [1, 2, 3]
        assert [r.startswith('<tr class="best">') for r in rows] == [e == best for e in (1, 2, 3)]
    assert "<td>83.00%</td>" in rows[1] and "<td>2.50</td>" in rows[1]  # val acc and seconds of epoch 2


def test_every_neuron_figure_in_numeric_order_with_its_animation(tmp_path):
    page = report.write(_run(tmp_path, neurons=(50, 7, 100, 8))).read_text()
    shown = re.findall(r'src="plots/neuron_(\d+)\.png"', page)
    assert shown == ["7", "8", "50", "100"]  # numbers, not text: 7 before 50 before 100
    assert re.findall(r'src="plots/neuron_(\d+)\.gif"', page) == ["7"]  # only the animation that exists
    assert page.index("neuron_7.png") < page.index("neuron_7.gif") < page.index("neuron_8.png")
    assert "Neuron 50: its incoming weights" in page


def test_html_in_names_commands_and_config_is_escaped(tmp_path):
    run_dir = _run(tmp_path, name="a<b>&c")
    page = report.write(run_dir).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>&c" not in page and "<h1>Run a&lt;b&gt;&amp;c</h1>" in page
    assert "<title>fmnist run a&lt;b&gt;&amp;c</title>" in page
    assert html.escape('data_dir = "/data/<fm>&co"') in page and "<fm>" not in page
    assert f"<code>{html.escape(COMMAND)}</code>" in page


def test_figures_are_referenced_relative_to_the_run(tmp_path):
    run_dir = _run(tmp_path)
    page = report.write(run_dir).read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("plots/") and ".." not in s for s in srcs), srcs
    assert {"plots/curves.png", "plots/confusion_matrix.png", "plots/neuron_50.png"} <= set(srcs)
    assert str(tmp_path) not in page  # the page works wherever the run directory is copied
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_a_report_that_fails_midway_leaves_the_old_page(tmp_path, monkeypatch):
    run_dir = _run(tmp_path)
    (run_dir / "report.html").write_text("the old report\n")
    real = Path.write_text

    def half_then_full_disk(self, text, *a, **kw):
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError):
        report.write(run_dir)
    monkeypatch.undo()
    assert (run_dir / "report.html").read_text() == "the old report\n"
    assert not list(run_dir.glob(runs.TEMP_GLOB))
    assert report.write(run_dir) == run_dir / "report.html"
    assert "the old report" not in (run_dir / "report.html").read_text()


def test_a_run_with_damaged_files_is_one_sentence(tmp_path):
    run_dir = _run(tmp_path)
    (run_dir / "history.jsonl").write_text("{not json\n")
    with pytest.raises(runs.RunError, match="history.jsonl is damaged"):
        report.write(run_dir)
    assert not (run_dir / "report.html").exists()


def test_per_class_figures_and_confused_pairs_when_given(tmp_path):
    import torch

    from fmnist import data, evaluate

    labels = torch.arange(10).repeat(3)
    preds = labels.clone()
    preds[:3] = torch.tensor([6, 6, 2])  # T-shirt/top -> Shirt, Trouser -> Shirt, Pullover -> Pullover
    classes = evaluate.per_class(labels, preds)
    page = report.write(_run(tmp_path), classes).read_text()
    table = page.split("<h2>Test results</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*><td>(.*?)</td>", table)
    assert rows == [html.escape(c) for c in data.CLASSES] + ["mean"]
    assert "T-shirt/top taken for Shirt: 1 times (33.3% of T-shirt/top)" in html.unescape(page)
    plain = report.write(_run(tmp_path, "plain")).read_text()  # without the figures: no table
    assert "<th>precision</th>" not in plain and "most-confused" not in plain


def test_a_neurons_profile_follows_its_figures_when_drawn(tmp_path):
    run = _run(tmp_path)
    (run / "plots" / "neuron_50_profile.png").write_bytes(b"png")
    page = report.write(run).read_text()
    figs = re.findall(r'src="plots/([^"]+)"', page)
    assert figs.index("neuron_50_profile.png") == figs.index("neuron_50.png") + 1
    assert "neuron_7_profile.png" not in figs  # not drawn: not referenced
