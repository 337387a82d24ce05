"""Reading routing logs: outcome rows (one call, one score) or tier-labeled rows (prompt, tier).

Every row is validated. An invalid row raises a DataError naming file, row, column and reason,
unless `skip_invalid` is set; then it is counted in a SkipReport, by reason, and nothing is
dropped silently. Files are read by the labeler's reader, classifier/prompt_files.py: a log and a
file of prompts to label are read alike.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from classifier.decision_files import outcome_logs_beside
from classifier.prompt_files import (
    BadRow,
    PromptFileError,
    decode_json_line,
    each_once,
    expand_pattern,
    file_format,
    is_rotated_jsonl,
    read_payloads,
    surrogate_at,
)
from training.errors import DataError

log = logging.getLogger(__name__)

OUTCOME_COLUMNS = ("prompt_id", "prompt", "model", "score", "source")
LABEL_COLUMNS = ("prompt", "tier")
LOG_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 8192


@dataclass(frozen=True)
class OutcomeRow:
    """One call: `model` answered `prompt` and got `score`."""

    prompt_id: str
    prompt: str
    model: str
    score: float
    source: str
    category: str
    cost_usd: float | None


@dataclass(frozen=True)
class TierLabelRow:
    """A prompt already labeled with the cheapest tier that answers it well."""

    prompt_id: str
    prompt: str
    tier: str
    source: str
    category: str


# A dispatcher's decision log holds request lines (score null until one is reported); outcome lines
# `{"kind": "outcome", "prompt_id", "score"}` (written by serving.dispatch.decision_log, reported through the
# dispatcher's POST /v1/promptier/outcomes) are in files beside it (classifier.decision_files), or in the log
# itself in logs written before schema version 9. Reading joins them: a request line takes the mean score
# reported for its prompt_id; one with none yet, or without stored prompt text, is left out and counted.
OUTCOME_KIND = "outcome"
# Where in a line its UTF-8 breaks ("invalid UTF-8 at byte 34"): left out of the reason, which rows are
# counted by; the row number says where.
_BYTE_OFFSET = re.compile(r" at byte \d+$")


@dataclass
class SkipReport:
    """Rows skipped under --skip-invalid, counted by reason, with the first few locations; and the
    decision-log lines left out because they cannot train yet (no outcome reported, no prompt stored)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    not_trainable: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        # By column and fault: a misnamed column is one count under its name, a judge on the wrong scale
        # one count, not one per value.
        self.counts[error.fault] += 1
        if len(self.examples) < 20:
            self.examples.append(str(error))

    def summary(self) -> str:
        parts = []
        if self.total:
            parts.append(f"skipped {self.total} invalid rows: {counted_reasons(self.counts)}")
        if self.not_trainable:
            parts.append("decision-log lines left out: " + counted_reasons(self.not_trainable))
        return "; ".join(parts) or "no rows skipped"


def counted_reasons(counts: Mapping[str, int], limit: int | None = None) -> str:
    """`3 x reason; 1 x other`, commonest first; with `limit`, that many and how many more there are."""
    ranked = Counter(counts).most_common()
    shown = "; ".join(f"{count} x {reason}" for reason, count in ranked[:limit])
    if limit is not None and len(ranked) > limit:
        shown += f"; and {len(ranked) - limit} more reasons"
    return shown


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly or by a glob pattern, plus the log files inside named directories (sorted)."""
    files: list[Path] = []
    for raw in paths:
        matches = expand_pattern(str(raw))
        if matches != [str(raw)]:  # a glob: its log files (a `**` pattern also matches directories)
            found = [path for path in map(Path, matches) if path.is_file() and _is_log_file(path)]
            if not found:
                raise DataError(str(raw), "no log file matches this pattern")
            files.extend(found)
            continue
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if _is_log_file(p)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(str(path), "no such file or directory")
    files = each_once(files)
    if not files:
        raise DataError(", ".join(map(str, paths)), "no log files found (expected .jsonl or .parquet)")
    return files


def _is_log_file(path: Path) -> bool:
    return path.suffix in LOG_SUFFIXES or is_rotated_jsonl(path)


def read_records(path: Path) -> Iterator[tuple[int, object]]:
    """(row number, raw record) pairs of one log file, read by the runtime's prompt-file reader (the
    labeler's); a line or row that is not a record comes as the DataError that says why.

    Raises:
        DataError: the file is not JSONL or Parquet, or cannot be read at all.
    """
    if file_format(path) not in ("jsonl", "parquet"):
        raise DataError(str(path), f"unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    try:
        for number, payload in read_payloads(path, PARQUET_BATCH_ROWS):
            if isinstance(payload, BadRow):  # a Parquet row whose text is not UTF-8, a JSONL line too long to read
                yield number, DataError(str(path), payload.error, row=number)
                continue
            if not isinstance(payload, bytes):
                yield number, payload
                continue
            record, problem = decode_json_line(payload)
            if problem is None:
                yield number, record
            else:  # counted by reason under --skip-invalid: the reason leaves out where in the line
                reason = f"invalid JSON: {problem.reason}" if problem.syntax else problem.reason
                reason = _BYTE_OFFSET.sub("", reason)
                yield number, DataError(str(path), reason, row=number)
    except PromptFileError as exc:
        raise DataError(str(path), exc.reason) from exc


def _text(record: dict, column: str, path: str, row: int, required: bool = True) -> str:
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(path, "missing value", row, column)
        return ""
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", row, column)
    if required and not value.strip():
        raise DataError(path, "empty string", row, column)
    check_unicode(value, path, row, column)
    return value


def check_unicode(value: str, path: str, row: int, column: str) -> None:
    """Refuse a string holding a lone UTF-16 surrogate: JSON can escape one (`\\ud83d`, what a JavaScript
    client writes when it cuts a string inside an emoji), and the tokenizer fails on it.

    Raises:
        DataError: names the file, row and column.
    """
    if surrogate_at(value) is not None:  # the reason holds no position: --skip-invalid counts such rows together
        raise DataError(path, "not valid Unicode: holds an unpaired surrogate", row, column)


def _number(record: dict, column: str, path: str, row: int, required: bool) -> float | None:
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(path, "missing value", row, column)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(path, f"expected a number, got {type(value).__name__}", row, column)
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits, which JSON allows
        raise DataError(path, "too large a number", row, column) from None
    if not math.isfinite(number):
        raise DataError(path, "not a finite number", row, column, value=value)
    return number


def parse_row(record: object, path: str, row: int, tiers: Sequence[str] | None = None
              ) -> OutcomeRow | TierLabelRow:
    """Validate one raw record; with `tiers` (the pool's), a tier-labeled row must name one of them.

    Raises:
        DataError: naming the column and reason.
    """
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(path, f"expected an object, got {type(record).__name__}", row)
    prompt = _text(record, "prompt", path, row)
    source = _text(record, "source", path, row, required=False) or "default"
    category = _text(record, "category", path, row, required=False)
    # A tier-labeled row names a tier and no model. "No model" includes a null one: Parquet gives every
    # row every column, so in a file of both shapes a label row's `model` is null, not absent.
    if record.get("tier") is not None and record.get("model") is None:
        tier = _text(record, "tier", path, row)
        if tiers is not None and tier not in tiers:
            raise DataError(path, f"an unknown tier (pool tiers: {list(tiers)})", row, "tier", value=repr(tier))
        prompt_id = _text(record, "prompt_id", path, row, required=False)
        return TierLabelRow(prompt_id, prompt, tier, source, category)
    prompt_id = _text(record, "prompt_id", path, row)
    model = _text(record, "model", path, row)
    score = _number(record, "score", path, row, required=True)
    assert score is not None
    if not 0.0 <= score <= 1.0:
        raise DataError(path, "outside [0, 1]", row, "score", value=score)
    cost = _number(record, "cost_usd", path, row, required=False)
    if cost is not None and cost < 0:
        raise DataError(path, "negative", row, "cost_usd", value=cost)
    return OutcomeRow(prompt_id, prompt, model, score, source, category, cost)


def read_logs(paths: Sequence[str | Path], skip_invalid: bool = False, explored_only: bool = False,
              tiers: Sequence[str] | None = None) -> tuple[list[OutcomeRow | TierLabelRow], SkipReport]:
    """Read and validate every row of every log file (`explored_only`, `tiers`: see `iter_rows`).

    Raises:
        DataError: the first invalid row, unless `skip_invalid`; a file that cannot be read at all
            always raises.
    """
    report = SkipReport()
    rows = list(iter_rows(paths, report, skip_invalid, explored_only, tiers))
    if not rows:
        raise DataError(", ".join(map(str, paths)), f"no valid rows ({report.summary()})")
    return rows, report


# An outcome's key: the request's prompt_id and the tenant whose key reported it (None: a line written
# before outcome lines named it, which joins any tenant's request).
OutcomeKey = tuple[str, str | None]


def reported_outcomes(files: Sequence[Path]) -> dict[OutcomeKey, float]:
    """The mean reported score per (prompt_id, reporting tenant), from the outcome lines of decision logs (a
    first pass that reads only files that start like a decision log, and parses only lines naming the
    outcome kind)."""
    # Lines are parsed only when they may be outcomes; the kind is checked once parsed, so that a log
    # rewritten compactly (`"kind":"outcome"`, by a log shipper or jq -c) keeps its outcomes.
    marker = f'"{OUTCOME_KIND}"'.encode()
    sums: dict[OutcomeKey, list[float]] = {}
    for path in files:
        if path.suffix == ".parquet":
            continue
        with path.open("rb") as handle:
            # Every decision-log line carries schema_version: a file whose first line does not is not one.
            if b'"schema_version"' not in handle.readline():
                continue
            handle.seek(0)
            for raw_line in handle:
                if marker not in raw_line:
                    continue
                try:
                    record = json.loads(raw_line)
                except ValueError:
                    continue  # reported as invalid by the main pass
                if not isinstance(record, dict) or record.get("kind") != OUTCOME_KIND:
                    continue
                score = record.get("score")
                prompt_id = record.get("prompt_id")
                tenant = record.get("tenant")
                if (isinstance(prompt_id, str) and isinstance(score, int | float) and not isinstance(score, bool)
                        and 0.0 <= score <= 1.0 and (tenant is None or isinstance(tenant, str))):
                    total = sums.setdefault((prompt_id, tenant), [0.0, 0.0])
                    total[0] += score
                    total[1] += 1
    return {key: total / count for key, (total, count) in sums.items()}


def _join_outcome(record: object, outcomes: dict[OutcomeKey, float], report: SkipReport,
                  explored_only: bool = False, scored_prompts: frozenset[str] = frozenset()) -> object | None:
    """A decision-log record made trainable with its reported outcome; None when it is not a row to
    train on (an outcome line itself, a request line without a score or a prompt, or, with
    `explored_only`, one whose tier the policy chose rather than exploration's random draw)."""
    if not isinstance(record, dict):
        return record
    if record.get("kind") == OUTCOME_KIND:
        return None
    if explored_only and "routed_tier" in record and record.get("explored") is not True:
        report.not_trainable["tier chosen by the policy, not explored (outcome_rows: explored)"] += 1
        return None
    if explored_only and "routed_tier" in record and record.get("tier") != record.get("routed_tier"):
        # The drawn tier's upstream failed and another answered: that tier was not drawn at random.
        report.not_trainable["explored, but the drawn tier's upstream failed"] += 1
        return None
    status = record.get("status")
    if "routed_tier" in record and "status" in record and not (isinstance(status, int) and 200 <= status < 300):
        # No answer to score: an upstream's 4xx or rate limit, a caller gone (499) or a broken stream (599).
        # A gateway that scores failed calls 0 would otherwise teach that the tier cannot answer the prompt.
        report.not_trainable["not an answer (the call ended with a status other than 2xx)"] += 1
        return None
    if record.get("score") is not None or "routed_tier" not in record:
        return record  # scored already, or not a decision-log line (parse_row says if it is invalid)
    prompt_id = str(record.get("prompt_id"))
    score = outcomes.get((prompt_id, str(record.get("tenant", "default"))), outcomes.get((prompt_id, None)))
    if score is None:
        # Scored only with another tenant's key: that tenant cannot judge (or poison) this one's answers.
        reason = "outcome reported with another tenant's key" if prompt_id in scored_prompts else \
            "no outcome reported yet"
        report.not_trainable[reason] += 1
        return None
    if not record.get("prompt") or not record.get("model"):
        report.not_trainable["no prompt stored (decision_log.store_prompts is off) or no answer"] += 1
        return None
    return {**record, "score": score}


def iter_rows(paths: Sequence[str | Path], report: SkipReport, skip_invalid: bool = False,
              explored_only: bool = False, tiers: Sequence[str] | None = None) -> Iterator[OutcomeRow | TierLabelRow]:
    """Every valid row of every log file, one at a time (JSONL line by line, Parquet a batch at a time).
    Decision logs are joined with the outcomes reported for their requests (see OUTCOME_KIND); with
    `explored_only`, only their requests whose tier exploration drew (serving.dispatch.exploration) are kept.
    With `tiers` (the pool's), a tier-labeled row naming another tier is invalid like any other bad value.

    Raises:
        DataError: the first invalid row, unless `skip_invalid` (then it is counted in `report`).
    """
    files = expand_paths(paths)
    # A decision log's outcomes are in files beside it, read with it however the log was named.
    beside = [outcome for path in files for outcome in outcome_logs_beside(path)]
    outcomes = reported_outcomes(each_once([*files, *beside]))
    scored_prompts = frozenset(prompt_id for prompt_id, _ in outcomes)
    requested: set[str] = set()  # the prompt_ids of the request lines read, which outcomes join
    for path in files:
        read, faults = 0, Counter[str]()
        for number, raw in read_records(path):
            read += 1
            if outcomes and isinstance(raw, dict) and "routed_tier" in raw:
                requested.add(str(raw.get("prompt_id")))
            record = _join_outcome(raw, outcomes, report, explored_only, scored_prompts)
            if record is None:
                continue
            try:
                yield parse_row(record, str(path), number, tiers)
            except DataError as error:
                if not skip_invalid:
                    raise
                report.add(error)
                faults[error.fault] += 1
        if faults and faults.total() == read:
            # Skipped row by row, a whole file of another format (a misnamed column, a judge on another
            # scale) would leave training as quietly as one bad row. Lines a decision log holds that cannot
            # train yet (outcomes, requests without one) are no fault of its format.
            log.warning("%s: all %d of its rows are invalid (%s), so none of it trains: are its columns those of "
                        "the log format (prompt, model, score, ...)?", path, read, counted_reasons(faults, 3))
    orphans = len(scored_prompts - requested)
    if orphans:  # its request is in a file not given (a rotated backup, another worker's log), or never was
        report.not_trainable["outcome reported for a request not in these logs"] += orphans
