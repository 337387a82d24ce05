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


class DecisionLog:
    def __init__(self, config: DecisionLogConfig) -> None:
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
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
