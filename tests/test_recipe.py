"""A preset with two recipes (cnn-fast: one for bf16 arithmetic, one for fp32) takes the one the run's device
computes in, says so, records it in summary.json, and lets --config and flags win over it."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config

from fmnist import cli, config, train


def parsed(*argv: str):
    args = cli.build_parser().parse_args(["train", *argv])
    args.argv = ["train", *argv]
    return args


@pytest.mark.parametrize("bf16", [True, False])
def test_the_recipe_follows_what_the_device_computes(monkeypatch, bf16):
    monkeypatch.setattr(cli, "_computes_bf16", lambda cfg: bf16)
    args = parsed("--preset", "cnn-fast")
    cfg = cli.config_from_args(args)
    want = config.preset("cnn-fast", fp32=not bf16)
    assert cfg == want.validate()
    assert args.recipe == ("bf16" if bf16 else "fp32")


def test_flags_and_config_win_over_the_fp32_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_computes_bf16", lambda cfg: False)
    key = next(iter(config.fp32_recipe("cnn-fast")))
    assert cli.config_from_args(parsed("--preset", "cnn-fast", "--epochs", "3")).epochs == 3
    f = tmp_path / "c.toml"
    f.write_text("seed = 7\n")
    cfg = cli.config_from_args(parsed("--preset", "cnn-fast", "--config", str(f)))
    assert cfg.seed == 7 and getattr(cfg, key) == config.fp32_recipe("cnn-fast")[key]


def test_precision_fp32_on_any_machine_takes_the_fp32_recipe():
    args = parsed("--preset", "cnn-fast", "--precision", "fp32", "--device", "cpu")
    cfg = cli.config_from_args(args)
    assert args.recipe == "fp32" and cfg.epochs == config.preset("cnn-fast", fp32=True).epochs


def test_a_one_recipe_preset_records_none():
    args = parsed("--preset", "mlp-fast")
    cli.config_from_args(args)
    assert args.recipe == ""


def test_models_says_which_recipe_applies_here(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_computes_bf16", lambda cfg: False)
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cnn-fast on this machine" in out and "fp32 recipe" in out
    assert cli.main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipes"]["cnn-fast"] == "fp32"


def test_the_recipe_is_in_summary_json_and_survives_a_resume(tiny_dir, tmp_path):

    cfg = tiny_config(tiny_dir, tmp_path, epochs=2)
    run = train.fit(cfg, recipe="fp32")
    assert json.loads((run.dir / "summary.json").read_text())["recipe"] == "fp32"
    assert torch.load(run.dir / "last.pt", weights_only=False)["recipe"] == "fp32"
    one = train.fit(tiny_config(tiny_dir, tmp_path / "b", epochs=1))
    assert "recipe" not in one.summary


def test_the_recipe_line_names_only_what_the_flags_left_to_it(monkeypatch):
    monkeypatch.setattr(cli, "_computes_bf16", lambda cfg: False)
    table = config.fp32_recipe("cnn-fast")
    words = cli._recipe_words("cnn-fast", cli.config_from_args(parsed("--preset", "cnn-fast", "--epochs", "3")))
    assert f"epochs {table['epochs']}" not in words and "channels" in words
    assert f"epochs {table['epochs']}" in cli._recipe_words("cnn-fast")
