"""The model every `promptier serve --workers` process serves, shared through one small file.

Each worker holds its own model, so an Admin.Reload reaches only the worker whose connection carried
it. To keep the workers on one model, that worker, once it has loaded the model, writes the directory
to the fleet file (owned by the supervisor, in a private temporary directory) with a new generation,
and signals the supervisor (FLEET_SIGNAL), which forwards the signal to every worker: each loads the
file's directory unless it has applied that generation already. A generation, not a comparison of
paths, decides, so reloading the same directory (new files deployed into it, a symlink moved, an
empty request) reaches every worker too. A worker started later (after a crash) starts on the file's
model. SIGHUP on the supervisor writes a new generation naming the start directory, so that every
worker goes back to the directory the server started with, as SIGHUP always did. When reloads are
asked of two workers at once, the file's last write is what every worker ends on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

FLEET_SIGNAL = signal.SIGUSR1

log = logging.getLogger("promptier.serve")


@dataclass(frozen=True)
class FleetState:
    """What the fleet file says: the generation of the last reload (None: none yet) and its directory
    (None: the directory the server started with)."""

    generation: str | None
    directory: Path | None


class FleetModel:
    """The fleet file, read by every worker and written by the one a reload reached (or the supervisor)."""

    def __init__(self, path: Path, supervisor_pid: int) -> None:
        self.path = path
        self.supervisor_pid = supervisor_pid

    def read(self) -> FleetState:
        """The file's state; a missing or unreadable file reads as no reload yet."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            directory = data["directory"]
            return FleetState(str(data["generation"]), Path(directory) if directory else None)
        except (OSError, ValueError, KeyError, TypeError):
            return FleetState(None, None)

    def write(self, directory: Path | None) -> str:
        """Name `directory` (None: the start directory) under a new generation, in one atomic
        replacement of the file; returns the generation.

        Raises:
            OSError: the file cannot be written (its directory removed by a temp cleaner, a full disk).
        """
        generation = uuid.uuid4().hex
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = self.path.with_name(f"{self.path.name}.{generation}")
        staged.write_text(json.dumps({"generation": generation,
                                      "directory": None if directory is None else str(directory.resolve())}),
                          encoding="utf-8")
        os.replace(staged, self.path)
        return generation

    def announce(self, directory: Path | None) -> str | None:
        """After a reload this worker was asked for: make every other worker follow. Returns the
        generation, or None when the file could not be written (logged: the others keep their model)."""
        try:
            generation = self.write(directory)
        except OSError as error:
            log.error(json.dumps({"event": "fleet_announce_failed", "reason": str(error),
                                  "action": "the other workers keep their model"}))
            return None
        with contextlib.suppress(ProcessLookupError):  # a supervisor gone: the workers are draining anyway
            os.kill(self.supervisor_pid, FLEET_SIGNAL)
        return generation


def same_directory(first: Path | None, second: Path | None) -> bool:
    """Whether two artifact directories (None: the shipped default model) are the same one."""
    if first is None or second is None:
        return first is second
    return first.resolve() == second.resolve()
