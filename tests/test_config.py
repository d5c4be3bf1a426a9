from __future__ import annotations

import dataclasses

import pytest

from fmnist import config
from fmnist.config import ConfigError, TrainConfig


def test_defaults_validate():
    TrainConfig().validate()


def test_toml_roundtrip(tmp_path):
    cfg = dataclasses.replace(TrainConfig(), hidden=[64, 32], lr=0.02, name='odd "name"', flip=False)
    p = tmp_path / "c.toml"
    p.write_text(config.to_toml(cfg))
    assert config.load(p) == cfg


def test_unknown_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("lr = 0.1\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        config.load(p)


def test_wrong_type(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('epochs = "ten"\n')
    with pytest.raises(ConfigError, match="'epochs' should be int"):
        config.load(p)


def test_int_accepted_for_float():
    assert config.from_dict({"lr": 1}).lr == 1.0


def test_malformed_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", config.presets())
def test_every_preset_loads_and_validates(name):
    config.preset(name).validate()


def test_presets_shipped():
    assert {"quick", "course", "mlp-fast", "cnn-fast", "mlp-best", "cnn-best"} <= set(config.presets())


def test_unknown_preset():
    with pytest.raises(ConfigError, match="known presets: .*quick"):
        config.preset("fast-and-furious")


@pytest.mark.parametrize("field,value,msg", [
    ("optimizer", "lion", "unknown optimizer"),
    ("schedule", "step", "unknown schedule"),
    ("epochs", 0, "epochs must be"),
    ("dropout", 1.0, "dropout must be"),
])
def test_validate_rejects(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        dataclasses.replace(TrainConfig(), **{field: value}).validate()
