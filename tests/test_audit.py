"""fmnist audit: label errors found from out-of-fold probabilities, duplicates named by file and index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic, write_idx

from fmnist import audit, cli, data
from fmnist.config import TrainConfig

# A small MLP that learns the synthetic bars well in a second (conftest.synthetic: class c is a bright bar)
SMALL = TrainConfig(hidden=[32], epochs=8, batch_size=32, lr=5e-3, flip=False, plots=False, device="cpu", threads=1)


def separable_pool(n_train: int = 400, n_test: int = 100) -> audit.Pool:
    return audit.Pool.of(synthetic(n_train, 1), synthetic(n_test, 2))


def test_flip_labels_changes_the_asked_share_each_to_another_class_seeded():
    labels = np.arange(1000) % 10
    flipped, which = audit.flip_labels(labels, 0.05, seed=3)
    assert len(which) == 50 and len(set(which.tolist())) == 50
    assert np.flatnonzero(flipped != labels).tolist() == which.tolist()  # every chosen one changed, no other
    assert flipped.min() >= 0 and flipped.max() <= 9
    again, which_again = audit.flip_labels(labels, 0.05, seed=3)
    assert (again == flipped).all() and (which_again == which).all()
    assert not (audit.flip_labels(labels, 0.05, seed=4)[1] == which).all()
    assert (labels == np.arange(1000) % 10).all()  # a copy: the given labels are left alone


def test_folds_are_stratified_and_keep_a_group_together():
    labels = np.arange(500) % 10
    fold = audit.fold_of(labels, 5, seed=0, groups=[np.array([3, 250, 499])])
    assert sorted(np.bincount(fold).tolist())[0] >= 98  # about 100 each
    assert len(set(fold[[3, 250, 499]].tolist())) == 1
    for k in range(5):
        assert np.bincount(labels[fold == k], minlength=10).min() >= 9


def test_flipped_labels_are_found_among_the_flags():
    pool = separable_pool()
    result = audit.audit(pool, SMALL, folds=4, flip=0.05, device=torch.device("cpu"))
    f = result.flip
    assert f["flipped"] == 20
    assert f["recall"] >= 0.8 and f["precision"] >= 0.8, f
    flagged = [r for r in result.issues if r["flipped"]]
    assert len(flagged) == f["found"]
    # each record names the image by its file and index; the suggested class is the true one (the bar's row)
    for r in flagged:
        assert r["split"] == "train"
        assert r["suggested"] == data.CLASSES[pool.labels[r["index"]]] != r["given"]
        assert 0 <= r["quality"] < audit.MAX_GIVEN and r["confidence"] > 0.5
    qualities = [r["quality"] for r in result.issues]
    assert qualities == sorted(qualities)  # worst first
    assert result.probabilities.shape == (500, 10)


def test_without_flips_a_clean_separable_set_has_few_flags():
    result = audit.audit(separable_pool(), SMALL, folds=4, device=torch.device("cpu"))
    assert result.flip is None
    assert sum(result.counts["flagged"].values()) <= 2
    assert result.counts["out_of_fold_accuracy"] > 0.97


def test_duplicates_exact_and_near_within_and_across_files_with_split_and_index():
    (xtr, ytr), (xte, yte) = synthetic(300, 1), synthetic(100, 2)
    xte[7] = xtr[42]  # exact, across the files; labels agree only if we make them
    yte[7] = (ytr[42] + 1) % 10
    xtr[10] = np.clip(xtr[200].astype(int) + np.random.default_rng(0).integers(-2, 3, (28, 28)), 0, 255)  # near
    pool = audit.Pool.of((xtr, ytr), (xte, yte))
    groups = audit.exact_duplicates(pool.images)
    assert [[pool.name(i) for i in g] for g in groups] == [[{"split": "train", "index": 42},
                                                            {"split": "test", "index": 7}]]
    pairs = audit.near_duplicates(pool.images)
    named = {(pool.name(i)["split"], pool.name(i)["index"], pool.name(j)["split"], pool.name(j)["index"])
             for i, j, _ in pairs}
    assert ("train", 42, "test", 7) in named and ("train", 10, "train", 200) in named
    assert len(pairs) == 2  # the bars alone do not make two noisy images near duplicates
    assert all(s >= audit.NEAR for _, _, s in pairs)


def test_near_duplicates_agree_with_all_pairs_brute_force():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (60, 28, 28))
    images = np.concatenate([base, np.clip(base[:20] + rng.integers(-3, 4, (20, 28, 28)), 0, 255)]).astype(np.uint8)
    f = audit._unit(images)
    sim = f @ f.T
    want = {(i, j) for i in range(len(f)) for j in range(i + 1, len(f)) if sim[i, j] >= audit.NEAR}
    got = {(i, j) for i, j, _ in audit.near_duplicates(images)}
    assert got == want and len(want) == 20


def write_files(directory: Path, train: tuple, test: tuple) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in (("train", train), ("test", test)):
        write_idx(directory / data.FILES[split][0], x)
        write_idx(directory / data.FILES[split][1], y)
    return directory


def test_cli_json_names_each_image_by_its_file_and_index(tmp_path, capsys):
    (xtr, ytr), (xte, yte) = synthetic(300, 1), synthetic(100, 2)
    xte[9] = xtr[123]
    d = write_files(tmp_path / "d", (xtr, ytr), (xte, yte))
    out = tmp_path / "out"
    assert cli.main(["audit", "--data-dir", str(d), "--folds", "2", "--out-dir", str(out), "--json",
                     "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["counts"]["images"] == {"train": 300, "test": 100}
    assert r["settings"]["folds"] == 2 and r["settings"]["preset"] == "mlp-fast"
    exact = [g for g in r["duplicates"] if g["kind"] == "exact"]
    assert exact == [{"kind": "exact", "where": "across", "similarity": 1.0, "labels_agree": ytr[123] == yte[9],
                      "images": [{"split": "train", "index": 123, "label": data.CLASSES[ytr[123]]},
                                 {"split": "test", "index": 9, "label": data.CLASSES[yte[9]]}]}]
    for rec in r["issues"]:
        assert set(rec) == {"split", "index", "given", "suggested", "confidence", "quality"}
        labels = ytr if rec["split"] == "train" else yte
        assert rec["given"] == data.CLASSES[labels[rec["index"]]]
    for name in ("audit.json", "out_of_fold.npz", "label_issues.png", "label_issues_test.png",
                 "duplicates_across.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "audit.json").read_text())["duplicates"] == r["duplicates"]
    saved = np.load(out / "out_of_fold.npz")
    assert saved["probabilities"].shape == (400, 10) and saved["index"][300] == 0 and saved["split"][300] == "test"
    # the same folder again: it is fmnist audit's own, so it is written over
    assert cli.main(["audit", "--data-dir", str(d), "--folds", "2", "--out-dir", str(out), "--quiet",
                     "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "label issues" in table and "1 groups of byte-equal images" in table


@pytest.mark.parametrize("argv, words", [
    (["--folds", "1"], ["--folds 1", "between 2 and"]),
    (["--folds", "50"], ["--folds 50"]),
    (["--flip", "0.7"], ["--flip 0.7", "below 0.5"]),
    (["--flip", "-0.1"], ["--flip -0.1"]),
    (["--flip", "0.0001"], ["--flip 0.0001", "flips none"]),
    (["--preset", "turbo"], ["turbo", "mlp-fast"]),
    (["--preset", "mlp-best"], ["mlp-best", "from scratch"]),
    (["--show", "-1"], ["--show -1"]),
    pytest.param(["--device", "cuda"], ["cuda", "not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_values_are_one_sentence(tiny_dir, tmp_path, capsys, argv, words):
    assert cli.main(["audit", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fmnist: error: ")
    for w in words:
        assert w in err[0], err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_missing_data_is_one_sentence(tmp_path, capsys):
    assert cli.main(["audit", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "fmnist data --download" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_folder_of_other_files_is_not_written_into(tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    d = write_files(tmp_path / "d", synthetic(60, 1), synthetic(20, 2))
    assert cli.main(["audit", "--data-dir", str(d), "--out-dir", str(other)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_too_few_images_for_the_folds_is_one_sentence(tmp_path, capsys):
    d = write_files(tmp_path / "d", synthetic(30, 1), synthetic(10, 2))
    assert cli.main(["audit", "--data-dir", str(d), "--folds", "5", "--out-dir", str(tmp_path / "o")]) == 2
    assert "too few" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_data_flips_found_and_indices_point_into_the_files(real_dir, tmp_path):
    result, paths = audit.run(str(real_dir), folds=2, out_dir=tmp_path / "a", seed=1, flip=0.01, threads=1)
    assert result.flip["recall"] >= 0.75 and result.flip["precision"] >= 0.5, result.flip
    xtr, ytr = data.load_split(real_dir, "train")
    xte, _ = data.load_split(real_dir, "test")
    files_ = {"train": xtr, "test": xte}
    across = [d for d in result.duplicates if d["where"] == "across"]
    assert across
    for d in across[:10]:  # read again from the files by the recorded index: still near duplicates
        a, b = (files_[im["split"]][im["index"]] for im in d["images"][:2])
        assert audit._unit(np.stack([a, b])).prod(0).sum() >= audit.NEAR
    for r in result.issues[:50]:
        if r["split"] == "train" and not r["flipped"]:
            assert r["given"] == data.CLASSES[ytr[r["index"]]]
    assert paths["label_issues"].is_file()


def test_an_empty_gallery_is_still_a_figure_of_fmnist(tmp_path):
    from fmnist import files, plots

    path = plots.gallery(np.zeros((0, 28, 28), np.uint8), [], tmp_path / "none.png", "nothing flagged")
    assert files.made_by_fmnist(path)


def test_a_missing_package_is_one_sentence(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab -> ImportError
    assert cli.main(["audit", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fmnist[audit]'" in err and len(err.strip().splitlines()) == 1


def test_label_smoothing_raises_the_limit_by_the_level_it_trains_wrong_classes_towards():
    import dataclasses

    assert audit.given_limit(SMALL) == audit.MAX_GIVEN
    assert audit.given_limit(dataclasses.replace(SMALL, label_smoothing=0.1)) == pytest.approx(audit.MAX_GIVEN + 0.01)
    labels = np.array([0, 0, 1, 1] * 10)
    probs = np.full((40, 10), 0.02 / 9, np.float32)
    probs[np.arange(40), labels] = 0.98
    probs[0] = 0.001 / 8  # image 0: labelled 0; the model says 1 (0.984) and gives 0 1.5 %
    probs[0, :2] = 0.015, 0.984
    assert 0 not in audit.label_issues(labels, probs, 0.01)[0]
    assert 0 in audit.label_issues(labels, probs, 0.02)[0]
