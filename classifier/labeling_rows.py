"""Reading and parsing a labeling job's input rows: the one row parser both engines share.

Rows are read in a deterministic order (what makes a resume exact) through classifier/prompt_files.py,
which training reads its logs with too. Every row then goes through `parse_row`: a row that cannot be
labeled (broken JSON, nesting too deep, wrong types, invalid text) becomes a parsed row with an
`error`, never an exception, so the local and Ray engines agree row for row, malformed rows included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError
from classifier.labeling_options import LabelingError, LabelOptions
from classifier.prompt_files import (
    BadRow,
    Payload,
    PromptFileError,
    batched,
    decode_json_line,
    read_payloads,
    surrogate_at,
)
from classifier.runtime import validate_text


def read_rows(path: Path, batch_rows: int = 4096, name: str | None = None) -> Iterator[tuple[str, Payload]]:
    """Every row of one input file, in file order, as (row name `NAME:N`, payload).

    The row name is the output id of a row without one; `NAME` is the file's name unless given (a job's
    inputs are named by `input_names`). Both engines read through this function, and it through
    classifier/prompt_files.py, which training reads its logs with too.

    Raises:
        LabelingError: the file cannot be read at all (missing, not Parquet, ...).
    """
    name = path.name if name is None else name
    try:
        for number, payload in read_payloads(path, batch_rows):
            yield f"{name}:{number}", payload
    except PromptFileError as exc:
        raise LabelingError(str(exc)) from exc


def input_names(files: Sequence[Path]) -> list[str]:
    """The name each of a job's inputs gives the ids of its rows without one (`NAME:N`): the file's path
    below the folder that holds all the inputs.

    So two `requests.jsonl` of different folders never give two rows one id, while a single input, or
    inputs of one folder, are named by their file names (the ids of earlier jobs, which a resume keeps).
    Paths are made absolute without resolving links: a link's name is the one the user gave.
    """
    paths = [os.path.abspath(path) for path in files]
    if not paths:
        return []
    folder = os.path.commonpath([os.path.dirname(path) for path in paths])
    return [Path(os.path.relpath(path, folder)).as_posix() for path in paths]


def read_chunks(files: Sequence[Path], rows: int) -> Iterator[list[tuple[str, Payload]]]:
    """Fixed-size chunks of rows across all files, in a deterministic order (what makes resume exact)."""
    named = zip(files, input_names(files), strict=True)
    return batched((row for path, name in named for row in read_rows(path, rows, name)), rows)


@dataclass(frozen=True)
class ParsedRow:
    """One input row as the labeler uses it: output id, kept columns, and the prompt or why there is none."""

    row_id: str
    prompt: str | None
    error: str | None
    kept: dict[str, str | None]
    own_id: bool = False  # the id is the row's value in the id column, not its name (`NAME:N`)


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
        if payload.line is not None:  # a JSONL line too long to read: named as a broken line is
            error = f"line {payload.line}: {error}"
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
    return ParsedRow(row_id=row_id, prompt=None if error else prompt, error=error, kept=kept,
                     own_id=raw_id is not None)


def _json_record(name: str, raw: bytes) -> tuple[dict, str | None]:
    """One JSONL line as (record, error), the error naming the line."""
    record, problem = decode_json_line(raw)
    return record, None if problem is None else f"line {name.rsplit(':', 1)[-1]}: {problem}"


def _prompt_of(record: dict, options: LabelOptions) -> str:
    """The row's prompt: its prompt column, else (when that is missing or blank) its conversation rendered
    as the dispatcher renders one; validated for the model."""
    value = record.get(options.prompt_column)
    messages = record.get(options.messages_column)
    # A log that writes both columns leaves the prompt empty on chat rows: their text is the conversation.
    blank = isinstance(value, str | bytes) and not value.strip()
    if value is not None and not (blank and messages is not None):
        return validate_text(value)
    if messages is None:
        raise InvalidInputError(f"row has no {options.prompt_column!r} (or {options.messages_column!r}) value")
    if not isinstance(messages, list):
        raise InvalidInputError(f"{options.messages_column!r} must be a list of messages, "
                                f"got {type(messages).__name__}")
    return validate_text(render_conversation(_chat_messages(messages)))


def _chat_messages(messages: list) -> list[dict]:
    """`messages` checked to be OpenAI chat message objects, as the dispatcher takes them.

    Their contents are read by render_conversation as the dispatcher reads them (classifier.conversation.
    content_text: a string, the text parts of a list, nothing for the null content of a tool-calling
    turn), so that a conversation gets the same tier here as there; a Parquet struct's missing fields
    are nulls.

    Raises:
        InvalidInputError: a message that is not an object (render_conversation checks the rest: roles,
            content types, the number of messages).
    """
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInputError(f"message {index} must be an object with a role and a content, got "
                                    f"{type(message).__name__}")
    return messages


def _cell(value: object) -> tuple[str | None, str | None]:
    """A value as output text (one type per column, whatever the input held), and what is wrong with it.

    Text is written as it is, and a null as no value (an id column's null names the row `NAME:N`). Booleans,
    numbers, lists and objects are written as JSON writes them, from every input format and nested or not:
    `true` (not Python's `True`), `1.5`, `1e+20`, `[1, false]`. An integer is written exactly; any other
    number is the double it reads as, as JSON readers read it (an id that must stay exact is an integer or a
    string). JSON has no number that is not finite, but a double does: `1e400` reads as infinity, Python's
    reader takes the words `NaN`, `Infinity` and `-Infinity`, and a Parquet float column may hold them. Such a
    number is written in those words (as Python's json writes it, not str()'s `nan` and `inf`), which Python's
    float() and JavaScript's Number() read back as that number; it is no error: the output can hold it, and it
    is the row's value. Dates, decimals and bytes, which Parquet holds and JSON has no type for, are written
    as Python prints them.
    """
    if value is None:
        return None, None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float | dict | list | tuple):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:  # the dates, decimals and bytes that Parquet holds
        text = str(value)
    position = surrogate_at(text)
    if position is not None:
        # JSON may escape a lone surrogate, which no UTF-8 output can hold: write it escaped.
        return text.encode("utf-8", "backslashreplace").decode("utf-8"), f"unpaired surrogate at character {position}"
    return text, None
