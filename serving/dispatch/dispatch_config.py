"""The dispatcher's YAML config, validated at start with errors that name the field."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from classifier.artifact import MODES
from classifier.decision_files import OUTCOMES_INFIX
from classifier.errors import PromptierError, validation_problems
from classifier.yaml_files import load_yaml
from serving.common.keys import header_safe
from serving.dispatch.capabilities import Serves
from serving.dispatch.tenant_config import DEFAULT_TENANT, SpendStoreConfig, TenantConfig, check_tenants

# gRPC target schemes: an address with one is passed to gRPC as written, not read as HOST:PORT.
GRPC_TARGET_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:", "passthrough:")


class ConfigError(PromptierError):
    """The dispatcher config is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Upstream(_Strict):
    """An OpenAI-compatible server playing one tier (hosted API, vLLM, llama.cpp server, Ollama)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="the upstream's own model name")
    api_key_env: str | None = Field(default=None, description="env var holding the upstream API key")
    connect_timeout_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    first_byte_timeout_s: float = Field(default=60.0, gt=0, allow_inf_nan=False,
                                        description="time to response headers (for a non-streaming request, "
                                        "usually the whole generation); independent of read_timeout_s")
    read_timeout_s: float = Field(default=120.0, gt=0, allow_inf_nan=False,
                                  description="max gap between body chunks, once the headers have come")
    serves: Serves = Field(default_factory=Serves, description="what the model can take "
                           "(serving.dispatch.capabilities); default: everything, no context limit")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    def api_key(self) -> str | None:
        """The upstream key, without the line end a key read from a secret file usually carries (sent as
        it is, it made every request to the tier fail before it left: no header may hold one)."""
        return os.environ.get(self.api_key_env, "").strip() if self.api_key_env else None


class ClassifierEndpoint(_Strict):
    """The gRPC service (default), or the runtime embedded in the dispatcher (`embedded: true`)."""

    address: str = "127.0.0.1:50051"
    timeout_ms: float = Field(default=20.0, gt=0, le=60_000, description="deadline of one classification")
    embedded: bool = Field(default=False, description="run the model inside the dispatcher: no network hop")
    model: Path | None = Field(default=None, description="embedded only: artifact directory (default: shipped)")
    threads: int = Field(default=1, ge=1, description="embedded only: ONNX Runtime threads")
    coalesce: bool = Field(default=True, description="gRPC only: concurrent requests share ClassifyBatch calls "
                           "while earlier calls are in flight (no wait window; changes nothing at low load)")
    connections: int = Field(default=2, ge=1, le=64, description="gRPC only: HTTP/2 connections to the service "
                             "(one per `promptier serve --workers` process spreads the load over all of them)")

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        # gRPC takes `http://host:port` or a bare host (port 443) without complaint and never connects: every
        # request would fall back while `--check` said OK. gRPC's own schemes (unix:, dns:, ...) pass as given.
        if value.startswith(GRPC_TARGET_SCHEMES):
            return value
        host, _, port = value.rpartition(":")
        if "/" in value or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address is the gRPC service's HOST:PORT (e.g. 127.0.0.1:50051, no http://), "
                             f"got {value!r}")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):  # gRPC reads `::1:50051` otherwise
            raise ValueError(f"address: an IPv6 host is written in brackets, as [::1]:50051; got {value!r}")
        return value

    @model_validator(mode="after")
    def _embedded_fields(self) -> ClassifierEndpoint:
        if not self.embedded and (self.model is not None or self.threads != 1):
            raise ValueError("model and threads apply only with embedded: true (the gRPC service loads its own)")
        if self.embedded and {"coalesce", "connections"} & self.model_fields_set:
            raise ValueError("coalesce and connections apply only to the gRPC service, not with embedded: true")
        return self


class DecisionLogConfig(_Strict):
    path: Path = Path("decisions.jsonl")
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    backups: int = Field(default=5, ge=0)
    store_prompts: bool = Field(default=False, description="write prompt text into the log")
    max_text_chars: int = Field(default=32768, ge=1024, description="with store_prompts, the most characters a "
                                "line keeps of the prompt (and, shared, of a conversation's messages): a longer "
                                "text keeps its head and its tail, where the classifier reads (the shipped model: "
                                "its first 512 and last 384 characters), so that one caller's huge prompts neither "
                                "rotate everyone's lines out of the log nor fill the savings page's window")

    @field_validator("path")
    @classmethod
    def _jsonl(cls, path: Path) -> Path:
        # `promptier train`, `label` and `budget-sim` read a log by its extension, and the outcome files
        # beside it are named after it (`decisions.outcomes.<tenant>.jsonl`): a log named otherwise would
        # be written all the same, and its requests and reported outcomes never train.
        if path.suffix != ".jsonl":
            raise ValueError(f"must name a .jsonl file (the log is JSON lines, and promptier train reads "
                             f"logs by their extension), not {path.name!r}")
        if OUTCOMES_INFIX in path.name:
            raise ValueError(f"{path.name!r} reads as an outcome file (its name holds {OUTCOMES_INFIX!r}): training "
                             "would never look for this log's own outcome files; name it otherwise")
        return path


class SavingsPageConfig(_Strict):
    """The savings page (GET /promptier/savings), drawn from the decision log (serving.dispatch.savings_page)."""

    enabled: bool = True
    max_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, description="the newest this many bytes of "
                           "the decision log and its backups are read (~4,700 requests at 890 bytes a line); "
                           "reading costs up to a second of one core per 4-16 MB (serving/README.md)")
    operator_keys_env: str | None = Field(default=None, description="environment variable of comma-separated "
                                          "keys that see every tenant's figures; a tenant's own key sees only "
                                          "its own; these keys are accepted by the savings page and, once "
                                          "set, /metrics alone (its labels carry every tenant's spend)")


class InboundConfig(_Strict):
    """Limits on callers' connections, so that slow or idle clients cannot hold the dispatcher's sockets
    (and file descriptors) until real requests fail. Read by each worker process when it starts (so a
    SIGHUP applies them too)."""

    header_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False,
                                    description="a request's headers must have come in full within this of its "
                                    "first byte (of the connection, for the first request); otherwise 408 and "
                                    "the connection is closed")
    body_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                  description="a request's body must have come in full within this of its "
                                  "headers; otherwise 408 and the connection is closed")
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="an idle keep-alive connection is closed "
                                      "after this")
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="a request's line and headers may take "
                                  "this many bytes; more is answered 431 and the connection closed (the HTTP "
                                  "parser sets no bound of its own, and a caller could send hundreds of MB "
                                  "within header_timeout_s)")
    max_connections: int | None = Field(default=None, ge=1, description="open caller connections per worker "
                                        "process; one more is answered 503 and closed at once. Default: half "
                                        "of the open-file limit less 64 (each caller connection may need an "
                                        "upstream one)")
    max_connections_per_client: int | None = Field(
        default=None, ge=1, description="open connections one client address may hold per worker process; one "
        "more from it is answered 503 and closed, while other clients still connect. Off by default: behind a "
        "load balancer or a gateway every caller arrives from its few addresses")


class DispatcherConfig(_Strict):
    """Tiers are listed cheapest first; their names must be the classifier's tier names."""

    classifier: ClassifierEndpoint = Field(default_factory=ClassifierEndpoint)
    tiers: dict[str, Upstream] = Field(min_length=1)
    default_mode: str = "balanced"
    fallback_tier: str = Field(description="tier used when the classifier is down or too slow")
    exploration_share: float = Field(default=0.0, ge=0.0, le=0.5, description="share of classified requests "
                                     "answered by a tier drawn at random, for unbiased outcome feedback "
                                     "(serving/dispatch/exploration.py); off by default: it costs quality or money")
    no_text_tier: str | None = Field(default=None, description="tier for a request with no user text to classify "
                                     "(an image alone, an empty turn); default: the cheapest tier that can serve "
                                     "it. A tier set here that cannot serve it gives way to the nearest that can")
    inbound_api_keys_env: str | None = Field(default=None, description="env var: comma-separated accepted keys")
    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    allowed_hosts: list[str] = Field(default_factory=list, description="without inbound keys, the Host names "
                                     "accepted besides localhost and IP addresses (a browser page on another "
                                     "name must not reach the dispatcher through DNS rebinding); '*' accepts "
                                     "any. Not checked when inbound keys are configured")
    inbound: InboundConfig = Field(default_factory=InboundConfig)
    decision_log: DecisionLogConfig = Field(default_factory=DecisionLogConfig)
    savings_page: SavingsPageConfig = Field(default_factory=SavingsPageConfig)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="teams by API key, each with "
                                             "its own policy and budget (serving/README.md: Tenants)")
    spend_store: SpendStoreConfig = Field(default_factory=SpendStoreConfig, description="where tenants' spend "
                                          "is kept (used when a tenant has a budget)")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(char in name for char in ":/ "):
                raise ValueError(f"allowed_hosts entries are host names without scheme or port, got {name!r}")
        return [name.lower().rstrip(".") if name != "*" else name for name in value]

    @model_validator(mode="after")
    def _consistent(self) -> DispatcherConfig:
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode {self.default_mode!r} is not one of {MODES}")
        if self.fallback_tier not in self.tiers:
            raise ValueError(f"fallback_tier {self.fallback_tier!r} is not a configured tier {list(self.tiers)}")
        if self.no_text_tier is not None and self.no_text_tier not in self.tiers:
            raise ValueError(f"no_text_tier {self.no_text_tier!r} is not a configured tier {list(self.tiers)}")
        check_tenants(self.tenants, self.tier_names, self.inbound_api_keys_env)
        return self

    @property
    def tier_names(self) -> list[str]:
        return list(self.tiers)

    @property
    def fingerprint(self) -> str:
        """A short hash of the settings (not of the file's layout or comments; the config holds no
        secrets, only the names of the variables that do): `/health` shows the one being served, so
        that after a SIGHUP it says whether the edit is live."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def inbound_keys(self) -> set[str] | None:
        if not self.inbound_api_keys_env:
            return None
        return _keys_from_env(self.inbound_api_keys_env, "inbound_api_keys_env")

    def tenant_of_key(self) -> dict[str, str] | None:
        """Each accepted API key -> its tenant's name; None when no key is configured (then every request
        is the tenant `default`'s). Keys come from the environment and never appear in an error.

        Raises:
            ConfigError: a tenant's variable is unset or empty, or one key is given to two tenants.
        """
        owners: dict[str, str] = dict.fromkeys(self.inbound_keys() or (), DEFAULT_TENANT)
        for name, tenant in self.tenants.items():
            if tenant.api_keys_env is None:
                continue
            for key in _keys_from_env(tenant.api_keys_env, f"tenants.{name}.api_keys_env"):
                if owners.setdefault(key, name) != name:
                    raise ConfigError(f"tenants.{name}: one of its keys is also a key of the tenant "
                                      f"{owners[key]!r}; a key must belong to one tenant")
        return owners if owners else None

    def operator_keys(self) -> set[str] | None:
        """The savings page's operator keys (they see every tenant's figures); None when none is configured.

        Raises:
            ConfigError: the variable is unset or empty, or one of its keys is also a tenant's key (a key
                handed to a team would show that team every other team's spend).
        """
        name = self.savings_page.operator_keys_env
        if name is None:
            return None
        keys = _keys_from_env(name, "savings_page.operator_keys_env")
        owners = self.tenant_of_key() or {}
        for key in keys:
            if key in owners:
                raise ConfigError(f"savings_page.operator_keys_env: one of its keys is also a key of the tenant "
                                  f"{owners[key]!r}; an operator key must be a key of its own")
        return keys


def _keys_from_env(variable: str, field: str) -> set[str]:
    """The comma-separated keys in environment variable `variable`, which config `field` names.

    Raises:
        ConfigError: the variable is unset or holds no key, or a key has a character no header can carry
            (the error names the field, never a key).
    """
    keys = {key.strip() for key in os.environ.get(variable, "").split(",") if key.strip()}
    if not keys:
        raise ConfigError(f"{field} names {variable}, which holds no keys")
    if not all(header_safe(key) for key in keys):
        raise ConfigError(f"{field}: a key in {variable} has a character other than printable ASCII, which no "
                          "client can send in an Authorization header: that key could never be used")
    return keys


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def read_config(path: Path, schema: type[SchemaT]) -> SchemaT:
    """Read a YAML file and validate it against `schema`. Raises ConfigError naming the file and field."""
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {'; '.join(validation_problems(exc))}") from exc


def load_dispatcher_config(path: Path) -> DispatcherConfig:
    """Read and validate the config. Raises ConfigError naming the file and field."""
    config = read_config(path, DispatcherConfig)
    for name, upstream in config.tiers.items():
        if upstream.api_key_env and upstream.api_key_env not in os.environ:
            raise ConfigError(f"{path}: tiers.{name}.api_key_env: environment variable {upstream.api_key_env} "
                              "is not set")
        key = upstream.api_key()
        if key is not None and (not key or not key.isprintable()):  # the key itself is never shown
            raise ConfigError(f"{path}: tiers.{name}.api_key_env: environment variable {upstream.api_key_env} "
                              "holds an empty key, or one with a line break or another control character")
    store = config.spend_store
    if store.kind == "redis" and store.url_env not in os.environ:
        raise ConfigError(f"{path}: spend_store.url_env: environment variable {store.url_env} is not set")
    try:
        config.tenant_of_key()
        config.operator_keys()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config
