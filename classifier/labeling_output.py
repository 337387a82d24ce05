"""A labeling job's output: its exclusive lock, its record, the staged parts and the atomic finish.

Beside OUTPUT a job keeps:

- `OUTPUT.lock`: locked for the whole job, so that two jobs never write one output; removed at the end.
- `OUTPUT.parts/`: the finished parts and `job.json`, the job's record; removed at the end.
- `OUTPUT.job.json`: the record of the job that wrote OUTPUT (its inputs, model and options). A resume
  checks it, so that it never mistakes an unrelated file, or another job's output, for its own.

Every file is written to a temporary name, synced to disk and renamed into place when complete, so
after a kill (even -9) a part, a record or OUTPUT exists whole or not at all, and a resume continues at
the first missing part (or a part a power loss damaged).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.artifact import load_manifest
from classifier.artifact_layout import REQUIRED_FILES
from classifier.labeling_options import DECISION_COLUMNS, LabelingError, LabelOptions, LabelStats
from classifier.labeling_rows import input_names
from classifier.pid_lock import pid_lock
from classifier.runtime import DEFAULT_MODEL_DIR

# What the output's columns hold. Raised whenever a column keeps its name but changes its meaning, so
# that parts written by another version are never continued into one mixed output (3: ids and kept
# values that are JSON booleans or numbers are written as JSON writes them, `true` rather than `True`).
OUTPUT_FORMAT = 3

JOB_RECORD = "job.json"


def lock_path(output: Path) -> Path:
    """The lock file of `output`'s job."""
    return output.with_name(output.name + ".lock")


def parts_path(output: Path) -> Path:
    """The folder of `output`'s staged parts."""
    return output.with_name(output.name + ".parts")


def record_path(output: Path) -> Path:
    """The record of the job that wrote `output`."""
    return output.with_name(output.name + ".job.json")


def cannot_write(path: Path, error: OSError, resumable: bool = True) -> LabelingError:
    """The error for a failed write: which file, and the system's reason (no traceback)."""
    hint = "; the finished parts are kept: make room, then rerun with --resume" if resumable else ""
    return LabelingError(f"cannot write {path}: {error.strerror or error}{hint}")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def output_lock(output: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the exclusive lock of `output` (`OUTPUT.lock`, classifier.pid_lock) for the with-block.

    One labeling job per output: a second job would otherwise merge, or replace, what the first writes.

    Raises:
        LabelingError: another job holds the lock (the message names the output and its pid), or the
            lock file cannot be created.
    """
    def busy(holder: str) -> LabelingError:
        return LabelingError(f"{output} is being written by another labeling job (pid {holder}); "
                             "wait for it to finish, or choose another output")

    return pid_lock(lock_path(output), busy, LabelingError)


def output_schema(keep_columns: Sequence[str], id_column: str) -> pa.Schema:
    """The labeled output's columns and types (ids and kept columns as strings)."""
    return pa.schema([(id_column, pa.string()), ("tier", pa.string()), ("scores", pa.string()),
                      ("threshold", pa.float64()), ("cheap_floor", pa.float64()), ("truncated", pa.bool_()),
                      ("tokens", pa.int32()), ("decided_by", pa.string()), ("familiarity", pa.float64()),
                      ("error", pa.string()), ("model_version", pa.string()), ("policy", pa.string())]
                     + [(c, pa.string()) for c in keep_columns])


def rows_to_table(rows: list[dict], keep_columns: Sequence[str], id_column: str) -> pa.Table:
    """Labeled rows as an Arrow table of the output's schema."""
    return pa.Table.from_pylist([{**row, "scores": None if row["scores"] is None else json.dumps(row["scores"])}
                                 for row in rows], schema=output_schema(keep_columns, id_column))


def write_part(rows: list[dict], options: LabelOptions, path: Path) -> None:
    """Write one part file (JSONL or Parquet, by `path`'s suffix), renamed into place only when complete.

    Raises:
        LabelingError: the part cannot be written (disk full, ...); no partial file is left.
    """
    temporary = path.with_suffix(".tmp")
    try:
        with temporary.open("wb") as handle:
            if path.suffix == ".parquet":
                pq.write_table(rows_to_table(rows, options.keep_columns, options.id_column), handle)
            else:
                handle.writelines((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
        durable_replace(temporary, path)
    except OSError as exc:
        _remove(temporary)
        raise cannot_write(path, exc) from None


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
    # As JSON has them (a tuple is read back as a list), so that a record compares equal to its reread self.
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(options).items()
                if key != "model"}
    # The output's columns: parts written by a version with other columns must not be mixed with these.
    job = {"inputs": inputs, "model": {"path": str(model.resolve()), "model_version": manifest.model_version,
                                       "files": model_files}, "options": settings, "columns": list(DECISION_COLUMNS),
           "format": OUTPUT_FORMAT}
    names = input_names(files)
    if names != [path.name for path in files]:
        # Recorded only where an input is not named by its file name alone: every other job's record, so
        # its fingerprint, stays what the versions that named rows by file name wrote (their interrupted
        # runs still resume), and parts that named this job's rows otherwise are not continued.
        job["input_names"] = names
    return job


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
    if old.get("input_names") != new.get("input_names") and "the input files" not in found:
        found.append("the ids of rows without one (the inputs are named by other paths, or the job was started "
                     "by a version of promptier that named them by their file names only)")
    if old.get("columns") != new["columns"] or old.get("format") != new["format"]:
        found.append("the output's columns (the job was started by another version of promptier)")
    return ", ".join(found) or "the job record"


def _read_record(path: Path) -> dict | None:
    """A job record, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def durable_replace(temporary: Path, path: Path) -> None:
    """Rename a fully written `temporary` to `path`, its bytes on disk first and the rename after: a
    machine that loses power then has the whole file under its name or the old state, never a name over
    missing data (which a resume would trust, or which the parts it was merged from, removed next,
    could no longer rebuild)."""
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _write_json(path: Path, value: dict) -> None:
    """Write `value` to `path` atomically and durably (a temporary file renamed into place)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
        durable_replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def merge_parts(parts: list[Path], output: Path, schema: pa.Schema) -> None:
    """Concatenate part files (Parquet, or JSONL for a JSONL output) into `output`, atomically; with
    no parts (an empty input), a Parquet output is an empty table of `schema`.

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
                pq.write_table(schema.empty_table(), temporary)
        else:
            with temporary.open("w", encoding="utf-8") as handle:
                for part in parts:
                    for row in pq.read_table(part).to_pylist():
                        if row.get("scores") is not None:
                            row["scores"] = json.loads(row["scores"])
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        durable_replace(temporary, output)
    except BaseException:
        _remove(temporary)
        raise


@dataclass(frozen=True)
class StagedJob:
    """A job that runs on OUTPUT: where its parts go, which are done, and the record its finish writes."""

    output: Path
    job: dict
    fingerprint: str

    @property
    def part_suffix(self) -> str:
        """A JSONL output's parts are JSONL (merged by concatenation); a Parquet output's are Parquet."""
        return ".jsonl" if self.output.suffix == ".jsonl" else ".parquet"

    def part(self, index: int) -> Path:
        """Where part `index` (the index of its chunk) is written."""
        return parts_path(self.output) / f"part-{index:08d}{self.part_suffix}"

    def finished_parts(self) -> set[int]:
        """The indexes of the parts already written (by an interrupted run of this job)."""
        return {int(p.stem.split("-")[1]) for p in parts_path(self.output).glob(f"part-*{self.part_suffix}")}

    def part_holds(self, index: int, rows: int) -> bool:
        """Whether part `index` reads whole with `rows` rows. A kill leaves a part whole or absent, but a
        machine that lost power may leave one cut short or empty: a resume labels that chunk again."""
        path = self.part(index)
        try:
            if self.part_suffix == ".parquet":  # read whole: a damaged page fails here, not in the merge
                return bool(pq.read_table(path).num_rows == rows)
            with path.open("rb") as handle:
                data = handle.read()
        except (OSError, pa.ArrowException):
            return False
        return data.count(b"\n") == rows and (not data or data.endswith(b"\n"))

    def finish(self, rows: int) -> None:
        """Merge the parts into OUTPUT, then record the job beside it, each atomically.

        Raises:
            LabelingError: a write failed (disk full, ...); the parts are kept for a resume.
        """
        parts = sorted(parts_path(self.output).glob(f"part-*{self.part_suffix}"))
        try:
            options = self.job["options"]
            merge_parts(parts, self.output, output_schema(options["keep_columns"], options["id_column"]))
        except OSError as exc:
            raise cannot_write(self.output, exc) from None
        record_file = record_path(self.output)
        try:
            _write_json(record_file, {"fingerprint": self.fingerprint, "job": self.job, "rows": rows,
                                      "output_bytes": self.output.stat().st_size})
        except OSError as exc:
            raise cannot_write(record_file, exc) from None

    def remove_temporaries(self) -> None:
        """Remove parts that were being written, should a worker have died while writing one."""
        for temporary in parts_path(self.output).glob("*.tmp"):
            _remove(temporary)

    def remove_parts(self) -> None:
        """Remove the staged parts and their record (once OUTPUT is finished)."""
        remove_folder(parts_path(self.output))


def every_row_failed(output: Path) -> bool:
    """Whether every row of a finished output is an error row (read whole: for the rare job whose every
    newly labeled row failed, to judge the rows a resumed run labeled earlier too)."""
    if output.suffix == ".parquet":
        errors = pq.read_table(output, columns=["error"]).column("error")
        return bool(errors.null_count == 0)
    with output.open(encoding="utf-8") as handle:
        return all(json.loads(line).get("error") is not None for line in handle if line.strip())


def remove_folder(folder: Path) -> None:
    """Remove `folder` as one step: renamed first, then deleted. Deleted in place, a kill partway could
    leave parts without the job record that names them, a folder no resume can match to its job."""
    doomed = folder.with_name(folder.name + ".removing")
    shutil.rmtree(doomed, ignore_errors=True)  # left by a kill during an earlier removal
    try:
        folder.rename(doomed)
    except FileNotFoundError:
        return
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def open_job(files: Sequence[Path], output: Path, options: LabelOptions, resume: bool) -> StagedJob | LabelStats:
    """Start the job on `output`, or continue its interrupted run; hold `output_lock(output)` first.

    An existing output is never replaced: without `resume` it is refused; with `resume` it must be
    the finished output of this very job (same inputs, model and options, per `OUTPUT.job.json`),
    and then there is nothing to run. Staged parts (`OUTPUT.parts`) are continued only with `resume`
    and only when their record's fingerprint is this job's.

    Returns:
        The staged job to run, or the stats of `output` (`complete` set) when it is already finished.

    Raises:
        LabelingError: an existing output or interrupted job that is not this job's (nothing is
            changed), or the job's record cannot be written.
        ArtifactError: the model is not a valid artifact.
    """
    parts_dir, record_file = parts_path(output), record_path(output)
    job = _job_record(files, options)
    fingerprint = _fingerprint(job)
    state_file = parts_dir / JOB_RECORD
    if parts_dir.exists():
        if not resume:
            raise LabelingError(f"{parts_dir} exists from an interrupted job; pass --resume to continue it")
        state = _read_record(state_file)
        if state is None and output.exists():
            with contextlib.suppress(LabelingError):  # not this job's output: the parts are the question
                finished = _finished(output, record_file, job, fingerprint)
                remove_folder(parts_dir)  # what a kill left of removing a finished job's parts
                return finished
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
        return _finished(output, record_file, job, fingerprint)
    else:
        _start(parts_dir, state_file, job, fingerprint)
    return StagedJob(output, job, fingerprint)


def _start(parts_dir: Path, state_file: Path, job: dict, fingerprint: str) -> None:
    try:
        parts_dir.mkdir(exist_ok=True)
        _write_json(state_file, {"fingerprint": fingerprint, "job": job})
    except OSError as exc:
        raise cannot_write(state_file, exc, resumable=False) from None


def _finished(output: Path, record_file: Path, job: dict, fingerprint: str) -> LabelStats:
    """`--resume` of an output with no interrupted job: fine if it is this job's finished output.

    Raises:
        LabelingError: `output` is not the finished output of this job; it is left unchanged.
    """
    record = _read_record(record_file)
    if record is None:
        raise LabelingError(f"{output} exists and is not the output of this job (no readable job record "
                            f"{record_file.name} beside it); nothing was changed. Remove it to label again, or "
                            "choose another output")
    if record.get("fingerprint") != fingerprint:
        raise LabelingError(f"{output} is not the output of this job ({_differences(record.get('job'), job)}); "
                            "nothing was changed. Remove it to label again, or choose another output")
    if record.get("output_bytes") != output.stat().st_size:
        raise LabelingError(f"{output} is not the output of this job: it changed after the job wrote it; "
                            "nothing was changed. Remove it to label again, or choose another output")
    rows = record.get("rows")
    return LabelStats(resumed_rows=rows if isinstance(rows, int) else 0, complete=True)
