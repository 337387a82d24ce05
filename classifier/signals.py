"""SIGTERM handled as an exit, for the tools that start processes of their own (benches, soaks)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit: `finally` blocks then stop the processes a tool
    started in sessions of their own, which a signal to the tool's process group no longer reaches.
    (Python's default SIGTERM ends the process without running them.) Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
