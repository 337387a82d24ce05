"""What a labeling job is told and what it reports, shared by both engines.

`LabelOptions` is everything that decides a job's output (it is recorded with the job, so a resume
must match it); `LabelStats` counts what a job did; `LabelingError` is why a job cannot run. The file
types and the decision columns are here because the job's checks, the parser and the writer all
need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from classifier.errors import PromptierError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
DECISION_COLUMNS = ("tier", "scores", "threshold", "cheap_floor", "truncated", "tokens", "decided_by", "familiarity",
                    "error", "model_version", "policy")


class LabelingError(PromptierError):
    """The job cannot run: bad paths, options, or a resume that does not match the original job."""


@dataclass(frozen=True)
class LabelOptions:
    """Everything that decides a job's output (recorded with the job, so a resume must match it)."""

    prompt_column: str = "prompt"
    id_column: str = "prompt_id"
    messages_column: str = "messages"
    keep_columns: tuple[str, ...] = ()
    mode: str | None = None
    threshold: float | None = None
    chunk_rows: int = 4096
    model: str | None = None


@dataclass
class LabelStats:
    """What a job did: rows labeled now, how many of them failed, rows resumed from an earlier run.

    `complete` is set when OUTPUT was already the finished output of this job and nothing ran.
    """

    rows: int = 0
    errors: int = 0
    resumed_rows: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    kept_values: dict[str, int] = field(default_factory=dict)  # per kept column, the rows that had a value
    id_values: int = 0  # the rows that had a value in the id column (the others are named `NAME:N`)
    complete: bool = False

    @classmethod
    def of_rows(cls, rows: list[dict], keep_columns: tuple[str, ...] = ()) -> LabelStats:
        """The counts of labeled output rows (a row with an `error` counts as failed, else by its tier),
        and of the rows with a value in each of `keep_columns`."""
        stats = cls(kept_values=dict.fromkeys(keep_columns, 0))
        for row in rows:
            stats.rows += 1
            if row["error"] is not None:
                stats.errors += 1
            else:
                stats.tiers[row["tier"]] = stats.tiers.get(row["tier"], 0) + 1
            for column in keep_columns:
                stats.kept_values[column] += row.get(column) is not None
        return stats

    def add(self, other: LabelStats) -> None:
        """Fold another part's counts into these."""
        self.rows += other.rows
        self.errors += other.errors
        for tier, count in other.tiers.items():
            self.tiers[tier] = self.tiers.get(tier, 0) + count
        for column, count in other.kept_values.items():
            self.kept_values[column] = self.kept_values.get(column, 0) + count
        self.id_values += other.id_values
