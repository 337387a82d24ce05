"""Structured (one JSON object per line) logs. Prompt text is never logged by the server."""

from __future__ import annotations

import json
import logging
import time


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


def configure_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(existing, UndeliveredAnswerFilter) for existing in core.filters):
        core.addFilter(UndeliveredAnswerFilter())
