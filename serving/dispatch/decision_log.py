"""The decision log: one JSON line per request, in the routing-log schema, rotated by size; and beside
it, one outcome file per tenant that reports scores (classifier.decision_files), rotated the same way.

Each line goes to the file in one `write` on an O_APPEND descriptor, with no user-space buffer, so a
crash loses at most the request in flight, and a line is never split between two writes. A write that
falls short (the disk filled part way) is cut back off the file and raised, so that no line runs on from
a partial one; a batch of outcomes is one write, kept whole or not at all. With scores added (e.g. by a
judge), the file is valid input for `promptier train`.

Rotation follows `logging.handlers.RotatingFileHandler`'s naming (`path.1` is the newest backup), with
no formatting layer: the stock handler cost 34 us per line, one `os.write` of the encoded line 14 us.

Several processes may share one log (`promptier dispatch --workers N`): the size comes from the open
file (so it counts every process's lines), and rotating takes an exclusive lock on `.<name>.lock`
beside it, so one process rotates and the others, finding the path renamed under them, reopen it. A
line another process writes while the rename happens lands in the newest backup: no line is lost or
split, and a file can exceed `max_bytes` by one line per process.

Each process checks before every line that the path still names the file it writes (one `stat`, which
also gives the size): a log moved away or deleted by an operator (logrotate without copytruncate) is
followed at once, so the next line goes to a new file at the path and none goes on into the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from classifier.decision_files import outcome_log_path
from serving.dispatch.dispatch_config import DecisionLogConfig

log = logging.getLogger("promptier.dispatcher")

# The schema of a decision-log line, kept here and nowhere else. Version 2 added `schema_version`,
# `decided_by` and `note`; lines without `schema_version` are version 1. Version 3 added what the
# request needed of its tier and whether that moved it (serving.dispatch.capabilities): `needs`,
# `estimated_tokens`, `steered`, and the reasons `no_text` and `capability`.
# Version 4 added the caller's `tenant` (always set: "default" when no tenants are configured or the
# caller's key is inbound_api_keys_env's), `scores` (the classifier's per-tier probabilities, when its
# model decided: what `promptier budget-sim` replays), `unpaced_tier` (the tier the policy chose when
# the tenant's budget moved the request elsewhere, else null) and `budget_pressure` (the tenant's
# pacing pressure in [0, 1], null without a budget); `reason` may also be `paced` or
# `budget_exhausted`, and `cost_usd` of an answer without usage, for a tenant with a budget, is
# counted from characters (`note` says so).
# Version 5 added outcome lines: `{"kind": "outcome", "prompt_id", "score", "judge", "time"}`, a score
# reported later (POST /v1/promptier/outcomes) for the request whose line has that `prompt_id` (sent to
# the caller as `x-promptier-request-id`); `promptier train` joins the two. Request lines have no `kind`.
# Version 6 added exploration (serving.dispatch.exploration): `propensity` (for a classified request while
# exploration is on, the probability that its tier was chosen; null otherwise) and `explored` (a random
# draw chose the tier); `reason` may also be `explored`.
# Version 7 added `failed_tiers`: the tiers whose upstream failed (5xx, timeout, unreachable), in order,
# before one answered (`tier`) or none did (status 502, `tier` null); a request that went on to a second
# tier has the reason `escalated` whether or not one answered.
# Version 8 added what reproduces a classified decision from its line: `model_version` (the classifier's
# model; null when it gave no tier), and, when its model decided, `threshold` and `cheap_floor` (the rule
# it applied to `scores`; `cheap_floor` null when none applied); outcome lines gained `tenant`, whose key
# reported the score (training joins it only to that tenant's requests); the `usage` of an answer charged
# by count (`note` says so) holds the counts it was charged by, and a budgeted answer given before the
# classifier's prices were known has `cost_usd` null and a `note` (it is charged once they are).
# Version 9 moved outcome lines out of the log into a file per reporting tenant beside it
# (`decisions.outcomes.<tenant>.jsonl`, classifier.decision_files), rotated like the log: a tenant that
# reports many outcomes rotates its own file only. Their lines are as before; readers take outcome lines
# from either place.
# Version 10 added `text_cut_chars`: with store_prompts, the characters cut from the middle of `prompt`
# and of `messages`' contents to keep a line within `decision_log.max_text_chars` (null: nothing cut).
# Version 11 added `cause`: why the classifier gave no tier, on a request that fell back (the
# x-promptier-cause header's value), kept when an escalation, a budget or a capability then moved the
# request, whose `reason` no longer says `fallback`. A conversation of more messages than
# `max_text_chars` / MIN_MESSAGE_CHARS keeps its first and last messages in `messages`, the first one
# after the gap saying how many were cut (their characters are in `text_cut_chars`).
DECISION_SCHEMA_VERSION = 11
OUTCOME_KIND = "outcome"
# Statuses of requests that ended without a whole answer after an upstream had them: the caller left
# (nginx's "client closed request"), or the upstream broke off a stream already relayed.
CLIENT_CLOSED = 499
BROKEN_STREAM = 599
# Fewest characters a message's content keeps when a long conversation shares `max_text_chars`.
MIN_MESSAGE_CHARS = 256


def cut_text(text: str, limit: int) -> tuple[str, int]:
    """`text` within `limit` characters: its head and its tail, a marker between them saying how much was
    cut; and that count (0: `text` was within `limit`). The head and tail are what a classifier reads of a
    text, so a cut prompt is classified as the whole one was."""
    if len(text) <= limit:
        return text, 0
    marker_room = 40  # "\n[... 1234567 characters cut ...]\n" and then some
    keep = max(limit - marker_room, 2)
    head, tail = keep // 2 + keep % 2, keep // 2
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[len(text) - tail:]}", cut


def cut_messages(messages: list[dict], limit: int) -> tuple[list[dict], int]:
    """A conversation's messages with their contents sharing `limit` characters (each at least
    MIN_MESSAGE_CHARS), each cut as `cut_text` cuts; and the characters cut in all.

    Where there are more messages than `limit` / MIN_MESSAGE_CHARS, the middle ones are left out (the first
    message kept after them says how many), so that the line stays within about `limit` characters
    however many messages one request sends: otherwise one caller's long conversations could rotate the
    other callers' lines out of the log and the savings page's window."""
    most = max(limit // MIN_MESSAGE_CHARS, 2)
    cut, gap, left_out = 0, len(messages), 0
    if len(messages) > most:
        gap = most // 2
        left_out = len(messages) - most
        cut = sum(len(message["content"]) for message in messages[gap:gap + left_out])
        messages = messages[:gap] + messages[gap + left_out:]
    share = max(MIN_MESSAGE_CHARS, limit // max(len(messages), 1))
    kept = []
    for index, message in enumerate(messages):
        content, removed = cut_text(message["content"], share)
        if index == gap and left_out:
            content = f"[... {left_out} messages cut ...]\n{content}"
        kept.append({**message, "content": content})
        cut += removed
    return kept, cut


@dataclass(frozen=True)
class DecisionRecord:
    """One request: the routing-log columns `promptier train` reads (prompt_id, prompt, model, score,
    cost_usd, source, category), then how it was routed and what it cost."""

    prompt_id: str
    prompt: str | None  # only with store_prompts: the text the classifier read
    messages: list[dict] | None  # a conversation of more than one message, as it came, for a judge
    model: str | None  # the upstream model that answered
    score: float | None  # filled in later by a judge or feedback
    cost_usd: float | None
    source: str
    category: str
    tier: str | None  # the tier that answered (status 499: the one at work when the caller left)
    routed_tier: str  # the tier routing chose (escalation may move `tier` up)
    # classified | pinned | fallback | escalated, or: no_text (no user text to classify: the no-text
    # tier), capability (the tier routing first chose cannot serve the request; see `steered`),
    # paced | budget_exhausted (the tenant's budget moved it; see `unpaced_tier`), explored (a random
    # draw chose the tier; see `propensity`)
    reason: str
    mode: str | None
    confidence: float | None
    decided_by: str | None  # model | prior, when the classifier decided
    classifier_ms: float | None
    latency_ms: float
    usage: dict | None
    status: int
    note: str | None  # why a successful answer was logged without usage or cost
    time: str
    # What the request needed of its tier: any of images, audio, tools, json_output (in that order).
    needs: list[str] = field(default_factory=list)
    # The dispatcher's estimate of the request's tokens, prompt plus completion limit, checked against
    # each tier's context_window (serving.dispatch.capabilities.request_needs says how it is counted).
    estimated_tokens: int | None = None
    # When a capability moved the request: {"from_tier", "from_reason" (classified, fallback or
    # no_text), "by": [capabilities that tier lacked, context_window included]}; else null.
    steered: dict | None = None
    tenant: str = "default"
    scores: dict[str, float] | None = None  # per-tier probabilities, when the classifier's model decided
    unpaced_tier: str | None = None  # the policy's tier, when the budget moved the request off it
    budget_pressure: float | None = None  # the tenant's pacing pressure, when it has a budget
    propensity: float | None = None  # P(this tier | the policy's choice), classified and exploring only
    explored: bool = False  # exploration's random draw chose the tier
    failed_tiers: list[str] = field(default_factory=list)  # upstreams that failed, in the order tried
    model_version: str | None = None  # the classifier's model, when it gave the tier
    threshold: float | None = None  # the threshold its rule applied to `scores`, when its model decided
    cheap_floor: float | None = None  # the cheap floor applied with it, when there was one
    text_cut_chars: int | None = None  # characters cut from `prompt` and `messages` (max_text_chars), if any
    # Why the classifier gave no tier (timeout, overloaded, invalid_input, error, unknown_tier or a gRPC
    # status name), when the request fell back, whatever moved it afterwards; else null.
    cause: str | None = None

    def as_dict(self) -> dict:
        # Shallow: the line is serialized at once, so its nested dicts (usage, scores, messages) need no
        # copies; dataclasses.asdict deep-copied them, a third of record()'s time in the dispatcher.
        return {"schema_version": DECISION_SCHEMA_VERSION, **self.__dict__}


@dataclass(frozen=True)
class OutcomeRecord:
    """A score for an earlier request: how well its answer served, in [0, 1], from a judge or a user."""

    prompt_id: str  # the request's `prompt_id` (its x-promptier-request-id)
    score: float
    judge: str | None  # who scored it (free text, bounded), e.g. "thumbs" or a judge model's name
    time: str
    tenant: str = "default"  # whose API key reported it

    def as_dict(self) -> dict:
        return {"schema_version": DECISION_SCHEMA_VERSION, "kind": OUTCOME_KIND, **self.__dict__}


class DecisionLog:
    """The request lines, in the log, and the outcome lines, in each reporting tenant's file beside it."""

    def __init__(self, config: DecisionLogConfig) -> None:
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self.path = config.path
        self.store_prompts = config.store_prompts
        self._config = config
        self._requests = RotatingLog(config.path, config.max_bytes, config.backups)
        self._outcomes: dict[str, RotatingLog] = {}  # per tenant: its names come from the config, so few
        self._lock = threading.Lock()

    def write(self, entry: dict) -> None:
        """Append one request line (durable against a process crash once this returns)."""
        self._requests.write(entry)

    def write_outcomes(self, tenant: str, entries: Sequence[dict]) -> None:
        """Append outcome lines to the file of the tenant that reported them: all of them, or none.

        Raises:
            OSError: they could not be written (a full disk, say); none of them is left.
        """
        log = self._outcomes.get(tenant)
        if log is None:
            with self._lock:
                log = self._outcomes.get(tenant)
                if log is None:
                    log = self._outcomes[tenant] = RotatingLog(outcome_log_path(self.path, tenant),
                                                               self._config.max_bytes, self._config.backups)
        log.write_lines(entries)

    def close(self) -> None:
        self._requests.close()
        with self._lock:
            for log in self._outcomes.values():
                log.close()


def _json_line(entry: dict) -> bytes:
    try:
        return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep it as an escape
        return (json.dumps(entry) + "\n").encode("ascii")


class RotatingLog:
    """One JSON-lines file rotated by size, shared by processes (the module docstring says how).

    Before each line it checks (one `stat`, which also gives the size rotation needs) that the path still
    names the file its descriptor writes, as `logging.handlers.WatchedFileHandler` does: when an operator
    has moved the file away (logrotate without copytruncate) or deleted it, or another process has rotated
    it, the line goes to the file now at the path, created if need be, not on into the old one.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()  # the embedded model's thread never writes, but callers may be threads
        self._fd, self._identity = self._open()
        self._reopen_failed = False  # logged once per failure spell, not once per line
        # Hidden, so that a glob of the log and its backups (`decisions.jsonl*`) does not pick it up.
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    def _open(self) -> tuple[int, tuple[int, int]]:
        """A descriptor on the file at `path` (created if missing), and that file's (st_dev, st_ino)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        opened = os.fstat(fd)
        return fd, (opened.st_dev, opened.st_ino)

    def write(self, entry: dict) -> None:
        """Append one entry as a JSON line (durable against a process crash once this returns).

        Raises:
            OSError: the line could not be written whole (a full disk, say); none of it is left.
        """
        self.write_lines([entry])

    def write_lines(self, entries: Sequence[dict]) -> None:
        """Append entries as JSON lines in one write: all of them, or (on an error) none.

        Raises:
            OSError: they could not be written whole (a full disk, say); none of them is left.
        """
        data = b"".join(_json_line(entry) for entry in entries)
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self.path} is closed")
            size = self._size_following_path()  # other processes' lines included
            if self.max_bytes > 0 and size > 0 and size + len(data) > self.max_bytes:
                self._rotate_or_follow(len(data))
            self._append(data)

    def _append(self, data: bytes) -> None:
        """One write of `data`. A short one (the disk filled part way) is cut back off the file, so that
        the next line does not run on from a partial one, which no reader could then parse."""
        written = os.write(self._fd, data)
        if written == len(data):
            return
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # an O_APPEND write leaves the offset at its own end
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == end:  # nothing of another process's follows our bytes
                os.ftruncate(self._fd, end - written)
        raise OSError(errno.ENOSPC, f"wrote only {written} of {len(data)} bytes to {self.path} (is the disk full?)")

    def _size_following_path(self) -> int:
        """The size of the file at `path`, after reopening it if it is not the file our descriptor writes."""
        try:
            at_path = os.stat(self.path)
        except OSError:  # gone, or its directory is (or cannot be searched): try to open it again
            at_path = None
        if at_path is not None and (at_path.st_dev, at_path.st_ino) == self._identity:
            return at_path.st_size
        self._reopen()
        return os.fstat(self._fd).st_size

    def _reopen(self) -> None:
        """Point our descriptor at the file now at `path`; when that fails (its directory is gone, say),
        keep writing where we were, which loses no line that a later reopen could have saved."""
        try:
            fd, identity = self._open()
        except OSError as error:
            if not self._reopen_failed:
                log.warning(json.dumps({"event": "log_reopen_failed", "path": str(self.path), "detail": str(error)}))
            self._reopen_failed = True
            return
        os.close(self._fd)
        self._fd, self._identity, self._reopen_failed = fd, identity, False

    def _rotate_or_follow(self, incoming: int) -> None:
        """Rotate, unless another process already did: then reopen the new file and check it again."""
        lock = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._still_current():
                self._rotate()
                return
            os.close(self._fd)
            self._fd, self._identity = self._open()
            size = os.fstat(self._fd).st_size
            if size > 0 and size + incoming > self.max_bytes:
                self._rotate()
        finally:
            os.close(lock)  # closing releases the lock

    def _still_current(self) -> bool:
        """Whether our descriptor is still the file at `path` (not renamed to a backup by another process)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (at_path.st_dev, at_path.st_ino) == self._identity

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            Path(self.path).unlink(missing_ok=True)
        self._fd, self._identity = self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
