"""Promptier inside a LiteLLM proxy: chat requests for the router's model name are classified and sent to
the model group their tier maps to.

In the LiteLLM config::

    router_settings:
      # Lists the name in /v1/models, and is where it goes if this hook is absent: a model group (a
      # model_name of model_list: the medium tier's in promptier-litellm.example.yaml), not a tier.
      model_group_alias: {promptier: gpt-4o-mini}
    litellm_settings:
      callbacks: ["serving.litellm_router.hook"]   # built from the file named by PROMPTIER_LITELLM_CONFIG

It routes in LiteLLM's proxy only: the SDK's `litellm.Router` never calls `async_pre_call_hook`, so a
request made through it for the router model goes, unrouted, where `model_group_alias` sends it.

The hook is a `CustomLogger` whose `async_pre_call_hook` rewrites the request's `model` before the
proxy hands it to its Router, as LiteLLM's own sensitive-data routing does. Of LiteLLM 1.110's
extension points this is the one that can move a request to another model group with this project's
guarantees:

- `CustomLogger.async_pre_routing_hook` is never called for callbacks: the Router asks only the
  strategies it registered from `auto_router/...` deployments.
- A custom routing strategy picks a deployment within the model group already chosen, and is set
  from Python (`Router.set_custom_routing_strategy`), not from the proxy's config.
- The complexity router's `classifier_type: custom` plugin returns a tier name, but it never sees the
  tier map: it cannot check at start that the model's tiers are the ones mapped (a mismatch would
  only show as fallbacks), it cannot add response headers, and LiteLLM meters routers with tier names
  of their own as a licensed feature (one per proxy without a license).

The hook runs after authentication, on the proxy's event loop, before the Router resolves the model
name, so LiteLLM's retries, fallbacks and load balancing apply within the chosen group; a companion
`async_post_call_response_headers_hook` puts the decision in `x-promptier-*` response headers.
LiteLLM is imported by this module only: nothing else in Promptier imports it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import classifier
from classifier.artifact import MODES
from classifier.conversation import content_text
from classifier.errors import ArtifactError, InvalidInputError
from serving.common.batcher import BatcherMetrics
from serving.dispatch.dispatch_config import ClassifierEndpoint, ConfigError, read_config
from serving.dispatch.route_classifier import ClassifierUnavailable, EmbeddedRouteClassifier, GrpcRouteClassifier

# LiteLLM resolves the callback `serving.litellm_router.hook` by file path when its config's folder holds
# `serving/litellm_router.py` (the Promptier checkout's root, where the README runs the proxy): that runs
# this file a second time, as a module Python's import system does not know, whose pydantic models cannot
# resolve their postponed annotations. Such a copy imports the real module first (its models then resolve
# against it) and hands out the real module's objects (`__getattr__`): one hook, one classifier per process.
_MODULE = "serving.litellm_router"
_PATH_LOADED_COPY = getattr(sys.modules.get(_MODULE), "__dict__", None) is not globals()
if _PATH_LOADED_COPY:
    importlib.import_module(_MODULE)

try:
    from fastapi import HTTPException
    from litellm.integrations.custom_logger import CustomLogger
    from litellm.litellm_core_utils.core_helpers import get_metadata_variable_name_from_kwargs
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("serving.litellm_router needs LiteLLM: pip install 'promptier[litellm]'") from error

log = logging.getLogger("promptier.litellm")
CONFIG_ENV = "PROMPTIER_LITELLM_CONFIG"
MODE_KEY = "promptier_mode"  # in the request's `metadata`: this request's routing mode
RECORD_KEY = "promptier"  # in LiteLLM's metadata bucket: the decision, for headers and LiteLLM's loggers
# Where LiteLLM keeps its metadata: `metadata` on /chat/completions; `litellm_metadata` on /v1/responses,
# /v1/messages, batches and files, whose `metadata` is the caller's own, for the provider.
METADATA_BUCKETS = ("metadata", "litellm_metadata")
HEADER_PREFIX = "x-promptier-"
# LiteLLM's own metadata field for what its spend logs keep: they, and every logger that reads the
# StandardLoggingPayload (Langfuse, OpenTelemetry, S3, ...), drop metadata keys LiteLLM does not know.
SPEND_LOGS_KEY = "spend_logs_metadata"
# The proxy's call types for /chat/completions; other endpoints carry no chat messages to classify.
CHAT_CALL_TYPES = frozenset({"acompletion", "completion"})
# The default deadline of one classification: LiteLLM's event loop, busy with its own per-request work,
# takes up the answer later than the dispatcher's (serving/README.md, "Speed").
TIMEOUT_MS = 50.0


def _name_problem(name: str) -> str | None:
    """What is wrong with `name` as a LiteLLM model name, or None. LiteLLM matches names exactly, so a name
    padded with spaces is a slip that would never match what callers send or what model_list serves."""
    if not name.strip():
        return "is blank"
    if name != name.strip():
        return (f"has white space at its start or end: LiteLLM matches model names exactly, so it is not "
                f"{name.strip()!r}")
    return None


class LiteLLMRouterConfig(BaseModel):
    """What the hook reads from the file named by PROMPTIER_LITELLM_CONFIG."""

    model_config = ConfigDict(extra="forbid")

    router_model: str = Field(default="promptier", min_length=1, description="the model name callers ask for to "
                              "be routed; any other name is served as asked (pinned)")
    tiers: dict[str, str] = Field(min_length=1, description="each tier of the model -> the LiteLLM model group "
                                  "(model_name in model_list) that serves it")
    fallback_tier: str = Field(description="tier whose group serves a request the classifier could not decide")
    default_mode: str = "balanced"
    classifier: ClassifierEndpoint = Field(default_factory=lambda: ClassifierEndpoint(timeout_ms=TIMEOUT_MS))

    @field_validator("router_model")
    @classmethod
    def _exact_router_model(cls, value: str) -> str:
        problem = _name_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value

    @field_validator("tiers")
    @classmethod
    def _exact_groups(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [f"{tier}: {group!r} {problem}" for tier, group in value.items()
                    if (problem := _name_problem(group))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("classifier", mode="before")
    @classmethod
    def _litellm_deadline(cls, value: object) -> object:
        # A classifier block without its own deadline gets this proxy's, not the dispatcher's 20 ms.
        if isinstance(value, dict) and "timeout_ms" not in value:
            return {**value, "timeout_ms": TIMEOUT_MS}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LiteLLMRouterConfig:
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode {self.default_mode!r} is not one of {MODES}")
        if self.fallback_tier not in self.tiers:
            raise ValueError(f"fallback_tier {self.fallback_tier!r} is not a configured tier {list(self.tiers)}")
        if self.router_model in self.tiers.values():
            raise ValueError(f"router_model {self.router_model!r} is also a tier's model group: a request for that "
                             "group would be classified instead of served as asked")
        return self


class RoutingRecord(dict):
    """A routing record made by a PromptierRouter: a caller's JSON can hold a dict under the same key, never
    one of these, so only the hook's own records come back as headers."""


def load_router_config(path: Path) -> LiteLLMRouterConfig:
    """Read and validate the hook's config. Raises ConfigError naming the file and field."""
    return read_config(path, LiteLLMRouterConfig)


def chat_messages(messages: object) -> list[tuple[str, str]]:
    """(role, text) pairs of an OpenAI chat request's `messages`.

    Raises:
        InvalidInputError: not a non-empty list of objects with a string role.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list")
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidInputError(f"messages[{index}] must be an object with a role")
        pairs.append((message["role"], content_text(message.get("content"))))
    return pairs


def _check_tiers(served: list[str], config: LiteLLMRouterConfig, source: str) -> None:
    if sorted(served) != sorted(config.tiers):
        raise ConfigError(f"the classifier ({source}) decides between tiers {served}, but the Promptier LiteLLM "
                          f"config maps {list(config.tiers)}; map every tier of the model, and only those")


class PromptierRouter(CustomLogger):  # type: ignore[misc]  # LiteLLM's class, untyped where it is not installed
    """The LiteLLM callback: classify, choose the tier's model group, say so in headers."""

    def __init__(self, config: LiteLLMRouterConfig) -> None:
        """Load and check the classifier; raises PromptierError (ConfigError, ArtifactError) when the model
        does not load or its tiers are not the config's, so that the proxy stops before it serves."""
        super().__init__()
        self.config = config
        self.source: Path | None = None  # the config file, when read from one: errors name it
        self.route_classifier: EmbeddedRouteClassifier | GrpcRouteClassifier | None = None
        endpoint = config.classifier
        self._embedded: EmbeddedRouteClassifier | None = None
        if endpoint.embedded:
            model = classifier.load(endpoint.model, endpoint.threads)
            _check_tiers(model.tier_names, config, f"embedded model {model.model_version}")
            metrics = BatcherMetrics(CollectorRegistry(), "promptier_litellm_classifier")
            self._embedded = EmbeddedRouteClassifier(model, endpoint.timeout_ms / 1000, metrics)
        else:
            self._check_service_tiers()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups_served = False

    @classmethod
    def from_file(cls, path: str | Path) -> PromptierRouter:
        """The hook for a config file (for a module of your own: `hook = PromptierRouter.from_file(...)`).

        Raises:
            ConfigError, ArtifactError: naming the file, as a proxy with several routers has several.
        """
        config = load_router_config(Path(path))
        try:
            router = cls(config)
        except ConfigError as error:  # the tier map is not the model's
            raise ConfigError(f"{path}: tiers: {error}") from error
        except ArtifactError as error:
            raise ArtifactError(f"{path}: classifier.model: {error}") from error
        router.source = Path(path)
        return router

    def _check_service_tiers(self) -> None:
        """The gRPC service's tiers, if it answers now; if not, a decision for a tier the config does not map
        falls back (logged) until it is fixed, as the dispatcher does."""
        from serving.client import RouterClient

        address = self.config.classifier.address
        try:
            with RouterClient(address, timeout=2.0, attempts=1) as client:
                served = [tier.name for tier in client.info().tiers]
        except Exception as error:  # grpc.RpcError, or a malformed address
            code = error.code() if isinstance(error, grpc.Call) else None
            # Said in the line itself: LiteLLM may print it without a level, and the proxy serves all the same.
            # Named by its model: a proxy with several routers has several classifiers to look at.
            log.warning(json.dumps({"event": "classifier_not_checked", "router": self.config.router_model,
                                    "level": "warning", "address": address,
                                    "detail": code.name if isinstance(code, grpc.StatusCode) else repr(error),
                                    "meaning": "requests go to the fallback tier's group "
                                               f"({self.config.tiers[self.config.fallback_tier]!r}) until the "
                                               "service answers; its tiers are not checked against this config"}))
            return
        _check_tiers(served, self.config, f"gRPC service at {address}")

    def _started_on(self, loop: asyncio.AbstractEventLoop) -> EmbeddedRouteClassifier | GrpcRouteClassifier:
        """The classifier, started on `loop`: its worker thread hands results to the loop that serves requests,
        and gRPC channels belong to the loop they were opened on, which only exists once the proxy runs."""
        if self.route_classifier is None:
            endpoint = self.config.classifier
            self.route_classifier = self._embedded or GrpcRouteClassifier(
                endpoint.address, endpoint.timeout_ms / 1000, endpoint.coalesce, endpoint.connections)
            self.route_classifier.start()
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("PromptierRouter serves one event loop; this call came from another")
        return self.route_classifier

    async def close(self) -> None:
        """Stop the classifier (its thread, or its gRPC channels)."""
        if self.route_classifier is not None:
            await self.route_classifier.close()

    def _check_groups(self) -> None:
        """Every mapped group is served by this proxy (checked until it holds: groups can be added at run time).

        Raises:
            HTTPException: 500 naming the tiers whose groups are missing.
        """
        if self._groups_served:
            return
        from litellm.proxy import proxy_server

        router = proxy_server.llm_router
        if router is None:
            raise HTTPException(status_code=500, detail="promptier: the proxy has no model_list to route to")
        registry = router.registry()
        # What a request for the name may reach, not the configured names alone: a group served by a wildcard
        # deployment (`model_name: "openai/*"`) is in no list of names, yet LiteLLM routes it.
        missing = {tier: group for tier, group in self.config.tiers.items()
                   if not registry.names(group, kind="route_candidates")}
        if missing:
            # Named by its model and its file: a proxy with several routers has several configs to look in.
            where = f"router {self.config.router_model!r}" + (f" ({self.source})" if self.source else "")
            log.error(json.dumps({"event": "model_groups_missing", "router": self.config.router_model,
                                  "config": str(self.source) if self.source else None, "missing": missing}))
            raise HTTPException(status_code=500, detail=f"promptier: {where}: tiers map to model groups this proxy "
                                f"does not serve: {missing}; served: {sorted(registry.names())}")
        self._groups_served = True

    def _mode(self, metadata: Mapping[str, Any]) -> str:
        # A null is "not set", as SDKs send an optional field left empty.
        mode = metadata.get(MODE_KEY)
        if mode is None:
            mode = self.config.default_mode
        if mode not in MODES:
            raise HTTPException(status_code=400, detail=f"metadata.{MODE_KEY} must be one of {list(MODES)}, "
                                f"got {str(mode)[:100]!r}")
        return str(mode)

    async def decide(self, data: dict, call_type: str) -> RoutingRecord:
        """The routing record for a request to the router model: tier, group, reason and, when classified,
        mode, confidence, who decided and the classifier's time."""
        metadata = data.get("metadata")
        mode = self._mode(metadata if isinstance(metadata, dict) else {})
        route_classifier = self._started_on(asyncio.get_running_loop())
        started = time.perf_counter()
        cause: str | None = None
        detail: str | None = None
        try:
            if call_type not in CHAT_CALL_TYPES:
                raise ClassifierUnavailable("unsupported_call_type")
            try:
                messages = chat_messages(data.get("messages"))
            except InvalidInputError as error:
                raise ClassifierUnavailable("invalid_input") from error
            decision = await route_classifier.classify(messages, mode)
            if decision.tier not in self.config.tiers:
                raise ClassifierUnavailable("unknown_tier")
        except ClassifierUnavailable as error:
            cause, detail = error.cause, error.detail
        elapsed_ms = (time.perf_counter() - started) * 1000
        if cause is not None:
            tier = self.config.fallback_tier
            log.warning(json.dumps({"event": "classifier_fallback", "router": self.config.router_model,
                                    "cause": cause, "tier": tier,
                                    "model_group": self.config.tiers[tier], **({"detail": detail} if detail else {})}))
            return RoutingRecord(tier=tier, model_group=self.config.tiers[tier], reason="fallback", cause=cause,
                            mode=mode, classifier_ms=round(elapsed_ms, 3))
        return RoutingRecord(tier=decision.tier, model_group=self.config.tiers[decision.tier], reason="classified",
                        mode=mode, confidence=round(decision.scores.get(decision.tier, 0.0), 4),
                        decided_by=decision.decided_by, model_version=decision.model_version,
                        classifier_ms=round(elapsed_ms, 3))

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str
                                  ) -> dict | None:
        """LiteLLM's pre-call hook: rewrite `model` of a request for the router model to its tier's group.

        The decision goes into the metadata bucket LiteLLM keeps for this request (`metadata` or
        `litellm_metadata`, chosen as LiteLLM chooses it); a `promptier` entry a caller wrote into either
        bucket, or into either's `spend_logs_metadata`, is dropped on every request, routed or not.

        Raises:
            HTTPException: 400 for an unknown `metadata.promptier_mode`; 500 when a mapped group is not served.
        """
        for key in METADATA_BUCKETS:
            metadata = data.get(key)
            # A RoutingRecord is another router's decision (several routers see each request, in turn):
            # only a caller's dict is dropped, which must not come back as headers or be logged.
            if isinstance(metadata, dict) and not isinstance(metadata.get(RECORD_KEY), RoutingRecord):
                metadata.pop(RECORD_KEY, None)
                _spend_logs_record(metadata, None)
        if data.get("model") != self.config.router_model:
            return None
        self._check_groups()
        record = await self.decide(data, call_type)
        bucket = get_metadata_variable_name_from_kwargs(data)
        metadata = data.get(bucket)
        if not isinstance(metadata, dict):
            metadata = data[bucket] = {}
        metadata[RECORD_KEY] = record
        _spend_logs_record(metadata, record)
        data["model"] = record["model_group"]
        return data

    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any, response: Any,
                                                    request_headers: dict[str, str] | None = None,
                                                    litellm_call_info: dict[str, object] | None = None
                                                    ) -> dict[str, str] | None:
        """The decision as `x-promptier-*` headers, on routed requests only (failed ones included)."""
        for key in METADATA_BUCKETS:
            metadata = data.get(key)
            record = metadata.get(RECORD_KEY) if isinstance(metadata, dict) else None
            if isinstance(record, RoutingRecord):
                return {f"{HEADER_PREFIX}{name.replace('_', '-')}": str(value) for name, value in record.items()
                        if value is not None}
        return None


def _spend_logs_record(metadata: dict, record: RoutingRecord | None) -> None:
    """Put `record` (None: no decision) under RECORD_KEY in the request's `spend_logs_metadata`, beside what
    the caller put there, so that LiteLLM's spend logs and standard logging payload carry the decision; a
    caller's own entry under that key is dropped, as it is from the headers. A `spend_logs_metadata` that is
    not an object is the caller's to get wrong, and is left as it is."""
    current = metadata.get(SPEND_LOGS_KEY)
    if current is None and record is None:
        return
    if current is not None and not isinstance(current, dict):
        return
    # A copy: the caller's dict may be shared with LiteLLM's record of what the caller sent.
    merged = {key: value for key, value in (current or {}).items() if key != RECORD_KEY}
    if record is not None:
        merged[RECORD_KEY] = dict(record)
    metadata[SPEND_LOGS_KEY] = merged


_hook: PromptierRouter | None = None


def __getattr__(name: str) -> PromptierRouter:
    """`serving.litellm_router.hook`: the hook built from PROMPTIER_LITELLM_CONFIG, once per process, when
    LiteLLM resolves its callbacks (never at import); from a copy loaded by file path, the real module's."""
    global _hook
    if _PATH_LOADED_COPY:
        hook: PromptierRouter = getattr(sys.modules[_MODULE], name)
        return hook
    if name != "hook":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _hook is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"set {CONFIG_ENV} to the Promptier LiteLLM config file (see serving/README.md, "
                              "\"LiteLLM\")")
        _hook = PromptierRouter.from_file(path)
    return _hook
