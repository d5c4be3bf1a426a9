"""The run directory: creating and locking it (also against other processes), checkpoints validated on load,
history, summary and neuron files and their damaged forms, resolving a config, and cleaning up.

Every user-made problem must be a RunError (or ConfigError): one sentence that names the file, never a
traceback. Everything here runs on files the tests make; the model is an 8-neuron MLP.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmnist import runs
from fmnist.config import TrainConfig
from fmnist.errors import ConfigError, FmnistError, RunError

FORK = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def one_sentence(e: pytest.ExceptionInfo, *words: str) -> None:
    text = str(e.value)
    assert "\n" not in text and text.rstrip().endswith((".", "?")), text
    for w in words:
        assert w in text, text


# ---------------------------------------------------------------- create and lock


def test_create_makes_a_new_run_and_holds_it_against_a_second_training(tmp_path):
    run_dir, created, held = runs.create(tmp_path / "runs", "r")
    assert run_dir == tmp_path / "runs" / "r" and run_dir.is_dir() and created
    with pytest.raises(RunError) as e:
        runs.create(tmp_path / "runs", "r")
    one_sentence(e, str(run_dir), "in use by another fmnist process")
    held.close()  # the first training ends
    again, created, held = runs.create(tmp_path / "runs", "r")
    assert again == run_dir and not created and held is not None
    held.close()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "", ".hidden", "x" * 150])
def test_a_name_is_one_plain_path_component(tmp_path, name):
    with pytest.raises(FmnistError, match="not a plain name"):
        runs.create(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def _finished(run_dir: Path) -> None:
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig())
    (run_dir / "last.pt").write_bytes(b"weights")


def _users(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")


def _users_config(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("epochs = 3\n")  # valid fmnist keys, but not written by fmnist


def _a_file(run_dir: Path) -> None:
    run_dir.write_text("a file\n")


def _started_plus_users(run_dir: Path) -> None:
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig())
    (run_dir / "photo.jpg").write_bytes(b"\xff\xd8")


@pytest.mark.parametrize("make,words", [
    (_finished, ("already holds a run", "--resume")),
    (_users, ("not empty", "not an fmnist run")),
    (_users_config, ("not an fmnist run",)),
    (_started_plus_users, ("not an fmnist run",)),
    (_a_file, ("not a directory",)),
], ids=["finished run", "user files", "user's config.toml", "stopped run plus a user file", "a file"])
def test_create_refuses_what_is_not_a_new_or_stopped_run_and_changes_nothing(tmp_path, make, words):
    make(tmp_path / "r")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunError) as e:
        runs.create(tmp_path, "r")
    one_sentence(e, str(tmp_path / "r"), *words)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_create_under_a_regular_file_is_one_sentence(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError) as e:
        runs.create(tmp_path / "f" / "runs", "r")
    one_sentence(e, "cannot create the run directory")


def test_a_stopped_run_is_taken_again_and_its_temp_files_are_cleaned(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig())
    runs.write_history(run_dir, [])
    (run_dir / "tb").mkdir()
    temp = run_dir / f".last.pt.abc{runs.TEMP_GLOB[2:]}"
    temp.write_bytes(b"half a checkpoint")
    same, created, held = runs.create(tmp_path, "r")
    assert same == run_dir and not created and held is not None
    assert not temp.exists() and (run_dir / "config.toml").is_file() and (run_dir / "tb").is_dir()
    held.close()


def _try_create(out: str, start, results, done) -> None:
    start.wait()
    held = None
    try:
        held = runs.create(out, "r")[2]  # the lock lasts as long as this file stays open
        results.put("created")
    except RunError as e:
        results.put(str(e))
    done.wait()  # hold the lock (if any) until every process has tried
    assert held is None or not held.closed


def test_processes_racing_for_one_name_one_gets_it_the_others_are_told(tmp_path):
    n = 6
    start, done, results = FORK.Barrier(n), FORK.Barrier(n), FORK.Queue()
    procs = [FORK.Process(target=_try_create, args=(str(tmp_path), start, results, done)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    assert got.count("created") == 1, got
    assert all("in use by another fmnist process" in g for g in got if g != "created"), got


def _hold(out: str, said) -> None:
    held = runs.create(out, "r")[2]
    said.put("holding")
    signal.pause()  # until killed
    held.close()


def test_the_lock_goes_with_a_killed_process(tmp_path):
    said = FORK.Queue()
    p = FORK.Process(target=_hold, args=(str(tmp_path), said))
    p.start()
    try:
        assert said.get(timeout=60) == "holding"
        with pytest.raises(RunError, match="in use by another fmnist process"):
            runs.create(tmp_path, "r")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
    run_dir, created, held = runs.create(tmp_path, "r")  # the killed training's folder: started again
    assert run_dir == tmp_path / "r" and not created
    held.close()


# ---------------------------------------------------------------- remove_unstarted, clean_temp


def test_remove_unstarted_deletes_fmnists_start_files_and_the_empty_folder(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig())
    runs.write_history(run_dir, [])
    (run_dir / "tb").mkdir()
    (run_dir / "tb" / "events").write_bytes(b"x")
    (run_dir / runs.LOCK_FILE).write_text("")
    (run_dir / f".neurons.npz.x{runs.TEMP_GLOB[2:]}").write_bytes(b"x")
    runs.remove_unstarted(run_dir)
    assert not run_dir.exists()


def test_remove_unstarted_keeps_anything_else_and_its_folder(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig())
    (run_dir / "notes.txt").write_text("mine\n")
    runs.remove_unstarted(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_clean_temp_removes_only_temp_files_here_and_in_plots(tmp_path):
    (tmp_path / "plots").mkdir()
    temps = [tmp_path / f".summary.json.a{runs.TEMP_GLOB[2:]}",
             tmp_path / "plots" / f".curves.png.b{runs.TEMP_GLOB[2:]}"]
    keep = [tmp_path / "summary.json", tmp_path / "plots" / "curves.png", tmp_path / "x.fmnist-tmp",
            tmp_path / ".draft.tmp"]
    for p in temps + keep:
        p.write_text("x")
    assert sorted(runs.clean_temp(tmp_path)) == sorted(temps)
    assert not any(p.exists() for p in temps) and all(p.exists() for p in keep)
    assert runs.clean_temp(tmp_path / "nowhere") == []


# ---------------------------------------------------------------- checkpoints


def _model_and_ckpt(**kw) -> tuple[torch.nn.Module, TrainConfig, dict]:
    cfg = runs.resolve(TrainConfig(hidden=[8], **kw))
    torch.manual_seed(0)
    model = runs.build_model(cfg)
    return model, cfg, {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "epoch": 3}


def test_a_checkpoint_round_trips_and_loads_as_its_model(tmp_path):
    model, cfg, ckpt = _model_and_ckpt()
    runs.save_checkpoint(ckpt, tmp_path / "best.pt")
    assert (tmp_path / "best.pt").stat().st_mode & 0o777 == runs.FILE_MODE and not list(tmp_path.glob(runs.TEMP_GLOB))
    back = runs.load_checkpoint(tmp_path / "best.pt")
    assert back["epoch"] == 3 and back["config"] == ckpt["config"]
    loaded, loaded_cfg, _ = runs.load_model(tmp_path)  # a run directory: its best.pt
    assert loaded_cfg == cfg and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), rtol=0, atol=1e-6)


class _Runs:
    """A pickle that would run code when loaded: it makes a folder named `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _damaged(tmp_path: Path, how: str) -> Path:
    _, _, ckpt = _model_and_ckpt()
    path = tmp_path / "best.pt"
    good = tmp_path / "good.pt"
    torch.save(ckpt, good)
    if how == "garbage":
        path.write_bytes(b"\x00\xffnot a checkpoint" * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif how == "a list":
        torch.save([1, 2, 3], path)
    elif how == "no weights":
        torch.save({k: v for k, v in ckpt.items() if k != "model"}, path)
    elif how == "epoch as text":
        torch.save({**ckpt, "epoch": "3"}, path)
    elif how == "runs code":
        torch.save({**ckpt, "epoch": _Runs(tmp_path / "it-ran")}, path)
    elif how == "a folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("how,words", [
    ("garbage", "not a readable fmnist checkpoint"), ("empty", "not a readable fmnist checkpoint"),
    ("truncated", "not a readable fmnist checkpoint"), ("a list", "not an fmnist checkpoint"),
    ("no weights", "'model' is missing or wrong"), ("epoch as text", "'epoch' is missing or wrong"),
    ("runs code", "not a readable fmnist checkpoint"), ("a folder", "is a directory"),
    ("missing", "does not exist")])
def test_a_damaged_or_foreign_checkpoint_is_one_sentence(tmp_path, how, words):
    path = _damaged(tmp_path, how)
    with pytest.raises(RunError) as e:
        runs.load_checkpoint(path)
    one_sentence(e, str(path), words)
    assert not (tmp_path / "it-ran").exists()  # weights only: the file's code never ran


def test_a_best_pt_is_not_a_last_pt(tmp_path):
    _, _, ckpt = _model_and_ckpt()
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(RunError) as e:
        runs.load_checkpoint(tmp_path / "last.pt", "last")
    one_sentence(e, "a last.pt that a run can resume from")


def test_load_model_refuses_weights_that_do_not_fit_or_are_not_finite(tmp_path):
    model, _, ckpt = _model_and_ckpt()
    wrong = {**ckpt, "config": {**ckpt["config"], "hidden": [16]}}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(RunError) as e:
        runs.load_model(tmp_path / "wrong.pt")
    one_sentence(e, "wrong.pt", "do not match its configuration")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save({**ckpt, "model": nan}, tmp_path / "nan.pt")
    with pytest.raises(RunError) as e:
        runs.load_model(tmp_path / "nan.pt")
    one_sentence(e, "nan.pt", "not finite")
    torch.save({**ckpt, "config": {**ckpt["config"], "model": "vit"}}, tmp_path / "vit.pt")
    with pytest.raises(RunError) as e:
        runs.load_model(tmp_path / "vit.pt")
    one_sentence(e, "vit.pt", "holds a configuration fmnist cannot use", "vit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError) as e:
        runs.load_model(tmp_path / "empty")
    one_sentence(e, "not a run directory (no best.pt)")
    with pytest.raises(RunError) as e:
        runs.load_model(tmp_path / "nothing.pt")
    one_sentence(e, "nothing.pt", "does not exist")


def test_check_pair_refuses_a_best_pt_of_another_run(tmp_path):
    _, cfg, ckpt = _model_and_ckpt()
    runs.check_pair(tmp_path, cfg)  # no best.pt yet: nothing to compare
    torch.save(ckpt, tmp_path / "best.pt")
    runs.check_pair(tmp_path, dataclasses.replace(cfg, out_dir="elsewhere", threads=3))  # where and how: same run
    with pytest.raises(RunError) as e:
        runs.check_pair(tmp_path, dataclasses.replace(cfg, lr=0.5))
    one_sentence(e, "best.pt and last.pt come from different runs")


# ---------------------------------------------------------------- config, history, summary, neurons


def test_config_round_trips_without_its_name_and_marks_the_folder_as_a_run(tmp_path):
    cfg = runs.resolve(TrainConfig(hidden=[32, 16], lr=0.01, name="r", data_dir='odd "dir"'))
    assert not runs.is_run(tmp_path)
    runs.write_config(tmp_path, cfg)
    assert runs.read_config(tmp_path) == dataclasses.replace(cfg, name="")  # the folder is the name
    assert runs.is_run_config(tmp_path / "config.toml") and runs.is_run(tmp_path)
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + "lr = [\n")
    with pytest.raises(RunError) as e:
        runs.read_config(tmp_path)
    one_sentence(e, "is not a usable run")


ROWS = [{"epoch": e, "lr": 0.01 / e, "train_loss": 1.0 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.1 / e,
         "val_acc": 0.4 + e / 10, "seconds": 2.5} for e in (1, 2, 3)]


def test_history_round_trips_and_blank_lines_do_not_count(tmp_path):
    runs.write_history(tmp_path, ROWS)
    assert runs.read_history(tmp_path, at_least=3) == ROWS
    (tmp_path / "history.jsonl").write_text("\n" + (tmp_path / "history.jsonl").read_text() + "\n\n")
    assert runs.read_history(tmp_path) == ROWS


@pytest.mark.parametrize("text,words", [
    (json.dumps(ROWS[0]) + "\n{\"epoch\": 2, \n", "line 2 is not JSON"),
    (json.dumps({k: v for k, v in ROWS[0].items() if k != "val_acc"}) + "\n", "line 1 lacks the numbers"),
    (json.dumps({**ROWS[0], "val_acc": float("nan")}) + "\n", "line 1 lacks the numbers"),
    (json.dumps({**ROWS[0], "val_acc": True}) + "\n", "line 1 lacks the numbers"),
    (json.dumps({**ROWS[0], "seconds": "2.5"}) + "\n", "line 1 lacks the numbers"),
    ("[1, 2, 3]\n", "line 1 lacks the numbers"),
    (json.dumps(ROWS[0]) + "\n", "it holds 1 epochs"),
], ids=["not JSON", "a key missing", "NaN", "a boolean", "a string", "not an object", "too short"])
def test_damaged_history_is_one_sentence(tmp_path, text, words):
    (tmp_path / "history.jsonl").write_text(text)
    with pytest.raises(RunError) as e:
        runs.read_history(tmp_path, at_least=2)
    one_sentence(e, str(tmp_path / "history.jsonl"), "damaged", words)


def test_unreadable_or_missing_history_is_one_sentence(tmp_path):
    with pytest.raises(RunError) as e:
        runs.read_history(tmp_path)
    one_sentence(e, "history.jsonl does not exist")
    (tmp_path / "history.jsonl").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(RunError) as e:
        runs.read_history(tmp_path)
    one_sentence(e, "history.jsonl cannot be read")


SUMMARY = {"test_accuracy": 0.9, "test_loss": 0.3, "best_val_accuracy": 0.91, "best_epoch": 2, "epochs": 3,
           "wall_seconds": 12.5, "device": "cpu", "command": "fmnist train"}


def test_summary_round_trips(tmp_path):
    runs.write_summary(tmp_path, SUMMARY)
    assert runs.read_summary(tmp_path) == SUMMARY
    assert runs.read_summary(tmp_path, need=("test_accuracy",)) == SUMMARY


@pytest.mark.parametrize("text,words", [
    ("{broken", "damaged (not JSON)"),
    ("[1, 2]", "it lacks best_val_accuracy"),
    (json.dumps({k: v for k, v in SUMMARY.items() if k != "best_epoch"}), "it lacks"),
    (json.dumps({**SUMMARY, "epochs": None}), "it lacks"),
    (json.dumps({**SUMMARY, "wall_seconds": "12 s"}), "its 'wall_seconds' is not a number"),
    (json.dumps({**SUMMARY, "test_accuracy": float("inf")}), "its 'test_accuracy' is not a number"),
], ids=["not JSON", "not an object", "a need missing", "a need null", "a number as text", "infinity"])
def test_damaged_summary_is_one_sentence(tmp_path, text, words):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(RunError) as e:
        runs.read_summary(tmp_path)
    one_sentence(e, str(tmp_path / "summary.json"), "damaged", words)


def test_neurons_round_trip(tmp_path):
    torch.manual_seed(0)
    snaps = {50: [torch.randn(28, 28) for _ in range(4)], 7: [torch.randn(28, 28) for _ in range(4)]}
    runs.write_neurons(tmp_path, snaps)
    back = runs.read_neurons(tmp_path)
    assert sorted(back) == [7, 50]
    for k, v in snaps.items():
        np.testing.assert_array_equal(back[k], torch.stack(v).numpy())
    with np.load(tmp_path / "neurons.npz") as z:
        assert z["epochs"].tolist() == [0, 1, 2, 3]
    assert not list(tmp_path.glob(runs.TEMP_GLOB)) and not list(tmp_path.glob("*.npz.npz"))


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("how", ["garbage", "truncated", "NaN", "flat", "no snapshots", "pickled"])
def test_damaged_neurons_is_one_sentence(tmp_path, how):
    path = tmp_path / "neurons.npz"
    good = np.ones((3, 28, 28), np.float32)
    if how == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip" * 5)
    elif how == "truncated":
        _npz(path, neuron_5=good, epochs=np.arange(3))
        path.write_bytes(path.read_bytes()[:700])
    elif how == "NaN":
        _npz(path, neuron_5=np.where(good > 0, np.nan, 0))
    elif how == "flat":
        _npz(path, neuron_5=good.reshape(3, -1)[0])
    elif how == "no snapshots":
        _npz(path, neuron_5=np.zeros((0, 28, 28)))
    elif how == "pickled":
        _npz(path, neuron_5=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RunError) as e:
        runs.read_neurons(tmp_path)
    one_sentence(e, str(path), "damaged")


def test_missing_neurons_is_one_sentence(tmp_path):
    with pytest.raises(RunError) as e:
        runs.read_neurons(tmp_path)
    one_sentence(e, "neurons.npz does not exist")


# ---------------------------------------------------------------- resolve, data_dir_for


def test_resolve_fills_in_the_models_own_defaults_and_is_idempotent():
    cfg = runs.resolve(TrainConfig())
    assert cfg.hidden == [256, 128] and cfg.track_neurons == [50] and cfg.activation is not None
    assert runs.resolve(cfg) == cfg
    narrow = runs.resolve(TrainConfig(hidden=[32]))
    assert narrow.track_neurons == [1]  # neuron 50 is past a layer of 32: the default follows the model
    assert runs.resolve(TrainConfig(hidden=[32], track_neurons=[32, 3])).track_neurons == [32, 3]


@pytest.mark.parametrize("cfg,words", [
    (TrainConfig(hidden=[32], track_neurons=[33]), ("neuron 33", "1..32")),
    (TrainConfig(init="zeros"), ("unknown init 'zeros'", "xavier")),
    (TrainConfig(activation="swish"), ("unknown activation 'swish'",)),
    (TrainConfig(batch_size=1), ("batch norm", "--batch-size 2")),
    (TrainConfig(lr=-1.0), ("lr must be positive",)),
    (TrainConfig(model="cnn", channels=[8], track_neurons=[9]), ("neuron 9", "1..8")),
], ids=["neuron past the layer", "init", "activation", "batch of one", "a range", "cnn filter"])
def test_resolve_refuses_before_anything_is_written(cfg, words):
    with pytest.raises(ConfigError) as e:
        runs.resolve(cfg)
    one_sentence(e, *words)


def test_resolve_refuses_a_model_too_big_for_this_machine(monkeypatch):
    monkeypatch.setattr(runs, "_memory_bytes", lambda: 2**30)  # a 1 GiB machine
    assert runs.resolve(TrainConfig(hidden=[256])).hidden == [256]  # 0.2 M parameters: 3 MB
    with pytest.raises(ConfigError) as e:
        runs.resolve(TrainConfig(hidden=[8192, 8192]))  # 73 M parameters: about 1 GiB
    one_sentence(e, "parameters", "GiB", "--hidden")
    assert runs.resolve(TrainConfig(batch_size=1, batch_norm=False)).batch_size == 1  # no batch norm: fine


def test_data_dir_for_prefers_the_flag_then_the_environment_then_the_saved_place(monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    assert runs.data_dir_for("/saved", "/given") == "/given"
    assert runs.data_dir_for("/saved", None) == "/saved"
    assert runs.data_dir_for("", None) is None  # nothing saved: search
    monkeypatch.setenv("FMNIST_DATA", "/env")
    assert runs.data_dir_for("/saved", None) is None  # data.locate reads FMNIST_DATA itself
    assert runs.data_dir_for("/saved", "/given") == "/given"
