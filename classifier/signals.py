"""SIGTERM handled as an exit, for the tools that start processes of their own (benches, soaks)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

# Signals received inside `exit_deferred` blocks, acted on when the outermost one ends (main thread only).
_deferring = 0
_deferred: list[int] = []
# Set once a signal has been acted on: the cleanup it started (stopping the processes a tool started,
# each bounded) is not cut short by a repeated Ctrl-C or SIGTERM, which would leave the rest running.
_stopping = False


def _stop(number: int) -> None:
    global _stopping
    _stopping = True
    _deferred.clear()  # acted on now: none may linger into a later block
    if number == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + number)


def _stop_or_defer(number: int, frame: FrameType | None) -> None:
    if _stopping:
        return
    if _deferring:
        _deferred.append(number)
        return
    _stop(number)


def _first_to_act_on(numbers: list[int]) -> int:
    """SIGTERM (a stop asked by a supervisor) over Ctrl-C, when both came during a deferral."""
    return signal.SIGTERM if signal.SIGTERM in numbers else numbers[0]


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit: `finally` blocks then stop the processes a tool
    started in sessions of their own, which a signal to the tool's process group no longer reaches.
    (Python's default SIGTERM ends the process without running them.) Ctrl-C still raises
    KeyboardInterrupt; both wait for the end of an `exit_deferred` block. Once one has been acted on,
    repeats are ignored, so that the stops it set off all run (each is bounded). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _stopping
    _stopping = False
    _deferred.clear()
    previous_term = signal.signal(signal.SIGTERM, _stop_or_defer)
    # Ctrl-C is left alone where the program set its own handler.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop_or_defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """`sigterm_as_exit` where SIGTERM has its default action (the process ends without running a
    `finally`); a handler the program set (a server's drain, a tool's own) is left as it is.

    For blocks whose `finally` undoes a half-done change on disk: a scheduler stops a job with SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    with sigterm_as_exit():
        yield


@contextlib.contextmanager
def exit_deferred() -> Iterator[None]:
    """Within the block, a SIGTERM or Ctrl-C under `sigterm_as_exit` waits for the block's end.

    Start a process and put it where a `finally` will stop it inside one block: a signal acted on
    between the two (even inside `subprocess.Popen`, which waits for the child's exec) would leave the
    process running with nobody to stop it. Keep the block short: the signal waits for it."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run in the main thread only: nothing to defer here
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred:
            _stop(_first_to_act_on(_deferred))
