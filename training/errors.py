"""Errors of the training pipeline."""

from __future__ import annotations

from classifier.errors import PromptierError


class DataError(PromptierError):
    """A log or pool file is invalid. The message names the file, the row or line, the column and why."""

    def __init__(self, path: str, reason: str, row: int | None = None, column: str | None = None,
                 value: object = None) -> None:
        """`value`: the bad value, shown before `reason` ("2.0 is outside [0, 1]") and kept out of it, so
        that `reason` is the same for every row with the same fault (`--skip-invalid` counts by it)."""
        where = path
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}" if value is None else f"{where}: {value} is {reason}")
        self.path, self.row, self.column, self.reason = path, row, column, reason

    @property
    def fault(self) -> str:
        """What is wrong, with the column but not the row or the value: what rows are counted by."""
        return self.reason if self.column is None else f"column {self.column!r}: {self.reason}"
