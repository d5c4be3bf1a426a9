"""The search space of `fmnist tune`: each model's own, a --space file over it, a point of it as a config.

No training here (tests/test_experiments.py runs studies); each test takes milliseconds.
"""

from __future__ import annotations

import optuna
import pytest
import torch

from fmnist import models, runs, tune
from fmnist.config import ConfigError, TrainConfig

LAYERS = {"mlp": ("hidden", "depth", "width"), "cnn": ("channels", "stages", "channels"),
          "resnet": ("channels", "stages", "channels")}


def space_file(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def first_width(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        return models.first_layer(models.create(cfg.model, **cfg.model_kwargs())).weight.shape[0]


# ---------------------------------------------------------------- each model's space


@pytest.mark.parametrize("name", models.names())
def test_every_model_is_searched_on_the_common_fields_and_its_own_layers(name):
    space = tune.load_space(None, name)
    argument, count, width = models.search_space(name).layers
    assert (argument, count, width) == LAYERS[name]
    assert set(tune.COMMON_SPACE) < set(space) and {count, width} <= set(space)
    tune.check_space(TrainConfig(model=name), space)  # every default value is usable


def test_the_resnet_also_searches_its_blocks_and_no_mlp_layers():
    space = tune.load_space(None, "resnet")
    assert "blocks" in space and "depth" not in space and "width" not in space and "hidden" not in space


@pytest.mark.parametrize("name", models.names())
def test_suggest_draws_a_width_for_each_layer(name):
    _, count, width = models.search_space(name).layers
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    counts = set()
    for _ in range(6):
        trial = study.ask()
        params = tune.suggest(trial, tune.load_space(None, name), name)
        counts.add(params[count])
        assert [k for k in params if k.startswith(f"{width}_")] == [f"{width}_{i}" for i in range(1, params[count] + 1)]
        assert trial.params == params  # every value was drawn, none fixed
        study.tell(trial, 0.5)
    assert len(counts) > 1  # the number of layers is searched too


# ---------------------------------------------------------------- a --space file


def test_a_space_file_replaces_its_entries_and_keeps_the_rest(tmp_path):
    path = space_file(tmp_path, 'lr = {low = 1e-3, high = 1e-2, log = true}\noptimizer = ["adamw"]\n'
                                "dropout = 0.0\nblocks = 2\n")
    space = tune.load_space(path, "resnet")
    assert space["lr"] == {"low": 1e-3, "high": 1e-2, "log": True}
    assert space["optimizer"] == ["adamw"] and space["dropout"] == 0.0 and space["blocks"] == 2
    assert space["channels"] == models.search_space("resnet").entries["channels"]
    assert space["batch_size"] == tune.COMMON_SPACE["batch_size"]


@pytest.mark.parametrize("model,key,known", [("resnet", "depth", "stages"), ("cnn", "width", "channels"),
                                             ("mlp", "blocks", "depth"), ("mlp", "learning_rate", "lr")])
def test_a_key_outside_the_models_space_is_refused(tmp_path, model, key, known):
    path = space_file(tmp_path, f"{key} = 2\n")
    with pytest.raises(ConfigError) as e:
        tune.load_space(path, model)
    said = str(e.value)
    assert f"'{key}'" in said and model in said and known in said and said.count(". ") == 0


@pytest.mark.parametrize("text,said", [
    ("lr = {low = 0.1, high = 0.01}", "low <= high"),
    ("lr = {low = 0.0, high = 0.1, log = true}", "log = true"),
    ('lr = {low = "a", high = 1}', "'lr' needs numbers"),
    ("lr = {low = 0.1, high = 0.2, step = 2}", "'lr' needs numbers"),
    ("optimizer = []", "empty list"),
    ("optimizer = [[\"sgd\"]]", "plain values"),
])
def test_a_malformed_entry_is_refused(tmp_path, text, said):
    with pytest.raises(ConfigError, match=said):
        tune.load_space(space_file(tmp_path, text + "\n"))


@pytest.mark.parametrize("model,text,said", [
    ("mlp", "depth = 0", "depth = 0"),
    ("mlp", "depth = {low = 1, high = 40}", "depth = 40"),
    ("mlp", "width = [64, 0]", "width = 0"),
    ("mlp", "width = [64.5]", "width = 64.5"),
    ("cnn", "stages = {low = 2, high = 5}", "stages = 5"),
    ("cnn", "channels = [16, 5000]", "channels = 5000"),
    ("resnet", "blocks = {low = 1, high = 20}", "blocks = 20"),
    ("resnet", 'optimizer = ["adamw", "lion"]', "'lion'"),
    ("mlp", "dropout = {low = 0.0, high = 1.0}", "dropout = 1.0"),
])
def test_an_unusable_value_is_refused_before_the_study(tmp_path, model, text, said):
    space = tune.load_space(space_file(tmp_path, text + "\n"), model)
    with pytest.raises(ConfigError) as e:
        tune.check_space(TrainConfig(model=model), space)
    assert said in str(e.value) and str(e.value).startswith("search space: ")


# ---------------------------------------------------------------- a point of the space


@pytest.mark.parametrize("name", models.names())
def test_a_point_becomes_the_models_layers(name):
    argument, count, width = models.search_space(name).layers
    point = {"lr": 0.02, "optimizer": "sgd", "dropout": 0.1, count: 2, f"{width}_1": 16, f"{width}_2": 32}
    if name == "resnet":
        point["blocks"] = 1
    cfg = runs.resolve(tune.trial_config(TrainConfig(model=name), point))
    assert getattr(cfg, argument) == [16, 32]
    assert cfg.lr == 0.02 and cfg.optimizer == "sgd" and cfg.dropout == 0.1
    assert first_width(cfg) == 16
    if name == "resnet":
        assert cfg.blocks == 1


def test_a_point_keeps_what_it_does_not_set():
    base = TrainConfig(model="cnn", hidden=[32], epochs=3, seed=7)
    cfg = tune.trial_config(base, {"stages": 1, "channels_1": 8})
    assert cfg.channels == [8] and cfg.hidden == [32] and cfg.epochs == 3 and cfg.seed == 7
    assert tune.trial_config(base, {"lr": 0.5}).channels is None  # no layers in the point: the model's own


def test_tracked_neurons_the_first_layer_lacks_are_left_out():
    cfg = tune.trial_config(TrainConfig(track_neurons=[50, 3]), {"depth": 1, "width_1": 16})
    assert cfg.track_neurons == [3]
    cfg = tune.trial_config(TrainConfig(model="resnet", track_neurons=[20]), {"stages": 1, "channels_1": 16})
    assert cfg.track_neurons is None  # none left: the model's default, fitted to the layer by runs.resolve
    assert runs.resolve(cfg).track_neurons == [1, 8]


def test_a_point_of_another_models_space_is_refused():
    with pytest.raises(ConfigError, match="'depth' is not a setting of the resnet"):
        tune.trial_config(TrainConfig(model="resnet"), {"depth": 2, "width_1": 64, "width_2": 64})


def test_a_point_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="lr must be positive"):
        tune.trial_config(TrainConfig(), {"lr": -1.0, "depth": 1, "width_1": 8})
