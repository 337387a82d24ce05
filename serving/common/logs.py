"""Structured (one JSON object per line) logs. Prompt text is never logged by the server."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        try:
            parsed = json.loads(message)
            entry.update(parsed if isinstance(parsed, dict) else {"message": message})
        except json.JSONDecodeError:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class UndeliveredAnswerFilter(logging.Filter):
    """gRPC's asyncio server logs an ERROR with a traceback (`ExecuteBatchError raised in core`) when it
    cannot send an answer because the call has already ended: the caller cancelled, or its deadline
    passed while the answer was on its way. That is a caller leaving, not a server fault, and on a busy
    machine it happens every few seconds under short deadlines; a traceback per occurrence would bury
    real errors. Such records become one WARNING line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("ExecuteBatchError raised in core"):
            method = record.getMessage().rpartition("[")[2].rstrip("]")
            record.msg = json.dumps({"event": "answer_not_delivered", "method": method,
                                     "why": "the call had ended (caller cancelled or deadline passed)"})
            record.args = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


# The logger gRPC's Cython layer writes to.
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record is logged, as logging's own last-resort handler does.

    A plain StreamHandler keeps the stream of the moment it was made; when a server is embedded in a
    process that swaps `sys.stderr` (a test runner capturing output, a host redirecting it), a later
    record from a background thread would go to a closed stream and be lost with a "Logging error".
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        """The current `sys.stderr`."""
        return sys.stderr

    @stream.setter
    def stream(self, _stream: TextIO) -> None:
        raise AttributeError("CurrentStderrHandler always writes to the current sys.stderr; "
                             "use a logging.StreamHandler for another stream")


def configure_json_logging(level: int = logging.INFO) -> None:
    """Log one JSON object per line to standard error, at `level` and above."""
    handler = CurrentStderrHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(existing, UndeliveredAnswerFilter) for existing in core.filters):
        core.addFilter(UndeliveredAnswerFilter())
