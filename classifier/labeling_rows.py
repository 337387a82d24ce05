"""Reading and parsing a labeling job's input rows: the one row parser both engines share.

Rows are read in a deterministic order (what makes a resume exact) through classifier/prompt_files.py,
which training reads its logs with too. Every row then goes through `parse_row`: a row that cannot be
labeled (broken JSON, nesting too deep, wrong types, invalid text) becomes a parsed row with an
`error`, never an exception, so the local and Ray engines agree row for row, malformed rows included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError
from classifier.labeling_options import LabelingError, LabelOptions
from classifier.prompt_files import BadRow, Payload, PromptFileError, batched, decode_json_line, read_payloads
from classifier.runtime import validate_text


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
    return batched((row for path in files for row in read_rows(path, rows)), rows)


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
