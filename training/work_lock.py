"""One training run per work dir: the lock a run holds on its checkpoints for as long as it runs.

Two `promptier train` commands on the same OUT share its work dir (OUT.work): each would resume and
overwrite the other's checkpoint, write the same temporary file, and fail with an error about a file
that vanished, or leave a checkpoint that is half of each. The lock (classifier.pid_lock) is released
by the system when its holder dies, however it dies: a stopped run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from classifier.errors import PromptierError
from classifier.pid_lock import pid_lock

LOCK_FILE = "train.lock"
OUT_LOCK_SUFFIX = ".train.lock"


@contextlib.contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of `work_dir` (`WORK_DIR/train.lock`) for the with-block; a work dir the
    block made and left empty (a run refused for its logs or pool before any checkpoint) is removed.

    Raises:
        PromptierError: another run holds the lock (the message names the work dir and its pid), or the
            lock file cannot be created.
    """
    def busy(holder: str) -> PromptierError:
        return PromptierError(f"{work_dir} is in use by another training run (pid {holder}): wait for it to "
                              "finish or stop it, then rerun to resume; or give this run another --work-dir "
                              "and --out")

    made = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with pid_lock(work_dir / LOCK_FILE, busy):
            yield
    finally:
        if made:
            # rmdir removes only an empty directory: a checkpoint, or another run's lock file, keeps it. A
            # run starting on it between its mkdir and its lock's open fails to create the lock, and says so.
            with contextlib.suppress(OSError):
                work_dir.rmdir()


@contextlib.contextmanager
def out_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of the artifact directory `out_dir` (`OUT.train.lock` beside it, removed on
    release) for the with-block: two runs that would both write OUT are refused even when their work dirs
    differ (a fresh run and a continuation, `--init-from`), or the later one's artifact would silently
    replace the other's.

    Raises:
        PromptierError: another run holds it (the message names OUT and its pid), or the lock file cannot
            be created.
    """
    def busy(holder: str) -> PromptierError:
        return PromptierError(f"{out_dir} is being written by another training run (pid {holder}): wait for it "
                              "to finish or stop it, or give this run another --out")

    out_dir = out_dir.resolve()  # `.` or `models/mine/` name a directory too
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with pid_lock(out_dir.with_name(out_dir.name + OUT_LOCK_SUFFIX), busy):
        yield
