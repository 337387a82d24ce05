"""Batch labeling's inputs: the rows real logs hold, and the files a user points the labeler at."""

from __future__ import annotations

import csv
import json
import math
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import classifier
from classifier import labeling_output, prompt_files
from classifier.labeling import (
    DECISION_COLUMNS,
    LabelingError,
    LabelOptions,
    expand_inputs,
    label_files,
    parse_row,
    read_chunks,
    read_rows,
)
from classifier.prompt_files import BadRow, PromptFileError, read_payloads
from classifier.runtime import MAX_TEXT_CHARS
from tests.grpc_server import EASY, HARD
from tests.labeling_files import read_output

# ---------------------------------------------------------------- chat rows as OpenAI's API writes them
TOOL_CALL = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": HARD},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
CONTENT_PARTS = [{"role": "user", "content": [{"type": "text", "text": EASY},
                                              {"type": "image_url", "image_url": {"url": "http://x"}}]}]


def _dispatcher_text(messages: list) -> str:
    """The text the dispatcher classifies for a chat request with these messages."""
    from serving.dispatch.inbound_request import parse_chat

    _, pairs = parse_chat(json.dumps({"model": "promptier", "messages": messages}).encode())
    return classifier.render_conversation(pairs)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _parsed(path: Path, options: LabelOptions | None = None) -> list:
    """Every row of one file as the labeler parses it (no model needed)."""
    return [parse_row(name, payload, options or LabelOptions()) for name, payload in read_rows(path)]


def test_chat_rows_read_as_the_dispatcher_reads_them(tmp_path: Path) -> None:
    """A tool-calling turn (null content) and multi-part content are standard chat rows: the labeler reads
    the same text from them as the dispatcher, so that it gives them the tier the dispatcher routes by."""
    rows = [{"prompt_id": "tool", "messages": TOOL_CALL}, {"prompt_id": "parts", "messages": CONTENT_PARTS},
            {"prompt_id": "blank", "prompt": " ", "messages": CONTENT_PARTS}]
    parsed = _parsed(_jsonl(tmp_path / "chat.jsonl", rows))
    assert [row.error for row in parsed] == [None, None, None]
    assert [row.prompt for row in parsed] == [_dispatcher_text(TOOL_CALL), _dispatcher_text(CONTENT_PARTS),
                                              _dispatcher_text(CONTENT_PARTS)]


def test_chat_rows_in_parquet_structs(tmp_path: Path) -> None:
    """Parquet holds messages as structs: a field a message lacks (a tool call's content) is a null."""
    source = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "tool", "messages": TOOL_CALL}]), source)
    (row,) = _parsed(source)
    assert row.error is None and row.prompt == _dispatcher_text(TOOL_CALL)
    parts = tmp_path / "parts.parquet"  # a content of parts: the image part's `text` is a null
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "parts", "messages": CONTENT_PARTS}]), parts)
    (row,) = _parsed(parts)
    assert row.error is None and row.prompt == _dispatcher_text(CONTENT_PARTS)


def test_chat_rows_that_are_not_conversations_are_row_errors(tmp_path: Path) -> None:
    rows = [{"prompt_id": "role", "messages": [{"role": "wizard", "content": EASY}]},
            {"prompt_id": "shape", "messages": ["just text"]},
            {"prompt_id": "no-user", "messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
            {"prompt_id": "empty", "prompt": ""},
            {"prompt_id": "first", "prompt": EASY, "messages": CONTENT_PARTS}]
    errors = {row.row_id: row.error for row in _parsed(_jsonl(tmp_path / "chat.jsonl", rows))}
    assert "unknown role 'wizard'" in errors["role"]
    assert "message 0 must be an object" in errors["shape"]
    assert "no user message" in errors["no-user"]
    assert errors["empty"] == "prompt is empty"  # no conversation to fall back on
    assert errors["first"] is None  # a prompt beside a conversation is the row's text


def test_chat_rows_are_labeled_with_the_dispatchers_tier(tmp_path: Path, shipped_artifact: Path) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"prompt_id": "tool", "messages": TOOL_CALL},
                                              {"prompt_id": "parts", "messages": CONTENT_PARTS}])
    label_files([str(source)], tmp_path / "out.jsonl", LabelOptions(model=str(shipped_artifact)), workers=1,
                progress=False)
    runtime = classifier.load(shipped_artifact)
    assert [(row["tier"], row["error"]) for row in read_output(tmp_path / "out.jsonl")] == [
        (runtime.classify(_dispatcher_text(TOOL_CALL)).tier, None),
        (runtime.classify(_dispatcher_text(CONTENT_PARTS)).tier, None)]


# ---------------------------------------------------------------- CSV records longer than a prompt can be
def _csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["prompt_id", "prompt"], *rows])
    return path


def test_a_csv_prompt_over_the_models_limit_is_one_row_that_says_so(tmp_path: Path) -> None:
    big = ("x" * 1000 + "\n") * 2100  # quoted, on 2,100 lines
    source = _csv(tmp_path / "big.csv", [["1", EASY], ["2", big], ["3", HARD]])
    parsed = _parsed(source)
    assert [(row.row_id, row.error) for row in parsed] == [
        ("1", None), ("2", f"prompt has {len(big)} characters; the limit is {MAX_TEXT_CHARS}"), ("3", None)]
    assert parsed[2].prompt == HARD


def test_a_csv_record_over_the_read_limit_is_one_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A field or line too long to read is one error row, and the reader goes on at the next record, not
    inside the quoted field it gave up on (where every line would have been taken for a record)."""
    monkeypatch.setattr(prompt_files, "_csv_char_limit", lambda: 40)
    source = _csv(tmp_path / "in.csv", [
        ["a", "short"],
        ["b", 'she said "hi, there"\n' * 5],  # a quoted field over the limit, on 6 lines, with quotes
        ["c", "short"],
        ["d", "y" * 100],  # a line over the limit
        ["e", 'a,"b"\n' + "z" * 100 + "\nend"],  # a line over the limit inside a quoted field
        ["f", "x" * 30 + "\r\n" + "y" * 30],  # a field over the limit whose lines are each under it
        ["g", "short, last"],
    ])
    payloads = list(read_payloads(source))
    assert [number for number, _ in payloads] == [1, 2, 3, 4, 5, 6, 7]
    assert [payload for _, payload in payloads if not isinstance(payload, BadRow)] == [
        {"prompt_id": "a", "prompt": "short"}, {"prompt_id": "c", "prompt": "short"},
        {"prompt_id": "g", "prompt": "short, last"}]
    assert [payload.error for _, payload in payloads if isinstance(payload, BadRow)] == [
        "CSV line 3: field larger than field limit (40)", "CSV line 10: a line longer than 40 characters",
        "CSV line 11: a line longer than 40 characters", "CSV line 14: field larger than field limit (40)"]


def test_a_stray_quote_in_an_overlong_csv_line_says_what_it_took(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A quote inside an unquoted field looks like a quoted field never closed: skipping to its end takes
    the rest of the file, and the error row says which lines went with it rather than losing them silently."""
    monkeypatch.setattr(prompt_files, "_csv_char_limit", lambda: 40)
    source = tmp_path / "in.csv"
    source.write_text("prompt_id,prompt\n1,short\n2," + "x" * 50 + '"x\n3,after\n4,more\n', newline="")
    payloads = [payload for _, payload in read_payloads(source)]
    assert payloads[0] == {"prompt_id": "1", "prompt": "short"} and len(payloads) == 2
    assert isinstance(payloads[1], BadRow) and payloads[1].error == (
        "CSV line 3: a line longer than 40 characters; a quote in it is never closed, so lines 4-5 to the end "
        "of the file were read as part of it")


def test_a_quoted_csv_field_never_closed_is_an_error_row_naming_the_lines_it_took(tmp_path: Path) -> None:
    """Python's csv reader ends a field left open at the end of the file without an error: the record took
    every line after it, and the job reported every row labeled."""
    source = tmp_path / "in.csv"
    source.write_text('prompt_id,prompt\n1,first prompt\n2,"he said ""hi"" and left\n3,third\n4,fourth\n',
                      newline="")
    payloads = [payload for _, payload in read_payloads(source)]
    assert payloads[0] == {"prompt_id": "1", "prompt": "first prompt"} and len(payloads) == 2
    assert payloads[1] == BadRow("CSV line 3: a quote in it is never closed, so lines 4-5 to the end of the file "
                                 "were read as part of it", {"prompt_id": "2"})
    # Quoted fields that close, over several lines or with a stray quote in an unquoted field, are rows.
    source.write_text('prompt_id,prompt\n1,"multi\nline ""q"" ok"\n2,5" screen\n', newline="")
    assert [payload for _, payload in read_payloads(source)] == [
        {"prompt_id": "1", "prompt": 'multi\nline "q" ok'}, {"prompt_id": "2", "prompt": '5" screen'}]


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("prompt_id,prompt,prompt\n1,real prompt,\n", newline="")
    with pytest.raises(PromptFileError, match=r"the CSV header names column\(s\) \['prompt'\] twice"):
        list(read_payloads(source))


# ---------------------------------------------------------------- JSONL lines longer than the read limit
def _line(row_id: str, size: int) -> bytes:
    """A JSONL row of exactly `size` bytes, its line end not counted."""
    head, tail = f'{{"prompt_id": "{row_id}", "prompt": "', '"}'
    assert size > len(head) + len(tail)
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


def test_a_jsonl_line_over_the_read_limit_is_one_error_row(tmp_path: Path, shipped_artifact: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A line just over the limit (the rest of a file without line ends, say) is one error row named by
    its line, as a broken line is, and the job goes on at the next line; a line at the limit is a row."""
    # The real limit reads a line holding the longest prompt the model takes, however JSON escapes it.
    assert prompt_files.MAX_JSONL_LINE_BYTES >= 12 * MAX_TEXT_CHARS
    monkeypatch.setattr(prompt_files, "MAX_JSONL_LINE_BYTES", 64)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + _line("a", 64) + b"\n"  # a leading BOM is not part of the line
                       + _line("b", 65) + b"\n"
                       + b" " * 100 + b"\n"  # a blank line, however long, is no row
                       + _line("d", 40) + b"\r\n"
                       + b"x" * 65)  # the last line, without a line end
    stats = label_files([str(source)], tmp_path / "out.jsonl", LabelOptions(model=str(shipped_artifact)),
                        workers=1, progress=False)
    rows = read_output(tmp_path / "out.jsonl")
    too_long = "longer than 64 bytes, the longest JSONL line read"
    assert [(row["prompt_id"], row["error"]) for row in rows] == [
        ("a", None), ("in.jsonl:2", f"line 2: {too_long}"), ("d", None), ("in.jsonl:5", f"line 5: {too_long}")]
    assert stats.rows == 4 and stats.errors == 2 and rows[2]["tier"] is not None
    # Training reads its logs with the same reader: such a line is a bad row whose reason holds no position.
    assert [payload for _, payload in read_payloads(source) if isinstance(payload, BadRow)] == [
        BadRow(too_long, {}, 2), BadRow(too_long, {}, 5)]


def test_a_jsonl_line_over_the_read_limit_is_never_held_whole(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt_files, "MAX_JSONL_LINE_BYTES", 1024)
    source = tmp_path / "in.jsonl"
    source.write_bytes(_line("a", 16 * 2**20) + b"\n" + _line("b", 40) + b"\n")
    tracemalloc.start()
    try:
        payloads = list(read_payloads(source))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert payloads == [(1, BadRow("longer than 1024 bytes, the longest JSONL line read", {}, 1)),
                        (2, _line("b", 40) + b"\n")]
    assert peak < 4 * 2**20  # of the 16 MiB line, a MiB at a time


# ---------------------------------------------------------------- ids and kept values that are not text
def test_a_jsonl_row_naming_a_key_twice_is_an_error_row(tmp_path: Path) -> None:
    """JSON readers keep the last of two equal keys: a row whose second "prompt" replaced the first would be
    labeled on a text its writer may not have meant, without a word. It is an error row instead, and the
    rows around it are labeled."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt_id": "a", "prompt": "hi"}\n'
                      '{"prompt_id": "b", "prompt": "Prove Fermat", "prompt": "hi"}\n'
                      '{"prompt_id": "c", "prompt": "hello", "meta": {"k": 1, "k": 2}}\n'
                      '{"prompt_id": "d", "prompt": "hello", "meta": {"k": 1}}\n')
    parsed = _parsed(source)
    assert [row.error is None for row in parsed] == [True, False, False, True]
    assert parsed[1].error == "line 2: key 'prompt' is written twice in one object"
    assert "key 'k' is written twice" in parsed[2].error


def test_ids_and_kept_values_that_are_not_text_are_written_as_json_writes_them(tmp_path: Path) -> None:
    """`true`, not Python's `True`, and `Infinity`, not `inf`: a value reads the same whether it came from
    JSONL or Parquet, alone or nested. A number JSON has no text for is written in the words Python's json
    reads and writes (1e400 reads as infinity), and is no error."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt_id": true, "prompt": "hi", "flag": false, "n": 1e400, "m": -1e400, "nan": NaN, '
                      '"i": 7, "f": 1.5, "big": 1e20, "o": {"k": true, "x": Infinity}, "none": null}\n'
                      '{"prompt_id": 1e400, "prompt": "hi"}\n{"prompt_id": null, "prompt": "hi"}\n'
                      '{"prompt_id": 12345678901234567890123, "prompt": "hi"}\n')
    keep = ("flag", "n", "m", "nan", "i", "f", "big", "o", "none")
    parsed = _parsed(source, LabelOptions(keep_columns=keep))
    assert [(row.row_id, row.error) for row in parsed] == [
        ("true", None), ("Infinity", None), ("in.jsonl:3", None), ("12345678901234567890123", None)]
    assert parsed[0].kept == {"flag": "false", "n": "Infinity", "m": "-Infinity", "nan": "NaN", "i": "7",
                              "f": "1.5", "big": "1e+20", "o": '{"k": true, "x": Infinity}', "none": None}
    assert [float(parsed[0].kept[column]) for column in ("n", "m")] == [math.inf, -math.inf]  # read back
    table = pa.Table.from_pylist([{"prompt_id": True, "prompt": "hi", "flag": False, "n": math.inf,
                                   "nan": math.nan, "i": 7, "f": 1.5}])
    pq.write_table(table, tmp_path / "in.parquet")
    (row,) = _parsed(tmp_path / "in.parquet", LabelOptions(keep_columns=("flag", "n", "nan", "i", "f")))
    assert (row.row_id, row.error) == ("true", None)
    assert row.kept == {"flag": "false", "n": "Infinity", "nan": "NaN", "i": "7", "f": "1.5"}


def test_the_ray_engine_reads_long_lines_and_ids_as_the_local_engine(tmp_path: Path, shipped_artifact: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads, parses and counts in its own processes: an overlong line, ids and kept values that are not
    text, and rows without an id come out as they do from the local engine, and are counted alike."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    from classifier.labeling_ray import label_with_ray

    limit = 200
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt_id": true, "prompt": "' + EASY.encode() + b'", "flag": false, "n": 1e400}\n'
                       + _line("long", limit + 1) + b"\n"
                       + b'{"prompt_id": 1.5, "prompt": "' + HARD.encode() + b'", "n": NaN}\n'
                       + b'{"prompt": "' + EASY.encode() + b'", "flag": true}\n')
    options = LabelOptions(model=str(shipped_artifact), keep_columns=("flag", "n"))
    monkeypatch.setattr(prompt_files, "MAX_JSONL_LINE_BYTES", limit)
    local = label_files([str(source)], tmp_path / "local.jsonl", options, workers=1, progress=False)

    def small_limit() -> None:  # in each Ray worker process, as it starts: Ray reads the files there
        from classifier import prompt_files

        prompt_files.MAX_JSONL_LINE_BYTES = limit

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": small_limit})
    try:
        on_ray = label_with_ray([str(source)], tmp_path / "ray.jsonl", options)
    finally:
        ray.shutdown()
    columns = ("prompt_id", "error", "flag", "n", "tier")
    rows = [tuple(row[c] for c in columns) for row in read_output(tmp_path / "local.jsonl")]
    assert [tuple(row[c] for c in columns) for row in read_output(tmp_path / "ray.jsonl")] == rows
    assert [row[:4] for row in rows] == [
        ("true", None, "false", "Infinity"),
        ("in.jsonl:2", f"line 2: longer than {limit} bytes, the longest JSONL line read", None, None),
        ("1.5", None, None, "NaN"), ("in.jsonl:4", None, "true", None)]
    assert (on_ray.rows, on_ray.errors, on_ray.kept_values, on_ray.id_values) == (
        local.rows, local.errors, local.kept_values, local.id_values) == (4, 1, {"flag": 2, "n": 2}, 2)


# ---------------------------------------------------------------- what the id column may be
def test_an_id_column_named_like_an_output_column_is_refused(tmp_path: Path, shipped_artifact: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", [{"tier": "id-1", "prompt": EASY}])
    for column in DECISION_COLUMNS:
        for output in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
            options = LabelOptions(model=str(shipped_artifact), id_column=column)
            with pytest.raises(LabelingError, match=f"--id-column '{column}' would overwrite"):
                label_files([str(source)], output, options, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_named_id_column_no_parquet_input_has_is_refused(tmp_path: Path, shipped_artifact: Path) -> None:
    """A mistyped --id-column would name every row FILE:N, not by the ids asked for: Parquet inputs say
    their columns up front, so the job is refused before anything is labeled, with the columns they have.
    The default id column is no one's typo: rows without it are named FILE:N, as they always were."""
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"request_id": "r1", "prompt": EASY}, {"request_id": "r2", "prompt": HARD}]),
                   source)
    older = tmp_path / "older.parquet"  # written before the logs had the column
    pq.write_table(pa.Table.from_pylist([{"prompt": EASY}]), older)
    out = tmp_path / "out.jsonl"
    mistyped = LabelOptions(model=str(shipped_artifact), id_column="requst_id")
    for inputs in ([source], [source, older]):
        with pytest.raises(LabelingError, match=r"^--id-column 'requst_id': no input has that column; the input's "
                                                r"columns are 'request_id', 'prompt' \(without --id-column"):
            label_files([str(path) for path in inputs], out, mistyped, workers=1, progress=False,
                        id_column_given=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "older.parquet"]
    stats = label_files([str(source)], out, LabelOptions(model=str(shipped_artifact)), workers=1, progress=False)
    assert [row["prompt_id"] for row in read_output(out)] == ["in.parquet:1", "in.parquet:2"]
    assert stats.id_values == 0
    # In one input of two: the other is no typo, and its rows are named FILE:N.
    named = LabelOptions(model=str(shipped_artifact), id_column="request_id")
    stats = label_files([str(source), str(older)], tmp_path / "both.jsonl", named, workers=1, progress=False,
                        id_column_given=True)
    assert [row["request_id"] for row in read_output(tmp_path / "both.jsonl")] == ["r1", "r2", "older.parquet:1"]
    assert stats.id_values == 2


def test_the_ray_engine_refuses_a_named_id_column_no_parquet_input_has(tmp_path: Path, shipped_artifact: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from classifier.labeling_ray import label_with_ray

    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"request_id": "r1", "prompt": EASY}]), source)
    with pytest.raises(LabelingError, match=r"^--id-column 'requst_id': no input has that column"):
        label_with_ray([str(source)], tmp_path / "out.jsonl",
                       LabelOptions(model=str(shipped_artifact), id_column="requst_id"), id_column_given=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
    # A column named like the one the engine counts its own ids in would be overwritten, then dropped.
    from classifier.labeling_ray import OWN_ID

    for options in (LabelOptions(model=str(shipped_artifact), keep_columns=(OWN_ID,)),
                    LabelOptions(model=str(shipped_artifact), id_column=OWN_ID)):
        with pytest.raises(LabelingError, match=f"the ray engine uses a column named '{OWN_ID}' of its own"):
            label_with_ray([str(source)], tmp_path / "out.jsonl", options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_a_column_kept_twice_is_refused_before_anything_is_labeled(tmp_path: Path, shipped_artifact: Path) -> None:
    """A Parquet output cannot hold two columns of one name: found only at the merge, the clash would
    fail the job once every row was labeled, and every resume of its parts the same way."""
    source = _jsonl(tmp_path / "in.jsonl", [{"prompt": EASY, "team": "a"}])
    options = LabelOptions(model=str(shipped_artifact), keep_columns=("team", "team"))
    for output in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        with pytest.raises(LabelingError, match="--keep names 'team' more than once"):
            label_files([str(source)], output, options, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]

# ---------------------------------------------------------------- files that are not JSON Lines
@pytest.mark.parametrize("text", ['[\n  {"prompt": "hi"},\n  {"prompt": "there"}\n]\n',
                                  '\ufeff \n[{"prompt": "hi"}]'])
def test_a_json_array_is_refused_before_anything_is_labeled(tmp_path: Path, shipped_artifact: Path,
                                                            text: str) -> None:
    first = _jsonl(tmp_path / "a.jsonl", [{"prompt": EASY}] * 10)
    array = tmp_path / "b.json"
    array.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match="is a JSON array; prompt files are JSON Lines"):
        list(read_payloads(array))  # what training reads its logs with, too
    misnamed = tmp_path / "c.jsonl"
    misnamed.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"jq -c '\.\[\]' c\.jsonl > c\.lines\.jsonl\)"):
        list(read_payloads(misnamed))  # the command it suggests never writes over what it reads
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(shipped_artifact), chunk_rows=2)
    with pytest.raises(LabelingError, match=r"b\.json: is a JSON array.*jq -c"):
        label_files([str(first), str(array)], out, options, workers=1, progress=False)
    assert not out.exists() and not out.with_name("out.jsonl.parts").exists()



def test_a_file_that_is_not_parquet_is_refused_before_anything_is_labeled(tmp_path: Path,
                                                                          shipped_artifact: Path) -> None:
    """Found at the start, not after the files before it were labeled: their parts would be kept for a
    resume that no longer matches once the file is replaced."""
    first = _jsonl(tmp_path / "a.jsonl", [{"prompt": EASY}] * 10)
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"PAR1 not really")
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(shipped_artifact), chunk_rows=2)
    with pytest.raises(LabelingError, match=r"b\.parquet: cannot read Parquet"):
        label_files([str(first), str(broken)], out, options, workers=1, progress=False)
    assert not out.exists() and not out.with_name("out.jsonl.parts").exists()


def test_the_ray_engine_refuses_a_file_that_is_not_parquet_in_one_line(tmp_path: Path, shipped_artifact: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found inside a Ray task, the reader's error would come back in Ray's wrapper: a traceback as the
    message."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from classifier.labeling_ray import label_with_ray

    first = _jsonl(tmp_path / "a.jsonl", [{"prompt": EASY}])
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(LabelingError) as info:
        label_with_ray([str(first), str(broken)], tmp_path / "out.jsonl", LabelOptions(model=str(shipped_artifact)))
    assert str(info.value).startswith(f"{broken}: cannot read Parquet") and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.parquet"]

def test_rotated_jsonl_logs_are_inputs(tmp_path: Path) -> None:
    for name in ("decisions.jsonl", "decisions.jsonl.1", "decisions.jsonl.2"):
        _jsonl(tmp_path / name, [{"prompt": EASY}])
    files = expand_inputs([str(tmp_path / "decisions.jsonl*")])
    assert [path.name for path in files] == ["decisions.jsonl", "decisions.jsonl.1", "decisions.jsonl.2"]
    assert [name for chunk in read_chunks(files, 2) for name, _ in chunk] == [
        "decisions.jsonl:1", "decisions.jsonl.1:1", "decisions.jsonl.2:1"]
    (tmp_path / "notes.txt.1").write_text("x")
    with pytest.raises(LabelingError, match=r"unsupported input type '\.1'"):
        expand_inputs([str(tmp_path / "notes.txt.1")])


def test_a_file_named_twice_is_labeled_once(tmp_path: Path, shipped_artifact: Path) -> None:
    """Overlapping globs, another spelling of a path and a link to a file all name one input."""
    _jsonl(tmp_path / "a.jsonl", [{"prompt": EASY}, {"prompt": HARD}])
    _jsonl(tmp_path / "b.jsonl", [{"prompt": EASY}])
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    inputs = [str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl"), str(tmp_path / "." / "b.jsonl"),
              str(tmp_path / "link.jsonl")]
    assert [path.name for path in expand_inputs(inputs)] == ["a.jsonl", "b.jsonl"]
    out = tmp_path / "out" / "labels.jsonl"
    out.parent.mkdir()
    label_files(inputs, out, LabelOptions(model=str(shipped_artifact)), workers=1, progress=False)
    assert [row["prompt_id"] for row in read_output(out)] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]



def test_a_parquet_row_whose_text_is_not_utf8_is_one_error_row(tmp_path: Path, shipped_artifact: Path) -> None:
    """Arrow does not check that a Parquet string column holds UTF-8, nor does every writer: the row that
    holds such bytes is an error row that keeps its id, as in JSONL or CSV, and the job goes on."""
    prompts = pa.array([EASY.encode(), b"caf\xe9 " + HARD.encode(), HARD.encode()], pa.binary()).view(pa.string())
    content = pa.array([b"hi", b"hi", b"\xff"], pa.binary()).view(pa.string())
    messages = pa.ListArray.from_arrays([0, 1, 2, 3], pa.StructArray.from_arrays(
        [pa.array(["user"] * 3), content], ["role", "content"]))
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "prompt": prompts, "messages": messages}), source)
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(shipped_artifact), chunk_rows=2)
    stats = label_files([str(source)], out, options, workers=1, progress=False)
    rows = read_output(out)
    assert [row["prompt_id"] for row in rows] == ["a", "b", "c"] and stats.rows == 3 and stats.errors == 2
    assert rows[0]["tier"] == "small" and rows[0]["error"] is None
    assert rows[1]["tier"] is None and rows[1]["error"] == "invalid UTF-8 in column 'prompt'"
    assert rows[2]["error"] == "invalid UTF-8 in column 'messages'"  # in a nested column too


def test_a_pipe_input_or_a_file_as_the_output_folder_is_refused_in_words(tmp_path: Path,
                                                                         shipped_artifact: Path) -> None:
    """`label <(zcat log.jsonl.gz)` names a pipe that exists, not a missing file; an output below a file
    is refused in words, not with the system's "File exists"."""
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(LabelingError, match=r"pipe\.jsonl: not a regular file \(a pipe or a device\)"):
        expand_inputs([str(pipe)])
    source = _jsonl(tmp_path / "in.jsonl", [{"prompt": EASY}])
    with pytest.raises(LabelingError, match=r"in\.jsonl is a file, not a folder"):
        label_files([str(source)], source / "out.jsonl", LabelOptions(model=str(shipped_artifact)), progress=False)

# ---------------------------------------------------------------- ids of rows without one
def test_ids_of_rows_without_one_are_unique_across_folders(tmp_path: Path, shipped_artifact: Path) -> None:
    for day in ("d1", "d2"):
        (tmp_path / "days" / day).mkdir(parents=True)
        _jsonl(tmp_path / "days" / day / "requests.jsonl", [{"prompt": EASY}, {"prompt": HARD}])
    _jsonl(tmp_path / "days" / "d1" / "other.jsonl", [{"prompt": EASY}])
    options = LabelOptions(model=str(shipped_artifact))
    files = expand_inputs([str(tmp_path / "days/*/requests.jsonl")])
    assert [name for chunk in read_chunks(files, 3) for name, _ in chunk] == [
        "d1/requests.jsonl:1", "d1/requests.jsonl:2", "d2/requests.jsonl:1", "d2/requests.jsonl:2"]
    label_files([str(tmp_path / "days/*/requests.jsonl")], tmp_path / "out.jsonl", options, workers=1,
                progress=False)
    assert [row["prompt_id"] for row in read_output(tmp_path / "out.jsonl")] == [
        "d1/requests.jsonl:1", "d1/requests.jsonl:2", "d2/requests.jsonl:1", "d2/requests.jsonl:2"]
    # One input, or inputs of one folder, keep the ids (and the job records, so the resumes) they had.
    for inputs, names in (([files[0]], ["requests.jsonl:1", "requests.jsonl:2"]),
                          (expand_inputs([str(tmp_path / "days/d1/*.jsonl")]),
                           ["other.jsonl:1", "requests.jsonl:1", "requests.jsonl:2"])):
        assert [name for chunk in read_chunks(inputs, 4) for name, _ in chunk] == names
        assert "input_names" not in labeling_output._job_record(inputs, options)
    assert "input_names" in labeling_output._job_record(files, options)


def test_resume_refuses_parts_whose_rows_were_named_otherwise(tmp_path: Path, shipped_artifact: Path) -> None:
    """An interrupted job whose parts named rows by their file names only is not continued with other ids."""
    for day in ("d1", "d2"):
        (tmp_path / day).mkdir()
        _jsonl(tmp_path / day / "requests.jsonl", [{"prompt": EASY}])
    inputs = [str(tmp_path / "*/requests.jsonl")]
    options = LabelOptions(model=str(shipped_artifact))
    out = tmp_path / "out.jsonl"
    job = labeling_output._job_record(expand_inputs(inputs), options)
    job.pop("input_names", None)  # the record of a job started by a version that named rows by file name only
    parts = labeling_output.parts_path(out)
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"fingerprint": labeling_output._fingerprint(job), "job": job}))
    (parts / "part-00000000.jsonl").write_text(json.dumps({"prompt_id": "requests.jsonl:1"}) + "\n")
    with pytest.raises(LabelingError, match="holds a different job \\(the ids of rows without one"):
        label_files(inputs, out, options, workers=1, resume=True, progress=False)
