"""The local labeling engine: a pool of worker processes on this machine, one model in each.

The job process reads the input in fixed-size chunks and hands each to a worker, which parses,
labels and writes it as one part; at most two chunks per worker are in flight, so memory stays flat
whatever the input size. Parts already written by an interrupted run of the same job are skipped,
so a resume produces exactly the output of an uninterrupted run. Workers end with the job process,
even when it is killed with -9.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from classifier.labeling_options import LabelingError, LabelOptions, LabelStats
from classifier.labeling_output import StagedJob, open_job, write_part
from classifier.labeling_rows import parse_row, read_chunks
from classifier.labeling_worker import label_chunk, load_worker_model
from classifier.prompt_files import Payload

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def init_worker(model: str | None, parent: int) -> None:
    """Pool worker initializer: tie this process's life to the job process's, then load the model."""
    _exit_with_parent(parent)
    load_worker_model(model)


def _exit_with_parent(parent: int) -> None:
    """Make this worker end when the job process `parent` does, even when it is killed with -9.

    Otherwise an orphaned worker keeps its model's memory forever: it waits on a queue whose writing
    end it holds itself, so it never sees end-of-file.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def label_part(chunk: list[tuple[str, Payload]], options: LabelOptions, path: Path) -> LabelStats:
    """Worker task: parse, label and write one part file (JSONL or Parquet, by `path`'s suffix).

    The part is renamed into place only when complete, so after a kill it exists whole or not at all.
    Only the counts travel back to the job process.

    Raises:
        LabelingError: the part cannot be written (disk full, ...); no partial file is left.
    """
    parsed = [parse_row(name, payload, options) for name, payload in chunk]
    rows = label_chunk(parsed, options)
    write_part(rows, options, path)
    stats = LabelStats.of_rows(rows, options.keep_columns)
    stats.id_values = sum(row.own_id for row in parsed)
    return stats


def label_locally(files: Sequence[Path], output: Path, options: LabelOptions, workers: int | None, resume: bool,
                  progress: bool) -> LabelStats:
    """Label `files` into `output` with a pool of `workers` processes (default: one per CPU).

    The caller holds `output_lock(output)`. See `classifier.labeling.label_files` for what a resume
    continues and what it refuses.

    Raises:
        LabelingError: an existing output or interrupted job that is not this job's, a write error,
            or a worker that died (the finished parts are kept for a resume).
        ArtifactError: the model is not a valid artifact.
    """
    staged = open_job(files, output, options, resume)
    if isinstance(staged, LabelStats):
        return staged
    done = staged.finished_parts()
    try:
        return _label_parts(files, staged, done, options, workers, progress)
    except BaseException:
        if not staged.finished_parts():
            # Nothing to keep (an unreadable input, a refused option): left behind, the folder would
            # only make the next run ask for --resume of a job that never labeled a row.
            staged.remove_parts()
        raise


def _label_parts(files: Sequence[Path], staged: StagedJob, done: set[int], options: LabelOptions,
                 workers: int | None, progress: bool) -> LabelStats:
    from tqdm.auto import tqdm

    stats = LabelStats()
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    # Whole rows: unit_scale would show 34 as "34.0", and tqdm writes the unit right after the count.
    bar = tqdm(desc="labeling", unit=" rows", disable=not progress, dynamic_ncols=True)
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                                 initargs=(options.model, os.getpid())) as pool:
            in_flight: dict[int, Future] = {}

            def collect(index: int) -> None:
                part = in_flight.pop(index).result()
                stats.add(part)
                bar.update(part.rows)

            try:
                for index, chunk in enumerate(read_chunks(files, options.chunk_rows)):
                    if index in done and staged.part_holds(index, len(chunk)):
                        stats.resumed_rows += len(chunk)
                        bar.update(len(chunk))
                        continue
                    if index in done:
                        log.warning("part %d of the interrupted run is damaged (cut short?): labeling its %d rows "
                                    "again", index, len(chunk))
                    in_flight[index] = pool.submit(label_part, chunk, options, staged.part(index))
                    # At most two chunks per worker in flight: memory stays flat whatever the input size.
                    while len(in_flight) >= 2 * workers:
                        collect(min(in_flight))
                while in_flight:
                    collect(min(in_flight))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        bar.close()
        staged.finish(stats.rows + stats.resumed_rows)
    except BrokenProcessPool:
        raise LabelingError("a worker process died or could not start (out of memory? killed? a model that does "
                            "not load?); the finished parts are kept: rerun with --resume") from None
    finally:
        bar.close()
        staged.remove_temporaries()
    staged.remove_parts()
    return stats
