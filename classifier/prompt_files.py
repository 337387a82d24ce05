"""Reading prompt files: JSONL, CSV and Parquet rows, for the labeler and for training alike.

`read_payloads` yields every row of one file, numbered, in file order, without judging it: a raw
JSONL line (decoded by `decode_json_line`, where the caller chooses: the labeler does it in its
worker processes), a Parquet or CSV record, or a `BadRow` for a CSV record it cannot read or a
Parquet row whose text is not UTF-8. What a row must hold is the caller's business: the labeler
wants a prompt (classifier/labeling_rows.py), training an outcome or a tier (training/data.py).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, TextIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.errors import PromptierError

T = TypeVar("T")

# Deeper JSON is refused with the same error in every process: where the recursion limit would stop
# the parser depends on the caller's stack, which differs between a pool worker and a Ray actor.
MAX_JSON_DEPTH = 64
UTF8_BOM = b"\xef\xbb\xbf"
# A CSV field or line longer than this many times the longest prompt the model takes is an error row
# without being read whole, so that one cell cannot take unbounded memory; a longer prompt under this
# bound is read, and refused with its length (validate_text) in a row that keeps its id.
CSV_LIMIT_FACTOR = 8
# A JSONL line longer than this many bytes (its line end not counted) is one error row, and is never held
# whole: a file without line ends would otherwise be read into memory as one line. A line holding the
# longest prompt the model takes (classifier.runtime.MAX_TEXT_CHARS, 2,000,000 characters) is read, with
# room for the row's other columns, even as JSON escapes text at its longest (12 bytes a character,
# `\ud83d\ude00`): so such a prompt, or a longer one below this bound, is refused with its length in a row
# that keeps its id, as in CSV.
MAX_JSONL_LINE_BYTES = 32 * 2**20
FileFormat = Literal["jsonl", "csv", "parquet"]


class PromptFileError(PromptierError):
    """A prompt file cannot be read at all (unreadable, not Parquet, a CSV without a header...)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class BadRow:
    """A row its reader could not make a record of (a CSV line with the wrong number of fields, a Parquet
    row whose text is not UTF-8, ...)."""

    error: str
    record: dict  # what could be read of it, so that the error row keeps the row's id
    line: int | None = None  # a JSONL line's number, which the labeler names as it does a broken line's


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


def each_once(files: Iterable[Path]) -> list[Path]:
    """The files in order, each once, where first named: overlapping globs, another spelling of a path
    or a link to a file would otherwise read its rows twice."""
    first_names: dict[Path, Path] = {}
    for path in files:
        first_names.setdefault(path.resolve(), path)
    return list(first_names.values())


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
    has to fit in memory whole; a JSONL line longer than `MAX_JSONL_LINE_BYTES` is a BadRow, never read
    whole.

    Raises:
        PromptFileError: the file cannot be read at all, its type is not one of `file_format`'s, or it
            holds a JSON array rather than JSON Lines.
    """
    kind = file_format(path)
    if kind == "jsonl":
        return _jsonl_lines(path)
    if kind == "csv":
        return _csv_rows(path)
    if kind == "parquet":
        return _parquet_records(path, batch_rows)
    raise PromptFileError(path, f"unsupported file type {path.suffix!r}")


def refuse_json_array(path: Path) -> None:
    """Refuse a JSON file that holds an array (what `json.dump` of a list writes) rather than JSON Lines.

    Read line by line, such a file would be an error for every line, blamed on the rows. Only the
    first character that is not whitespace (after a BOM) is read: a file of JSON Lines starts with an
    object, and a first line that is an array could not be a row anyway.

    Raises:
        PromptFileError: the file starts with `[`, or cannot be read.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(len(UTF8_BOM))
            chunk = b"" if head == UTF8_BOM else head
            while True:
                start = chunk.lstrip()
                if start:
                    break
                chunk = handle.read(65536)
                if not chunk:
                    return
    except OSError as exc:
        raise PromptFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    if start.startswith(b"["):
        converted = path.with_suffix(".jsonl").name
        if converted == path.name:  # `jq ... x.jsonl > x.jsonl` would empty the file before jq reads it
            converted = f"{path.stem}.lines.jsonl"
        raise PromptFileError(path, "is a JSON array; prompt files are JSON Lines, one object per line "
                                    f"(convert it with: jq -c '.[]' {path.name} > {converted})")


def parquet_columns(path: Path) -> list[str]:
    """The names of a Parquet file's columns, read from its footer alone: a job calls it to find a file
    that is not Parquet before it starts, not after it labeled the files before it (nor inside a Ray
    task, whose error is a traceback).

    Raises:
        PromptFileError: the file cannot be read, or is not Parquet.
    """
    try:
        return list(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(path, f"cannot read Parquet: {exc}") from exc


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Payload]]:
    """Raw JSONL lines numbered by line; blank lines are skipped, a leading UTF-8 BOM dropped.

    A line longer than `MAX_JSONL_LINE_BYTES` is a BadRow without a record (its id is not read), and the
    next line is read after it; no more of such a line than the limit is held at a time.

    Raises:
        PromptFileError: the file cannot be read, or holds a JSON array (`refuse_json_array`).
    """
    refuse_json_array(path)
    limit = MAX_JSONL_LINE_BYTES  # looked up per file, so that a test can set it smaller
    try:
        with path.open("rb") as handle:
            if handle.read(len(UTF8_BOM)) != UTF8_BOM:
                handle.seek(0)
            number = 0
            while raw := handle.readline(limit + 1):
                number += 1
                cut = len(raw) > limit and not raw.endswith(b"\n")
                if cut and not _skip_line(handle, blank=not raw.strip()):
                    # The reason holds no position, so that training can count such lines by reason.
                    yield number, BadRow(f"longer than {limit} bytes, the longest JSONL line read", {}, number)
                elif not cut and raw.strip():
                    yield number, raw
    except OSError as exc:
        raise PromptFileError(path, f"cannot read it: {exc.strerror or exc}") from exc


def _skip_line(handle: BinaryIO, blank: bool) -> bool:
    """Read the rest of a line a MiB at a time, up to its end or the file's; returns whether the line was
    blank (`blank`: its part read before), which is skipped as a short blank line is."""
    while raw := handle.readline(2**20):
        blank = blank and not raw.strip()
        if raw.endswith(b"\n"):
            break
    return blank


def _csv_rows(path: Path) -> Iterator[tuple[int, Payload]]:
    """CSV records (all values text, as written) numbered by record; a record the reader cannot read
    is one BadRow, and the next record is read from its own first line.

    Python's csv module rather than Arrow's reader: Arrow fails the whole file on one line with the
    wrong number of fields or with invalid UTF-8, and infers types (an id `007` would become 7).
    """
    limit = _csv_char_limit()
    # The limit is per process, and is put back when the file is read.
    previous_limit = csv.field_size_limit(limit)
    try:
        # utf-8-sig drops a leading BOM; surrogateescape keeps undecodable bytes, reported per row below.
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            lines = _CsvLines(handle, limit)
            reader = csv.reader(lines)
            header: list[str] | None = None
            number = 0
            while True:
                first_line = lines.line + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if header is None:
                        raise PromptFileError(path, f"unreadable CSV header: {exc}") from exc
                    # The reader starts again at the next line, which may be inside this record's field.
                    skipped = lines.skip_record()
                    number += 1
                    yield number, BadRow(f"CSV line {first_line}: {exc}{skipped}", {})
                    continue
                # A record that spans lines ends where its quoted field closes, with an even count of
                # quotes; an odd count means the reader reached the end of the file inside the field, and
                # every line after its start was read as part of it.
                unclosed = lines.quotes % 2 == 1 and lines.line > first_line
                lines.record_read()
                if header is None:
                    if unclosed:
                        raise PromptFileError(path, "unreadable CSV header: a quote in it is never closed")
                    twice = sorted({name for name in cells if cells.count(name) > 1})
                    if twice:
                        raise PromptFileError(path, f"the CSV header names column(s) {twice} twice: each "
                                                    "column needs a name of its own")
                    header = cells
                    continue
                if not cells:
                    continue  # a blank line
                number += 1
                if unclosed:
                    yield number, BadRow(f"CSV line {first_line}: a quote in it is never closed, so lines "
                                         f"{first_line + 1}-{lines.line} to the end of the file were read as "
                                         "part of it", dict(zip(header, cells[:-1], strict=False)))
                    continue
                yield number, _csv_record(header, cells, first_line)
    except OSError as exc:
        raise PromptFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    finally:
        csv.field_size_limit(previous_limit)


def _csv_char_limit() -> int:
    """The longest CSV field, or line, that is read: `CSV_LIMIT_FACTOR` times the longest prompt the model takes."""
    # Imported here: only CSV needs the runtime's limit, and the logs training reads are never CSV.
    from classifier.runtime import MAX_TEXT_CHARS

    return CSV_LIMIT_FACTOR * MAX_TEXT_CHARS


class _CsvLineTooLong(csv.Error):
    """A line longer than the CSV character limit (the csv reader passes its source's errors on)."""


class _CsvLines:
    """A CSV file's lines for csv.reader, read `limit` characters at most, with what it takes to find the
    end of a record the reader gave up on: the line number, and the quote characters of the record so far.

    The reader ends a record at the end of a line, outside quotes; after an error it starts again at the
    next line, which may lie inside a quoted field. In a quoted field quotes come in pairs (`""` is one
    quote), so a record ends at the first line end after an even number of quotes.
    """

    def __init__(self, handle: TextIO, limit: int) -> None:
        self.handle, self.limit = handle, limit
        self.line = 0  # lines read to their end
        self.quotes = 0  # quote characters read since the last record ended
        self.cut = False  # the last read stopped at `limit`, inside a line

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        text = self._read()
        if not text:
            raise StopIteration
        if self.cut:
            raise _CsvLineTooLong(f"a line longer than {self.limit} characters")
        return text

    def _read(self) -> str:
        text = self.handle.readline(self.limit)
        self.quotes += text.count('"')
        self.cut = len(text) == self.limit and not text.endswith(("\n", "\r"))
        if text and not self.cut:
            self.line += 1
        return text

    def record_read(self) -> None:
        """The reader made a record of the lines read: the next one starts on the next line."""
        self.quotes = 0

    def skip_record(self) -> str:
        """Skip the rest of a record the reader gave up on: the rest of its line, then, while one of its
        quoted fields is open, every line up to the one that closes it. Returns what that took, when it
        took the rest of the file (a stray quote in an unquoted field looks like one never closed): the
        rows there are then not lost silently."""
        start, ended = self.line, False
        while self.cut or self.quotes % 2:
            if not self._read():
                ended = True
                break
        self.quotes = 0
        if ended and self.line > start + 1:
            return (f"; a quote in it is never closed, so lines {start + 2}-{self.line} to the end of the file "
                    "were read as part of it")
        return ""


def surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate, which UTF-8 cannot encode (a JSON escape of half a
    pair, or undecodable bytes kept by surrogateescape); None when it holds none."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _csv_record(header: list[str], cells: list[str], line: int) -> Payload:
    """One CSV record by its header's names, or a BadRow naming the record's first line and its problem."""
    record = dict(zip(header, cells, strict=False))
    for name, value in record.items():
        position = surrogate_at(value)
        if position is not None:  # undecodable bytes, kept as surrogates by surrogateescape
            clean = {k: v.encode("utf-8", "replace").decode("utf-8") for k, v in record.items()}
            return BadRow(f"CSV line {line}: invalid UTF-8 in column {name!r} at character {position}", clean)
    if len(cells) != len(header):
        return BadRow(f"CSV line {line}: {len(cells)} fields; the header has {len(header)}", record)
    return record


def _parquet_records(path: Path, rows: int) -> Iterator[tuple[int, Payload]]:
    """Parquet records numbered by row, streamed in record batches of about `rows` rows; a row holding
    text that is not UTF-8 is a BadRow."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        number = 0
        for record_batch in batches:
            for record in _batch_records(record_batch):
                number += 1
                yield number, record
    except (OSError, pa.ArrowException, _UnconvertibleColumn) as exc:
        raise PromptFileError(path, f"cannot read Parquet: {exc}") from exc


class _UnconvertibleColumn(Exception):
    """A Parquet column holds a value Python has no type for (a timestamp past year 9999)."""


def _batch_records(batch: pa.RecordBatch) -> list[Payload]:
    """A record batch's rows as records.

    Arrow does not check that a string column holds UTF-8, and not every Parquet writer does: such
    bytes fail the batch's conversion, so the batch is then converted row by row, and only the rows
    that hold them become BadRows (the job goes on, as it does for invalid UTF-8 in JSONL or CSV).

    Raises:
        _UnconvertibleColumn: naming the column whose values Python cannot hold (a timestamp written in
            the wrong unit, a date past year 9999), whatever column it is.
    """
    try:
        try:
            return batch.to_pylist()
        except UnicodeDecodeError:
            return [_parquet_row(batch.slice(index, 1)) for index in range(batch.num_rows)]
    except UnicodeDecodeError:  # a ValueError too, but not a value Python cannot hold
        raise
    except (OverflowError, ValueError) as exc:
        raise _unconvertible(batch, exc) from exc


def _unconvertible(batch: pa.RecordBatch, error: Exception) -> _UnconvertibleColumn:
    """The error naming the first column of `batch` that Python cannot convert (text that is not UTF-8
    is not such a column: its rows are BadRows)."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            column.to_pylist()
        except UnicodeDecodeError:
            continue
        except (OverflowError, ValueError) as column_error:
            return _UnconvertibleColumn(f"column {name!r} holds a value Python cannot represent ({column_error}): "
                                        "fix the column, or leave it out of the file")
    return _UnconvertibleColumn(str(error))


def _parquet_row(row: pa.RecordBatch) -> Payload:
    """One row of a record batch as a record, or a BadRow naming the first column whose text is not UTF-8
    (its record keeps every column that converts, and such text with its invalid bytes replaced).

    The error holds no position (the row's number or id names the row, and in a nested column a byte
    offset would be one of a value inside it), so that training can count such rows by reason."""
    try:
        return row.to_pylist()[0]
    except UnicodeDecodeError:
        pass
    record: dict = {}
    problem = ""
    for name, column in zip(row.schema.names, row.columns, strict=True):
        try:
            record[name] = column.to_pylist()[0]
        except UnicodeDecodeError:
            record[name] = _text_replaced(column)
            problem = problem or f"invalid UTF-8 in column {name!r}"
    return BadRow(problem, record)


def _text_replaced(column: pa.Array) -> str | None:
    """The text of a one-row string column with its invalid UTF-8 replaced; None for a nested column."""
    try:
        raw = column.cast(pa.large_binary())[0].as_py()
    except pa.ArrowException:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None


def decode_json_line(raw: bytes) -> tuple[dict, LineProblem | None]:
    """One JSONL line as (record, None), or (what could be read of it, why it is not a record).

    A line with invalid UTF-8 whose rest parses still gives its record, so that a caller can name the
    row by its id. An object naming one key twice is a problem, not its last value: a training log's
    `"score": 7, "score": 0.5` would train on 0.5, and a labeling row's second `"prompt"` would be
    labeled in place of the first, without a word. (Checking costs about a microsecond a line, where
    classifying the row costs a hundred.)
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


class _KeyWrittenTwice(ValueError):
    """A JSON object names one key twice."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key written twice (json keeps the last)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _KeyWrittenTwice(f"key {key!r} is written twice in one object")
            seen.add(key)
    return record


def _load_json(text: str) -> tuple[object, LineProblem | None]:
    """Parse JSON text as (value, None), or (None, why not)."""
    too_deep = LineProblem(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        return None, too_deep
    except _KeyWrittenTwice as exc:
        return None, LineProblem(str(exc))
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
