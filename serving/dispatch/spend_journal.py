"""Spend a dispatcher process could not write to its store before it stopped, kept on local disk until
a process that opens the same store writes it there.

A process that stops while its spend store is down (Redis unreachable, a SQLite file locked past its
timeout) still holds spend that no store has: its last unconfirmed write and what was charged after
it. Both go into one file per process, `spend-unwritten.<writer>.json` in the journal directory, as the
numbered writes the store would have taken (the unconfirmed one under its own number, the rest under
the next). The next ledger on the same store replays them under the dead process's writer id: the
store's once-per-number rule makes a replay that two processes race to do, or one of a write the store
had applied after all, charge nothing twice. The file is deleted once every write in it is applied.

The file's schema is this module's, versioned by JOURNAL_VERSION.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("promptier.dispatcher")

JOURNAL_VERSION = 1
PREFIX = "spend-unwritten."
Key = tuple[str, str]  # (tenant, period key)
_reported: set[Path] = set()  # unreadable journals already logged by this process


@dataclass(frozen=True)
class JournaledWrite:
    """One write the store did not confirm: its number, increments and keys' period ends."""

    sequence: int
    increments: dict[Key, float]
    expires: dict[str, float]


@dataclass(frozen=True)
class Journal:
    """One stopped process's unwritten spend, for the store named by `store` (a store's identity)."""

    path: Path
    store: str
    writer: str
    writes: list[JournaledWrite]

    def usd(self) -> float:
        return sum(sum(write.increments.values()) for write in self.writes)


def save(directory: Path, store: str, writer: str, writes: list[JournaledWrite]) -> Path:
    """Write the journal atomically (a reader sees all of it or none) and durably; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{PREFIX}{writer}.json"
    body = {"journal_version": JOURNAL_VERSION, "store": store, "writer": writer,
            "writes": [{"sequence": write.sequence, "expires": write.expires,
                        "increments": [[tenant, period, usd] for (tenant, period), usd in write.increments.items()]}
                       for write in writes]}
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(body, file)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
    return path


def load(directory: Path, store: str) -> list[Journal]:
    """The journals in `directory` for this store, oldest first. One for another store is left where it
    is (its store may come back into use), and one that cannot be read is left and logged: neither is
    ever deleted unapplied."""
    journals = []
    try:
        paths = sorted(directory.glob(f"{PREFIX}*.json"), key=_modified)
    except OSError:
        return []
    for path in paths:
        try:
            journal = _read(path)
        except Exception as error:  # any malformed file: left in place, never fatal to the ledger
            if path not in _reported:  # once, not at every scan
                _reported.add(path)
                log.error(json.dumps({"event": "spend_journal_unreadable", "path": str(path),
                                      "detail": f"{type(error).__name__}: {error}"}))
            continue
        if journal is not None and journal.store == store:
            journals.append(journal)
    return journals


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # replayed and deleted by another process meanwhile
        return math.inf


def _read(path: Path) -> Journal | None:
    """The journal at `path`; None when another process has replayed and deleted it meanwhile."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(body, dict) or body.get("journal_version") != JOURNAL_VERSION:
        version = body.get("journal_version") if isinstance(body, dict) else None
        raise ValueError(f"journal_version {version!r}, this version reads {JOURNAL_VERSION}")
    writes = [_write(write) for write in body["writes"]]
    return Journal(path, str(body["store"]), str(body["writer"]), writes)


def _write(raw: dict) -> JournaledWrite:
    """One journaled write, checked whole: a store is only ever sent what it can apply."""
    increments = {(str(tenant), str(period)): _usd(usd) for tenant, period, usd in raw["increments"]}
    expires = {str(period): float(end) for period, end in raw["expires"].items()}
    missing = {period for _, period in increments} - set(expires)
    if missing:
        raise ValueError(f"write {raw['sequence']}: no period end for {sorted(missing)}")
    return JournaledWrite(int(raw["sequence"]), increments, expires)


def _usd(value: object) -> float:
    usd = float(value)  # type: ignore[arg-type]
    if not math.isfinite(usd) or usd < 0:
        raise ValueError(f"an increment of {value!r} USD")
    return usd
