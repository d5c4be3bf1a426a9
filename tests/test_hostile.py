"""Hostile and clumsy input, one class of failure at a time.

Every case asserts: exit code 2, one `fmnist: error:` line that names the
problem, no traceback, nothing written outside --out-dir, and every file the
user had before untouched. Cases run in-process (a bug would surface as an
exception, so a traceback fails the test too); interrupts and start-up run in
real processes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import idx_bytes, make_dataset, synthetic

from fmnist import cli, data, runs, train
from fmnist.config import TrainConfig

FAST = ["--hidden", "32", "--epochs", "2", "--batch-size", "64", "--val-size", "100", "--device", "cpu",
        "--no-plots", "--quiet"]


@dataclass
class Env:
    """A sandbox: tmp/cwd is the working directory, tmp/out the --out-dir, tmp/tiny a small dataset."""

    tmp: Path
    tiny: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def cwd(self) -> Path:
        return self.tmp / "cwd"

    def train(self, *extra: str) -> list[str]:
        return ["train", "--data-dir", str(self.tiny), "--out-dir", str(self.out), "--name", "r", *FAST, *extra]

    def finished_run(self) -> Path:
        """A finished run (with figures), made in-process, outside what the case snapshot checks."""
        cfg = TrainConfig(data_dir=str(self.tiny), out_dir=str(self.out), name="done", hidden=[32], epochs=2,
                          batch_size=64, val_size=100, device="cpu", plots=False, threads=1)
        return train.fit(cfg).dir


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes (directories -> 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- the cases: setup(env) -> (argv, words)

def _toml(env: Env, name: str, content: bytes | str) -> str:
    p = env.tmp / "files" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00\xffnot what it should be" * 3)
    elif how == "text":
        path.write_text("{ this is not json\n")
    elif how == "empty":
        path.write_bytes(b"")


def _replace_data_file(env: Env, stem: str, content: bytes) -> None:
    for p in env.tiny.glob(stem + "*"):
        p.unlink()
    (env.tiny / (stem + ".gz")).write_bytes(content)


def _corrupt_deflate(env: Env) -> tuple[list[str], tuple[str, ...]]:
    p = env.tiny / "train-images-idx3-ubyte.gz"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # the header stays valid, the deflate stream breaks
    p.write_bytes(bytes(raw))
    return env.train(), ("train-images-idx3-ubyte", "cannot be read")


def _swapped(env: Env):
    x, y = synthetic(150, 1)
    big_x, big_y = synthetic(600, 2)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", big_x), ("t10k-labels-idx1-ubyte", big_y)):
        _replace_data_file(env, stem, gzip.compress(idx_bytes(arr)))
    return env.train(), ("swapped",)


def _empty_test(env: Env):
    import numpy as np

    _replace_data_file(env, "t10k-images-idx3-ubyte", gzip.compress(idx_bytes(np.zeros((0, 28, 28), np.uint8))))
    _replace_data_file(env, "t10k-labels-idx1-ubyte", gzip.compress(idx_bytes(np.zeros((0,), np.uint8))))
    return env.train(), ("test files", "no images")


def _resume_best_as_last(env: Env):
    run = env.finished_run()
    (run / "summary.json").unlink()  # so that it looks unfinished
    shutil.copy(run / "best.pt", run / "last.pt")
    return ["train", "--resume", str(run)], ("last.pt", "resume")


def _evaluate_mismatch(env: Env):
    run = env.finished_run()
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["hidden"] = [16]  # the weights are of hidden [32]
    path = env.tmp / "files" / "odd.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(ckpt, path)
    return ["evaluate", str(path), "--data-dir", str(env.tiny)], ("odd.pt", "do not match")


def _damaged_in_run(filename: str, how: str, command: str):
    def setup(env: Env):
        run = env.finished_run()
        _damage(run / filename, how)
        if command == "plot":
            return ["plot", str(run), "--data-dir", str(env.tiny)], (filename,)
        if command == "evaluate":
            return ["evaluate", str(run), "--data-dir", str(env.tiny)], (filename,)
        return ["train", "--resume", str(run)], (filename,)
    return setup


def _compare_rerun_damaged(env: Env):
    args = ["compare-init", "--inits", "xavier", "--seeds", "1", "--data-dir", str(env.tiny),
            "--out-dir", str(env.out), "--hidden", "32", "--epochs", "1", "--val-size", "100", "--quiet"]
    assert cli.main(args) == 0
    (env.out / "xavier-s0" / "summary.json").write_text("{broken")
    return args, ("summary.json",)


def _tune(env: Env, *extra: str) -> list[str]:
    return ["tune", "--data-dir", str(env.tiny), "--out-dir", str(env.out), "--epochs", "1", "--hidden", "32",
            "--val-size", "100", "--trials", "1", "--quiet", *extra]


def _resume_on_other_data(env: Env):
    def stop(row):
        raise KeyboardInterrupt

    cfg = TrainConfig(data_dir=str(env.tiny), out_dir=str(env.tmp / "runs"), name="r", hidden=[32], epochs=3,
                      batch_size=64, val_size=100, device="cpu", plots=False)
    with pytest.raises(train.Interrupted):
        train.fit(cfg, on_epoch=stop)
    other = make_dataset(env.tmp / "other", n_train=700)
    return ["train", "--resume", str(env.tmp / "runs" / "r"), "--data-dir", str(other)], ("does not hold the data",)


def _foreign_last(env: Env):
    def stop(row):
        raise KeyboardInterrupt

    for name, hidden in (("r", [32]), ("other", [16])):
        cfg = TrainConfig(data_dir=str(env.tiny), out_dir=str(env.tmp / "runs"), name=name, hidden=hidden, epochs=3,
                          batch_size=64, val_size=100, device="cpu", plots=False)
        with pytest.raises(train.Interrupted):
            train.fit(cfg, on_epoch=stop)
    shutil.copy(env.tmp / "runs" / "other" / "last.pt", env.tmp / "runs" / "r" / "last.pt")
    return ["train", "--resume", str(env.tmp / "runs" / "r")], ("best.pt and last.pt", "different runs")


def _run_in_use(env: Env):
    _, _, held = runs.create(env.out, "r")  # another process is training into out/r
    env.held = held
    return env.train(), ("in use by another fmnist process",)


def _tune_other_space(env: Env):
    first = _toml(env, "a.toml", "depth = 1\n")
    assert cli.main(_tune(env, "--space", first, "--dry-run")) == 0
    return _tune(env, "--space", _toml(env, "b.toml", "depth = 2\n"), "--dry-run"), ("another space",)


def _user_files(env: Env) -> Path:
    d = env.out / "mine"
    d.mkdir(parents=True)
    (d / "config.toml").write_text("# my own notes, not fmnist's\nanswer = 42\n")
    (d / "summary.json").write_text('{"mine": true}\n')
    return d


def _out_under_file(env: Env):
    f = env.tmp / "cwd" / "a-file"
    f.write_text("mine\n")
    return ["train", "--data-dir", str(env.tiny), "--out-dir", str(f / "runs"), "--name", "r", *FAST], \
        ("cannot create",)


def _image(env: Env) -> str:
    """A small product photo outside the folders a case may touch."""
    from PIL import Image

    path = env.tmp / "images" / "shoe.png"
    path.parent.mkdir(exist_ok=True)
    im = Image.new("RGB", (60, 40), (255, 255, 255))
    im.paste((20, 20, 20), (5, 10, 50, 30))
    im.save(path)
    return str(path)


CASES: dict[str, Callable[[Env], tuple[list[str], tuple[str, ...]]]] = {
    # 1. values that validation let through and that crashed later
    "negative weight decay": lambda e: (e.train("--weight-decay", "-1"), ("weight_decay",)),
    "NaN learning rate": lambda e: (e.train("--lr", "nan"), ("lr", "finite")),
    "infinite learning rate": lambda e: (e.train("--lr", "inf"), ("lr", "finite")),
    "seed too large": lambda e: (e.train("--seed", str(2**40)), ("seed",)),
    "negative seed": lambda e: (e.train("--seed", "-3"), ("seed",)),
    "plateau factor above 1": lambda e: (e.train("--schedule", "plateau", "--plateau-factor", "1.5"),
                                         ("plateau_factor",)),
    "negative init std": lambda e: (e.train("--init", "normal", "--init-std", "-0.1"), ("init_std",)),
    "nesterov without momentum": lambda e: (e.train("--optimizer", "sgd", "--nesterov", "--momentum", "0"),
                                            ("nesterov", "momentum")),
    "negative split seed": lambda e: (e.train("--split-seed", "-1"), ("split_seed",)),
    "momentum of 1": lambda e: (e.train("--optimizer", "sgd", "--momentum", "1"), ("momentum",)),
    "negative min lr": lambda e: (e.train("--min-lr=-1e-3"), ("min_lr",)),
    "erase above 1": lambda e: (e.train("--erase", "1.5"), ("erase",)),
    "huge translate": lambda e: (e.train("--translate", "1000"), ("translate",)),
    "negative threads": lambda e: (e.train("--threads", "-2"), ("threads",)),
    "zero-width layer": lambda e: (e.train("--hidden", "32,0"), ("hidden",)),
    "neuron 0": lambda e: (e.train("--track-neurons", "0"), ("track_neurons",)),
    "neuron twice": lambda e: (e.train("--track-neurons", "3,3"), ("twice",)),
    "too many epochs": lambda e: (e.train("--epochs", "10000000"), ("epochs",)),
    "a model too big for memory": lambda e: (e.train("--hidden", "65536,65536,65536,65536,65536"),
                                             ("GiB", "--hidden")),
    "batch of one with batch norm": lambda e: (e.train("--batch-size", "1", "--batch-norm"), ("batch norm",)),
    "NaN in a TOML file": lambda e: (e.train("--config", _toml(e, "c.toml", "lr = nan\n")), ("lr",)),
    # 2. settings of one model given to another; neurons that the model does not have
    "channels for an MLP": lambda e: (e.train("--channels", "8,16"), ("mlp", "channels")),
    "neuron past the layer": lambda e: (e.train("--track-neurons", "33"), ("neuron 33", "1..32")),
    "CNN neuron 50": lambda e: (["train", "--model", "cnn", "--channels", "8", "--track-neurons", "50",
                                 "--data-dir", str(e.tiny), "--out-dir", str(e.out), "--device", "cpu"],
                                ("neuron 50", "1..8")),
    "five conv blocks": lambda e: (e.train("--model", "cnn", "--channels", "8,8,8,8,8"), ("channels",)),
    "unknown activation": lambda e: (e.train("--activation", "swish"), ("swish", "relu")),
    # 3. damaged files
    "corrupt deflate stream": _corrupt_deflate,
    "config not UTF-8": lambda e: (e.train("--config", _toml(e, "c.toml", b"lr = 0.1\n\xff\xfe\x00")), ("UTF-8",)),
    "space not UTF-8": lambda e: (_tune(e, "--space", _toml(e, "s.toml", b"\xff\xfelr = 1\n")), ("UTF-8",)),
    "config is a directory": lambda e: (e.train("--config", str(e.tiny)), ("directory",)),
    "damaged summary.json, plot": _damaged_in_run("summary.json", "text", "plot"),
    "damaged history.jsonl, plot": _damaged_in_run("history.jsonl", "garbage", "plot"),
    "damaged neurons.npz, plot": _damaged_in_run("neurons.npz", "garbage", "plot"),
    "empty best.pt, evaluate": _damaged_in_run("best.pt", "empty", "evaluate"),
    "damaged last.pt, resume": _damaged_in_run("last.pt", "garbage", "resume"),
    "damaged summary.json, compare-init rerun": _compare_rerun_damaged,
    "best.pt-shaped last.pt, resume": _resume_best_as_last,
    "config that does not match the weights": _evaluate_mismatch,
    "tune storage is a directory": lambda e: (_tune(e, "--storage", str(e.tiny)), ("directory",)),
    "tune storage is a garbage file": lambda e: (_tune(e, "--storage", _toml(e, "j.log", b"\x00garbage\n{")),
                                                 ("j.log", "not an Optuna journal")),
    "tune storage is a user's file": lambda e: (_tune(e, "--storage", _toml(e, "notes.txt", "my notes\n")),
                                                ("notes.txt", "will not write")),
    "tune out-dir of user files": lambda e: (_tune(e, "--out-dir", str(e.cwd)), ("not empty",)),
    "samples over a user's picture": lambda e: ((e.cwd / "holiday.png").write_bytes(b"\x89PNG mine") and [
        "data", "--data-dir", str(e.tiny), "--samples", str(e.cwd / "holiday.png")], ("already exists",)),
    "cosine min lr above lr": lambda e: (e.train("--schedule", "cosine", "--lr", "1e-3", "--min-lr", "0.5"),
                                         ("min_lr",)),
    "mirror without download": lambda e: (["data", "--data-dir", str(e.tiny), "--mirror", "http://127.0.0.1:9/"],
                                          ("--download",)),
    "empty preset": lambda e: (e.train("--preset", ""), ("--preset",)),
    "empty data dir": lambda e: (e.train("--data-dir", ""), ("--data-dir",)),
    "tune space log with low 0": lambda e: (_tune(e, "--space", _toml(e, "s.toml", "lr = {low = 0.0, high = 0.1, "
                                                                                   "log = true}\n")), ("log",)),
    "tune space depth 0": lambda e: (_tune(e, "--space", _toml(e, "s.toml", "depth = 0\n")), ("depth",)),
    "tune space string range": lambda e: (_tune(e, "--space", _toml(e, "s.toml", 'lr = {low = "a", high = 1}\n')),
                                          ("lr",)),
    # 4. data that parses but is wrong
    "train and test swapped": _swapped,
    "a test split of zero images": _empty_test,
    "validation takes every image": lambda e: (e.train("--val-size", "600"), ("val-size", "600")),
    "resume on other data": _resume_on_other_data,
    "resume with another run's last.pt": _foreign_last,
    "a run another process is training": _run_in_use,
    "an abbreviated flag": lambda e: (["train", "--epoch", "3"], ("--epoch",)),
    "tune rerun with another space": _tune_other_space,
    # 5. paths
    "name climbs out": lambda e: (e.train("--name", "../../x"), ("not a plain name",)),
    "absolute name": lambda e: (e.train("--name", "/tmp/fmnist-abs"), ("not a plain name",)),
    "name is dot": lambda e: (e.train("--name", "."), ("not a plain name",)),
    "300-character name": lambda e: (e.train("--name", "n" * 300), ("not a plain name",)),
    "name of a folder of user files": lambda e: (_user_files(e) and e.train("--name", "mine"), ("not empty",)),
    "out-dir under a regular file": _out_under_file,
    "samples with an unknown extension": lambda e: (["data", "--data-dir", str(e.tiny), "--samples",
                                                     str(e.out / "s.xyz")], (".png",)),
    # 7. resume takes --data-dir, and refuses what would change the run
    "resume with a training flag": lambda e: (["train", "--resume", str(e.finished_run()), "--lr", "0.1"],
                                              ("--lr",)),
    "resume of a finished run": lambda e: (["train", "--resume", str(e.finished_run())], ("finished",)),
    # 8. argparse's own errors, and flags that a command would override
    "no command": lambda e: ([], ("COMMAND",)),
    "not an int": lambda e: (["train", "--epochs", "ten"], ("--epochs", "ten")),
    "bad choice": lambda e: (["evaluate", "x", "--split", "train"], ("--split",)),
    "unknown flag": lambda e: (["models", "--colour"], ("--colour",)),
    "compare-init --init": lambda e: (["compare-init", "--init", "normal", "--out-dir", str(e.out)], ("--init",)),
    "tune --name": lambda e: (_tune(e, "--name", "x"), ("--name",)),
    "tune --plots": lambda e: (_tune(e, "--plots"), ("--plots",)),
    # 9. predict and export (a bad image file is not a user error of the command: test_predict.py)
    "predict with a folder that is not a run": lambda e: (["predict", str(e.tiny), _image(e)], ("no best.pt",)),
    "predict --top-k 0": lambda e: (["predict", str(e.finished_run()), _image(e), "--top-k", "0"], ("--top-k",)),
    "predict --batch-size 0": lambda e: (["predict", str(e.finished_run()), _image(e), "--batch-size", "0"],
                                         ("--batch-size",)),
    "predict with a damaged model.onnx": lambda e: (["predict", _toml(e, "model.onnx", b"\x08\x07junk"), _image(e)],
                                                    ("not an ONNX model",)),
    "predict a folder without images": lambda e: (["predict", str(e.finished_run()), str(e.cwd)],
                                                  ("no image files",)),
    "predict --save-inputs into user files": lambda e: (["predict", str(e.finished_run()), _image(e),
                                                         "--save-inputs", str(e.cwd)], ("not empty",)),
    "export a folder that is not a run": lambda e: (["export", str(e.tiny)], ("no best.pt",)),
    "export with its data gone": lambda e: (["export", str(e.finished_run()), "--data-dir", str(e.tmp / "gone")],
                                            ("gone",)),
}


# Optuna's journal is an append-only log that opening a study appends to: tune's own state, inside --out-dir.
MAY_CHANGE = {"tune rerun with another space": {"out/study.journal"}}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_sentence(case, tiny_dir, tmp_path, capsys, monkeypatch):
    env = Env(tmp_path, tiny_dir)
    env.cwd.mkdir()
    (env.cwd / "notes.txt").write_text("a user's file\n")
    argv, words = CASES[case](env)
    capsys.readouterr()
    monkeypatch.chdir(env.cwd)
    before = snapshot(tmp_path)
    code, err = run_cli(argv, capsys)
    after = snapshot(tmp_path)

    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fmnist: error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    changed = [p for p in before if p in after and before[p] != after[p] and p not in MAY_CHANGE.get(case, ())]
    gone = [p for p in before if p not in after]
    assert not changed and not gone, (changed, gone)  # the user's files, data and earlier runs are intact
    new = [p for p in after if p not in before]
    assert all(p == "out" or p.startswith("out/") for p in new), new  # nothing outside --out-dir
    assert not [p for p in new if p.startswith("out/r/")], new  # and no run was started for a refused command


# ---------------------------------------------------------------- class 2: legitimate settings that crashed

def test_last_batch_of_one_image_joins_the_one_before(tiny_dir, tmp_path):
    # 500 training images at batch 499: the last batch would hold one image, which batch norm cannot train on
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="odd", hidden=[32], epochs=1,
                      batch_size=499, val_size=100, device="cpu", plots=False)
    loader = data.BatchLoader(*data.load(str(tiny_dir), 100).train, 499)
    assert [len(y) for _, y in loader] == [500]
    assert train.fit(cfg).summary["epochs"] == 1


def test_cnn_without_a_preset_gets_its_own_defaults(tiny_dir, tmp_path):
    cfg = runs.resolve(TrainConfig(model="cnn"))
    assert cfg.channels == [32, 64, 128] and cfg.hidden == [] and cfg.track_neurons == [1, 8]
    mlp = runs.resolve(TrainConfig(model="mlp", hidden=[32]))
    assert mlp.track_neurons == [1]  # neuron 50 does not exist in a layer of 32: the default follows the model
    assert mlp.channels is None and "channels" not in (tmp_path / "x").as_posix()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--batch-size", "27"], ["--model", "cnn", "--channels", "8,16"]],
                         ids=["batch 27", "cnn without preset"])
def test_real_epoch_of_settings_that_used_to_crash(argv, real_dir, tmp_path, capsys):
    """55,000 training images at batch 27 leave a last batch of one; --model cnn used to get an MLP's head."""
    code = cli.main(["train", "--data-dir", str(real_dir), "--out-dir", str(tmp_path), "--name", "r", "--epochs",
                     "1", "--no-plots", "--quiet", "--json", *argv])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 1 and summary["test_accuracy"] > 0.75
    saved = (tmp_path / "r" / "config.toml").read_text()
    if "cnn" in argv:
        assert "channels = [8, 16]" in saved and "hidden = []" in saved and "track_neurons = [1, 8]" in saved


# ---------------------------------------------------------------- class 5: a run name is a name

def test_a_stopped_unstarted_run_may_be_started_again(tiny_dir, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    runs.write_config(run_dir, TrainConfig(epochs=2))  # what an early-stopped run leaves
    (run_dir / f".last.pt.abc{runs.TEMP_GLOB[2:]}").write_bytes(b"half")
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="r", hidden=[32], epochs=1,
                      batch_size=64, val_size=100, device="cpu", plots=False)
    run = train.fit(cfg)
    assert (run.dir / "last.pt").is_file() and not list(run.dir.glob(runs.TEMP_GLOB))


def test_a_user_folder_that_looks_like_a_config_is_not_a_run(tiny_dir, tmp_path):
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.toml").write_text("epochs = 3\n")  # a user's own file, valid TOML of fmnist's keys
    (mine / ".draft.tmp").write_text("my draft\n")
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="exp", hidden=[32], epochs=1,
                      batch_size=64, val_size=100, device="cpu", plots=False)
    with pytest.raises(runs.RunError, match="not an fmnist run"):
        train.fit(cfg)
    assert (mine / "config.toml").read_text() == "epochs = 3\n" and (mine / ".draft.tmp").is_file()


# ---------------------------------------------------------------- class 6: interrupts

def _slow_args(tiny_dir: Path, out: Path) -> list[str]:
    return ["--data-dir", str(tiny_dir), "--out-dir", str(out), "--name", "r", "--hidden", "2048,2048",
            "--batch-size", "2", "--epochs", "3", "--val-size", "100", "--device", "cpu", "--no-plots", "--threads",
            "1"]


def _fmnist(*argv: str) -> subprocess.Popen:
    """A real `fmnist` process that takes Ctrl-C as a terminal user's would (CI may start us with SIGINT ignored)."""
    return subprocess.Popen([sys.executable, "-m", "fmnist", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_ends_keeps_nothing(tiny_dir, tmp_path):
    p = _fmnist("train", *_slow_args(tiny_dir, tmp_path))
    deadline = time.time() + 60
    while not (tmp_path / "r" / "neurons.npz").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / "r" / "last.pt").exists(), "the first epoch ended too soon to test this"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err
    assert "--resume" not in err and "run the same command again" in err
    assert not (tmp_path / "r").exists()  # nothing half-started is left behind


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5])  # before ~0.1 s it is Python's own start-up (site.py)
def test_ctrl_c_during_start_up_is_one_line(tiny_dir, tmp_path, delay):
    p = _fmnist("train", *_slow_args(tiny_dir, tmp_path))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err
    assert p.returncode in (130, -signal.SIGINT), err  # -2: killed before Python installed its handler
    assert len([line for line in err.splitlines() if line.strip()]) <= 1, err


def test_ctrl_c_during_the_test_phase_says_how_to_resume(tiny_dir, tmp_path, monkeypatch):
    cfg = TrainConfig(data_dir=str(tiny_dir), out_dir=str(tmp_path), name="r", hidden=[32], epochs=2,
                      batch_size=64, val_size=100, device="cpu", plots=False)
    real = runs.load_checkpoint

    def interrupt_at_test(path, kind="best"):
        if Path(path).name == "best.pt":
            raise KeyboardInterrupt
        return real(path, kind)

    monkeypatch.setattr(runs, "load_checkpoint", interrupt_at_test)
    with pytest.raises(train.Interrupted) as e:
        train.fit(cfg)
    assert e.value.resumable
    monkeypatch.setattr(runs, "load_checkpoint", real)
    (tmp_path / "r" / f".summary.json.x{runs.TEMP_GLOB[2:]}").write_text("{")  # a temp file a killed process left
    run = train.fit(TrainConfig(), resume=tmp_path / "r")
    assert "test_accuracy" in run.summary and len(run.history) == 2
    assert not list((tmp_path / "r").glob(runs.TEMP_GLOB))


@pytest.mark.slow
def test_ctrl_c_while_drawing_says_the_run_is_complete(tiny_dir, tmp_path, monkeypatch, capsys):
    from fmnist import report

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "draw", interrupt)
    code = cli.main(["train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), "--name", "r", "--hidden", "32",
                     "--epochs", "1", "--val-size", "100", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and f"fmnist plot {tmp_path / 'r'}" in err and "--resume" not in err
    monkeypatch.undo()
    assert cli.main(["plot", str(tmp_path / "r"), "--data-dir", str(tiny_dir)]) == 0
    assert (tmp_path / "r" / "report.html").is_file()


def test_interrupt_hints(tmp_path):
    resumable = train.Interrupted(tmp_path / "r", resumable=True)
    assert f"--resume {tmp_path / 'r'}" in cli._interrupted(None, resumable)
    fresh = train.Interrupted(tmp_path / "r", resumable=False)
    assert "--resume" not in cli._interrupted(None, fresh)
    drawing = train.Interrupted(tmp_path / "r", resumable=False, drawing=True)
    assert f"fmnist plot {tmp_path / 'r'}" in cli._interrupted("train", drawing)
    for command in ("tune", "compare-init"):  # a trial or a seed's run is continued by rerunning the command
        hint = cli._interrupted(command, resumable)
        assert "--resume" not in hint and f"run the same command again to continue the {command}" in hint


def test_a_runs_config_trains_it_again_into_a_new_run(tiny_dir, tmp_path, capsys):
    run = Env(tmp_path, tiny_dir).finished_run()
    code = cli.main(["train", "--config", str(run / "config.toml"), "--out-dir", str(tmp_path / "again"), "--quiet",
                     "--json", "--no-plots"])
    assert code == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["best_val_accuracy"] == runs.read_summary(run)["best_val_accuracy"]  # the same model, retrained


# ---------------------------------------------------------------- class 7: where the data is now

def _stopped_run(tiny_dir: Path, out: Path, monkeypatch) -> Path:
    """A run stopped after its first of 3 epochs, trained from `out` with a relative --data-dir."""
    monkeypatch.chdir(tiny_dir.parent)

    def stop(row):
        raise KeyboardInterrupt

    cfg = TrainConfig(data_dir=tiny_dir.name, out_dir=str(out), name="r", hidden=[32], epochs=3, batch_size=64,
                      val_size=100, device="cpu", plots=False)
    with pytest.raises(train.Interrupted):
        train.fit(cfg, on_epoch=stop)
    return out / "r"


def test_resume_from_another_directory_with_a_relative_data_dir(tiny_dir, tmp_path, monkeypatch, capsys):
    run = _stopped_run(tiny_dir, tmp_path / "runs", monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert len(runs.read_history(run)) == 3


def test_resume_takes_data_dir_and_fmnist_data_wins_over_the_saved_path(tiny_dir, tmp_path, monkeypatch, capsys):
    run = _stopped_run(tiny_dir, tmp_path / "runs", monkeypatch)
    moved = tmp_path / "moved"
    shutil.move(str(tiny_dir), moved)
    code, err = run_cli(["train", "--resume", str(run), "--quiet"], capsys)
    assert code == 2 and "--data-dir" in err  # the saved place is gone: say how to point at the data
    monkeypatch.setenv("FMNIST_DATA", str(moved))
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    monkeypatch.delenv("FMNIST_DATA")
    assert cli.main(["evaluate", str(run), "--data-dir", str(moved), "--json"]) == 0


# ---------------------------------------------------------------- one CLI grammar

def _subparsers():
    parser = cli.build_parser()
    return parser, parser._subparsers._group_actions[0].choices


def test_every_flag_and_argument_has_help():
    parser, subs = _subparsers()
    for name, sub in [("fmnist", parser), *subs.items()]:
        for action in sub._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_one_grammar_across_commands():
    _, subs = _subparsers()

    def flags(name):
        return {s for a in subs[name]._actions for s in a.option_strings}

    for name in ("train", "compare-init", "tune"):
        assert {"--out-dir", "--quiet", "--json", "--data-dir", "--threads"} <= flags(name), name
    for name in ("evaluate", "plot", "data", "models"):
        assert "--json" in flags(name), name
    assert "--quiet" in flags("data")
    assert not any("--out" in flags(n) for n in subs)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fmnist ")


def test_tune_epochs_has_one_default():
    import inspect

    from fmnist import tune

    assert "epochs" not in inspect.signature(tune.tune).parameters  # the config's epochs, in CLI and API alike
    args = cli.build_parser().parse_args(["tune"])
    assert cli.config_from_args(args).epochs == TrainConfig().epochs


def test_no_module_imports_train_to_write_files_and_no_cycles():
    import ast

    pkg = Path(cli.__file__).parent
    edges = {}
    for p in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        edges[p.stem] = {d.split(".")[0] for d in deps} - {p.stem}
    for low in ("plots", "report", "evaluate", "runs", "data", "models", "config", "devices", "distributed"):
        assert "train" not in edges[low], f"{low} imports train"
    assert edges["errors"] == set(), edges["errors"]  # the bottom: every module may raise its errors
    assert edges["config"] <= {"errors"}, edges["config"]  # config imports nothing else of fmnist
    assert edges["devices"] <= {"errors"}, edges["devices"]  # nor does devices: it knows no torch.distributed

    def reach(start, node, seen):
        for nxt in edges.get(node, ()):
            assert nxt != start, f"import cycle through {start} and {node}"
            if nxt not in seen:
                seen.add(nxt)
                reach(start, nxt, seen)

    for m in edges:
        reach(m, m, set())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["models"]])
def test_output_onto_a_full_disk_is_an_error(argv):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "fmnist", *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("fmnist: error: ") and "No space left" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
