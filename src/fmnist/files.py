"""How fmnist writes files: atomically, and only into folders that are new, empty or its own.

Imports neither torch nor the rest of fmnist, so that classifying with an
exported model (predict.py on onnxruntime) can write through it too.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RunError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file; temp files start as 0600
TEMP_GLOB = ".*.fmnist-tmp"  # atomic_write's temp files; a killed process can leave them behind
OUTPUT_MARKER = ".fmnist"  # in a folder that compare-init, tune or predict writes into: which of them made it


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old or the new file, never half.

    The temp file, .NAME.PID.RANDOM.fmnist-tmp beside `path`, names the process writing it, so that one a
    killed process left can be told from one being written now (remove_stale_temps)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".fmnist-tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path, older_than: float = 600.0) -> list[Path]:
    """Remove the temp files that atomic_write(path, ...) left when its process was killed: those whose process
    is gone, and those too old to be anyone's (written before the names carried a process, older_than seconds).
    A temp file another process is writing now stays."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.fmnist-tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        try:
            stale = not process_alive(int(pid)) if pid.isdigit() else time.time() - tmp.stat().st_mtime > older_than
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone already, or not ours to remove
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of that id runs on this machine (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def claim_output_dir(path: str | Path, kind: str, legacy: tuple[str, ...] = ()) -> Path:
    """The folder that compare-init or tune (`kind`) writes into: new, empty, or one that `kind` made before.

    A folder of other files is refused rather than written over; `legacy` names
    files that mark a folder made before the marker existed.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the output directory {path}: {e.strerror or e}; choose another --out-dir.") \
            from None
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        others = [p for p in path.iterdir() if p.name != OUTPUT_MARKER and not p.match(TEMP_GLOB)]
        # (the marker again: another worker may have claimed the folder and written into it since the check above)
        if others and not any((path / f).is_file() for f in legacy) and not marker.is_file():
            raise RunError(f"{path} is not empty and holds no fmnist {kind} output; choose another --out-dir.")
        try:  # O_EXCL: of several workers starting together on a new folder, one writes the marker
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(kind + "\n")
            return path
        except FileExistsError:
            pass
    for _ in range(50):  # another worker may be writing it this instant
        made_by = marker.read_text(encoding="utf-8", errors="replace").strip()
        if made_by:
            break
        time.sleep(0.02)
    if made_by != kind:
        raise RunError(f"{path} holds the output of fmnist {made_by or 'something'}, not of {kind}; "
                       "choose another --out-dir.")
    return path


def overwritable(path: Path, ours: Callable[[Path], bool]) -> Path:
    """`path`, unless it is an existing file that fmnist did not write (which is never overwritten)."""
    if path.exists() and not (path.is_file() and ours(path)):
        raise RunError(f"{path} already exists and was not written by fmnist; choose another name or move it away.")
    return path


def made_by_fmnist(path: Path) -> bool:
    """A PNG whose Software field names fmnist (every figure fmnist saves carries it)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith("fmnist")
    except Exception:  # not an image PIL can open: not ours
        return False
