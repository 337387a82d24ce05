"""Offline batch labeling: prompt files in, one routing decision per row out.

Streams input in fixed-size chunks (bounded memory for any input size), labels chunks in worker
processes (one model per process), and writes each chunk as an atomically renamed part file, so an
interrupted job (even kill -9) resumes at the first missing part with `resume=True` and produces
exactly the output of an uninterrupted run. Parts are merged into the output file at the end.
The input is never modified.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError, PromptierError
from classifier.policy import RoutingRequest

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


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
    rows: int = 0
    errors: int = 0
    resumed_rows: int = 0
    tiers: dict[str, int] = field(default_factory=dict)

    def add(self, other: LabelStats) -> None:
        """Fold another part's counts into these."""
        self.rows += other.rows
        self.errors += other.errors
        for tier, count in other.tiers.items():
            self.tiers[tier] = self.tiers.get(tier, 0) + count


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
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


def _jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """Raw JSONL lines with their row names; parsed in the workers, where the cores are."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{path.name}:{number}", raw


def parse_jsonl_line(row_name: str, raw: bytes) -> dict:
    """One JSONL line as a record; a bad line becomes a record with an `__error__`, never an exception."""
    try:
        record = json.loads(raw.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"expected an object, got {type(record).__name__}")
    except UnicodeDecodeError as exc:
        # Keep the row's id when the rest of the line parses, so the error row can be joined back.
        try:
            salvaged = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            salvaged = None
        record = dict(salvaged) if isinstance(salvaged, dict) else {}
        record["__error__"] = f"line {row_name.rsplit(':', 1)[-1]}: invalid UTF-8 at byte {exc.start}"
    except ValueError as exc:
        record = {"__error__": f"line {row_name.rsplit(':', 1)[-1]}: {exc}"}
    record.setdefault("__row__", row_name)
    return record


def _arrow_records(path: Path, rows: int) -> Iterator[dict]:
    """Parquet or CSV, streamed in record batches of about `rows` rows."""
    if path.suffix == ".parquet":
        reader: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(batch_size=rows)
    else:
        reader = iter(pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=1 << 22)))
    number = 0
    for record_batch in reader:
        for record in record_batch.to_pylist():
            number += 1
            record.setdefault("__row__", f"{path.name}:{number}")
            yield record


RawRecord = dict | tuple[str, bytes]  # a parsed record (Parquet, CSV) or a raw JSONL line


def read_chunks(files: Sequence[Path], rows: int) -> Iterator[list[RawRecord]]:
    """Fixed-size chunks of rows across all files, in a deterministic order (what makes resume exact).

    JSONL lines stay raw bytes here: the job process only splits lines, and the workers parse.
    """
    pending: list[RawRecord] = []
    for path in files:
        records: Iterator[RawRecord] = (_jsonl_lines(path) if path.suffix in (".jsonl", ".json")
                                        else _arrow_records(path, rows))
        for record in records:
            pending.append(record)
            if len(pending) == rows:
                yield pending
                pending = []
    if pending:
        yield pending


# ---------------------------------------------------------------- worker side (one model per process)
_worker_model = None


def _init_worker(model: str | None) -> None:
    global _worker_model
    import classifier

    _worker_model = classifier.load(model, threads=1)


def _prompt_of(record: dict, options: LabelOptions) -> str:
    if "__error__" in record:
        raise InvalidInputError(str(record["__error__"]))
    if options.prompt_column in record and record[options.prompt_column] is not None:
        return record[options.prompt_column]  # validated by the runtime (type, emptiness, size)
    messages = record.get(options.messages_column)
    if isinstance(messages, list):
        pairs = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise InvalidInputError("messages must be objects with a string content")
            pairs.append((str(message.get("role", "")), message["content"]))
        return render_conversation(pairs)
    raise InvalidInputError(f"row has no {options.prompt_column!r} (or {options.messages_column!r}) value")


def label_chunk(records: list[dict], options: LabelOptions) -> list[dict]:
    """Label one chunk; a bad row gets an error and null decision fields, the rest are unaffected."""
    assert _worker_model is not None, "worker not initialised"
    request = RoutingRequest(mode=options.mode, threshold=options.threshold)
    items: list[tuple[object, RoutingRequest | None]] = []
    prompt_errors: dict[int, str] = {}
    for index, record in enumerate(records):
        try:
            items.append((_prompt_of(record, options), request))
        except InvalidInputError as error:
            prompt_errors[index] = str(error)
            items.append(("", request))  # placeholder; replaced by the error below
    outcomes = _worker_model.classify_items(items)
    policy = json.dumps({"mode": options.mode, "threshold": options.threshold}, sort_keys=True)
    out = []
    for index, (record, outcome) in enumerate(zip(records, outcomes, strict=True)):
        row: dict = {options.id_column: record.get(options.id_column, record["__row__"])}
        problem = prompt_errors.get(index) or (str(outcome) if isinstance(outcome, InvalidInputError) else None)
        if problem is None and not isinstance(outcome, InvalidInputError):
            row.update(tier=outcome.tier, scores=outcome.scores, threshold=outcome.threshold,
                       truncated=outcome.truncated, tokens=outcome.tokens, error=None)
        else:
            row.update(tier=None, scores=None, threshold=None, truncated=None, tokens=None, error=problem)
        row.update(model_version=_worker_model.model_version, policy=policy)
        for column in options.keep_columns:
            value = record.get(column)
            row[column] = value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value)
        out.append(row)
    return out


# ---------------------------------------------------------------- job side
def rows_to_table(rows: list[dict], keep_columns: Sequence[str], id_column: str) -> pa.Table:
    """Labeled rows as an Arrow table with a fixed schema (ids and kept columns as strings)."""
    schema = pa.schema([(id_column, pa.string()), ("tier", pa.string()), ("scores", pa.string()),
                        ("threshold", pa.float64()), ("truncated", pa.bool_()), ("tokens", pa.int32()),
                        ("error", pa.string()), ("model_version", pa.string()), ("policy", pa.string())]
                       + [(c, pa.string()) for c in keep_columns])
    normalised = [{**row, "scores": None if row["scores"] is None else json.dumps(row["scores"])}
                  for row in _normalise(rows, keep_columns, id_column)]
    return pa.Table.from_pylist(normalised, schema=schema)


def _normalise(rows: list[dict], keep_columns: Sequence[str], id_column: str) -> list[dict]:
    """Ids and kept columns as strings: one output type per column, whatever the input held."""
    return [{**row, id_column: None if row[id_column] is None else str(row[id_column]),
             **{c: None if row.get(c) is None else str(row[c]) for c in keep_columns}} for row in rows]


def label_part(chunk: list[RawRecord], options: LabelOptions, path: Path) -> LabelStats:
    """Worker task: parse, label and write one part file (JSONL or Parquet, by `path`'s suffix).

    The part is renamed into place only when complete, so after a kill it exists whole or not at all.
    Only the counts travel back to the job process.
    """
    records = [parse_jsonl_line(*record) if isinstance(record, tuple) else record for record in chunk]
    rows = label_chunk(records, options)
    temporary = path.with_suffix(".tmp")
    if path.suffix == ".jsonl":
        lines = [json.dumps(row, ensure_ascii=False) + "\n"
                 for row in _normalise(rows, options.keep_columns, options.id_column)]
        temporary.write_text("".join(lines), encoding="utf-8")
    else:
        pq.write_table(rows_to_table(rows, options.keep_columns, options.id_column), temporary)
    os.replace(temporary, path)
    stats = LabelStats()
    _count(rows, stats)
    return stats


def _fingerprint(files: Sequence[Path], options: LabelOptions) -> str:
    digest = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _merge(parts: list[Path], output: Path) -> None:
    """Concatenate part files (Parquet, or JSONL for a JSONL output) into `output`, atomically."""
    temporary = output.with_name(output.name + ".tmp")
    if output.suffix == ".jsonl" and all(part.suffix == ".jsonl" for part in parts):
        with temporary.open("wb") as handle:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, handle)
    elif output.suffix == ".parquet":
        writer = None
        for part in parts:
            table = pq.read_table(part)
            writer = writer or pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table)
        if writer is None:
            pq.write_table(pa.table({}), temporary)
        else:
            writer.close()
    else:
        with temporary.open("w", encoding="utf-8") as handle:
            for part in parts:
                for row in pq.read_table(part).to_pylist():
                    if row.get("scores") is not None:
                        row["scores"] = json.loads(row["scores"])
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, output)


def label_files(inputs: Sequence[str], output: Path, options: LabelOptions, workers: int | None = None,
                resume: bool = False, progress: bool = True) -> LabelStats:
    """Label every row of `inputs` into `output` (.jsonl or .parquet).

    Raises:
        LabelingError: bad inputs/outputs, an existing output without --resume, or a resume whose
            inputs or options differ from the interrupted job's.
    """
    from tqdm.auto import tqdm

    files = expand_inputs(inputs)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise LabelingError(f"output must end in {OUTPUT_SUFFIXES}, got {output.name}")
    if any(output.resolve() == f.resolve() for f in files):
        raise LabelingError("output would overwrite an input; the labeler never edits its input")
    parts_dir = output.with_name(output.name + ".parts")
    state_file = parts_dir / "job.json"
    fingerprint = _fingerprint(files, options)
    if parts_dir.exists():
        if not resume:
            raise LabelingError(f"{parts_dir} exists from an interrupted job; pass --resume to continue it")
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != fingerprint:
            raise LabelingError("cannot resume: inputs or options differ from the interrupted job")
    else:
        if output.exists() and not resume:
            raise LabelingError(f"{output} exists; remove it or choose another output")
        if output.exists():
            return LabelStats()  # finished earlier: nothing to resume
        parts_dir.mkdir(parents=True)
        state_file.write_text(json.dumps({"fingerprint": fingerprint, "options": asdict(options)}))
    part_suffix = ".jsonl" if output.suffix == ".jsonl" else ".parquet"
    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob(f"part-*{part_suffix}")}
    stats = LabelStats()
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    bar = tqdm(desc="labeling", unit="rows", unit_scale=True, disable=not progress, dynamic_ncols=True)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(options.model,)) as pool:
        in_flight: dict[int, Future] = {}

        def collect(index: int) -> None:
            part = in_flight.pop(index).result()
            stats.add(part)
            bar.update(part.rows)

        for index, chunk in enumerate(read_chunks(files, options.chunk_rows)):
            if index in done:
                stats.resumed_rows += len(chunk)
                bar.update(len(chunk))
                continue
            in_flight[index] = pool.submit(label_part, chunk, options, parts_dir / f"part-{index:08d}{part_suffix}")
            # At most two chunks per worker in flight: memory stays flat whatever the input size.
            while len(in_flight) >= 2 * workers:
                collect(min(in_flight))
        while in_flight:
            collect(min(in_flight))
    bar.close()
    parts = sorted(parts_dir.glob(f"part-*{part_suffix}"))
    _merge(parts, output)
    shutil.rmtree(parts_dir)
    return stats


def _count(rows: list[dict], stats: LabelStats) -> None:
    for row in rows:
        stats.rows += 1
        if row["error"] is not None:
            stats.errors += 1
        else:
            stats.tiers[row["tier"]] = stats.tiers.get(row["tier"], 0) + 1
