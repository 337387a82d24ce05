"""The `tenants:` and `spend_store:` sections of the dispatcher config (validated with the rest of it).

A tenant is a team behind one or more API keys: its own default mode, the tiers it may use, and an
optional budget per calendar period (UTC) that pacing meets by routing (serving.dispatch.budget_pacing).
Keys are never in the file: each tenant names an environment variable that holds them, comma-separated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from classifier.artifact import MODES
from serving.dispatch.budget_pacing import BudgetRule, OnExhausted, Period

DEFAULT_TENANT = "default"
# Tenant names become Prometheus label values and Redis key parts: short, plain, and from the config
# only (so the label set is bounded by the file, never by what callers send).
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The name the savings page gives its total over every tenant (serving.dispatch.savings): no tenant's.
ALL_TENANTS = "all"


class _Strict(BaseModel):
    # No inf or nan: an infinite budget would pace nothing and print as "$inf".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BudgetConfig(_Strict):
    """Spend allowed per calendar period, met by routing toward cheaper tiers as spend runs ahead."""

    # `pacing: "yes"` or `usd: "500"` is a mistake to name, not to coerce (as `serves:` does). Merged
    # with _Strict's settings, which still apply.
    model_config = ConfigDict(strict=True)

    usd: float = Field(gt=0, description="the budget of one period, in USD")
    period: Period = Field(default="month", description="day or month, calendar-aligned in UTC")
    on_exhausted: OnExhausted = Field(default="cheapest", description="once the period's spend reaches the "
                                      "budget: serve the cheapest allowed tier, or reject with HTTP 429")
    pacing: bool = Field(default=True, description="move routing toward cheaper tiers as spend runs ahead of "
                         "the budget; false: route normally until the budget is spent (a hard cap)")
    max_quality_loss: float = Field(default=0.5, gt=0, le=1, description="the quality floor: the most "
                                    "probability of a good answer pacing may give up on one request")
    pacing_band: float = Field(default=0.1, gt=0, le=1, description="pressure is full once the remaining budget "
                               "allows only (1 - pacing_band) of the even spend rate")

    def rule(self) -> BudgetRule:
        return BudgetRule(usd=self.usd, pacing=self.pacing, band=self.pacing_band,
                          max_quality_loss=self.max_quality_loss, on_exhausted=self.on_exhausted)


class TenantConfig(_Strict):
    """One team: its keys (by environment variable), policy and budget."""

    api_keys_env: str | None = Field(default=None, description="env var: this tenant's keys, comma-separated "
                                     "(the tenant named default takes inbound_api_keys_env's instead)")
    default_mode: str | None = Field(default=None, description="mode of `promptier` requests (default: the "
                                     "dispatcher's default_mode)")
    allowed_tiers: list[str] | None = Field(default=None, min_length=1, description="tiers it may be routed, "
                                            "pinned or escalated to (default: all)")
    budget: BudgetConfig | None = None

    @field_validator("default_mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        if value is not None and value not in MODES:
            raise ValueError(f"default_mode {value!r} is not one of {MODES}")
        return value

    @field_validator("allowed_tiers")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"allowed_tiers lists a tier twice: {value}")
        return value


class SpendStoreConfig(_Strict):
    """Where tenants' spend is kept, shared by every dispatcher process that uses the same store.

    `sqlite` (default): a file that the processes of one host share. `redis`: a server that several
    hosts share, its URL read from the environment (it may hold a password).
    """

    kind: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = Field(default=None, description="sqlite only: the database file (default spend.sqlite3)")
    url_env: str | None = Field(default=None, description="redis only: env var holding the URL, "
                                "e.g. redis://:password@host:6379/0")
    key_prefix: str = Field(default="promptier", min_length=1, description="redis only: prefix of the keys")
    refresh_ms: float = Field(default=250.0, ge=10, le=60_000, description="a process reads the other "
                              "processes' spend at most this long after they wrote it")
    journal_dir: Path | None = Field(default=None, description="where a process that stops while the store "
                                     "is down keeps the spend it could not write, for the next process on "
                                     "the same store to write (default: the SQLite file's directory; for "
                                     "Redis, the directory the dispatcher runs in)")

    def journal_directory(self) -> Path:
        """`journal_dir`, or its default."""
        if self.journal_dir is not None:
            return self.journal_dir
        return self.path.parent if self.path is not None else Path(".")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> SpendStoreConfig:
        if self.kind == "sqlite":
            if self.url_env is not None or "key_prefix" in self.model_fields_set:
                raise ValueError("url_env and key_prefix apply only with kind: redis")
            if self.path is None:
                self.path = Path("spend.sqlite3")
        else:
            if self.path is not None:
                raise ValueError("path applies only with kind: sqlite")
            if not self.url_env:
                raise ValueError("kind: redis needs url_env, the environment variable that holds the server's URL")
        return self


def check_tenants(tenants: dict[str, TenantConfig], tiers: list[str], inbound_api_keys_env: str | None) -> None:
    """What the config as a whole must satisfy: names fit to be labels, tiers that exist, keys for each.

    Raises:
        ValueError: naming the tenant and field.
    """
    for name, tenant in tenants.items():
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenants.{name}: a tenant name is 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
        if name == ALL_TENANTS:
            raise ValueError(f"tenants.{name}: the name is taken by the savings page's total of every tenant")
        unknown = [tier for tier in tenant.allowed_tiers or [] if tier not in tiers]
        if unknown:
            raise ValueError(f"tenants.{name}.allowed_tiers: {unknown} are not configured tiers {tiers}")
        if name == DEFAULT_TENANT:
            if tenant.api_keys_env is not None:
                raise ValueError(f"tenants.{DEFAULT_TENANT}: its keys are inbound_api_keys_env's; it takes no "
                                 "api_keys_env")
        elif not tenant.api_keys_env:
            raise ValueError(f"tenants.{name}: api_keys_env is required (the environment variable holding its keys)")
        elif tenant.api_keys_env == inbound_api_keys_env:
            raise ValueError(f"tenants.{name}.api_keys_env: {tenant.api_keys_env} is inbound_api_keys_env, whose "
                             f"keys belong to the tenant {DEFAULT_TENANT!r}")
    envs = [tenant.api_keys_env for tenant in tenants.values() if tenant.api_keys_env]
    shared = sorted({env for env in envs if envs.count(env) > 1})
    if shared:
        raise ValueError(f"tenants: {shared} named by more than one tenant (a key belongs to one tenant)")
