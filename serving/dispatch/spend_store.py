"""Tenants' spend per period, shared by every dispatcher process, and the in-process view requests read.

Stores (one row or key per tenant and period, holding the USD spent):

- `SqliteSpendStore`: one file shared by the processes of a host (`promptier dispatch --workers N`), in
  WAL mode so that readers never wait for the writer; each write is one short `BEGIN IMMEDIATE`
  transaction of upserts, and `busy_timeout` queues processes that write at the same moment.
  `synchronous=NORMAL`: a committed write survives a process crash (the WAL is in the OS's hands);
  a power cut may lose the last moments of spend, which only makes pacing a little lenient.
- `RedisSpendStore`: a Redis server that several hosts share; one script adds a write's increments
  atomically (`INCRBYFLOAT`), and each key expires a month after its period ends.

Writes are idempotent: each writer (a ledger) numbers its writes, and a store records per writer the last
number it applied, in the same transaction or script as the increments. A write whose reply was lost
(a timeout, a connection reset, a failover) is retried with the same number and the same increments, and
a store that had applied it applies nothing: spend is charged once.

`SpendLedger` keeps the current totals in process memory: requests read a dict, never the store. A
thread of its own writes the process's spend (once a request is charged, writes at least
WRITE_INTERVAL_S apart: the requests charged in between go together in the next one) and rereads
every watched total every `refresh_ms`.
What a request sees is the store's total as of this process's last write or refresh, plus this
process's own spend not yet written: other processes' spend shows at most `refresh_ms` (plus one
store round trip) late, this process's at once. Spend still unwritten when the ledger closes goes to a
journal on local disk, which the next ledger on the same store writes (serving.dispatch.spend_journal).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from classifier.errors import PromptierError
from serving.dispatch import spend_journal
from serving.dispatch.spend_journal import JournaledWrite

log = logging.getLogger("promptier.dispatcher")
Key = tuple[str, str]  # (tenant, period key)
# Redis keys outlive their period by this long, so that last month's spend can still be read.
REDIS_RETENTION_S = 35 * 86400
# How long a store remembers a writer's last write number after its last write: a write is retried until
# it is confirmed, so only a writer silent for this long (a stopped process) is forgotten.
WRITER_RETENTION_S = 7 * 86400
# Writes are at least this far apart: one write per request at low load, one for all the requests
# charged in the interval at high load (a SQLite write took 75 us of CPU here, which a busy process
# should not pay hundreds of times a second).
WRITE_INTERVAL_S = 0.02
# How often a running ledger looks again for journals that stopped processes left (serving.dispatch.spend_journal).
JOURNAL_SCAN_S = 10.0


class SpendStoreError(PromptierError):
    """The spend store cannot be opened or used."""


class SpendStore(Protocol):
    def add(self, increments: dict[Key, float], expires: dict[str, float], writer: str = "", sequence: int = 0
            ) -> dict[Key, float]:
        """Add each increment, unless `writer` already had write `sequence` (or a later one) applied; return
        the totals of those keys. `expires`: period key -> its end. Without a writer, always add."""
        ...

    def totals(self, keys: Iterable[Key]) -> dict[Key, float]:
        """The stored totals of `keys` (0 for a key never written)."""
        ...

    def totals_and_applied(self, keys: Iterable[Key], writer: str) -> tuple[dict[Key, float], int]:
        """`totals`, and the number of `writer`'s last applied write (0: none), read at one moment: whether
        a write whose answer was lost is in those totals."""
        ...

    def describe(self) -> str: ...

    def forgets_on_restart(self) -> str | None:
        """Why the store's server loses every total when it restarts, or None: it keeps them, or cannot
        tell. Raises SpendStoreError when the server cannot be asked."""
        ...

    def identity(self) -> str:
        """Names this store's data (not only its server) across processes and hosts: a journal of
        unwritten spend is replayed only into the store it was kept for."""
        ...

    def close(self) -> None: ...


class SqliteSpendStore:
    """Spend in a SQLite file (WAL), shared by the processes of one host."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level None): transactions are begun explicitly, IMMEDIATE, so that two
            # writers queue on busy_timeout instead of one failing on a lock upgrade.
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._set_wal(time.monotonic() + busy_timeout_s)
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS spend (tenant TEXT NOT NULL, period TEXT NOT NULL, "
                             "usd REAL NOT NULL, PRIMARY KEY (tenant, period)) WITHOUT ROWID")
            self._db.execute("CREATE TABLE IF NOT EXISTS writers (writer TEXT PRIMARY KEY, sequence INTEGER NOT NULL, "
                             "written REAL NOT NULL) WITHOUT ROWID")
        except (OSError, sqlite3.Error) as error:
            raise SpendStoreError(f"spend store {path}: cannot open it: {error}") from error
        self._lock = threading.Lock()  # one connection, used by the ledger's thread and by tools

    def _set_wal(self, deadline: float) -> None:
        """Switch the file to WAL, retrying "database is locked" until `deadline` (a time.monotonic()).

        Several processes opening a new store at once (a dispatcher's workers starting) race to change
        its journal mode; SQLite answers one of them "locked" at once, without waiting on busy_timeout,
        where waiting could deadlock. Retrying after the others' switch is what waiting would have done.
        """
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @staticmethod
    def read_only(path: Path) -> SqliteSpendStore:
        """An existing store opened only to read it (`promptier dispatch --check`).

        Raises:
            SpendStoreError: the file is not a spend store.
        """
        store = SqliteSpendStore.__new__(SqliteSpendStore)
        store.path, store._lock = path, threading.Lock()
        try:
            uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
            store._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            store._db.execute("SELECT tenant, period, usd FROM spend LIMIT 1").fetchall()
        except sqlite3.Error as error:
            raise SpendStoreError(f"spend store {path}: cannot read it: {error}") from error
        return store

    def add(self, increments: dict[Key, float], expires: dict[str, float], writer: str = "", sequence: int = 0
            ) -> dict[Key, float]:
        totals: dict[Key, float] = {}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not writer or self._take_sequence(writer, sequence):
                    for (tenant, period), usd in increments.items():
                        (total,) = self._db.execute(
                            "INSERT INTO spend (tenant, period, usd) VALUES (?, ?, ?) ON CONFLICT (tenant, period) "
                            "DO UPDATE SET usd = usd + excluded.usd RETURNING usd", (tenant, period, usd)).fetchone()
                        totals[(tenant, period)] = float(total)
                else:
                    totals = self._select_totals(set(increments))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return totals

    def _take_sequence(self, writer: str, sequence: int) -> bool:
        """Record `sequence` as `writer`'s last applied write, unless it was already; inside a transaction."""
        row = self._db.execute("SELECT sequence FROM writers WHERE writer = ?", (writer,)).fetchone()
        if row is not None and row[0] >= sequence:
            return False
        now = time.time()
        self._db.execute("INSERT INTO writers (writer, sequence, written) VALUES (?, ?, ?) ON CONFLICT (writer) "
                         "DO UPDATE SET sequence = excluded.sequence, written = excluded.written",
                         (writer, sequence, now))
        self._db.execute("DELETE FROM writers WHERE written < ?", (now - WRITER_RETENTION_S,))
        return True

    def _select_totals(self, wanted: set[Key]) -> dict[Key, float]:
        """The stored totals of `wanted` (0 for a key never written), under the caller's lock and transaction."""
        found = dict.fromkeys(wanted, 0.0)
        periods = sorted({period for _, period in wanted})
        if periods:
            rows = self._db.execute(f"SELECT tenant, period, usd FROM spend WHERE period IN "
                                    f"({', '.join('?' * len(periods))})", periods).fetchall()
            for tenant, period, usd in rows:
                if (tenant, period) in wanted:
                    found[(tenant, period)] = float(usd)
        return found

    def totals(self, keys: Iterable[Key]) -> dict[Key, float]:
        return self.totals_and_applied(keys, "")[0]

    def totals_and_applied(self, keys: Iterable[Key], writer: str) -> tuple[dict[Key, float], int]:
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot for both reads (WAL: readers never wait)
            try:
                found = self._select_totals(set(keys))
                row = self._db.execute("SELECT sequence FROM writers WHERE writer = ?", (writer,)).fetchone() \
                    if writer else None
            finally:
                self._db.execute("COMMIT")
        return found, int(row[0]) if row is not None else 0

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def forgets_on_restart(self) -> str | None:
        return None  # a file on disk

    def identity(self) -> str:
        return f"sqlite {self.path.resolve()}"

    def close(self) -> None:
        with self._lock:
            self._db.close()


# One write, atomic on the server: the increments unless this writer's write number was applied already,
# then the totals (as strings: Redis truncates a Lua number to an integer). KEYS[1] holds the writer's last
# applied number; ARGV: the write's number (0: no writer, always add), that key's time to live, then
# (USD, expiry time) per spend key.
_REDIS_ADD = """
local sequence = tonumber(ARGV[1])
if sequence == 0 or sequence > tonumber(redis.call('GET', KEYS[1]) or '0') then
  for i = 2, #KEYS do
    redis.call('INCRBYFLOAT', KEYS[i], ARGV[2 * i - 1])
    redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
  end
  if sequence > 0 then
    redis.call('SET', KEYS[1], sequence, 'EX', ARGV[2])
  end
end
local totals = {}
for i = 2, #KEYS do
  totals[i - 1] = redis.call('GET', KEYS[i]) or '0'
end
return totals
"""


def _check_redis_url(url: str) -> None:
    """Refuse a Redis URL that redis-py would misread, saying why without quoting it (it may hold a password).

    redis-py reads a database path that is not a number (`/spend`) as database 0, without a word, and
    names every other fault a parse error; the password hint below applies only to the cases it fits.

    Raises:
        SpendStoreError: the scheme is not Redis's, the port is not a port, or the path is not a database.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SpendStoreError(f"spend store: the Redis URL must start with redis://, rediss:// or unix://, not "
                              f"{parts.scheme + '://' if parts.scheme else 'without a scheme'}")
    if parts.scheme == "unix":
        return
    password_hint = ("; a password holding '/', '?', '#' or '@' must be percent-encoded. The URL is not shown, as "
                     "it may hold a password")
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise SpendStoreError("spend store: the Redis URL cannot be parsed: its port is not a number from 0 to "
                              f"65535{password_hint}") from None
    if "@" in parts.path:
        raise SpendStoreError(f"spend store: the Redis URL cannot be parsed{password_hint}")
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
        raise SpendStoreError("spend store: the Redis URL cannot be parsed: its path must be a database number "
                              f"(redis://host:6379/0) or nothing{password_hint}")


class RedisSpendStore:
    """Spend in Redis, shared by dispatchers on several hosts. Needs the `redis` package (extra `[redis]`)."""

    def __init__(self, url: str, prefix: str = "promptier", timeout_s: float = 2.0) -> None:
        try:
            import redis
        except ImportError as error:
            raise SpendStoreError("spend_store kind redis needs the redis client: pip install 'promptier[redis]'"
                                  ) from error
        _check_redis_url(url)
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError:
            # Not chained, and the parser's message left out: for a password holding '/', '?' or '#' it
            # quotes the password's first characters as the "port".
            raise SpendStoreError("spend store: the Redis URL cannot be parsed (percent-encode any '/', '?', '#' "
                                  "or '@' in its password); the URL is not shown, as it may hold a password"
                                  ) from None
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self.prefix = prefix
        self._add = self._redis.register_script(_REDIS_ADD)
        # The URL may carry a password: describe the server by host and port only.
        options = self._redis.connection_pool.connection_kwargs
        self._where = f"redis {options.get('host', '?')}:{options.get('port', '?')}/{options.get('db', 0)}"

    def key(self, tenant: str, period: str) -> str:
        return f"{self.prefix}:spend:{period}:{tenant}"

    def writer_key(self, writer: str) -> str:
        """Where a writer's last applied write number is kept."""
        return f"{self.prefix}:spend-writer:{writer}"

    def ping(self) -> None:
        """Raises SpendStoreError when the server does not answer."""
        try:
            self._redis.ping()
        except self._errors as error:
            raise SpendStoreError(f"spend store {self._where}: {type(error).__name__}: {error}") from error

    def add(self, increments: dict[Key, float], expires: dict[str, float], writer: str = "", sequence: int = 0
            ) -> dict[Key, float]:
        keys = [self.writer_key(writer)]
        args: list[str | int] = [sequence if writer else 0, WRITER_RETENTION_S]
        for (tenant, period), usd in increments.items():
            keys.append(self.key(tenant, period))
            args += [repr(usd), int(expires[period] + REDIS_RETENTION_S)]
        replies = self._add(keys=keys, args=args)
        return {key: float(total) for key, total in zip(increments, replies, strict=True)}

    def totals(self, keys: Iterable[Key]) -> dict[Key, float]:
        return self.totals_and_applied(keys, "")[0]

    def totals_and_applied(self, keys: Iterable[Key], writer: str) -> tuple[dict[Key, float], int]:
        wanted = list(keys)
        # One MGET: the writer's number and the totals as of one moment.
        values = self._redis.mget([self.writer_key(writer),
                                   *(self.key(tenant, period) for tenant, period in wanted)])
        totals = {key: float(value) if value is not None else 0.0
                  for key, value in zip(wanted, values[1:], strict=True)}
        return totals, int(values[0]) if writer and values[0] is not None else 0

    def describe(self) -> str:
        return self._where

    def forgets_on_restart(self) -> str | None:
        """Whether the server neither snapshots (RDB `save` empty) nor logs writes (AOF off); None also
        where CONFIG is refused (managed services often rename or forbid it)."""
        import redis

        try:
            save = self._redis.config_get("save").get("save")
            appendonly = self._redis.config_get("appendonly").get("appendonly")
        except redis.ResponseError:
            return None
        except self._errors as error:
            raise SpendStoreError(f"spend store {self._where}: {type(error).__name__}: {error}") from error
        if save == "" and appendonly == "no":
            return ("it neither snapshots (RDB) nor logs writes (AOF): a restart of it sets every tenant's "
                    "spend back to $0")
        return None

    def identity(self) -> str:
        return f"{self._where} {self.prefix}"

    def close(self) -> None:
        self._redis.close()


class SpendLedger:
    """The process's view of every tenant's spend, kept current by a thread of its own (module docstring).

    `spent` and `charge` are what the request path calls: a dict read, a dict update and an event.
    A store that fails is retried on the next round with the spend it has not taken yet; meanwhile the
    view keeps counting this process's spend, and `error` says what failed (shown by /health).
    """

    def __init__(self, store: SpendStore, refresh_s: float, on_refresh: Callable[[dict[Key, float]], None]
                 | None = None, on_error: Callable[[str], None] | None = None,
                 write_interval_s: float = WRITE_INTERVAL_S, journal_dir: Path | None = None) -> None:
        """`journal_dir`: where spend still unwritten at `close` is kept, and where this ledger looks for
        what stopped processes of the same store kept (serving.dispatch.spend_journal); None: nowhere."""
        self.store = store
        self.journal_dir = journal_dir
        self._journals_scanned = -math.inf  # time.monotonic() of the last look for other processes' journals
        self.refresh_s = refresh_s
        self.write_interval_s = write_interval_s
        self._on_refresh = on_refresh
        self._on_error = on_error
        self._lock = threading.Lock()
        self._stored: dict[Key, float] = {}  # the store's totals, as last read or written
        self._pending: dict[Key, float] = {}  # this process's spend not yet handed to the store
        self._writing: dict[Key, float] = {}  # handed to the store, not yet confirmed: retried as it is
        self._writer = uuid.uuid4().hex  # the store applies each of this ledger's numbered writes once
        self._sequence = 0  # the number of the write in `_writing`
        self._expires: dict[str, float] = {}
        self._watched: dict[str, Key] = {}  # tenant -> its current (tenant, period)
        self._wake = threading.Event()
        self._read_tried = threading.Event()  # set once a read of the watched totals succeeded or failed
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.last_ok: float | None = None
        self._persistence_known = False  # whether the store has said if it forgets on restart

    def spent(self, key: Key) -> float:
        """Spend of (tenant, period) as this process knows it."""
        with self._lock:  # uncontended but for the moments the thread moves spend between the three
            return self._stored.get(key, 0.0) + self._pending.get(key, 0.0) + self._writing.get(key, 0.0)

    def watch(self, key: Key, period_end: float) -> None:
        """Keep (tenant, period) refreshed; the first time, read it now (so a new period, or a process
        that just started, does not start from zero for a refresh interval)."""
        if self._watched.get(key[0]) == key:
            return
        with self._lock:
            self._watched[key[0]] = key  # a tenant's earlier period is no longer read
            self._expires[key[1]] = period_end
        self._wake.set()

    def charge(self, key: Key, usd: float, wake: bool = True, period_end: float | None = None) -> None:
        """Add this process's spend: counted in `spent` at once, written by the thread (now, or on `wake`).
        `period_end`: when the key's period ends, for a key that is written but not watched."""
        if usd <= 0.0:
            return
        with self._lock:
            if period_end is not None:
                self._expires.setdefault(key[1], period_end)
            self._pending[key] = self._pending.get(key, 0.0) + usd
        if wake:
            self._wake.set()

    def wake(self) -> None:
        """Have the thread write what is pending now (rather than at its next refresh)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="promptier-spend-ledger", daemon=True)
        self._thread.start()

    def wait_first_read(self, timeout_s: float) -> bool:
        """Wait until the first read of the watched totals has answered, or failed, or `timeout_s` passed;
        whether it succeeded. Until then `spent` knows only this process's own spend."""
        self._read_tried.wait(timeout_s)
        return self.last_ok is not None

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending (within `timeout_s`), keep in the journal what the store did not take,
        and stop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        unwritten = self._unwritten()
        if unwritten:
            self._keep(unwritten)
        self.store.close()

    def _unwritten(self) -> list[JournaledWrite]:
        """The unconfirmed write under its number and the spend charged after it under the next: what the
        store would have been sent. A write still running past `close`'s wait is in it too; should that
        write land, its number makes the journal's copy a no-op."""
        with self._lock:
            writes = [JournaledWrite(sequence, dict(spend), {period: self._expires.get(period, time.time() + 31 * 86400)
                                                             for _, period in spend})
                      for sequence, spend in ((self._sequence, self._writing), (self._sequence + 1, self._pending))
                      if spend]
        return writes

    def _keep(self, writes: list[JournaledWrite]) -> None:
        usd: dict[str, float] = {}  # both writes may charge one tenant's period: the sum is what is unwritten
        for write in writes:
            for (tenant, period), value in write.increments.items():
                usd[f"{tenant}/{period}"] = usd.get(f"{tenant}/{period}", 0.0) + value
        if self.journal_dir is not None:
            try:
                path = spend_journal.save(self.journal_dir, self.store.identity(), self._writer, writes)
            except OSError as error:
                detail = f"journal not written: {type(error).__name__}: {error}"
            else:
                log.warning(json.dumps({"event": "spend_journaled", "store": self.store.describe(), "path": str(path),
                                        "usd": usd, "detail": self.error}))
                return
        else:
            detail = "no journal directory"
        log.error(json.dumps({"event": "spend_unwritten_at_stop", "store": self.store.describe(), "usd": usd,
                              "detail": detail}))

    def _run(self) -> None:
        next_refresh = 0.0
        last_write = 0.0
        while True:
            self._wake.wait(max(0.0, next_refresh - time.monotonic()))
            stopping = self._stopping
            wait = last_write + self.write_interval_s - time.monotonic()
            if wait > 0 and not stopping:
                time.sleep(wait)  # requests charged meanwhile go in the same write
            self._wake.clear()
            if self._pending:
                last_write = time.monotonic()
            self._replay_journals()
            self._write()
            if time.monotonic() >= next_refresh or self._unread():
                self._refresh()
                next_refresh = time.monotonic() + self.refresh_s
            if stopping:
                return

    def _unread(self) -> bool:
        with self._lock:
            return any(key not in self._stored for key in self._watched.values())

    def _write(self) -> None:
        with self._lock:
            if not self._writing:
                if not self._pending:
                    return
                self._writing, self._pending = self._pending, {}
                self._sequence += 1
            batch = dict(self._writing)
            expires = {period: self._expires.get(period, time.time() + 31 * 86400) for _, period in batch}
        try:
            totals = self.store.add(batch, expires, self._writer, self._sequence)
        except Exception as error:
            # Any store failure: the same write is retried on the next round, with its number, so that a
            # store that applied it but whose reply was lost does not apply it again.
            self._failed("write", error)
            return
        with self._lock:
            self._stored.update(totals)  # totals include what this write added
            self._writing = {}
        self._succeeded()

    def _replay_journals(self) -> None:
        """Write the spend that stopped processes of this store kept in journals (at start, then every
        JOURNAL_SCAN_S: a process replaced by a reload may stop after this one started). Each write goes
        under the stopped process's writer id and number, so it is charged once however often it is sent."""
        if self.journal_dir is None or time.monotonic() - self._journals_scanned < JOURNAL_SCAN_S:
            return
        # Scanned now whatever happens below: a store that is down is retried at the next scan, not at
        # every round, where each try could cost its connect timeout before the round's write and read.
        self._journals_scanned = time.monotonic()
        for journal in spend_journal.load(self.journal_dir, self.store.identity()):
            try:
                for write in journal.writes:
                    totals = self.store.add(write.increments, write.expires, journal.writer, write.sequence)
                    with self._lock:
                        self._stored.update(totals)
            except Exception as error:  # the store is down (the journal's writes were checked when read)
                self._failed("replay", error)
                return
            try:
                journal.path.unlink(missing_ok=True)
            except OSError as error:  # left behind: replayed again later, which its numbers make a no-op
                log.warning(json.dumps({"event": "spend_journal_not_deleted", "path": str(journal.path),
                                        "detail": str(error)}))
            log.info(json.dumps({"event": "spend_journal_replayed", "store": self.store.describe(),
                                 "writer": journal.writer, "usd": round(journal.usd(), 9)}))

    def _refresh(self) -> None:
        with self._lock:
            watched = list(self._watched.values())
        if not watched:
            self._read_tried.set()  # nothing to read
            return
        try:
            totals, applied = self.store.totals_and_applied(watched, self._writer)
        except Exception as error:
            self._failed("read", error)
            self._read_tried.set()
            return
        # Writes run on this same thread, so `_writing` is as the last write left it: a write still
        # unconfirmed is in these totals exactly when the store has applied its number (its answer was
        # lost), and then it is confirmed here; else `spent` goes on adding it to them.
        with self._lock:
            if self._writing and applied >= self._sequence:
                self._writing = {}
            self._stored.update(totals)
        self._succeeded()
        self._read_tried.set()
        if self._on_refresh is not None:
            self._on_refresh(dict(totals))
        if not self._persistence_known:  # after the first read is out: start-up does not wait for it
            self._warn_if_forgetful()

    def _succeeded(self) -> None:
        if self.error is not None:
            log.info(json.dumps({"event": "spend_store_recovered", "store": self.store.describe()}))
        self.error = None
        self.last_ok = time.time()

    def _warn_if_forgetful(self) -> None:
        """Once the store has answered the question: a store that forgets on restart reopens every spent
        budget. A store that cannot be asked now is asked again after the next read."""
        try:
            reason = self.store.forgets_on_restart()
        except Exception:  # a question about the store must never stop the ledger
            return
        self._persistence_known = True
        if reason is not None:
            log.warning(json.dumps({"event": "spend_store_not_persistent", "store": self.store.describe(),
                                    "detail": reason}))

    def _failed(self, operation: str, error: Exception) -> None:
        detail = f"{operation} failed: {type(error).__name__}: {error}"
        if self.error is None:  # once per outage, not once per request
            log.warning(json.dumps({"event": "spend_store_failed", "store": self.store.describe(), "detail": detail}))
        self.error = detail
        if self._on_error is not None:
            self._on_error(operation)
