"""The errors a user can cause, and what the command line needs to say about them.

Every kind below is an `FmnistError`: one sentence that says what to do, and
the facts the CLI needs beside it (a hint, the run directory, whether that run
can be resumed, which process of a torchrun training found it). `cli.main`
turns any of them into `fmnist: error: ...` and exit code 2; anything else is
a bug and keeps its traceback. This module imports nothing: predict can use it
without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class FmnistError(Exception):
    """An error the user can cause. `str(e)` is the sentence; the fields are what the CLI may add to it.

    hint: a further sentence (what to run next); run_dir: the run it concerns; resumable: that run holds a
    last.pt to continue from; rank: the torchrun rank that found it (None: this process). An error raised by
    rank 0 on behalf of every rank carries rank 0, so that the other ranks need not print it again.
    """

    def __init__(self, message: str, *, hint: str = "", run_dir: str | Path | None = None,
                 resumable: bool = False, rank: int | None = None):
        super().__init__(message)
        self.message, self.hint, self.resumable, self.rank = message, hint, resumable, rank
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def sentence(self) -> str:
        """The message and its hint on one line, whatever they held."""
        return " ".join(f"{self.message} {self.hint}".split())

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the fields when torch.distributed pickles it to other ranks
        return _rebuild, (type(self), self.message, dict(self.__dict__))


def _rebuild(cls: type[FmnistError], message: str, fields: dict[str, Any]) -> FmnistError:
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    e.__dict__.update(fields)
    return e


class UsageError(FmnistError):
    """A command line that cannot be parsed."""


class ConfigError(FmnistError, ValueError):
    """A configuration the user wrote that cannot be used."""


class DataError(FmnistError):
    """Data files that are missing, damaged, or not Fashion-MNIST."""


class ModelError(FmnistError, ValueError):
    """An unknown model, activation or init name, or arguments a model does not take."""


class RunError(FmnistError):
    """A run directory or checkpoint that cannot be used as asked."""


class DeviceError(FmnistError, RuntimeError):
    """A device or process group that was asked for and is not here."""


class TrainError(FmnistError, RuntimeError):
    """A training that cannot go on (divergence, memory)."""


class TuneError(FmnistError, RuntimeError):
    """A study that cannot be opened or run (unreachable storage, bad search space)."""


class ImageError(FmnistError, ValueError):
    """A file or upload that is not an image fmnist can read."""


class PredictError(FmnistError):
    """A model file or input that `fmnist predict` cannot use."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a training. run_dir: the run it stopped; resumable: it holds a last.pt to continue from;
    drawing: the run had finished (summary.json written) and only its figures were being drawn."""

    def __init__(self, run_dir: str | Path, resumable: bool, drawing: bool = False):
        super().__init__(str(run_dir))
        self.run_dir, self.resumable, self.drawing = Path(run_dir), resumable, drawing
