"""The decision log: one JSON line per request, in the routing-log schema, rotated by size.

Lines are written and flushed one at a time by a RotatingFileHandler, so a crash loses at most the
request in flight. With scores added (e.g. by a judge), the file is valid input for `promptier train`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading

from serving.dispatch_config import DecisionLogConfig


class _SizeCountingRotatingHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that tracks the file size itself: the stock check stats the path and seeks
    on every record, which was a tenth of the dispatcher's per-request work."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._size = self.stream.tell() if self.stream else 0

    def shouldRollover(self, record: logging.LogRecord) -> int:
        line = len(self.format(record).encode("utf-8")) + len(self.terminator)
        if self.maxBytes > 0 and self._size + line > self.maxBytes and self._size > 0:
            self._size = line  # the record goes into the fresh file
            return 1
        self._size += line
        return 0


class DecisionLog:
    def __init__(self, config: DecisionLogConfig) -> None:
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = _SizeCountingRotatingHandler(
            config.path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()
        self.store_prompts = config.store_prompts

    def write(self, entry: dict) -> None:
        record = logging.makeLogRecord({"msg": json.dumps(entry, ensure_ascii=False), "levelno": logging.INFO})
        with self._lock:
            self._handler.emit(record)  # emit flushes the stream

    def close(self) -> None:
        self._handler.close()
