"""`fmnist models` says what the presets with precision "auto" train in on this machine: bf16 autocast where the
device computes bfloat16 natively, else fp32 (cnn-fast's time depends on it: see its preset file)."""

from __future__ import annotations

import json

import pytest

from fmnist import cli, config


@pytest.mark.parametrize("bf16", [True, False])
def test_models_says_what_the_auto_presets_train_in_here(capsys, monkeypatch, bf16):
    monkeypatch.setattr(cli, "_computes_bf16", lambda cfg: bf16)
    auto = [n for n in config.presets() if config.preset(n).precision == "auto"]
    assert "cnn-fast" in auto and "mlp-fast" not in auto
    assert cli.main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "on this machine" in x)
    assert line.startswith(", ".join(auto) + " on this machine")
    assert line.endswith("train in bf16 autocast" if bf16 else "train in fp32")
    assert cli.main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == {n: "bf16" if bf16 else "fp32" for n in auto}


def test_precision_fp32_trains_in_fp32_on_any_machine():
    args = cli.build_parser().parse_args(["train", "--preset", "cnn-fast", "--precision", "fp32", "--device", "cpu"])
    cfg = cli.config_from_args(args)
    assert cfg.precision == "fp32" and not cli._computes_bf16(cfg)
    assert cfg.channels == config.preset("cnn-fast").channels  # one recipe: the flag changes the precision alone
