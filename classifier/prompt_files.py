"""Reading prompt files: JSONL, CSV and Parquet rows, for the labeler and for training alike.

`read_payloads` yields every row of one file, numbered, in file order, without judging it: a raw
JSONL line (decoded by `decode_json_line`, where the caller chooses: the labeler does it in its
worker processes), a Parquet or CSV record, or a `BadRow` for a CSV line that is not a record. What a
row must hold is the caller's business: the labeler wants a prompt (classifier/labeling_rows.py), training
an outcome or a tier (training/data.py).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.errors import PromptierError

T = TypeVar("T")

# Deeper JSON is refused with the same error in every process: where the recursion limit would stop
# the parser depends on the caller's stack, which differs between a pool worker and a Ray actor.
MAX_JSON_DEPTH = 64
UTF8_BOM = b"\xef\xbb\xbf"
FileFormat = Literal["jsonl", "csv", "parquet"]


class PromptFileError(PromptierError):
    """A prompt file cannot be read at all (unreadable, not Parquet, a CSV without a header...)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class BadRow:
    """A row its reader could not make a record of (a CSV line with the wrong number of fields, ...)."""

    error: str
    record: dict  # what could be read of it, so that the error row keeps the row's id


# A raw JSONL line, a Parquet or CSV record, or a bad row.
Payload = bytes | dict | BadRow


@dataclass(frozen=True)
class LineProblem:
    """Why a JSONL line is not a record."""

    reason: str  # the same words for every line with this problem, so that problems can be counted
    where: str = ""  # where in the line, when the JSON parser says
    syntax: bool = False  # the line is not JSON at all (rather than JSON of the wrong kind)

    def __str__(self) -> str:
        return f"{self.reason}: {self.where}" if self.where else self.reason


def file_format(path: Path) -> FileFormat | None:
    """How a file is read, by its name: `.jsonl`/`.json` (and a rotated `x.jsonl.1`), `.csv`, `.parquet`."""
    if path.suffix in (".jsonl", ".json") or is_rotated_jsonl(path):
        return "jsonl"
    if path.suffix == ".csv":
        return "csv"
    if path.suffix == ".parquet":
        return "parquet"
    return None


def expand_pattern(pattern: str) -> list[str]:
    """A path as given when it exists (even with glob characters in its name), else, when it holds a
    glob character (`*`, `?`, `[`), its matches sorted (`**` crosses directories). Quoted on the
    command line, one pattern names many files in every shell."""
    if not os.path.lexists(pattern) and any(character in pattern for character in "*?["):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), in order: itertools.batched of Python 3.12."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_rotated_jsonl(path: Path) -> bool:
    """A rotated backup of a JSONL log (`decisions.jsonl.1`): read as JSONL."""
    return len(path.suffixes) >= 2 and path.suffixes[-2] == ".jsonl" and path.suffix[1:].isdigit()


def read_payloads(path: Path, batch_rows: int = 4096) -> Iterator[tuple[int, Payload]]:
    """Every row of one prompt file, in file order, as (row number from 1, payload).

    JSONL rows are numbered by line (blank lines are skipped, not renumbered), CSV and Parquet rows by
    record. Parquet is read a record batch of about `batch_rows` rows at a time, so that a file never
    has to fit in memory whole.

    Raises:
        PromptFileError: the file cannot be read at all, or its type is not one of `file_format`'s.
    """
    kind = file_format(path)
    if kind == "jsonl":
        return _jsonl_lines(path)
    if kind == "csv":
        return _csv_rows(path)
    if kind == "parquet":
        return _parquet_records(path, batch_rows)
    raise PromptFileError(path, f"unsupported file type {path.suffix!r}")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Payload]]:
    """Raw JSONL lines numbered by line; blank lines are skipped, a leading UTF-8 BOM dropped."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
                if raw.strip():
                    yield number, raw
    except OSError as exc:
        raise PromptFileError(path, f"cannot read it: {exc.strerror or exc}") from exc


def _csv_rows(path: Path) -> Iterator[tuple[int, Payload]]:
    """CSV records (all values text, as written) numbered by record; a bad line is a BadRow.

    Python's csv module rather than Arrow's reader: Arrow fails the whole file on one line with the
    wrong number of fields or with invalid UTF-8, and infers types (an id `007` would become 7).
    """
    # Imported here: only CSV needs the runtime's limit, and the logs training reads are never CSV.
    from classifier.runtime import MAX_TEXT_CHARS

    # Allow fields as long as the longest prompt the model accepts (csv's default stops at 128 KiB).
    # The limit is per process, and is put back when the file is read.
    previous_limit = csv.field_size_limit(max(csv.field_size_limit(), MAX_TEXT_CHARS + 1))
    try:
        # utf-8-sig drops a leading BOM; surrogateescape keeps undecodable bytes, reported per row below.
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            reader = csv.reader(handle)
            header: list[str] | None = None
            number = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # the reader goes on at the next line
                    if header is None:
                        raise PromptFileError(path, f"unreadable CSV header: {exc}") from exc
                    number += 1
                    yield number, BadRow(f"CSV line {reader.line_num}: {exc}", {})
                    continue
                if header is None:
                    header = cells
                    continue
                if not cells:
                    continue  # a blank line
                number += 1
                yield number, _csv_record(header, cells, reader.line_num)
    except OSError as exc:
        raise PromptFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    finally:
        csv.field_size_limit(previous_limit)


def _csv_record(header: list[str], cells: list[str], line: int) -> Payload:
    record = dict(zip(header, cells, strict=False))
    for name, value in record.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # undecodable bytes, kept as surrogates by surrogateescape
                clean = {k: v.encode("utf-8", "replace").decode("utf-8") for k, v in record.items()}
                return BadRow(f"CSV line {line}: invalid UTF-8 in column {name!r} at character {exc.start}", clean)
    if len(cells) != len(header):
        return BadRow(f"CSV line {line}: {len(cells)} fields; the header has {len(header)}", record)
    return record


def _parquet_records(path: Path, rows: int) -> Iterator[tuple[int, Payload]]:
    """Parquet records numbered by row, streamed in record batches of about `rows` rows."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        number = 0
        for record_batch in batches:
            for record in record_batch.to_pylist():
                number += 1
                yield number, record
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(path, f"cannot read Parquet: {exc}") from exc


def decode_json_line(raw: bytes) -> tuple[dict, LineProblem | None]:
    """One JSONL line as (record, None), or (what could be read of it, why it is not a record).

    A line with invalid UTF-8 whose rest parses still gives its record, so that a caller can name the
    row by its id.
    """
    try:
        value, problem = _load_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        salvaged, _ = _load_json(raw.decode("utf-8", "replace"))
        return (salvaged if isinstance(salvaged, dict) else {}), LineProblem(f"invalid UTF-8 at byte {exc.start}")
    if problem is None and not isinstance(value, dict):
        problem = LineProblem(f"expected an object, got {type(value).__name__}")
    if problem is not None:
        return {}, problem
    assert isinstance(value, dict)
    return value, None


def _load_json(text: str) -> tuple[object, LineProblem | None]:
    """Parse JSON text as (value, None), or (None, why not)."""
    too_deep = LineProblem(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except RecursionError:
        return None, too_deep
    except json.JSONDecodeError as exc:
        return None, LineProblem(exc.msg, f"line {exc.lineno} column {exc.colno} (char {exc.pos})", syntax=True)
    except ValueError as exc:  # what json.loads raises besides a syntax error (an integer too long...)
        return None, LineProblem(str(exc), syntax=True)
    return (None, too_deep) if _deeper_than(value, MAX_JSON_DEPTH) else (value, None)


def _deeper_than(value: object, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
