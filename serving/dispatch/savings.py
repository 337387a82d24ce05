"""What the dispatcher's routing saved, from its decision log: the numbers behind the savings page.

`read_window` reads the newest `max_bytes` of the log (the current file, then its backups, newest
first; a bounded amount of work whatever the log's size), and `summarize` adds its rows up per tenant
(the rows' `tenant` field; rows without one are the group "default"), and over all of them:

- spend: the sum of the rows' `cost_usd` (the tier that answered, at its price);
- always-top-tier cost: the same rows' token usage at the price of the most capable tier the row's
  tenant may use (the last tier, unless the tenant's `allowed_tiers` stop below it: without the
  router, that tenant would call its own top tier, not one it may not use); only rows with a cost are
  counted on either side, so the two compare the same requests;
- requests by the tier that answered, in all and per time bucket (at most MAX_BUCKETS buckets over
  the window); reasons (classified, pinned, fallback, escalated, capability, no_text); fallbacks
  (reason fallback, or a fallback that a capability, an escalation or a budget then moved); escalations;
  errors (status >= 400);
- classifier latency: nearest-rank percentiles of `classifier_ms` (rows where the classifier was asked).
"""

from __future__ import annotations

import calendar
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.dispatch.decision_log import OUTCOME_KIND
from serving.dispatch.tenant_config import ALL_TENANTS

DEFAULT_GROUP = "default"
MAX_GROUPS = 50  # tenants shown one by one; the rest are added up as OTHER_GROUP
OTHER_GROUP = "(other tenants)"
MAX_BUCKETS = 48
BUCKET_SIZES_S = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
PERCENTILES = (50, 90, 99)


@dataclass
class LogWindow:
    """The rows read from the newest part of a decision log, oldest first."""

    rows: list[dict]
    files: list[str]  # the files read, newest first
    bytes_read: int
    truncated: bool  # older lines exist that the window leaves out
    unreadable_lines: int


def log_files(path: Path, backups: int) -> list[Path]:
    """The log and its backups, newest first (`path.1` is the newest backup)."""
    return [path, *(path.with_name(f"{path.name}.{index}") for index in range(1, backups + 1))]


def read_window(path: Path, backups: int, max_bytes: int) -> LogWindow:
    """The complete lines among the newest `max_bytes` of the log and its backups.

    A file rotated while it is read is recognised by its inode and read once; the line a process may
    be appending at that moment (no newline yet) is left for the next read.
    """
    chunks: list[bytes] = []
    files: list[str] = []
    seen: set[int] = set()
    budget, truncated = max_bytes, False
    for name in log_files(path, backups):
        try:
            handle = open(name, "rb")  # noqa: SIM115 (closed below; a missing backup is skipped)
        except FileNotFoundError:
            continue
        with handle:
            status = os.fstat(handle.fileno())
            if status.st_ino in seen or status.st_size == 0:
                continue
            if budget <= 0:
                truncated = True
                break
            seen.add(status.st_ino)
            start = max(0, status.st_size - budget)
            # From the byte before the window, to tell whether its first line starts with it.
            handle.seek(max(0, start - 1))
            data = handle.read(status.st_size - max(0, start - 1))
        budget -= status.st_size - start
        data = data[:data.rfind(b"\n") + 1]
        if start > 0:  # the window starts inside this file: drop the line it cuts, if it cuts one
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
            truncated = True
        chunks.append(data)
        files.append(str(name))
    rows: list[dict] = []
    unreadable = 0
    for data in reversed(chunks):
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                unreadable += 1
                continue
            if isinstance(row, dict):
                if row.get("kind") != OUTCOME_KIND:  # a score reported later, not a request
                    rows.append(row)
            else:
                unreadable += 1
    return LogWindow(rows, files, max_bytes - max(budget, 0), truncated, unreadable)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (a value that occurred): the smallest value with q% at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _number(value: object) -> float | None:
    """A logged number as a float; None for anything else. JSON readers take `1e999` and `NaN` as infinity
    and not-a-number, and an integer of 400 digits has no float: one such line (hand-edited, or written by
    another tool) must not make the whole page unanswerable, so it counts as a missing figure."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _common_top(groups: list[_Group]) -> str | None:
    """The top tier the groups share, else None."""
    tops = {group.top_tier for group in groups}
    return tops.pop() if len(tops) == 1 else None


@dataclass
class _Group:
    tiers: list[str]
    top_tier: str | None  # what its always-top-tier cost is priced at (None: a sum of groups of other tops)
    requests: int = 0
    errors: int = 0
    spend_usd: float = 0.0
    top_tier_usd: float = 0.0
    costed: int = 0
    answered_without_cost: int = 0
    fallbacks: int = 0
    escalations: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    classifier_ms: list[float] = field(default_factory=list)
    over_time: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, row: dict, bucket: int | None, top_price: tuple[float, float] | None) -> None:
        self.requests += 1
        status = row.get("status")
        if not isinstance(status, int) or status >= 400:
            self.errors += 1
        reason = str(row.get("reason"))
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        steered = row.get("steered")
        # A fallback whose tier then failed, or whose tenant's budget moved it, has another reason: its
        # `cause` (schema 11) still says it fell back.
        if reason == "fallback" or row.get("cause") is not None or (
                isinstance(steered, dict) and steered.get("from_reason") == "fallback"):
            self.fallbacks += 1
        if reason == "escalated":
            self.escalations += 1
        tier = row.get("tier")
        if isinstance(tier, str):
            self.by_tier[tier] = self.by_tier.get(tier, 0) + 1
            if bucket is not None:
                counts = self.over_time.setdefault(bucket, {})
                counts[tier] = counts.get(tier, 0) + 1
        cost = _number(row.get("cost_usd"))
        usage = row.get("usage")
        if cost is not None:
            self.costed += 1
            self.spend_usd += cost
            if top_price is not None and isinstance(usage, dict):
                prompt, completion = _number(usage.get("prompt_tokens")), _number(usage.get("completion_tokens"))
                if prompt is not None and completion is not None:
                    self.top_tier_usd += (prompt * top_price[0] + completion * top_price[1]) / 1e6
        elif isinstance(status, int) and status < 400:
            self.answered_without_cost += 1
        latency = _number(row.get("classifier_ms"))
        if latency is not None:
            self.classifier_ms.append(latency)

    def merge(self, other: _Group) -> None:
        for name in ("requests", "errors", "spend_usd", "top_tier_usd", "costed", "answered_without_cost",
                     "fallbacks", "escalations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.by_tier, other.by_tier), (self.reasons, other.reasons)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.classifier_ms.extend(other.classifier_ms)
        for bucket, counts in other.over_time.items():
            target = self.over_time.setdefault(bucket, {})
            for tier, count in counts.items():
                target[tier] = target.get(tier, 0) + count

    def report(self, name: str, buckets: list[int], priced: bool) -> dict:
        top = self.top_tier_usd if priced else None
        saved = top - self.spend_usd if top is not None else None
        tiers = [*self.tiers, *sorted(set(self.by_tier) - set(self.tiers))]  # a tier since renamed, too
        return {
            "tenant": name, "requests": self.requests, "errors": self.errors, "top_tier": self.top_tier,
            "spend_usd": self.spend_usd, "top_tier_usd": top, "saved_usd": saved,
            "saved_share": saved / top if saved is not None and top else None,
            "costed_requests": self.costed, "answered_without_cost": self.answered_without_cost,
            "fallbacks": self.fallbacks, "escalations": self.escalations,
            "by_tier": {tier: self.by_tier.get(tier, 0) for tier in tiers},
            "reasons": dict(sorted(self.reasons.items())),
            "classifier_ms": {"count": len(self.classifier_ms),
                              **{f"p{q}": percentile(self.classifier_ms, q) for q in PERCENTILES}},
            "over_time": [{tier: self.over_time.get(bucket, {}).get(tier, 0) for tier in tiers}
                          for bucket in buckets],
        }


class _EpochOf:
    """Seconds since the epoch of the log's `time` strings, cached (rows share their second)."""

    def __init__(self) -> None:
        self.cache: dict[str, int | None] = {}

    def __call__(self, value: object) -> int | None:
        if not isinstance(value, str):
            return None
        if value not in self.cache:
            try:
                self.cache[value] = calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
            except ValueError:
                self.cache[value] = None
        return self.cache[value]


def bucket_size(span_s: int) -> int:
    """The smallest of BUCKET_SIZES_S that covers `span_s` in at most MAX_BUCKETS buckets."""
    for size in BUCKET_SIZES_S:
        if span_s // size + 1 <= MAX_BUCKETS:
            return size
    return 86400 * math.ceil((span_s // 86400 + 1) / MAX_BUCKETS)


def group_of(row: dict) -> str:
    """The tenant a row is counted under: its `tenant`, or DEFAULT_GROUP for rows written without one."""
    tenant = row.get("tenant")
    return tenant if isinstance(tenant, str) and tenant else DEFAULT_GROUP


def by_tenant(window: LogWindow) -> dict[str, LogWindow]:
    """The window split by tenant, each part as a tenant may see it: its own rows, and nothing that
    tells of the others (no file names, no byte count, no unreadable lines); only whether older rows
    were left out."""
    rows: dict[str, list[dict]] = {}
    for row in window.rows:
        rows.setdefault(group_of(row), []).append(row)
    return {tenant: LogWindow(own, [], 0, window.truncated, 0) for tenant, own in rows.items()}


def summarize(window: LogWindow, tiers: list[str], prices: dict[str, tuple[float, float]],
              top_tiers: Mapping[str, str] | None = None, tenant: str | None = None) -> dict:
    """The savings report of the rows in `window` (see the module docstring); `tiers` cheapest first,
    `prices` per tier as (input, output) USD per million tokens, possibly empty (not known yet);
    `top_tiers`: the most capable tier of each tenant that may not use the last one; `tenant`: the one
    tenant whose rows `window` holds, if so (its top tier is the report's even without rows)."""
    top_tiers = top_tiers or {}

    def top_of(group: str) -> str | None:
        return top_tiers.get(group, tiers[-1]) if tiers else None

    epoch = _EpochOf()
    times = [epoch(row.get("time")) for row in window.rows]
    known = [moment for moment in times if moment is not None]
    size = bucket_size(max(known) - min(known)) if known else 60
    # The first bucket starts at a multiple of its size, before the first row: the span it must cover
    # can be one bucket longer than the rows', so the size is chosen on that span.
    while known and (max(known) - min(known) // size * size) // size + 1 > MAX_BUCKETS:
        size = bucket_size(max(known) - min(known) // size * size)
    first = min(known) // size * size if known else 0
    buckets = list(range(first, max(known) + 1, size)) if known else []
    groups: dict[str, _Group] = {}
    for row, moment in zip(window.rows, times, strict=True):
        name = group_of(row)
        group = groups.get(name)
        if group is None:
            group = groups[name] = _Group(tiers, top_of(name))
        group.add(row, None if moment is None else moment // size * size, prices.get(group.top_tier or ""))
    ranked = sorted(groups.items(), key=lambda item: (-item[1].requests, item[0]))
    shown, rest = ranked[:MAX_GROUPS], ranked[MAX_GROUPS:]
    # Where the tenants' top tiers differ, a sum of their groups has no one top tier.
    if rest:
        other = _Group(tiers, _common_top([group for _, group in rest]))
        for _, group in rest:
            other.merge(group)
        shown.append((OTHER_GROUP, other))
    total = _Group(tiers, _common_top([group for _, group in shown]) if shown else top_of(tenant or DEFAULT_GROUP))
    for _, group in shown:
        total.merge(group)
    # Priced once the classifier has reported the price of every top tier the rows are compared with.
    tops = {group.top_tier for group in groups.values()} if groups else {total.top_tier}
    priced = all(top is not None and top in prices for top in tops)
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "window": {"rows": len(window.rows), "files": window.files, "bytes_read": window.bytes_read,
                   "truncated": window.truncated, "unreadable_lines": window.unreadable_lines,
                   "first_time": _iso(min(known)) if known else None,
                   "last_time": _iso(max(known)) if known else None},
        "tiers": tiers,
        "top_tier": total.top_tier,  # null where the tenants' top tiers differ: each group names its own
        "prices": {tier: {"input_usd_per_mtok": price[0], "output_usd_per_mtok": price[1]}
                   for tier, price in prices.items()},
        "bucket_s": size,
        "buckets": [_iso(bucket) for bucket in buckets],
        "total": total.report(ALL_TENANTS, buckets, priced),
        "groups": [group.report(name, buckets, priced) for name, group in shown],
    }


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
