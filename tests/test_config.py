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


def _outside(meta: dict) -> list:
    """Values just outside a field's bounds (for a list field: one item outside, or one item too many)."""
    out = [meta["ge"] - 1 if meta["ge"] is not None else None, meta["gt"],
           meta["le"] + 1 if meta["le"] is not None else None, meta["lt"]]
    return [v for v in out if v is not None]


RANGED = [name for name, f in config.FIELDS.items()
          if any(f.metadata[k] is not None for k in ("ge", "gt", "le", "lt", "items"))]


@pytest.mark.parametrize("name", RANGED)
def test_validate_checks_each_fields_range_from_its_metadata(name):
    meta = config.FIELDS[name].metadata
    wrap = (lambda v: [v]) if meta["kind"] == "ints" else (lambda v: v)
    for v in _outside(meta):
        with pytest.raises(ConfigError, match=f"^{name} must be "):
            dataclasses.replace(TrainConfig(), **{name: wrap(v)}).validate()
    for v in (meta["ge"], meta["le"]):  # inclusive bounds are inside
        if v is not None:
            dataclasses.replace(TrainConfig(), **{name: wrap(v)}).validate()
    if meta["items"] and meta["items"][1] is not None:
        too_many = [meta["ge"] or 1] * (meta["items"][1] + 1)
        with pytest.raises(ConfigError, match=f"^{name} must be a list of "):
            dataclasses.replace(TrainConfig(), **{name: too_many}).validate()


@pytest.mark.parametrize("name,value", [("momentum", 1.0), ("plateau_factor", 0.0), ("translate", 15),
                                        ("hidden", [32, 0]), ("channels", [8] * 5), ("track_neurons", [0]),
                                        ("erase", 1.5), ("seed", 2**40), ("bn_bias_lr_scale", 0.0)])
def test_range_messages_are_one_sentence_naming_the_range(name, value):
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(TrainConfig(), **{name: value}).validate()
    said = str(e.value)
    assert said == f"{name} must be {config.describe(name)}, got {value}." and said.count(". ") == 0


@pytest.mark.parametrize("name,value,known", [("init", "zeros", "xavier_normal"), ("activation", "swish", "gelu"),
                                              ("device", "tpu", "mps"), ("precision", "fp16", "bf16")])
def test_names_are_checked_once_against_their_choices(name, value, known):
    with pytest.raises(ConfigError, match=f"unknown {name} '{value}'; known: .*{known}"):
        dataclasses.replace(TrainConfig(), **{name: value}).validate()


def test_model_settings_left_to_the_model_are_not_checked():
    cfg = TrainConfig()
    assert cfg.activation is None and cfg.dropout is None and cfg.hidden is None
    cfg.validate()


def test_help_shows_the_range_that_validate_checks():
    from fmnist import cli

    sub = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: " ".join(a.help.split()) for a in sub._actions if a.help}
    assert helps["momentum"].endswith("(in [0, 1); default: 0.9)")
    assert "one of relu, gelu, silu, tanh, sigmoid, leaky_relu" in helps["activation"]
    assert "one of xavier, xavier_normal, kaiming, normal, default; default: xavier" in helps["init"]
    assert "a list of 1 to 4 values, each from 1 to 4096" in helps["channels"]
    for name in RANGED:
        assert config.describe(name) in helps[name], name


def test_describe_reads_the_bounds():
    assert config.describe("lr") == "positive"
    assert config.describe("plateau_factor") == "in (0, 1)"
    assert config.describe("bn_bias_lr_scale") == "in (0, 1000]"
    assert config.describe("epochs") == "from 1 to 100000"
    assert config.describe("weight_decay") == "at least 0"
    assert config.describe("hidden") == "a list of at most 32 values, each from 1 to 65536"
    assert config.describe("teacher") == ""
