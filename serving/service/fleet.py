"""The model every `promptier serve --workers` process serves, shared through one small file.

Each worker holds its own model, so an Admin.Reload reaches only the worker whose connection carried
it. To keep the workers on one model, the worker that reloads writes the directory to the fleet file
(owned by the supervisor, in a private temporary directory) and signals the supervisor
(FLEET_SIGNAL), which forwards the signal to every worker: each loads what the file names unless it
serves it already. A worker started later (after a crash) starts on it too. SIGHUP on the supervisor
empties the file first, so that every worker goes back to the directory the server started with,
as SIGHUP always did.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

FLEET_SIGNAL = signal.SIGUSR1


class FleetModel:
    """The fleet file: the directory every worker should serve; empty means the start directory."""

    def __init__(self, path: Path, supervisor_pid: int) -> None:
        self.path = path
        self.supervisor_pid = supervisor_pid

    def read(self) -> Path | None:
        """The directory the workers should serve; None: the one the server started with."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return Path(text) if text else None

    def write(self, directory: Path | None) -> None:
        """Name `directory` (None: the start directory) in one atomic replacement of the file."""
        staged = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        staged.write_text("" if directory is None else str(directory.resolve()), encoding="utf-8")
        os.replace(staged, self.path)

    def announce(self, directory: Path | None) -> None:
        """After a reload this worker was asked for: make every other worker follow."""
        self.write(directory)
        with contextlib.suppress(ProcessLookupError):  # a supervisor gone: the workers are draining anyway
            os.kill(self.supervisor_pid, FLEET_SIGNAL)


def same_directory(first: Path | None, second: Path | None) -> bool:
    """Whether two artifact directories (None: the shipped default model) are the same one."""
    if first is None or second is None:
        return first is second
    return first.resolve() == second.resolve()
