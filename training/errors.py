"""Errors of the training pipeline."""

from __future__ import annotations

from classifier.errors import PromptierError


class DataError(PromptierError):
    """A log or pool file is invalid. The message names the file, the row or line, the column and why."""

    def __init__(self, path: str, reason: str, row: int | None = None, column: str | None = None) -> None:
        where = path
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")
        self.path, self.row, self.column, self.reason = path, row, column, reason
