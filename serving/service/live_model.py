"""The model a server routes by, and its swap for a newly loaded one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import classifier
from classifier import TierClassifier


class ModelHolder:
    """The live model. Reload validates a new artifact fully before swapping the reference.

    `start_directory` is the directory the server was started with (None: the shipped default model):
    what an empty Admin.Reload and SIGHUP load, even after a reload from another directory.
    `directory` is the one the serving model came from.
    """

    def __init__(self, model: TierClassifier, directory: Path | None, threads: int) -> None:
        self.model = model
        self.start_directory = directory
        self.directory = directory
        self._threads = threads
        self._lock = asyncio.Lock()

    async def reload(self, directory: Path | None) -> tuple[str, str]:
        """Load `directory` (None: the start directory) and swap it in; returns (new, previous) versions."""
        async with self._lock:
            target = self.start_directory if directory is None else directory
            loop = asyncio.get_running_loop()
            new = await loop.run_in_executor(None, classifier.load, target, self._threads)
            previous = self.model.model_version
            self.model, self.directory = new, target  # one reference assignment: atomic for readers
            return new.model_version, previous
