"""An exclusive lock one process holds on a file for as long as it works on what the file guards.

An flock: the system releases it when its holder dies, however it dies (kill -9 included), so a
stopped job never leaves a stale lock. The file holds the holder's pid, for the message another
process gets, and is removed on release; a lock taken on a file removed meanwhile locks nothing, so
it is taken again on the file now at the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from classifier.errors import PromptierError


@contextlib.contextmanager
def pid_lock(path: Path, busy: Callable[[str], PromptierError],
             error: type[PromptierError] = PromptierError) -> Iterator[None]:
    """Hold the exclusive lock of `path` for the with-block.

    Raises:
        PromptierError: `busy(holder's pid)` when another process holds it; `error` when the lock file
            cannot be created or locked.
    """
    fd = _acquire(path, busy, error)
    try:
        with contextlib.suppress(OSError):  # the pid is for messages only; a full disk must not stop the work
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, busy: Callable[[str], PromptierError], error: type[PromptierError]) -> int:
    """A descriptor of the file at `path` holding its exclusive flock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise error(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise busy(holder) from None
        except OSError as exc:
            os.close(fd)
            raise error(f"cannot lock {path}: {exc.strerror or exc}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)
