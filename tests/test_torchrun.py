"""Training under torchrun: DistributedDataParallel on CPU processes (gloo), as users start it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_fmnist

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are found through /proc")

TINY = ["--hidden", "64,16", "--val-size", "100", "--threads", "1", "--no-plots", "--quiet", "--device", "cpu"]


def torchrun(*args: str, procs: int = 2, extra: tuple[str, ...] = ("--standalone",), **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc-per-node", str(procs),
           "-m", "fmnist", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def finish(p: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def workers(p: subprocess.Popen) -> list[int]:
    """The worker processes torchrun started (its children running fmnist)."""
    kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    return [int(k) for k in kids if b"fmnist" in Path(f"/proc/{k}/cmdline").read_bytes()]


def wait_for(path: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert p.poll() is None, finish(p)[1]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_processes_at_batch_b_train_the_weights_of_one_at_2b(tiny_dir, tmp_path):
    common = ["--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, "--no-batch-norm", "--no-flip",
              "--epochs", "1", "--batch-size", "64"]  # batch_size is the global batch: 2 x 32 here
    rc, out = finish(torchrun(*common, "--name", "two"))
    assert rc == 0, out
    one = subprocess.run([sys.executable, "-m", "fmnist", "train", *common, "--name", "one"], capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s2["best_val_accuracy"] == s1["best_val_accuracy"]  # the ranks' validation counts add up to one's
    assert not list(tmp_path.glob(".torchrun-*"))  # the note for restarts goes with the launch


@pytest.mark.slow
def test_default_model_on_two_processes_only_rank_0_writes(tiny_dir, tmp_path):
    rank0, rank1 = tmp_path / "node0", tmp_path / "node1"
    port = free_port()
    # two "machines": two torchrun commands meeting at a c10d rendezvous; the second one's out_dir must stay empty
    nodes = [torchrun("--data-dir", str(tiny_dir), "--out-dir", str(out), "--epochs", "2", "--name", "ddp",
                      "--val-size", "100", "--no-plots", "--device", "cpu",
                      procs=1, extra=("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                      f"127.0.0.1:{port}", "--rdzv-id", "fmnist-test", "--node-rank", str(i)))
             for i, out in enumerate((rank0, rank1))]
    results = [finish(p) for p in nodes]
    assert all(rc == 0 for rc, _ in results), results
    run = rank0 / "ddp"
    assert not rank1.exists() or not any(rank1.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["global_batch"] == 128
    assert summary["batch_per_process"] == 64 and summary["epochs"] == 2
    written = sorted(p.name for p in run.iterdir() if p.name != ".fmnist-lock")
    assert written == ["best.pt", "config.toml", "history.jsonl", "last.pt", "neurons.npz", "summary.json"]
    out = results[0][1] + results[1][1]
    assert out.count("test accuracy") == 1  # one voice: rank 0's
    assert 0.5 < summary["test_accuracy"] <= 1


@pytest.mark.slow
def test_a_killed_worker_then_resume_on_one_process_completes(tiny_dir, tmp_path):
    args = ["--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, "--epochs", "60", "--name", "k"]
    p = torchrun(*args)
    wait_for(tmp_path / "k" / "last.pt", p)
    os.kill(workers(p)[-1], signal.SIGKILL)
    rc, out = finish(p)
    assert rc != 0
    done = torch.load(tmp_path / "k" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 60 and not (tmp_path / "k" / "summary.json").exists()
    # continued by one process: correct, and said to be not bit-equal
    r = run_fmnist("train", "--resume", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert "trained on 2 process(es) and continues on 1" in r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "k" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 61))
    assert json.loads((tmp_path / "k" / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_last_pt(tiny_dir, tmp_path):
    loud = [a for a in TINY if a != "--quiet"]  # the restarted attempt says what it continues
    args = ["--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *loud, "--epochs", "60"]  # default name
    p = torchrun(*args, extra=("--standalone", "--max-restarts", "1"))
    runs_ = []
    end = time.monotonic() + 120
    while not runs_ or not (runs_[0] / "last.pt").exists():
        assert p.poll() is None and time.monotonic() < end, finish(p)[1]
        runs_ = [d for d in tmp_path.iterdir() if d.is_dir() and d.name != "tiny"]
        time.sleep(0.02)
    os.kill(workers(p)[0], signal.SIGKILL)
    rc, out = finish(p)
    assert rc == 0, out
    assert [d for d in tmp_path.iterdir() if d.is_dir() and d.name != "tiny"] == runs_  # continued, no second run
    rows = [json.loads(line) for line in (runs_[0] / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 61))
    assert f"torchrun restarted this training: continuing {runs_[0]}" in out
    assert "Traceback" not in out and "another process of this training stopped" in out  # not gloo's traceback
    assert not list(tmp_path.glob(".torchrun-*"))  # the note for restarts goes with the launch


@pytest.mark.slow
def test_ctrl_c_under_torchrun_is_said_once_and_leaves_no_note(tiny_dir, tmp_path):
    args = ["--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, "--epochs", "200", "--name", "c"]
    p = torchrun(*args, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(tmp_path / "c" / "last.pt", p)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches torchrun and every worker
    rc, out = finish(p)
    assert rc != 0
    assert out.count("fmnist: interrupted") == 1, out  # every rank said it
    assert "terminate called" not in out and "[rank1]" not in out, out
    assert not list(tmp_path.glob(".torchrun-*")) and (tmp_path / "c" / "last.pt").is_file()


@pytest.mark.slow
def test_a_global_batch_that_does_not_split_is_one_sentence(tiny_dir, tmp_path):
    rc, out = finish(torchrun("--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, "--batch-size", "65"))
    assert rc != 0 and out.count("fmnist: error") == 1 and "does not split evenly over 2 processes" in out
    assert "fmnist/train.py" not in out  # (torchrun prints its own report of a failed worker; fmnist's is one line)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # nothing written beside the data


def fmnist_nproc(*args: str, procs: int = 2, **kw) -> subprocess.Popen:
    """`fmnist train --nproc N ...`: fmnist starts the workers itself, through torch's launcher."""
    cmd = [sys.executable, "-m", "fmnist", "train", "--nproc", str(procs), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow
def test_ctrl_c_with_nproc_is_one_sentence_exit_130_and_the_run_resumes(tiny_dir, tmp_path):
    args = ["--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, "--epochs", "200", "--name", "c"]
    # as a terminal does: Ctrl-C goes to the foreground process group (torch's launcher starts the workers in
    # sessions of their own, so it is the launcher that passes Ctrl-C on to them)
    p = fmnist_nproc(*args, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(tmp_path / "c" / "last.pt", p)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "Traceback" not in err and "terminate called" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"fmnist: interrupted; continue with: fmnist train --resume {tmp_path / 'c'}"], err
    done = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 200 and not (tmp_path / "c" / "summary.json").exists()
    assert not list(tmp_path.glob(".torchrun-*"))
    rc, out = finish(fmnist_nproc("--resume", str(tmp_path / "c")))
    assert rc == 0 and out.count("test accuracy") == 1 and "Traceback" not in out, out
    rows = [json.loads(line) for line in (tmp_path / "c" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 201))
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["world_size"] == 2
    assert not list(tmp_path.glob(".torchrun-*"))


@pytest.mark.slow
def test_an_error_of_the_workers_under_nproc_is_said_once(tiny_dir, tmp_path):
    rc, out = finish(fmnist_nproc("--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY,
                                  "--batch-size", "65"))
    assert rc == 2, out
    assert [line for line in out.splitlines() if line.strip()] == [
        "fmnist: error: batch_size 65 (the global batch) does not split evenly over 2 processes; choose a "
        "multiple of 2."]  # and nothing from torch's launcher
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


@pytest.mark.parametrize("argv, words", [
    (["--nproc", "0"], "--nproc 0: give the number of processes"),
    (["--nproc", "-2"], "--nproc -2"),
    (["--nproc", "2", "--lr", "auto"], "--lr auto is not run on several processes"),
])
def test_nproc_flags_that_cannot_be_used_are_one_sentence(argv, words, tiny_dir, tmp_path, capsys):
    from fmnist import cli

    assert cli.main(["train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist: error: ") and words in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_nproc_under_torchrun_is_one_sentence(tiny_dir, tmp_path, capsys, monkeypatch):
    from fmnist import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), "--nproc", "2"]) == 2
    assert "--nproc starts its own processes" in capsys.readouterr().err


def test_the_workers_run_the_command_without_nproc():
    from fmnist.cli import _without_nproc

    assert _without_nproc(["--nproc", "2", "--epochs", "3"]) == ["--epochs", "3"]
    assert _without_nproc(["--epochs", "3", "--nproc=4", "--name", "x"]) == ["--epochs", "3", "--name", "x"]
    assert _without_nproc(["--epochs", "2", "--npr", "2"]) == ["--epochs", "2"]  # argparse's abbreviation
    assert _without_nproc(["--name", "a", "--", "--nproc"]) == ["--name", "a", "--", "--nproc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_size_without_torchrun_is_one_sentence(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = run_fmnist("train", "--data-dir", str(tiny_dir), "--out-dir", str(tmp_path), *TINY,
                   env={**env, "WORLD_SIZE": "2", "RANK": "0"})
    assert r.returncode == 2 and "start them with torchrun" in r.stderr and "Traceback" not in r.stderr


def test_a_note_whose_torchrun_was_killed_is_removed_by_the_next_launch(tmp_path, monkeypatch):
    from fmnist import train
    from fmnist.config import TrainConfig

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".torchrun-old").write_text(f"gone\n{dead.pid}\n")  # its torchrun was SIGKILLed
    (tmp_path / ".torchrun-live").write_text(f"other\n{os.getpid()}\n")  # another launch, still running
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "new")
    train._note_for_restarts(str(tmp_path), "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".torchrun-live", ".torchrun-new"]
    assert (tmp_path / ".torchrun-new").read_text() == f"mine\n{os.getppid()}\n"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "last.pt").write_bytes(b"")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train._restarted_run(TrainConfig(out_dir=str(tmp_path))) == tmp_path / "mine"
