"""compare-init and tune: on tiny synthetic data, with real worker processes and a real PostgreSQL server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import assert_one_sentence, run_fmnist
from PIL import Image

from fmnist import config, tune
from fmnist.compare import compare_init
from fmnist.config import ConfigError, TrainConfig

SMALL = ["--hidden", "64", "--batch-size", "64", "--val-size", "100", "--device", "cpu"]


def start_worker(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fmnist", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def states(storage, name: str = "s") -> list[str]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def journal(path: Path):
    return tune.open_storage(str(path), path.parent)


# ---------------------------------------------------------------- compare-init


def test_compare_init_writes_results_and_reuses_runs(tiny_dir, tmp_path):
    base = TrainConfig(data_dir=str(tiny_dir), hidden=[64], epochs=2, batch_size=64, val_size=100, device="cpu")
    out = tmp_path / "cmp"
    results = compare_init(base, ["xavier", "normal"], 2, out)
    data = json.loads((out / "results.json").read_text())
    assert set(data["inits"]) == {"xavier", "normal"}
    for r in data["inits"].values():
        assert len(r["runs"]) == 2 and all(len(run["val_acc"]) == 2 for run in r["runs"])
        accs = [run["summary"]["best_val_accuracy"] for run in r["runs"]]
        assert r["best_val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert r["best_val_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert results["inits"]["xavier"]["runs"][0]["val_loss"] != results["inits"]["normal"]["runs"][0]["val_loss"]
    img = Image.open(out / "init_comparison.png")
    assert img.size[0] > 800 and np.asarray(img.convert("L")).std() > 5

    stamp = (out / "xavier-s0" / "best.pt").stat().st_mtime_ns
    said = []
    compare_init(base, ["xavier", "normal"], 2, out, echo=said.append)
    assert (out / "xavier-s0" / "best.pt").stat().st_mtime_ns == stamp
    assert all("reused" in s for s in said)

    with pytest.raises(ConfigError, match="another configuration"):
        compare_init(TrainConfig(**{**vars(base), "epochs": 3}), ["xavier"], 1, out)


def test_compare_init_unknown_init_exit_2(tmp_path):
    r = run_fmnist("compare-init", "--inits", "xavier,glorot", "--out-dir", str(tmp_path))
    assert_one_sentence(r, "glorot", "xavier")


# ---------------------------------------------------------------- tune


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_tune_continues_a_study_and_best_config_reproduces(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 't.db'}"
    args = ["tune", "--epochs", "2", "--study", "s", "--storage", db, "--out-dir", str(tmp_path / "out"),
            "--data-dir", str(tiny_dir), *SMALL]
    r = run_fmnist(*args, "--trials", "3")
    assert r.returncode == 0, r.stderr
    r = run_fmnist(*args, "--trials", "2")
    assert r.returncode == 0, r.stderr
    assert "5 trials" in r.stdout
    study = optuna.load_study(study_name="s", storage=db)
    assert len(study.trials) == 5
    assert len({t.params["lr"] for t in study.trials}) == 5  # the rerun did not repeat the first proposals
    for f in ("best.toml", "optimization_history.png"):
        assert (tmp_path / "out" / f).is_file()

    # The best trial, retrained from best.toml, gives the same validation accuracy.
    from fmnist import train

    cfg = config.load(tmp_path / "out" / "best.toml")
    cfg = TrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "runs"), "plots": False})
    run = train.fit(cfg)
    assert run.summary["best_val_accuracy"] == pytest.approx(study.best_value, abs=1e-9)


def test_tune_never_touches_the_test_split(tiny_dir, tmp_path):
    base = TrainConfig(data_dir=str(tiny_dir), hidden=[64], batch_size=64, val_size=100, device="cpu")
    result = tune.tune(replace(base, epochs=1), tmp_path / "out", trials=2, study_name="t")
    for run in (tmp_path / "out" / "trials").iterdir():
        summary = json.loads((run / "summary.json").read_text())
        assert "test_accuracy" not in summary
    assert result.best_toml is not None


def test_pruner_reports_every_epoch(tiny_dir, tmp_path):
    base = TrainConfig(data_dir=str(tiny_dir), hidden=[64], batch_size=64, val_size=100, device="cpu")
    result = tune.tune(replace(base, epochs=3), tmp_path / "out", trials=2, study_name="p")
    for t in result.study.trials:
        assert sorted(t.intermediate_values) == [1, 2, 3]
        assert t.value == max(t.intermediate_values.values())


def test_space_file_overrides_and_fixes(tiny_dir, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('optimizer = ["sgd"]\nlr = {low = 0.01, high = 0.02}\ndepth = 2\nwidth = [64]\ndropout = 0.0\n')
    base = TrainConfig(data_dir=str(tiny_dir), batch_size=64, val_size=100, device="cpu")
    result = tune.tune(replace(base, epochs=1), tmp_path / "out", trials=2, study_name="sp", space_file=str(space))
    for t in result.study.trials:
        assert t.params["optimizer"] == "sgd" and 0.01 <= t.params["lr"] <= 0.02
        assert "dropout" not in t.params  # fixed, not searched
    best = config.load(tmp_path / "out" / "best.toml")
    assert best.hidden == [64, 64] and best.optimizer == "sgd" and best.dropout == 0.0


@pytest.mark.parametrize("model,own", [("cnn", ""), ("resnet", "blocks = {low = 1, high = 2}\n")])
def test_tune_searches_the_widths_of_every_model(tiny_dir, tmp_path, model, own):
    # The model's own space, narrowed to tiny widths so that a trial takes a second.
    space = tmp_path / "space.toml"
    space.write_text(f"stages = {{low = 1, high = 2}}\nchannels = [4, 8]\n{own}")
    base = TrainConfig(model=model, data_dir=str(tiny_dir), batch_size=64, val_size=100, device="cpu",
                       epochs=1, dry_run=True)
    result = tune.tune(base, tmp_path / "out", trials=2, study_name=model, space_file=str(space), pruner="none")
    for t in result.study.trials:
        assert t.state.name == "COMPLETE", t.user_attrs.get("error")
        widths = [t.params[f"channels_{i}"] for i in range(1, t.params["stages"] + 1)]
        assert widths and set(widths) <= {4, 8}
        run = config.load(tmp_path / "out" / "trials" / f"{model}-trial_{t.number}" / "config.toml")
        assert run.model == model and run.channels == widths
        if model == "resnet":
            assert run.blocks == t.params["blocks"]
    assert config.load(result.best_toml).model == model


def test_space_file_key_of_another_model_exit_2(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("depth = 2\n")
    r = run_fmnist("tune", "--model", "resnet", "--space", str(space), "--out-dir", str(tmp_path / "out"))
    assert_one_sentence(r, "'depth'", "resnet", "stages", "blocks")
    assert not (tmp_path / "out").exists()  # refused before the study


def test_space_file_unknown_key_exit_2(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("learning_rate = [0.1]\n")
    assert_one_sentence(run_fmnist("tune", "--space", str(space), "--out-dir", str(tmp_path)), "learning_rate", "lr")


def test_space_file_bad_choice_exit_2(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('optimizer = ["adamw", "lion"]\n')
    assert_one_sentence(run_fmnist("tune", "--space", str(space), "--out-dir", str(tmp_path)), "lion")


@pytest.mark.slow
def test_unreachable_storage_exit_2(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_fmnist("tune", "--storage", f"postgresql://nobody@127.0.0.1:{port}/nothing", "--out-dir", str(tmp_path))
    assert_one_sentence(r, "cannot open the study storage", str(port))


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_two_workers_in_parallel_share_a_journal(tiny_dir, tmp_path):
    path = tmp_path / "study.journal"
    args = ["tune", "--trials", "2", "--epochs", "1", "--study", "s", "--storage", str(path),
            "--out-dir", str(tmp_path / "out"), "--data-dir", str(tiny_dir), *SMALL]
    workers = [start_worker(*args) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="s", storage=journal(path))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers did trials


def kill_mid_trial(storage, args: list[str], tmp_path: Path) -> None:
    """SIGKILL a worker after its trial saved two epochs; a second worker continues that trial's run."""
    w = start_worker(*args, "--trials", "1", "--epochs", "60", "--batch-size", "16")
    deadline = time.time() + 120
    hist = None
    try:
        while time.time() < deadline:
            found = list((tmp_path / "out" / "trials").glob("*/history.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 2:
                hist = found[0]
                break
            assert w.poll() is None, w.communicate()[1]
            time.sleep(0.01)
        else:
            pytest.fail("the first worker never saved an epoch")
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait()
    assert states(storage) == ["RUNNING"]  # what a killed worker leaves behind
    before = [json.loads(line) for line in hist.read_text().splitlines()]
    assert len(before) < 60
    r = run_fmnist(*args, "--trials", "1", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "marked failed" in r.stdout
    assert states(storage) == ["FAIL", "COMPLETE"]
    study = optuna.load_study(study_name="s", storage=storage)
    retry = study.trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == study.trials[0].params
    after = [json.loads(line) for line in hist.read_text().splitlines()]
    assert len(after) == 60  # the retried trial continued the run to its 60 epochs, not a fresh 1-epoch run
    assert [r["val_acc"] for r in after[:len(before)]] == [r["val_acc"] for r in before]
    assert sorted(retry.intermediate_values) == list(range(1, 61))  # earlier epochs replayed to the pruner
    assert retry.value == max(r["val_acc"] for r in after)


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_killed_worker_on_a_journal(tiny_dir, tmp_path):
    path = tmp_path / "study.journal"
    args = ["tune", "--study", "s", "--storage", str(path), "--out-dir", str(tmp_path / "out"),
            "--data-dir", str(tiny_dir), *SMALL]
    kill_mid_trial(journal(path), args, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_heartbeat_fails_a_silent_worker(tiny_dir, tmp_path):
    """The RDB heartbeat alone (the dead worker seems to live on another host) fails the lost trial."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    storage = tune.open_storage(db, tmp_path, heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trial = study.ask()
    trial.set_user_attr("host", "elsewhere")
    trial.set_user_attr("pid", 1)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(5)  # longer than the grace period (3 heartbeats; the database clock counts whole seconds)
    assert tune.fail_dead_trials(study) == []  # not ours to judge by pid...
    assert states(storage) == ["FAIL", "WAITING"]  # ...but its heartbeat stopped, and it is queued again
    retry = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["retries"] == 1


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on loopback, started for these tests and stopped after them."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        if os.environ.get("FMNIST_REQUIRE_DATA"):
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    root.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    datadir = root / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(root / "log"), "-w", "-t", "60",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_two_workers_in_parallel_on_postgresql(postgres_url, tiny_dir, tmp_path):
    args = ["tune", "--trials", "2", "--epochs", "1", "--study", "par", "--storage", postgres_url,
            "--out-dir", str(tmp_path / "out"), "--data-dir", str(tiny_dir), *SMALL]
    workers = [start_worker(*args) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="par", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2


@pytest.mark.slow  # several processes and a kill: run by CI's second pass (pytest -m slow)
def test_killed_worker_on_postgresql(postgres_url, tiny_dir, tmp_path):
    args = ["tune", "--study", "s", "--storage", postgres_url, "--out-dir", str(tmp_path / "out"),
            "--data-dir", str(tiny_dir), *SMALL]
    kill_mid_trial(postgres_url, args, tmp_path)
