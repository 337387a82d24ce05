"""Tenants at request time: who is calling (by API key), which policy applies, and what its budget allows.

The dispatcher calls `Tenants.authenticate` for each request, `Tenants.apply_budget` once the policy
has chosen a tier, and `Tenants.charge` with the request's cost once the answer is in. Everything on
the request path is in-process (a dict lookup, the pacing arithmetic, a cached spend); the spend store
is read and written by `SpendLedger`'s thread. Config: serving.dispatch.tenant_config; pacing:
serving.dispatch.budget_pacing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge

from serving.common.keys import bearer_token
from serving.dispatch.budget_pacing import EXHAUSTED, PACED, BudgetDecision, BudgetRule, Period, WindowClock, decide
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig
from serving.dispatch.spend_store import RedisSpendStore, SpendLedger, SpendStore, SpendStoreError, SqliteSpendStore
from serving.dispatch.tenant_config import DEFAULT_TENANT, SpendStoreConfig, TenantConfig

log = logging.getLogger("promptier.dispatcher")
# How long a starting process waits for its first read of the tenants' spend before it serves.
FIRST_READ_S = 5.0
# Every period a budgeted tenant's spend is written under, whichever its budget is: a reload that changes
# the period then reads a total that already holds the spend charged under the old one.
PERIODS: tuple[Period, ...] = get_args(Period)


@dataclass
class Tenant:
    name: str
    mode: str
    allowed: tuple[int, ...]  # indices of the tiers it may use, cheapest first
    allowed_names: tuple[str, ...] | None  # the same by name; None when every tier is allowed
    fallback_tier: str  # where its requests go when the classifier cannot answer
    budget: BudgetRule | None = None
    clock: WindowClock | None = None
    spend_clocks: tuple[WindowClock, ...] = ()  # one per period in PERIODS, when it has a budget
    shown_pressure: float = field(default=-1.0)  # last value put in the pressure gauge

    def may_use(self, tier: str) -> bool:
        return self.allowed_names is None or tier in self.allowed_names


def bearer_key(authorization: str) -> str:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case, as RFC 9110 has it;
    the whole header when it names no scheme)."""
    token = bearer_token(authorization)
    return token if token is not None else authorization.strip()


def key_digest(key: str) -> bytes:
    """What keys are looked up by: their SHA-256. A lookup by the key itself would take longer the more
    of a real key a guess matched; by its digest, the time says nothing about the key."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class TenantMetrics:
    """Per-tenant series. Tenant label values come from the config only (a bounded set); a request
    with an unknown key is refused before it has a tenant, so it labels nothing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("promptier_dispatch_tenant_requests", "requests by tenant and the tier that "
                                "answered (none: no upstream answered)", ["tenant", "tier"], registry=registry)
        self.spend = Counter("promptier_dispatch_tenant_spend_usd", "measured spend (upstream usage x tier "
                             "prices) by tenant", ["tenant"], registry=registry)
        self.moves = Counter("promptier_dispatch_tenant_budget_moves", "requests the budget moved to a cheaper "
                             "tier, by cause (paced | budget_exhausted)", ["tenant", "cause"], registry=registry)
        self.refusals = Counter("promptier_dispatch_tenant_budget_refusals", "requests refused with 429: budget "
                                "exhausted", ["tenant"], registry=registry)
        # livemax: with --workers, the largest of the live processes' views (spend only grows in a period).
        self.pressure = Gauge("promptier_dispatch_tenant_budget_pressure", "budget pressure in [0, 1] at the "
                              "tenant's last request", ["tenant"], registry=registry, multiprocess_mode="livemax")
        self.period_spend = Gauge("promptier_dispatch_tenant_period_spend_usd", "spend of the current period, "
                                  "all processes, as last read from the spend store", ["tenant"],
                                  registry=registry, multiprocess_mode="livemax")
        self.budget = Gauge("promptier_dispatch_tenant_budget_usd", "budget of one period", ["tenant"],
                            registry=registry, multiprocess_mode="livemax")
        self.store_errors = Counter("promptier_dispatch_spend_store_errors", "spend store operations that failed",
                                    ["operation"], registry=registry)


def open_store(config: SpendStoreConfig) -> SpendStore:
    """The configured store. Raises ConfigError when the Redis URL's variable is unset, and
    SpendStoreError when a SQLite file cannot be opened (a Redis server is only reached when used)."""
    if config.kind == "sqlite":
        assert config.path is not None  # the config's validator fills it in
        return SqliteSpendStore(Path(config.path))
    assert config.url_env is not None
    url = os.environ.get(config.url_env)
    if not url:
        raise ConfigError(f"spend_store.url_env: environment variable {config.url_env} is not set")
    return RedisSpendStore(url, config.key_prefix)


def _check_creatable(path: Path, what: str) -> None:
    """Raise SpendStoreError unless `path` could be created: its nearest existing parent is a writable folder."""
    folder = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise SpendStoreError(f"{what}: cannot be created: {folder} is a file, not a folder")
    if folder is None or not os.access(folder, os.W_OK):
        raise SpendStoreError(f"{what}: cannot be created: {folder} is not writable")


def check_journal_dir(directory: Path, probe: bool = False) -> None:
    """Raise SpendStoreError unless a journal can be written in `directory` (or it can be created).

    The journal is written only when a process stops while the store is down: a folder it cannot write to
    would otherwise be found then, and that spend lost, however long the dispatcher had run. (Redis's
    default is the folder the dispatcher runs in, which under a service manager is often `/`.) `probe`:
    create the folder and a file in it (at start), rather than judge by permissions (`--check`, which
    writes nothing, and cannot see a read-only file system or what a superuser may not write).
    """
    what = f"spend_store.journal_dir {directory}"
    hint = " (set spend_store.journal_dir to a folder the dispatcher may write)"
    if probe:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".promptier-probe-"):
                pass
        except OSError as error:
            raise SpendStoreError(f"{what}: a journal cannot be written there ({type(error).__name__}: "
                                  f"{error.strerror or error}){hint}") from None
        return
    if directory.exists():
        if not directory.is_dir():
            raise SpendStoreError(f"{what}: is a file, not a folder{hint}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SpendStoreError(f"{what}: is not writable{hint}")
        return
    try:
        _check_creatable(directory, what)
    except SpendStoreError as error:
        raise SpendStoreError(f"{error}{hint}") from None


def check_tenants_and_store(config: DispatcherConfig) -> str:
    """What `promptier dispatch --check` says of the tenants, after reaching the spend store they need.

    Raises:
        PromptierError: the store cannot be opened, or (Redis) does not answer.
    """
    if not config.tenants:
        return "no tenants configured (every request is the default tenant's)"
    described = []
    for name, tenant in config.tenants.items():
        budget = tenant.budget
        spend = (f"${budget.usd:g} per {budget.period}, {'paced' if budget.pacing else 'hard cap'}, then "
                 f"{budget.on_exhausted}" if budget else "no budget")
        described.append(f"{name} ({spend})")
    summary = f"tenants: {', '.join(described)}"
    if not any(tenant.budget for tenant in config.tenants.values()):
        return summary
    settings = config.spend_store
    check_journal_dir(settings.journal_directory())
    if settings.kind == "sqlite":  # a check writes nothing: the file is read if it is there, else its folder checked
        assert settings.path is not None
        path = Path(settings.path)
        if path.exists():
            SqliteSpendStore.read_only(path).close()
            return f"{summary}; spend store sqlite {path} reads"
        _check_creatable(path, f"spend store {path}")
        return f"{summary}; spend store sqlite {path} will be created"
    store = open_store(settings)
    try:
        assert isinstance(store, RedisSpendStore)
        store.ping()
        forgets = store.forgets_on_restart()
        warning = f" (warning: {forgets})" if forgets else ""
        return f"{summary}; spend store {store.describe()} answers{warning}"
    finally:
        store.close()


def _tenant(name: str, settings: TenantConfig, config: DispatcherConfig) -> Tenant:
    tiers = config.tier_names
    names = settings.allowed_tiers
    allowed = tuple(sorted(tiers.index(tier) for tier in names)) if names else tuple(range(len(tiers)))
    # The configured fallback when the tenant may use it; else its most capable tier.
    fallback = config.fallback_tier if names is None or config.fallback_tier in names else tiers[allowed[-1]]
    budget = settings.budget
    spend_clocks = tuple(WindowClock(period) for period in PERIODS) if budget else ()
    return Tenant(name=name, mode=settings.default_mode or config.default_mode, allowed=allowed,
                  allowed_names=tuple(tiers[index] for index in allowed) if names else None, fallback_tier=fallback,
                  budget=budget.rule() if budget else None, spend_clocks=spend_clocks,
                  # Its budget's period is one of the periods spend is written under: the same clock.
                  clock=next(clock for clock in spend_clocks if clock.period == budget.period) if budget else None)


class Tenants:
    """The config's tenants, their keys, and (when a tenant has a budget) the spend ledger."""

    def __init__(self, config: DispatcherConfig, registry: CollectorRegistry) -> None:
        self.tiers = config.tier_names
        self.by_name = {name: _tenant(name, settings, config) for name, settings in config.tenants.items()}
        if DEFAULT_TENANT not in self.by_name:
            self.by_name[DEFAULT_TENANT] = _tenant(DEFAULT_TENANT, TenantConfig(), config)
        owners = config.tenant_of_key()
        self.open = owners is None  # no key configured: every request is the default tenant's
        self._by_key = {key_digest(key): self.by_name[name] for key, name in (owners or {}).items()}
        self.default = self.by_name[DEFAULT_TENANT]
        self.metrics = TenantMetrics(registry)
        self._counters: dict[tuple[str, str | None], tuple[Counter, Counter]] = {}
        self.prices: list[tuple[float, float]] = []  # the tiers' (input, output) USD per Mtok, once known
        self.ledger: SpendLedger | None = None
        budgeted = [tenant for tenant in self.by_name.values() if tenant.budget is not None]
        if budgeted:
            check_journal_dir(config.spend_store.journal_directory(), probe=True)
            self.ledger = SpendLedger(open_store(config.spend_store), config.spend_store.refresh_ms / 1000,
                                      on_refresh=self._show_spend,
                                      on_error=lambda operation: self.metrics.store_errors.labels(operation).inc(),
                                      journal_dir=config.spend_store.journal_directory())
            for tenant in budgeted:
                assert tenant.budget is not None
                self.metrics.budget.labels(tenant.name).set(tenant.budget.usd)

    def authenticate(self, authorization: str) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <key>` header; None for a missing or unknown key."""
        if self.open:
            return self.default
        return self._by_key.get(key_digest(bearer_key(authorization)))

    def start(self) -> None:
        if self.ledger is not None:
            now = time.time()
            for tenant in self.by_name.values():
                if tenant.clock is not None:
                    window = tenant.clock.at(now)
                    self.ledger.watch((tenant.name, window.key), window.end)
            self.ledger.start()

    def wait_for_spend(self, timeout_s: float = FIRST_READ_S) -> None:
        """Block until the ledger has read the budgeted tenants' spend (or the store failed, or `timeout_s`
        passed): a process that served before that read would see every budget unspent, and let a tenant
        whose budget is spent through until it lands."""
        if self.ledger is not None and not self.ledger.wait_first_read(timeout_s):
            log.warning(json.dumps({"event": "spend_store_unread", "store": self.ledger.store.describe(),
                                    "detail": self.ledger.error or f"no answer within {timeout_s:g} s",
                                    "action": "serving; budgets count this process's spend until a read succeeds"}))

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def set_prices(self, prices: dict[str, tuple[float, float]]) -> None:
        """Tier prices (USD per Mtok in, out), from the classifier: what pacing weighs tiers by."""
        if all(tier in prices for tier in self.tiers):
            self.prices = [prices[tier] for tier in self.tiers]

    def apply_budget(self, tenant: Tenant, tier: str, probabilities: dict[str, float] | None,
                     prompt_tokens: float, allowed: tuple[int, ...] | None = None) -> BudgetDecision | None:
        """What the tenant's budget makes of the policy's `tier` (None: the tenant has no budget).

        `probabilities`: the classifier's per-tier probabilities when its model decided, else None (a
        request not scored is not paced, only stopped once the budget is spent). `prompt_tokens`: an
        estimate, which pacing sizes the request's saving by. `allowed`: the tiers it may move to
        (default: the tenant's; the dispatcher leaves out those that cannot serve the request).
        """
        if tenant.budget is None or tenant.clock is None or self.ledger is None:
            return None
        now = time.time()
        window = tenant.clock.at(now)
        key = (tenant.name, window.key)
        self.ledger.watch(key, window.end)
        scores = None
        if probabilities is not None and self.prices:
            scores = [probabilities.get(name, 0.0) for name in self.tiers]
        decision = decide(tenant.budget, self.ledger.spent(key), window.elapsed(now), self.tiers.index(tier), scores,
                          allowed or tenant.allowed, self.prices, prompt_tokens)
        if decision.reject:
            self.metrics.refusals.labels(tenant.name).inc()
        elif decision.reason in (PACED, EXHAUSTED):
            self.metrics.moves.labels(tenant.name, decision.reason).inc()
        if abs(decision.pressure - tenant.shown_pressure) >= 0.001:
            tenant.shown_pressure = decision.pressure
            self.metrics.pressure.labels(tenant.name).set(decision.pressure)
        return decision

    def seconds_left(self, tenant: Tenant) -> int:
        """Seconds until the tenant's budget period ends (a refused caller's Retry-After), rounded up: a
        caller that retries on time must find the new period open."""
        if tenant.clock is None:
            return 0
        now = time.time()
        return max(1, math.ceil(tenant.clock.at(now).end - now))

    def charge(self, tenant: Tenant, tier: str | None, usd: float | None) -> None:
        """Count an answered request, and its cost against the tenant's budget."""
        counters = self._counters.get((tenant.name, tier))
        if counters is None:  # labels() takes a lock and builds a key: once per tenant and tier, not per request
            counters = self._counters[(tenant.name, tier)] = (
                self.metrics.requests.labels(tenant.name, tier or "none"), self.metrics.spend.labels(tenant.name))
        counters[0].inc()
        if usd is not None:
            self.add_spend(tenant, usd, counters[1])

    def add_spend(self, tenant: Tenant, usd: float, counter: Counter | None = None) -> None:
        """Charge `usd` to the tenant's spend (and its budget's period), without counting a request."""
        if usd <= 0.0:
            return
        (counter or self.metrics.spend.labels(tenant.name)).inc(usd)
        if tenant.clock is not None and self.ledger is not None:
            now = time.time()
            for clock in tenant.spend_clocks:  # its budget's period among them
                window = clock.at(now)
                self.ledger.charge((tenant.name, window.key), usd, wake=False, period_end=window.end)
            try:
                # The write starts once the event loop is free again: after the response has been written
                # (a non-streaming request is charged just before), not while it is.
                asyncio.get_running_loop().call_soon(self.ledger.wake)
            except RuntimeError:  # no event loop (a tool, a test): now
                self.ledger.wake()

    def top_tiers(self) -> dict[str, str]:
        """The most capable tier of each tenant that may not use the last one, by tenant name."""
        return {tenant.name: tenant.allowed_names[-1] for tenant in self.by_name.values()
                if tenant.allowed_names and tenant.allowed_names[-1] != self.tiers[-1]}

    def health(self) -> dict[str, object]:
        """The spend store's state, for /health (nothing when no tenant has a budget)."""
        if self.ledger is None:
            return {}
        state = "ok" if self.ledger.error is None else f"failing ({self.ledger.error}); spend is kept in process"
        return {"spend_store": self.ledger.store.describe(), "spend_store_state": state,
                "tenants_with_budgets": sorted(t.name for t in self.by_name.values() if t.budget is not None)}

    def _show_spend(self, totals: dict[tuple[str, str], float]) -> None:
        for (tenant, _), usd in totals.items():
            self.metrics.period_spend.labels(tenant).set(usd)
