"""What the benchmark writes beside its figures: the command that made them, without this machine's folders."""
from __future__ import annotations

import importlib.util
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _run_module():
    spec = importlib.util.spec_from_file_location("benchmark_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_recorded_command_hides_where_runs_were_kept():
    rec = _run_module().recorded_argv
    assert rec(["--presets", "cnn-quick", "--keep-runs", "/home/me/runs", "--seeds", "0"]) == \
        "--presets cnn-quick --keep-runs DIR --seeds 0"
    assert rec(["--keep-runs=/home/me/runs", "--block", "quick"]) == "--keep-runs=DIR --block quick"
    assert rec(["--block", "race"]) == "--block race"
    assert rec(["--data-dir", "/data/fm", "--out=/tmp/o", "--compare", "benchmarks/results.json"]) == \
        "--data-dir DIR --out=DIR --compare benchmarks/results.json"
