"""fmnist export under hostile conditions: Ctrl-C, a full disk (a file size limit), a killed export."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_sentence

from fmnist import files


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "r"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("model.*"))
    return copy


def _fmnist(*argv: str) -> subprocess.Popen:
    """Ctrl-C reaches it as from a terminal (a background job of a shell would ignore it)."""
    return subprocess.Popen([sys.executable, "-m", "fmnist", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_temp(run: Path, p: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + 120
    while not list(run.glob(f".{name}.*.fmnist-tmp")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.5, 2.5])
def test_ctrl_c_during_an_onnx_export_is_one_line_and_leaves_nothing(run, delay):
    p = _fmnist("export", str(run))
    _wait_for_temp(run, p, "model.onnx")
    time.sleep(delay)  # inside torch.onnx.export, which turned Ctrl-C into its own 100-line error
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:  # finished before the signal came
        return
    assert p.returncode == 130 and err.splitlines() == ["fmnist: interrupted"], err
    assert not list(run.glob("*.fmnist-tmp")) and not (run / "model.onnx").exists()



@pytest.mark.slow
def test_ctrl_c_after_the_export_is_written_leaves_a_finished_command(run):
    """Python's shutdown after torch takes most of a second: a Ctrl-C then made a finished export exit -2."""
    p = _fmnist("export", str(run))
    first = p.stdout.readline()  # standard output is a pipe: it reaches us when the command has returned
    assert "model.onnx" in first, p.communicate()
    p.send_signal(signal.SIGINT)
    out = first + p.stdout.read()  # not communicate(): it reads the pipe itself, past what readline buffered
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == "", err
    assert "use it: fmnist predict" in out and (run / "model.onnx").stat().st_size > 0

def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_that_cannot_be_written_is_one_sentence(run, fmt):
    r = subprocess.run([sys.executable, "-m", "fmnist", "export", str(run), "--format", fmt],
                       capture_output=True, text=True, preexec_fn=_file_size_limit, timeout=300)
    assert r.returncode != -signal.SIGABRT  # torch.jit.save's writer aborted the process
    assert_one_sentence(r, "cannot write", "model.", "File too large")
    assert not list(run.glob("*.fmnist-tmp")) and not list(run.glob("model.*"))


@pytest.mark.slow
def test_a_killed_exports_temp_file_is_removed_by_the_next(run):
    p = _fmnist("export", str(run), "--format", "torchscript")
    _wait_for_temp(run, p, "model.torchscript")
    p.kill()
    p.communicate()
    left = list(run.glob("*.fmnist-tmp"))
    assert left and str(p.pid) in left[0].name
    busy = run / f".model.torchscript.{os.getpid()}.x.fmnist-tmp"  # another export, still writing: kept
    busy.write_bytes(b"")
    old = run / ".model.torchscript.abcdefgh.fmnist-tmp"  # named before temp files named their process
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3600,) * 2)
    assert sorted(files.remove_stale_temps(run / "model.torchscript")) == sorted([left[0], old])
    assert list(run.glob("*.fmnist-tmp")) == [busy]
    busy.unlink()
    (run / f".model.torchscript.{p.pid}.y.fmnist-tmp").write_bytes(b"")  # its process is dead
    r = subprocess.run([sys.executable, "-m", "fmnist", "export", str(run), "--format", "torchscript"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(run.glob("*.fmnist-tmp")) and (run / "model.torchscript").is_file()
