"""Offline batch labeling: prompt files in, one routing decision per row out.

Streams input in fixed-size chunks (bounded memory for any input size), labels chunks in worker
processes (one model per process), and writes each chunk as an atomically renamed part file, so an
interrupted job (even kill -9) resumes at the first missing part with `resume=True` and produces
exactly the output of an uninterrupted run. Parts are merged into the output file at the end.
The input is never modified.

Beside OUTPUT a job keeps:

- `OUTPUT.lock`: locked for the whole job, so that two jobs never write one output; removed at the end.
- `OUTPUT.parts/`: the finished parts and `job.json`, the job's record; removed at the end.
- `OUTPUT.job.json`: the record of the job that wrote OUTPUT (its inputs, model and options). A resume
  checks it, so that it never mistakes an unrelated file, or another job's output, for its own.

Every input row goes through one parser, `parse_row`, which the Ray engine shares: a row that cannot
be labeled (broken JSON, nesting too deep, wrong types, invalid text) becomes an output row with an
`error`, never an exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.artifact import load_manifest
from classifier.artifact_layout import REQUIRED_FILES
from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError, PromptierError
from classifier.policy import RoutingRequest
from classifier.prompt_files import BadRow, Payload, PromptFileError, decode_json_line, read_payloads
from classifier.runtime import DEFAULT_MODEL_DIR, ClassificationResult, validate_text

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
DECISION_COLUMNS = ("tier", "scores", "threshold", "truncated", "tokens", "decided_by", "familiarity", "error",
                    "model_version", "policy")
JOB_RECORD = "job.json"


class LabelingError(PromptierError):
    """The job cannot run: bad paths, options, or a resume that does not match the original job."""


@dataclass(frozen=True)
class LabelOptions:
    """Everything that decides a job's output (recorded with the job, so a resume must match it)."""

    prompt_column: str = "prompt"
    id_column: str = "prompt_id"
    messages_column: str = "messages"
    keep_columns: tuple[str, ...] = ()
    mode: str | None = None
    threshold: float | None = None
    chunk_rows: int = 4096
    model: str | None = None


@dataclass
class LabelStats:
    """What a job did: rows labeled now, how many of them failed, rows resumed from an earlier run.

    `complete` is set when OUTPUT was already the finished output of this job and nothing ran.
    """

    rows: int = 0
    errors: int = 0
    resumed_rows: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    def add(self, other: LabelStats) -> None:
        """Fold another part's counts into these."""
        self.rows += other.rows
        self.errors += other.errors
        for tier, count in other.tiers.items():
            self.tiers[tier] = self.tiers.get(tier, 0) + count


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Input files named by paths or globs, in a deterministic order.

    Raises:
        LabelingError: a path does not exist, has an unsupported type, or nothing matches.
    """
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise LabelingError(f"{match}: no such file")
            if path.suffix not in INPUT_SUFFIXES:
                raise LabelingError(f"{match}: unsupported input type {path.suffix!r} (use {INPUT_SUFFIXES})")
            files.append(path)
    if not files:
        raise LabelingError(f"no input files match {list(patterns)}")
    return files


def check_job(files: Sequence[Path], output: Path, options: LabelOptions) -> None:
    """Refuse an output or options that cannot work, before anything is written.

    Raises:
        LabelingError: the output type is wrong, the output (or a file beside it) is an input, a kept
            column would overwrite an output column, or chunk_rows is not positive.
    """
    if output.suffix not in OUTPUT_SUFFIXES:
        raise LabelingError(f"output must end in {OUTPUT_SUFFIXES}, got {output.name}")
    inputs = {f.resolve() for f in files}
    if output.resolve() in inputs:
        raise LabelingError("output would overwrite an input; the labeler never edits its input")
    beside = [_lock_path(output), _record_path(output)]
    if any(path.resolve() in inputs for path in beside):
        raise LabelingError(f"an input is named like a file the labeler keeps beside {output.name}: "
                            f"{', '.join(p.name for p in beside)}")
    clashes = [c for c in options.keep_columns if c == options.id_column or c in DECISION_COLUMNS]
    if clashes:
        raise LabelingError(f"--keep {clashes} would overwrite output columns of the same name")
    if options.chunk_rows < 1:
        raise LabelingError(f"chunk_rows must be at least 1, got {options.chunk_rows}")


# ---------------------------------------------------------------- reading rows
def read_rows(path: Path, batch_rows: int = 4096) -> Iterator[tuple[str, Payload]]:
    """Every row of one input file, in file order, as (row name `FILE:N`, payload).

    The row name is the output id of a row without one. Both engines read through this function, and
    it through classifier/prompt_files.py, which training reads its logs with too.

    Raises:
        LabelingError: the file cannot be read at all (missing, not Parquet, ...).
    """
    try:
        for number, payload in read_payloads(path, batch_rows):
            yield f"{path.name}:{number}", payload
    except PromptFileError as exc:
        raise LabelingError(str(exc)) from exc


def read_chunks(files: Sequence[Path], rows: int) -> Iterator[list[tuple[str, Payload]]]:
    """Fixed-size chunks of rows across all files, in a deterministic order (what makes resume exact)."""
    pending: list[tuple[str, Payload]] = []
    for path in files:
        for row in read_rows(path, rows):
            pending.append(row)
            if len(pending) == rows:
                yield pending
                pending = []
    if pending:
        yield pending


# ---------------------------------------------------------------- parsing rows
@dataclass(frozen=True)
class ParsedRow:
    """One input row as the labeler uses it: output id, kept columns, and the prompt or why there is none."""

    row_id: str
    prompt: str | None
    error: str | None
    kept: dict[str, str | None]


def parse_row(name: str, payload: Payload, options: LabelOptions) -> ParsedRow:
    """Turn one input row into what is labeled; every problem with the row becomes its `error`.

    Never raises: one malformed row must not end a job (nor every resume of it). Both engines label
    through this function, so they agree row for row.
    """
    try:
        return _parse_row(name, payload, options)
    except Exception as exc:  # whatever a row holds, it is that row's error, not the job's
        return ParsedRow(row_id=name, prompt=None, error=f"unreadable row: {type(exc).__name__}: {exc}",
                         kept=dict.fromkeys(options.keep_columns))


def _parse_row(name: str, payload: Payload, options: LabelOptions) -> ParsedRow:
    if isinstance(payload, bytes):
        record, error = _json_record(name, payload)
    elif isinstance(payload, BadRow):
        record, error = payload.record, payload.error
    else:
        record, error = payload, None
    prompt = None
    if error is None:
        try:
            prompt = _prompt_of(record, options)
        except InvalidInputError as exc:
            error = str(exc)
    raw_id = record.get(options.id_column)
    row_id, problem = _cell(name if raw_id is None else raw_id)
    assert row_id is not None
    problems = [f"column {options.id_column!r}: {problem}"] if problem else []
    kept: dict[str, str | None] = {}
    for column in options.keep_columns:
        kept[column], problem = _cell(record.get(column))
        if problem:
            problems.append(f"column {column!r}: {problem}")
    error = error or "; ".join(problems) or None
    return ParsedRow(row_id=row_id, prompt=None if error else prompt, error=error, kept=kept)


def _json_record(name: str, raw: bytes) -> tuple[dict, str | None]:
    """One JSONL line as (record, error), the error naming the line."""
    record, problem = decode_json_line(raw)
    return record, None if problem is None else f"line {name.rsplit(':', 1)[-1]}: {problem}"


def _prompt_of(record: dict, options: LabelOptions) -> str:
    """The row's prompt: its prompt column, else its conversation rendered; validated for the model."""
    value = record.get(options.prompt_column)
    if value is not None:
        return validate_text(value)
    messages = record.get(options.messages_column)
    if messages is None:
        raise InvalidInputError(f"row has no {options.prompt_column!r} (or {options.messages_column!r}) value")
    if not isinstance(messages, list):
        raise InvalidInputError(f"{options.messages_column!r} must be a list of messages, "
                                f"got {type(messages).__name__}")
    pairs = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidInputError("messages must be objects with a string content")
        pairs.append((str(message.get("role", "")), message["content"]))
    return validate_text(render_conversation(pairs))


def _cell(value: object) -> tuple[str | None, str | None]:
    """A value as output text (one type per column, whatever the input held), and what is wrong with it."""
    if value is None:
        return None, None
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list | tuple):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:  # numbers, and the dates, decimals and bytes that Parquet holds
        text = str(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON may escape a lone surrogate, which no UTF-8 output can hold: write it escaped.
            return (text.encode("utf-8", "backslashreplace").decode("utf-8"),
                    f"unpaired surrogate at character {exc.start}")
    return text, None


# ---------------------------------------------------------------- worker side (one model per process)
_worker_model = None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(model: str | None, parent: int) -> None:
    """Pool worker initializer: tie this process's life to the job process's, then load the model."""
    _exit_with_parent(parent)
    load_worker_model(model)


def load_worker_model(model: str | None) -> None:
    """Load the model this process labels with (a pool worker, or a Ray actor)."""
    global _worker_model
    import classifier

    _worker_model = classifier.load(model, threads=1)


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


def label_chunk(rows: list[ParsedRow], options: LabelOptions) -> list[dict]:
    """Label one chunk; a bad row gets an error and null decision fields, the rest are unaffected."""
    assert _worker_model is not None, "worker not initialised"
    request = RoutingRequest(mode=options.mode, threshold=options.threshold)
    valid = [index for index, row in enumerate(rows) if row.error is None]
    results = _worker_model.classify_items([(rows[index].prompt, request) for index in valid])
    outcomes = dict(zip(valid, results, strict=True))
    policy = json.dumps({"mode": options.mode, "threshold": options.threshold}, sort_keys=True)
    out = []
    for index, parsed in enumerate(rows):
        row: dict = {options.id_column: parsed.row_id}
        outcome = outcomes.get(index)
        if isinstance(outcome, ClassificationResult):
            row.update(tier=outcome.tier, scores=outcome.scores, threshold=outcome.threshold,
                       truncated=outcome.truncated, tokens=outcome.tokens, decided_by=outcome.decided_by,
                       familiarity=outcome.familiarity, error=None)
        else:
            problem = parsed.error or str(outcome)
            row.update(tier=None, scores=None, threshold=None, truncated=None, tokens=None, decided_by=None,
                       familiarity=None, error=problem)
        row.update(model_version=_worker_model.model_version, policy=policy, **parsed.kept)
        out.append(row)
    return out


def label_part(chunk: list[tuple[str, Payload]], options: LabelOptions, path: Path) -> LabelStats:
    """Worker task: parse, label and write one part file (JSONL or Parquet, by `path`'s suffix).

    The part is renamed into place only when complete, so after a kill it exists whole or not at all.
    Only the counts travel back to the job process.

    Raises:
        LabelingError: the part cannot be written (disk full, ...); no partial file is left.
    """
    rows = label_chunk([parse_row(name, payload, options) for name, payload in chunk], options)
    temporary = path.with_suffix(".tmp")
    try:
        with temporary.open("wb") as handle:
            if path.suffix == ".parquet":
                pq.write_table(rows_to_table(rows, options.keep_columns, options.id_column), handle)
            else:
                handle.writelines((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
        os.replace(temporary, path)
    except OSError as exc:
        _remove(temporary)
        raise _cannot_write(path, exc) from None
    stats = LabelStats()
    _count(rows, stats)
    return stats


# ---------------------------------------------------------------- job side
def rows_to_table(rows: list[dict], keep_columns: Sequence[str], id_column: str) -> pa.Table:
    """Labeled rows as an Arrow table with a fixed schema (ids and kept columns as strings)."""
    schema = pa.schema([(id_column, pa.string()), ("tier", pa.string()), ("scores", pa.string()),
                        ("threshold", pa.float64()), ("truncated", pa.bool_()), ("tokens", pa.int32()),
                        ("decided_by", pa.string()), ("familiarity", pa.float64()), ("error", pa.string()),
                        ("model_version", pa.string()), ("policy", pa.string())]
                       + [(c, pa.string()) for c in keep_columns])
    return pa.Table.from_pylist([{**row, "scores": None if row["scores"] is None else json.dumps(row["scores"])}
                                 for row in rows], schema=schema)


def _lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _parts_path(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _record_path(output: Path) -> Path:
    return output.with_name(output.name + ".job.json")


def _cannot_write(path: Path, error: OSError, resumable: bool = True) -> LabelingError:
    """The error for a failed write: which file, and the system's reason (no traceback)."""
    hint = "; the finished parts are kept: make room, then rerun with --resume" if resumable else ""
    return LabelingError(f"cannot write {path}: {error.strerror or error}{hint}")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the exclusive lock of `output` (`OUTPUT.lock`, flock) for the with-block.

    One labeling job per output: a second job would otherwise merge, or replace, what the first writes.
    The lock file holds the holder's pid, for the error message, and is removed on release.

    Raises:
        LabelingError: another job holds the lock (the message names the output and its pid), or the
            lock file cannot be created.
    """
    import fcntl

    path = _lock_path(output)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LabelingError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LabelingError(f"{output} is being written by another labeling job (pid {holder}); "
                                "wait for it to finish, or choose another output") from None
        except OSError as exc:
            os.close(fd)
            raise LabelingError(f"cannot lock {path}: {exc.strerror or exc}") from None
        # A holder removes the file when it finishes; a lock taken on a removed file locks nothing.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is for messages only; a full disk must not stop the job
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _remove(path)
        os.close(fd)


def _job_record(files: Sequence[Path], options: LabelOptions) -> dict:
    """What decides a job's output: its inputs (path, size, mtime), model and options.

    Raises:
        ArtifactError: the model directory is not a valid artifact.
    """
    model = Path(options.model) if options.model else DEFAULT_MODEL_DIR
    manifest = load_manifest(model)
    inputs = []
    for path in files:
        stat = path.stat()
        inputs.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    model_files = {}
    for name in REQUIRED_FILES:
        stat = (model / name).stat()
        model_files[name] = [stat.st_size, stat.st_mtime_ns]
    settings = {key: value for key, value in asdict(options).items() if key != "model"}
    # The output's columns: parts written by a version with other columns must not be mixed with these.
    return {"inputs": inputs, "model": {"path": str(model.resolve()), "model_version": manifest.model_version,
                                        "files": model_files}, "options": settings, "columns": list(DECISION_COLUMNS)}


def _fingerprint(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _differences(old: object, new: dict) -> str:
    """What differs between two job records, in words."""
    if not isinstance(old, dict):
        return "its record is from another version of promptier"
    found = []
    old_inputs = old.get("inputs") or []
    if [i.get("path") for i in old_inputs] != [i["path"] for i in new["inputs"]]:
        found.append("the input files")
    else:
        found += [f"input {Path(n['path']).name} (modified since)"
                  for o, n in zip(old_inputs, new["inputs"], strict=True) if o != n]
    old_model = old.get("model") or {}
    if old_model != new["model"]:
        versions = (old_model.get("model_version"), new["model"]["model_version"])
        found.append(f"the model ({versions[0]} -> {versions[1]})" if versions[0] != versions[1] else "the model")
    old_options = old.get("options") or {}
    for key in sorted(set(old_options) | set(new["options"])):
        if old_options.get(key) != new["options"].get(key):
            found.append(f"option {key} ({old_options.get(key)!r} -> {new['options'].get(key)!r})")
    if old.get("columns") != new["columns"]:
        found.append("the output's columns (the job was started by another version of promptier)")
    return ", ".join(found) or "the job record"


def _read_record(path: Path) -> dict | None:
    """A job record, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, value: dict) -> None:
    """Write `value` to `path` atomically (a temporary file renamed into place)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _merge(parts: list[Path], output: Path) -> None:
    """Concatenate part files (Parquet, or JSONL for a JSONL output) into `output`, atomically.

    Raises:
        OSError: a write failed; no temporary file is left and `output` is unchanged.
    """
    temporary = output.with_name(output.name + ".tmp")
    try:
        if output.suffix == ".jsonl" and all(part.suffix == ".jsonl" for part in parts):
            with temporary.open("wb") as handle:
                for part in parts:
                    with part.open("rb") as source:
                        shutil.copyfileobj(source, handle)
        elif output.suffix == ".parquet":
            writer = None
            try:
                for part in parts:
                    table = pq.read_table(part)
                    writer = writer or pq.ParquetWriter(temporary, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                pq.write_table(pa.table({}), temporary)
        else:
            with temporary.open("w", encoding="utf-8") as handle:
                for part in parts:
                    for row in pq.read_table(part).to_pylist():
                        if row.get("scores") is not None:
                            row["scores"] = json.loads(row["scores"])
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, output)
    except BaseException:
        _remove(temporary)
        raise


def label_files(inputs: Sequence[str], output: Path, options: LabelOptions, workers: int | None = None,
                resume: bool = False, progress: bool = True) -> LabelStats:
    """Label every row of `inputs` into `output` (.jsonl or .parquet).

    One job per output at a time (`OUTPUT.lock`). An existing output is never replaced: without
    `resume` it is refused; with `resume` it must be the finished output of this very job (same
    inputs, model and options, per `OUTPUT.job.json`), and then nothing runs (`complete` is set).
    An interrupted job (`OUTPUT.parts`) continues only with `resume` and only if it is the same job.
    A write error (disk full) removes temporary files and keeps the finished parts.

    Raises:
        LabelingError: bad inputs/outputs, another job on the output, an existing output or an
            interrupted job that is not this job's, or a write error.
        ArtifactError: the model is not a valid artifact.
    """
    files = prepare_job(inputs, output, options)
    with output_lock(output):
        return _label_locked(files, output, options, workers, resume, progress)


def prepare_job(inputs: Sequence[str], output: Path, options: LabelOptions) -> list[Path]:
    """The job's input files, once the job is checked and the output's folder exists (both engines).

    Raises:
        LabelingError: bad inputs or options, or the output's folder cannot be created.
    """
    files = expand_inputs(inputs)
    check_job(files, output, options)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(output.parent, exc, resumable=False) from None
    return files


def _label_locked(files: list[Path], output: Path, options: LabelOptions, workers: int | None, resume: bool,
                  progress: bool) -> LabelStats:
    from tqdm.auto import tqdm

    parts_dir, record_path = _parts_path(output), _record_path(output)
    job = _job_record(files, options)
    fingerprint = _fingerprint(job)
    state_file = parts_dir / JOB_RECORD
    if parts_dir.exists():
        if not resume:
            raise LabelingError(f"{parts_dir} exists from an interrupted job; pass --resume to continue it")
        state = _read_record(state_file)
        if state is None:
            if any(parts_dir.glob("part-*")):
                raise LabelingError(f"cannot resume: {state_file} is missing or unreadable, so the parts in "
                                    f"{parts_dir} cannot be matched to this job; remove {parts_dir} to start over")
            _start(parts_dir, state_file, job, fingerprint)  # the job died while creating it
        elif state.get("fingerprint") != fingerprint:
            raise LabelingError(f"cannot resume: {parts_dir} holds a different job "
                                f"({_differences(state.get('job'), job)}); nothing was changed. Rerun with the "
                                f"original inputs, model and options, or remove {parts_dir} to start over")
    elif output.exists():
        if not resume:
            raise LabelingError(f"{output} exists; remove it or choose another output")
        return _finished(output, record_path, job, fingerprint)
    else:
        _start(parts_dir, state_file, job, fingerprint)
    part_suffix = ".jsonl" if output.suffix == ".jsonl" else ".parquet"
    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob(f"part-*{part_suffix}")}
    stats = LabelStats()
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    bar = tqdm(desc="labeling", unit="rows", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(options.model, os.getpid())) as pool:
            in_flight: dict[int, Future] = {}

            def collect(index: int) -> None:
                part = in_flight.pop(index).result()
                stats.add(part)
                bar.update(part.rows)

            try:
                for index, chunk in enumerate(read_chunks(files, options.chunk_rows)):
                    if index in done:
                        stats.resumed_rows += len(chunk)
                        bar.update(len(chunk))
                        continue
                    in_flight[index] = pool.submit(label_part, chunk, options,
                                                   parts_dir / f"part-{index:08d}{part_suffix}")
                    # At most two chunks per worker in flight: memory stays flat whatever the input size.
                    while len(in_flight) >= 2 * workers:
                        collect(min(in_flight))
                while in_flight:
                    collect(min(in_flight))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        bar.close()
        parts = sorted(parts_dir.glob(f"part-*{part_suffix}"))
        try:
            _merge(parts, output)
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        total = stats.rows + stats.resumed_rows
        try:
            _write_json(record_path, {"fingerprint": fingerprint, "job": job, "rows": total,
                                      "output_bytes": output.stat().st_size})
        except OSError as exc:
            raise _cannot_write(record_path, exc) from None
    except BrokenProcessPool:
        raise LabelingError("a worker process died or could not start (out of memory? killed? a model that does "
                            "not load?); the finished parts are kept: rerun with --resume") from None
    finally:
        bar.close()
        for temporary in parts_dir.glob("*.tmp"):  # a worker's, should it have died while writing
            _remove(temporary)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return stats


def _start(parts_dir: Path, state_file: Path, job: dict, fingerprint: str) -> None:
    try:
        parts_dir.mkdir(exist_ok=True)
        _write_json(state_file, {"fingerprint": fingerprint, "job": job})
    except OSError as exc:
        raise _cannot_write(state_file, exc, resumable=False) from None


def _finished(output: Path, record_path: Path, job: dict, fingerprint: str) -> LabelStats:
    """`--resume` of an output with no interrupted job: fine if it is this job's finished output.

    Raises:
        LabelingError: `output` is not the finished output of this job; it is left unchanged.
    """
    record = _read_record(record_path)
    if record is None:
        raise LabelingError(f"{output} exists and is not the output of this job (no readable job record "
                            f"{record_path.name} beside it); nothing was changed. Remove it to label again, or "
                            "choose another output")
    if record.get("fingerprint") != fingerprint:
        raise LabelingError(f"{output} is not the output of this job ({_differences(record.get('job'), job)}); "
                            "nothing was changed. Remove it to label again, or choose another output")
    if record.get("output_bytes") != output.stat().st_size:
        raise LabelingError(f"{output} is not the output of this job: it changed after the job wrote it; "
                            "nothing was changed. Remove it to label again, or choose another output")
    rows = record.get("rows")
    return LabelStats(resumed_rows=rows if isinstance(rows, int) else 0, complete=True)


def _count(rows: list[dict], stats: LabelStats) -> None:
    for row in rows:
        stats.rows += 1
        if row["error"] is not None:
            stats.errors += 1
        else:
            stats.tiers[row["tier"]] = stats.tiers.get(row["tier"], 0) + 1
