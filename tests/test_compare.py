"""compare-init's console table: the means and standard deviations over seeds, per init, in the order asked for.

The runs are made by a stand-in for train.fit that writes a run's files with chosen accuracies, so that the
table can be checked against numpy (mean, and std with ddof=1) in milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fmnist import compare, plots, runs, train
from fmnist.config import TrainConfig

# (init, seed) -> (validation accuracy after epoch 1, best validation accuracy, test accuracy)
ACC = {("normal", 0): (0.512, 0.801, 0.7930), ("normal", 1): (0.498, 0.812, 0.8011),
       ("normal", 2): (0.530, 0.795, 0.7877),
       ("xavier", 0): (0.801, 0.871, 0.8650), ("xavier", 1): (0.812, 0.874, 0.8702),
       ("xavier", 2): (0.795, 0.869, 0.8633),
       ("kaiming", 0): (0.790, 0.880, 0.8755), ("kaiming", 1): (0.805, 0.866, 0.8641),
       ("kaiming", 2): (0.788, 0.873, 0.8688)}
INITS = ["normal", "xavier", "kaiming"]  # not alphabetical: the table keeps this order


def fake_fit(cfg: TrainConfig, resume=None, progress=False, data_dir=None):
    """What train.fit leaves in out/<init>-s<seed>/, two epochs, with the accuracies of ACC."""
    first, best, test = ACC[(cfg.init, cfg.seed)]
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir()
    runs.write_config(run_dir, cfg)
    runs.write_history(run_dir, [{"epoch": e, "lr": 0.01, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                                  "val_acc": acc, "seconds": 1.0} for e, acc in ((1, first), (2, best))])
    summary = {"best_val_accuracy": best, "test_accuracy": test, "best_epoch": 2, "epochs": 2}
    runs.write_summary(run_dir, summary)
    (run_dir / "last.pt").write_bytes(b"")
    return SimpleNamespace(summary=summary, dir=run_dir)


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(plots, "init_comparison", lambda results, path: path)


def parse(table: str) -> tuple[list[str], dict[str, list[tuple[float, float]]], str]:
    """Header, init -> [(mean, std)] per column in percent, and the footer."""
    head, *rows, foot = table.splitlines()
    cells = {}
    for row in rows:
        name = row.split()[0]
        cells[name] = [(float(m), float(s)) for m, s in re.findall(r"(-?\d+\.\d+) ± (\d+\.\d+)", row)]
    return head.split("  "), cells, foot


def test_the_table_holds_the_mean_and_std_over_seeds_of_each_init_in_order(tmp_path, no_training):
    results = compare.compare_init(TrainConfig(hidden=[8], epochs=2), INITS, 3, tmp_path / "cmp")
    text = compare.table(results)
    _, cells, foot = parse(text)
    assert list(cells) == INITS
    assert [line.split()[0] for line in text.splitlines()[1:-1]] == INITS
    for init in INITS:
        for column, (mean, std) in enumerate(cells[init]):  # epoch-1 val, best val, test
            values = 100 * np.array([ACC[(init, seed)][column] for seed in range(3)])
            assert mean == pytest.approx(values.mean(), abs=0.005 + 1e-9), (init, column)
            assert std == pytest.approx(values.std(ddof=1), abs=0.005 + 1e-9), (init, column)
    assert foot == "(mean ± std over 3 seeds; percent)"
    assert "epoch-1 val acc" in text and "best val acc" in text and "test acc" in text
    assert compare.table(json.loads((tmp_path / "cmp" / "results.json").read_text())) == text  # as saved


def test_a_rerun_reuses_the_runs_and_gives_the_same_table(tmp_path, no_training, monkeypatch):
    first = compare.table(compare.compare_init(TrainConfig(hidden=[8], epochs=2), INITS, 3, tmp_path / "cmp"))

    def must_not_train(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "fit", must_not_train)
    said: list[str] = []
    again = compare.compare_init(TrainConfig(hidden=[8], epochs=2), INITS, 3, tmp_path / "cmp", echo=said.append)
    assert compare.table(again) == first and len(said) == 9 and all("reused" in s for s in said)


def test_one_seed_has_no_spread_and_says_seed():
    results = {"inits": {"xavier": {"runs": [{}],
                                    "first_epoch_val_accuracy": {"mean": 0.8012, "std": 0.0},
                                    "best_val_accuracy": {"mean": 0.87, "std": 0.0},
                                    "test_accuracy": {"mean": 0.8649, "std": 0.0}}}}
    text = compare.table(results)
    _, cells, foot = parse(text)
    assert cells == {"xavier": [(80.12, 0.0), (87.0, 0.0), (86.49, 0.0)]}
    assert foot == "(mean ± std over 1 seed; percent)"


def test_the_columns_line_up_for_long_and_short_init_names():
    cell = {"mean": 0.5, "std": 0.01}
    results = {"inits": {name: {"runs": [{}, {}], "first_epoch_val_accuracy": cell, "best_val_accuracy": cell,
                                "test_accuracy": cell} for name in ("xavier_normal", "normal")}}
    lines = compare.table(results).splitlines()
    assert len({line.index("±") for line in lines[1:-1]}) == 1  # every row's first ± in one column
    assert len({len(line.rstrip()) for line in lines[1:-1]}) == 1
    assert lines[-1] == "(mean ± std over 2 seeds; percent)"
