"""The services' JSON log lines: a caller that left before its answer was sent is one warning line, while
any other error keeps its traceback."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator

import pytest

from serving.common.logs import GRPC_CORE_LOGGER, configure_json_logging


@pytest.fixture
def json_logging(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[dict]]]:
    """The services' logging set up; returns a reader of the JSON lines written to stderr since the last read."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    core = logging.getLogger(GRPC_CORE_LOGGER)
    saved_filters = core.filters[:]
    configure_json_logging()
    capsys.readouterr()
    yield lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    root.handlers[:], core.filters[:] = saved_handlers, saved_filters
    root.setLevel(saved_level)


def _raise_and_log(logger: logging.Logger, message: str) -> None:
    try:
        raise RuntimeError('Failed "execute_batch": (SendInitialMetadataOperation, SendMessageOperation)')
    except RuntimeError:
        logger.exception(message)  # how gRPC's Cython layer reports it


def test_an_answer_the_caller_left_before_is_one_warning_line(json_logging: Callable[[], list[dict]]) -> None:
    _raise_and_log(logging.getLogger(GRPC_CORE_LOGGER),
                   "ExecuteBatchError raised in core by servicer method [/promptier.v1.Router/Classify]")
    [line] = json_logging()
    assert line["level"] == "WARNING" and line["event"] == "answer_not_delivered"
    assert line["method"] == "/promptier.v1.Router/Classify"
    assert "exception" not in line and "Traceback" not in json.dumps(line)

    configure_json_logging()  # configuring twice adds no second filter
    assert sum(type(f).__name__ == "UndeliveredAnswerFilter" for f in logging.getLogger(GRPC_CORE_LOGGER).filters) == 1


def test_other_grpc_core_errors_keep_their_traceback(json_logging: Callable[[], list[dict]]) -> None:
    _raise_and_log(logging.getLogger(GRPC_CORE_LOGGER), "Unexpected [RuntimeError] raised by servicer method [/x]")
    [line] = json_logging()
    assert line["level"] == "ERROR" and "Traceback (most recent call last)" in line["exception"]


def test_records_go_to_stderr_as_it_is_now_not_as_it_was_when_logging_was_set_up(
        json_logging: Callable[[], list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    logging.getLogger("promptier.test").warning(json.dumps({"event": "first"}))
    assert [line["event"] for line in json_logging()] == ["first"]
    later = io.StringIO()  # a host (or a test runner) swaps stderr after logging was set up
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("promptier.test").warning(json.dumps({"event": "second"}))
    assert [json.loads(line)["event"] for line in later.getvalue().splitlines()] == ["second"]


def test_setting_another_stream_is_refused_not_ignored() -> None:
    from serving.common.logs import CurrentStderrHandler

    with pytest.raises(AttributeError, match=r"current sys\.stderr"):
        CurrentStderrHandler().setStream(io.StringIO())
