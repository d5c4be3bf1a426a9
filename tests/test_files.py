"""How fmnist writes: atomic writes (readers see the old file or the new one, never half) and the output folders
that compare-init, tune and predict claim, also when several worker processes start on one folder at once."""

from __future__ import annotations

import multiprocessing
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from fmnist import files
from fmnist.errors import RunError

# ---------------------------------------------------------------- atomic_write


def _temp_files(directory: Path) -> list[Path]:
    return list(directory.glob(files.TEMP_GLOB))


def test_atomic_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old\n")
    seen = []

    def write(tmp: str) -> None:
        seen.append((Path(tmp).parent, Path(tmp).match(files.TEMP_GLOB), path.read_text()))
        Path(tmp).write_text("new\n")

    files.atomic_write(path, write)
    assert path.read_text() == "new\n"
    # beside the file (so that the rename is atomic), named so that clean-up finds it, the old file still there
    assert seen == [(tmp_path, True, "old\n")]
    assert path.stat().st_mode & 0o777 == files.FILE_MODE  # not mkstemp's 0600
    assert not _temp_files(tmp_path)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}\n')

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise error

    with pytest.raises(type(error)):
        files.atomic_write(path, half_then_fail)
    assert path.read_text() == '{"old": true}\n'
    assert not _temp_files(tmp_path)
    with pytest.raises(type(error)):  # a file that did not exist yet: still nothing there
        files.atomic_write(tmp_path / "new.json", half_then_fail)
    assert not (tmp_path / "new.json").exists() and not _temp_files(tmp_path)


def test_a_reader_never_sees_half_a_file(tmp_path):
    path = tmp_path / "history.jsonl"
    contents = ["a" * 200_000, "b" * 300_000]
    files.write_text(path, contents[0])
    torn: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            text = path.read_text()
            if text not in contents:
                torn.append(len(text))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            files.write_text(path, contents[i % 2])
    finally:
        done.set()
        reader.join()
    assert not torn, f"a reader saw {len(torn)} partial files, e.g. of {torn[0]} characters"


def test_write_json_round_trip(tmp_path):
    import json

    obj = {"accuracy": 0.875, "names": ["Tér", "<b>"], "n": 3}
    files.write_json(tmp_path / "s.json", obj)
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8")) == obj


# ---------------------------------------------------------------- claim_output_dir, one process


def test_a_new_folder_is_claimed_and_marked_with_its_kind(tmp_path):
    out = tmp_path / "a" / "b"
    assert files.claim_output_dir(out, "tune") == out
    assert (out / files.OUTPUT_MARKER).read_text() == "tune\n"
    (out / "study.journal").write_text("")
    assert files.claim_output_dir(out, "tune") == out  # a rerun of the same command: its own folder
    with pytest.raises(RunError, match="holds the output of fmnist tune, not of compare-init"):
        files.claim_output_dir(out, "compare-init")
    assert (out / files.OUTPUT_MARKER).read_text() == "tune\n"


def test_an_empty_folder_is_claimed_and_temp_files_do_not_count(tmp_path):
    (tmp_path / ".results.json.x.fmnist-tmp").write_text("{")  # what a killed process leaves
    assert files.claim_output_dir(tmp_path, "compare-init") == tmp_path
    assert (tmp_path / files.OUTPUT_MARKER).read_text() == "compare-init\n"


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(RunError, match="not empty and holds no fmnist tune output"):
        files.claim_output_dir(tmp_path, "tune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_legacy_file_marks_a_folder_made_before_the_marker(tmp_path):
    (tmp_path / "study.journal").write_text("")
    assert files.claim_output_dir(tmp_path, "tune", legacy=("study.journal",)) == tmp_path
    assert (tmp_path / files.OUTPUT_MARKER).read_text() == "tune\n"


def test_a_folder_under_a_regular_file_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="cannot create the output directory"):
        files.claim_output_dir(tmp_path / "file" / "out", "tune")


def test_a_worker_that_claims_and_writes_while_another_looks_does_not_refuse_it(tmp_path, monkeypatch):
    """The moment between 'no marker yet' and 'list the folder': another worker of the same kind claims the
    folder and writes its first file there. The folder is tune's own, and this worker must get it too."""
    out = tmp_path / "out"
    out.mkdir()
    real = Path.iterdir
    hooked = []

    def another_worker_claims_first(self):
        if self == out and not hooked:
            hooked.append(True)
            (out / files.OUTPUT_MARKER).write_text("tune\n")
            (out / "study.journal").write_text("")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", another_worker_claims_first)
    assert files.claim_output_dir(out, "tune") == out
    assert hooked, "the folder was never listed: this test no longer reaches the moment it is about"
    monkeypatch.undo()
    hooked.clear()
    monkeypatch.setattr(Path, "iterdir", another_worker_claims_first)  # and a worker of another kind is refused
    (out / files.OUTPUT_MARKER).unlink()
    (out / "study.journal").unlink()
    with pytest.raises(RunError, match="fmnist tune, not of compare-init"):
        files.claim_output_dir(out, "compare-init")


# ---------------------------------------------------------------- claim_output_dir, many processes at once

WORKERS = 8


def _claim(out: str, kind: str, index: int, start, results) -> None:
    """A worker: wait for all, claim `out` for `kind`, then write a file of its own there (as tune does)."""
    start.wait()
    try:
        files.claim_output_dir(out, kind)
    except RunError as e:
        results.put((index, kind, str(e)))
        return
    Path(out, f"worker-{index}.log").write_text(f"{index}\n")
    results.put((index, kind, None))


def _race(out: Path, kinds: list[str]) -> list[tuple[int, str, str | None]]:
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    start, results = ctx.Barrier(len(kinds)), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(out), kind, i, start, results)) for i, kind in enumerate(kinds)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return got


def test_workers_of_one_kind_starting_together_all_get_the_new_folder(tmp_path):
    out = tmp_path / "study"
    got = _race(out, ["tune"] * WORKERS)
    assert [error for _, _, error in got] == [None] * WORKERS, got
    assert (out / files.OUTPUT_MARKER).read_text() == "tune\n"  # written once, whole
    assert sorted(p.name for p in out.iterdir()) == sorted([files.OUTPUT_MARKER] +
                                                           [f"worker-{i}.log" for i in range(WORKERS)])


def test_workers_of_two_kinds_starting_together_one_kind_gets_the_folder(tmp_path):
    out = tmp_path / "out"
    kinds = ["tune", "compare-init"] * (WORKERS // 2)
    got = _race(out, kinds)
    winner = (out / files.OUTPUT_MARKER).read_text()
    assert winner in ("tune\n", "compare-init\n")
    winner = winner.strip()
    loser = "compare-init" if winner == "tune" else "tune"
    for index, kind, error in got:
        if kind == winner:
            assert error is None and (out / f"worker-{index}.log").is_file()
        else:
            assert error is not None and (f"fmnist {winner}, not of {loser}" in error or "not empty" in error), error
            assert not (out / f"worker-{index}.log").exists()


# ---------------------------------------------------------------- overwritable, made_by_fmnist


def _png(path: Path, software: str | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if software is not None:
        info.add_text("Software", software)
    Image.new("L", (4, 4)).save(path, pnginfo=info)
    return path


def test_only_fmnist_figures_and_new_paths_may_be_overwritten(tmp_path):
    ours = _png(tmp_path / "ours.png", "fmnist 0.1.0")
    mine = _png(tmp_path / "mine.png", "GIMP")
    plain = _png(tmp_path / "plain.png", None)
    (tmp_path / "text.png").write_text("not a picture")
    assert files.made_by_fmnist(ours) and not files.made_by_fmnist(mine) and not files.made_by_fmnist(plain)
    assert not files.made_by_fmnist(tmp_path / "text.png") and not files.made_by_fmnist(tmp_path / "missing.png")
    assert files.overwritable(ours, files.made_by_fmnist) == ours
    assert files.overwritable(tmp_path / "new.png", files.made_by_fmnist) == tmp_path / "new.png"
    for path in (mine, plain, tmp_path / "text.png", tmp_path):
        with pytest.raises(RunError, match="was not written by fmnist"):
            files.overwritable(path, files.made_by_fmnist)
