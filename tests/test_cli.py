"""The command line: user errors end in one sentence and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_sentence, idx_bytes, run_fmnist, synthetic

from fmnist import cli, runs

TINY = ["--hidden", "64,16", "--epochs", "2", "--batch-size", "64", "--val-size", "100", "--device", "cpu",
        "--no-plots", "--quiet"]


def test_nonexistent_data_dir(tmp_path):
    r = run_fmnist("train", "--data-dir", "/nonexistent", "--out-dir", str(tmp_path))
    assert_one_sentence(r, "/nonexistent", "fmnist data --download", "dataset-fashion-mnist")


def test_truncated_idx_file(tiny_dir, tmp_path):
    p = tiny_dir / "train-images-idx3-ubyte.gz"
    p.unlink()
    p.with_suffix("").write_bytes(idx_bytes(synthetic(600, 1)[0])[:-1000])
    r = run_fmnist("train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path))
    assert_one_sentence(r, "train-images-idx3-ubyte", "truncated")


def test_wrong_magic_idx_file(tiny_dir, tmp_path):
    p = tiny_dir / "t10k-labels-idx1-ubyte.gz"
    p.unlink()
    p.with_suffix("").write_bytes(b"GIF89a" + bytes(300))
    r = run_fmnist("train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path))
    assert_one_sentence(r, "t10k-labels-idx1-ubyte", "magic")


def test_unknown_model(tmp_path):
    assert_one_sentence(run_fmnist("train", "--model", "vit", "--out-dir", str(tmp_path)), "vit", "mlp")


def test_unknown_preset(tmp_path):
    assert_one_sentence(run_fmnist("train", "--preset", "turbo", "--out-dir", str(tmp_path)), "turbo", "quick")


def test_malformed_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("epochs = [1,\n")
    assert_one_sentence(run_fmnist("train", "--config", str(p), "--out-dir", str(tmp_path)), "bad.toml", "TOML")


def test_unknown_toml_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("epoch = 3\n")
    assert_one_sentence(run_fmnist("train", "--config", str(p)), "epoch")


def test_evaluate_not_a_run(tmp_path):
    assert_one_sentence(run_fmnist("evaluate", str(tmp_path)), "not a run directory")


def test_resume_nothing(tmp_path):
    assert_one_sentence(run_fmnist("train", "--resume", str(tmp_path)), "last.pt")


def test_bad_flag_value_exits_2(tmp_path):
    r = run_fmnist("train", "--hidden", "256,abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "256,abc" in r.stderr


def test_layering_preset_config_flags(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("epochs = 7\nlr = 0.2\n")
    args = cli.build_parser().parse_args(["train", "--preset", "course", "--config", str(p), "--lr", "0.3"])
    cfg = cli.config_from_args(args)
    assert cfg.optimizer == "sgd"  # from the preset
    assert cfg.epochs == 7  # the file beats the preset
    assert cfg.lr == 0.3  # the flag beats the file


def test_every_config_field_has_a_flag():
    from fmnist.config import FIELDS

    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in help_text, name


def test_train_then_evaluate(tiny_dir, tmp_path, capsys):
    assert cli.main(["train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), "--name", "r", *TINY]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    run = tmp_path / "r"
    summary = runs.read_summary(run)  # the default averages the mirror where validation says it pays, and says so
    assert ("answers average the mirror views" in out) is summary["inference_tta"]
    assert ("answers without the test-time views" in out) is not summary["inference_tta"]
    assert ("photos are answered with six views" in out) is ("photo_views" in summary)  # ... and for photos
    assert ("photos are answered as any other image" in out) is ("photo_views" not in summary)
    saved = (run / "config.toml").read_text()
    assert "hidden = [64, 16]" in saved and "epochs = 2" in saved
    assert cli.main(["evaluate", str(run), "--json", "--data-dir", str(tiny_dir)]) == 0
    r = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert r["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert cli.main(["evaluate", str(run), "--data-dir", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "confusion matrix" in text and "Ankle boot" in text


def test_data_command_on_unverified_files(tiny_dir, capsys):
    assert cli.main(["data", "--data-dir", str(tiny_dir)]) == 1
    out = capsys.readouterr().out
    assert "verified:  NO" in out and "Trouser" in out and "60" in out


def test_data_samples_grid(tiny_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "s.png"
    cli.main(["data", "--data-dir", str(tiny_dir), "--samples", str(out)])
    img = Image.open(out)
    assert img.size[0] > 300 and img.size[1] > 300


@pytest.mark.realdata
def test_data_command_real(real_dir, capsys):
    assert cli.main(["data", "--data-dir", str(real_dir)]) == 0
    out = capsys.readouterr().out
    assert "verified:  yes" in out and "60000" in out and "mean 0.2860" in out


@pytest.mark.slow
@pytest.mark.realdata
def test_dry_run_real(real_dir, tmp_path):
    r = run_fmnist("train", "--dry-run", "--data-dir", str(real_dir), "--out-dir", str(tmp_path), "--name", "d",
                "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert (Path(tmp_path) / "d" / "summary.json").is_file()


def test_an_error_keeps_its_facts_across_processes_and_the_cli_says_it_once(capsys, monkeypatch):
    """torch.distributed pickles rank 0's error to the other ranks: the fields must survive, and a rank that did
    not find the error stays quiet while rank 0 says it."""
    import pickle

    from fmnist import errors

    e = errors.RunError("the run is  damaged.", hint="Train it again.", run_dir="runs/a", resumable=True)
    e.rank = 0
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is errors.RunError and isinstance(back, errors.FmnistError)
    assert (back.message, back.hint, back.run_dir, back.resumable, back.rank) == (
        "the run is  damaged.", "Train it again.", Path("runs/a"), True, 0)
    assert back.sentence() == "the run is damaged. Train it again."

    def fail(args):
        raise back

    monkeypatch.setattr(cli, "cmd_models", fail)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "fmnist: error: the run is damaged. Train it again.\n")):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["models"]) == 2
        assert capsys.readouterr().err == said
