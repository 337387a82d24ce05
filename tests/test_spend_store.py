"""Spend stores (SQLite shared by processes, a real Redis server) and the in-process ledger over them."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from serving.bench.ports import free_port
from serving.dispatch.spend_store import RedisSpendStore, SpendLedger, SpendStoreError, SqliteSpendStore
from serving.dispatch.tenants import check_tenants_and_store
from tests.redis_server import RedisServer

PERIOD_END = time.time() + 86400


def _add_many(path: str, tenant: str, times: int) -> None:
    store = SqliteSpendStore(Path(path))
    for _ in range(times):
        store.add({(tenant, "2025-06"): 0.25, ("shared", "2025-06"): 0.5}, {"2025-06": PERIOD_END})
    store.close()


def test_sqlite_store_shared_by_processes_loses_no_write(tmp_path: Path) -> None:
    path = tmp_path / "spend.sqlite3"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(str(path), f"t{index}", 200)) for index in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    store = SqliteSpendStore(path)
    totals = store.totals([("t0", "2025-06"), ("t3", "2025-06"), ("shared", "2025-06"), ("t0", "2025-07")])
    # Every one of the 1,600 writes counted (quarters and halves add up exactly in binary).
    assert totals == {("t0", "2025-06"): 50.0, ("t3", "2025-06"): 50.0, ("shared", "2025-06"): 400.0,
                      ("t0", "2025-07"): 0.0}
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    with pytest.raises(SpendStoreError, match="cannot open it"):
        SqliteSpendStore(tmp_path / "spend.sqlite3" / "not-a-dir" / "x.sqlite3")


def test_a_store_opens_while_another_process_holds_the_new_file_mid_write(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection holds a write lock gets "database is
    locked" at once (SQLite does not wait where waiting could deadlock); several dispatcher workers
    opening a new store together hit this. The store retries within its busy timeout."""
    import sqlite3
    import threading

    path = tmp_path / "spend.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE early (a)")
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # what a plain switch gets
        sqlite3.connect(path, timeout=5, isolation_level=None).execute("PRAGMA journal_mode = WAL")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        store = SqliteSpendStore(path)
    finally:
        release.join()
        other.close()
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def _wait_for(condition, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_ledger_counts_its_own_spend_at_once_and_another_process_within_its_refresh(tmp_path: Path) -> None:
    path = tmp_path / "spend.sqlite3"
    key = ("search", "2025-06")
    SqliteSpendStore(path).add({key: 3.0}, {"2025-06": PERIOD_END})  # spend from before the start
    first, second = (SpendLedger(SqliteSpendStore(path), refresh_s=0.05) for _ in range(2))
    for ledger in (first, second):
        ledger.watch(key, PERIOD_END)
        ledger.start()
    try:
        assert _wait_for(lambda: first.spent(key) == 3.0 and second.spent(key) == 3.0)  # read when first watched
        first.charge(key, 1.5)
        assert first.spent(key) == 4.5  # its own spend: at once, before the store has it
        assert _wait_for(lambda: second.spent(key) == 4.5)  # the other process's: after a refresh
        for _ in range(100):
            second.charge(key, 0.01)
        assert _wait_for(lambda: abs(first.spent(key) - 5.5) < 1e-9 and abs(second.spent(key) - 5.5) < 1e-9)
    finally:
        first.close()
        second.close()
    assert SqliteSpendStore(path).totals([key])[key] == pytest.approx(5.5)


class ReplyLost:
    """A real store whose first `lose` writes are applied (unless `refuse`) and then lost on the way back,
    as a timeout after the server has run the command (a stall, a network blip, a failover) looks to the
    writer; with `refuse`, as a store that reads but cannot write (a full disk, a read-only replica)."""

    def __init__(self, store: SqliteSpendStore | RedisSpendStore, lose: int = 1, refuse: bool = False) -> None:
        self.store, self.lost, self.lose, self.refuse = store, 0, lose, refuse

    def add(self, increments, expires, writer="", sequence=0):  # type: ignore[no-untyped-def]
        if self.lost < self.lose:
            if not self.refuse:
                self.store.add(increments, expires, writer, sequence)
            self.lost += 1
            raise TimeoutError("the reply was lost")
        return self.store.add(increments, expires, writer, sequence)

    def totals(self, keys):  # type: ignore[no-untyped-def]
        return self.store.totals(keys)

    def totals_and_applied(self, keys, writer):  # type: ignore[no-untyped-def]
        return self.store.totals_and_applied(keys, writer)

    def describe(self) -> str:
        return self.store.describe()

    def identity(self) -> str:
        return self.store.identity()

    def close(self) -> None:
        self.store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_write_whose_reply_was_lost_is_charged_once(kind: str, tmp_path: Path, redis_server: RedisServer) -> None:
    """The ledger retries a write it got no answer for; the store must not add the same spend again."""
    store = SqliteSpendStore(tmp_path / "spend.sqlite3") if kind == "sqlite" else RedisSpendStore(redis_server.url)
    lossy = ReplyLost(store)
    errors: list[str] = []
    ledger = SpendLedger(lossy, refresh_s=0.05, on_error=errors.append)
    key = ("search", "2025-06")
    ledger.watch(key, PERIOD_END)
    ledger.start()
    try:
        assert _wait_for(lambda: ledger.last_ok is not None)  # the first read is done
        ledger.charge(key, 1.0)
        assert _wait_for(lambda: lossy.lost == 1 and ledger.error is None)  # lost, then retried and confirmed
        ledger.charge(key, 0.25)  # and the writes after it still count
        assert _wait_for(lambda: store.totals([key])[key] == 1.25)
        assert ledger.spent(key) == 1.25
    finally:
        ledger.close()
    assert errors == ["write"]
    other = SqliteSpendStore(tmp_path / "spend.sqlite3") if kind == "sqlite" else RedisSpendStore(redis_server.url)
    assert other.totals([key])[key] == 1.25
    other.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
@pytest.mark.parametrize("refuse", [False, True])
def test_while_writes_fail_the_ledger_still_reads_the_others_spend_and_counts_its_own_once(
        kind: str, refuse: bool, tmp_path: Path, redis_server: RedisServer) -> None:
    """Writes that keep failing (applied with the answer lost, or refused) while reads work: the other
    processes' spend still shows, and this process's own counts once, whether the store took it or not."""
    def open_store() -> SqliteSpendStore | RedisSpendStore:
        return SqliteSpendStore(tmp_path / "spend.sqlite3") if kind == "sqlite" else RedisSpendStore(redis_server.url)

    lossy = ReplyLost(open_store(), lose=10**9, refuse=refuse)
    ledger = SpendLedger(lossy, refresh_s=0.05)
    key = ("search", "2025-06")
    ledger.watch(key, PERIOD_END)
    ledger.start()
    other = open_store()
    try:
        assert _wait_for(lambda: ledger.last_ok is not None)
        ledger.charge(key, 1.0)
        assert _wait_for(lambda: lossy.lost >= 1)
        other.add({key: 50.0}, {"2025-06": PERIOD_END})  # another process's spend
        assert _wait_for(lambda: ledger.spent(key) == 51.0)
        time.sleep(0.3)  # several more failed writes and refreshes: still counted once
        assert ledger.spent(key) == 51.0
        assert other.totals([key])[key] == (50.0 if refuse else 51.0)
    finally:
        ledger.close(timeout_s=0.5)
        other.close()


@pytest.mark.parametrize("url", ["redis://:Zk9q/Xw3S@10.0.0.5:6379/0", "redis://app:Zk9q#Xw3S@10.0.0.5:6379/0",
                                 "redis://:Zk9q?Xw3S@10.0.0.5:6379/0"])
def test_a_redis_url_that_does_not_parse_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(SpendStoreError, match="cannot be parsed") as refused:
        RedisSpendStore(url)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # no parser message chained
    assert "Zk9q" not in str(refused.value)


@pytest.mark.parametrize(("url", "message"), [
    ("redis://127.0.0.1:6379/spend", "path must be a database number"),  # redis-py reads it as database 0
    ("redis://127.0.0.1:6379/0/x", "path must be a database number"),
    ("http://127.0.0.1:6379/0", "must start with redis://, rediss:// or unix://, not http://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis://127.0.0.1:99999/0", "port is not a number from 0 to 65535"),
])
def test_a_redis_url_redis_py_would_misread_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(SpendStoreError, match=message) as refused:
        RedisSpendStore(url)
    assert "127.0.0.1" not in str(refused.value)  # the URL is never quoted: it may hold a password


def test_redis_store_adds_atomically_and_expires_its_keys(redis_server: RedisServer) -> None:
    import redis

    store = RedisSpendStore(redis_server.url, prefix="test")
    key = ("search", "2025-06")
    assert store.add({key: 0.25}, {"2025-06": PERIOD_END}) == {key: 0.25}
    assert store.add({key: 0.5, ("other", "2025-06"): 1.0}, {"2025-06": PERIOD_END})[key] == 0.75
    assert store.totals([key, ("nobody", "2025-06")]) == {key: 0.75, ("nobody", "2025-06"): 0.0}
    client = redis.Redis.from_url(redis_server.url)
    ttl = client.ttl("test:spend:2025-06:search")
    assert 30 * 86400 < ttl <= 36 * 86400  # kept a month after the period ends, then gone
    assert "127.0.0.1" in store.describe() and "redis://" not in store.describe()
    store.close()


def test_ledger_keeps_counting_through_a_redis_outage_and_writes_the_spend_when_it_is_back(
        redis_server: RedisServer) -> None:
    errors: list[str] = []
    ledger = SpendLedger(RedisSpendStore(redis_server.url), refresh_s=0.05, on_error=errors.append)
    key = ("search", "2025-06")
    ledger.watch(key, PERIOD_END)
    ledger.start()
    try:
        ledger.charge(key, 1.0)
        assert _wait_for(lambda: RedisSpendStore(redis_server.url).totals([key])[key] == 1.0)
        redis_server.stop()
        ledger.charge(key, 2.0)
        assert _wait_for(lambda: "write" in errors and ledger.error is not None)  # said, not swallowed
        assert ledger.spent(key) == 3.0  # the spend is still counted here
        restarted = RedisServer(redis_server.port)  # the same server comes back, empty
        redis_server.process = restarted.process
        assert _wait_for(lambda: ledger.error is None)
        # What this process could not write is written now (the server lost what it had before).
        assert _wait_for(lambda: RedisSpendStore(redis_server.url).totals([key])[key] == 2.0)
    finally:
        ledger.close()


def test_spend_a_process_could_not_write_before_it_stopped_is_written_once_by_the_next(
        redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process stops while Redis is down: the spend it could not write is kept on local disk, and the
    next process on the same store writes it, once, even when the journal is replayed twice. Its log line
    says how much was kept: the failed write and what was charged after it, summed."""
    key, journal, errors = ("search", "2025-06"), tmp_path / "journal", []
    first = SpendLedger(RedisSpendStore(redis_server.url), refresh_s=0.05, journal_dir=journal,
                        on_error=errors.append)
    first.watch(key, PERIOD_END)
    first.start()
    first.charge(key, 1.0)
    assert _wait_for(lambda: RedisSpendStore(redis_server.url).totals([key])[key] == 1.0)
    redis_server.stop()
    first.charge(key, 2.0)
    assert _wait_for(lambda: "write" in errors)  # that write failed and waits for a retry
    first.charge(key, 0.5)  # charged after it: a write of its own
    with caplog.at_level(logging.WARNING, logger="promptier.dispatcher"):
        first.close(timeout_s=2)
    (kept,) = journal.glob("spend-unwritten.*.json")
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if "spend_journaled" in r.getMessage()]
    assert line["usd"] == {"search/2025-06": 2.5}
    copy = kept.read_bytes()
    restarted = RedisServer(redis_server.port)  # back, empty (no persistence): the 1.0 written before is gone
    redis_server.process = restarted.process

    def replayed_by_a_new_process() -> float:
        ledger = SpendLedger(RedisSpendStore(redis_server.url), refresh_s=0.05, journal_dir=journal)
        ledger.watch(key, PERIOD_END)
        ledger.start()
        try:
            assert ledger.wait_first_read(30)  # journals are replayed before the first read
            assert not list(journal.glob("spend-unwritten.*.json"))
            return ledger.spent(key)
        finally:
            ledger.close()

    assert replayed_by_a_new_process() == 2.5
    kept.write_bytes(copy)  # a second replay of the same journal (two processes racing to it) adds nothing
    assert replayed_by_a_new_process() == 2.5
    assert RedisSpendStore(redis_server.url).totals([key])[key] == 2.5


def test_a_journal_is_replayed_only_into_its_own_store(tmp_path: Path) -> None:
    key = ("search", "2025-06")
    refusing = ReplyLost(SqliteSpendStore(tmp_path / "a.sqlite3"), lose=10**9, refuse=True)
    stopped = SpendLedger(refusing, refresh_s=0.05, journal_dir=tmp_path)
    stopped.watch(key, PERIOD_END)
    stopped.start()
    stopped.charge(key, 1.25)
    assert _wait_for(lambda: refusing.lost >= 1)
    stopped.close(timeout_s=2)
    assert len(list(tmp_path.glob("spend-unwritten.*.json"))) == 1
    (tmp_path / "spend-unwritten.broken.json").write_text("{not json")
    (tmp_path / "spend-unwritten.list.json").write_text("[]")  # JSON, but no journal
    (tmp_path / "spend-unwritten.no-end.json").write_text(json.dumps({
        "journal_version": 1, "store": refusing.identity(), "writer": "w",
        "writes": [{"sequence": 1, "expires": {}, "increments": [["search", "2025-06", 1.0]]}]}))
    for name, total, left in (("b.sqlite3", 0.0, 4), ("a.sqlite3", 1.25, 3)):
        ledger = SpendLedger(SqliteSpendStore(tmp_path / name), refresh_s=0.05, journal_dir=tmp_path)
        ledger.watch(key, PERIOD_END)
        ledger.start()
        try:
            assert ledger.wait_first_read(30)
            assert ledger.spent(key) == total  # another store's journal is left for its own store
            ledger.charge(key, 1.0)  # and a malformed one stops nothing: the ledger writes on
            reader = SqliteSpendStore(tmp_path / name)
            assert _wait_for(lambda store=reader, before=total: store.totals([key])[key] == before + 1.0)
            reader.close()
            assert ledger.error is None
        finally:
            ledger.close()
        assert len(list(tmp_path.glob("spend-unwritten.*.json"))) == left  # an unreadable one is never deleted


def test_check_reads_an_existing_store_and_writes_nothing(tmp_path: Path, redis_server: RedisServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.dispatch.dispatch_config import DispatcherConfig

    def config(store: dict) -> DispatcherConfig:
        return DispatcherConfig.model_validate({
            "tiers": {"small": {"base_url": "http://x/v1", "model": "m"}}, "fallback_tier": "small",
            "tenants": {"search": {"api_keys_env": "K", "budget": {"usd": 5}}}, "spend_store": store})

    path = tmp_path / "new" / "spend.sqlite3"
    assert "will be created" in check_tenants_and_store(config({"path": str(path)}))
    assert not path.parent.exists()
    SqliteSpendStore(path).close()
    assert "spend store sqlite" in check_tenants_and_store(config({"path": str(path)}))
    (tmp_path / "junk.sqlite3").write_text("not a database")
    with pytest.raises(SpendStoreError, match="cannot read it"):
        check_tenants_and_store(config({"path": str(tmp_path / "junk.sqlite3")}))
    monkeypatch.setenv("SPEND_REDIS_URL", redis_server.url)
    assert "answers" in check_tenants_and_store(config({"kind": "redis", "url_env": "SPEND_REDIS_URL"}))
    monkeypatch.setenv("SPEND_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(SpendStoreError, match="ConnectionError"):
        check_tenants_and_store(config({"kind": "redis", "url_env": "SPEND_REDIS_URL"}))


def _warnings_after_first_read(store: RedisSpendStore, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The `spend_store_not_persistent` lines a ledger logs once the store first answers."""
    caplog.clear()
    refreshes: list[dict] = []
    ledger = SpendLedger(store, refresh_s=0.01, on_refresh=refreshes.append)
    ledger.watch(("search", "2025-06"), PERIOD_END)
    ledger.start()
    try:
        assert _wait_for(lambda: len(refreshes) >= 5) and ledger.error is None  # asked once, not per read
    finally:
        ledger.close()
    return [record.getMessage() for record in caplog.records if "spend_store_not_persistent" in record.getMessage()]


def test_a_redis_that_forgets_every_total_on_restart_is_said_so_at_check_and_in_the_log(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Budgets kept in a Redis without RDB or AOF reopen, spent, whenever it restarts: the operator is told."""
    import redis

    from serving.dispatch.dispatch_config import DispatcherConfig

    config = DispatcherConfig.model_validate({
        "tiers": {"small": {"base_url": "http://x/v1", "model": "m"}}, "fallback_tier": "small",
        "tenants": {"search": {"api_keys_env": "K", "budget": {"usd": 5}}},
        "spend_store": {"kind": "redis", "url_env": "SPEND_REDIS_URL"}})
    monkeypatch.setenv("SPEND_REDIS_URL", redis_server.url)
    caplog.set_level("WARNING", logger="promptier.dispatcher")
    store = RedisSpendStore(redis_server.url)  # the test server runs with --save "" --appendonly no
    assert "warning: it neither snapshots (RDB) nor logs writes (AOF)" in check_tenants_and_store(config)
    [line] = _warnings_after_first_read(store, caplog)  # once, not once per refresh
    assert json.loads(line)["store"] == store.describe()

    client = redis.Redis.from_url(redis_server.url)
    client.config_set("save", "3600 1")  # snapshots: totals survive a restart
    try:
        assert "warning" not in check_tenants_and_store(config)
        assert _warnings_after_first_read(store, caplog) == []
    finally:
        client.config_set("save", "")  # else its shutdown would write a snapshot into the tests' folder


def test_a_journal_dir_that_cannot_be_written_is_refused_at_check_and_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is written only when a process stops while its store is down: a folder it cannot write
    would be found then, and that spend lost. `--check` judges the folder; the start tries it."""
    from prometheus_client import CollectorRegistry

    from serving.dispatch.dispatch_config import DispatcherConfig
    from serving.dispatch.tenants import Tenants

    monkeypatch.setenv("K", "search-key")

    def config(journal_dir: Path) -> DispatcherConfig:
        return DispatcherConfig.model_validate({
            "tiers": {"small": {"base_url": "http://x/v1", "model": "m"}}, "fallback_tier": "small",
            "tenants": {"search": {"api_keys_env": "K", "budget": {"usd": 5}}},
            "spend_store": {"path": str(tmp_path / "spend.sqlite3"), "journal_dir": str(journal_dir)}})

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for where in (a_file, a_file / "journal"):
        with pytest.raises(SpendStoreError, match=r"journal_dir .*(file, not a folder).*set spend_store\.journal_dir"):
            check_tenants_and_store(config(where))
        with pytest.raises(SpendStoreError, match=r"journal_dir .*a journal cannot be written there"):
            Tenants(config(where), CollectorRegistry())
    # Where no permission bit says so (a superuser's view of /proc): only trying to write finds it.
    with pytest.raises(SpendStoreError, match=r"a journal cannot be written there"):
        Tenants(config(Path("/proc/promptier-journal")), CollectorRegistry())
    fine = tmp_path / "journal"
    assert "will be created" in check_tenants_and_store(config(fine)) and not fine.exists()
    Tenants(config(fine), CollectorRegistry()).close()
    assert fine.is_dir() and not list(fine.iterdir())  # the probe leaves nothing behind
