"""OpenAI-compatible dispatcher: classify each chat request (gRPC service or embedded runtime), forward it
to its tier's upstream.

`create_app(config)` builds the ASGI app (plain Starlette: FastAPI's per-request middleware layers
showed in the dispatcher's profile); `promptier dispatch --config dispatcher.yaml` serves it.
Request and response bodies pass through untouched except the request's model name. Every response
says, in x-promptier-* headers, which tier and upstream model served it and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app, multiprocess
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount
from starlette.routing import Route as Endpoint
from starlette.types import ASGIApp, Receive, Scope, Send

import classifier
from classifier.artifact import MODES
from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError, PromptierError
from serving.common.batcher import BatcherMetrics
from serving.common.logs import configure_json_logging
from serving.common.startup import freeze_startup_objects
from serving.dispatch.capabilities import (
    NO_NEEDS,
    CapabilityMetrics,
    CapabilityRefusal,
    CapabilityRouter,
    Needs,
    Steered,
    describe_serves,
    request_needs,
)
from serving.dispatch.decision_log import DecisionLog, DecisionRecord
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig, load_dispatcher_config
from serving.dispatch.dispatch_supervisor import CONFIG_ENV, METRICS_DIR_ENV
from serving.dispatch.exploration import draw_tier
from serving.dispatch.http_error import HTTPError
from serving.dispatch.inbound import INBOUND_ATTRIBUTE
from serving.dispatch.inbound_request import (
    CLIENT_CLOSED,
    ClientGone,
    DisconnectWatch,
    HostCheck,
    is_json,
    parse_chat,
    read_body,
)
from serving.dispatch.outcomes import MAX_OUTCOMES_BODY_BYTES, OutcomeError, parse_outcomes, record_outcomes
from serving.dispatch.route_classifier import (
    ClassifierUnavailable,
    EmbeddedRouteClassifier,
    GrpcRouteClassifier,
    RouteClassifier,
)
from serving.dispatch.savings_page import SavingsReport, savings_routes
from serving.dispatch.stream_meter import (
    CHARS_PER_TOKEN,
    ESTIMATED,
    StreamMeter,
    answer_chars,
    ask_for_usage,
    estimated_usage,
    wants_usage,
)
from serving.dispatch.tenants import Tenant, Tenants, check_tenants_and_store
from serving.dispatch.upstream_body import (
    BUFFERED_BODY_LIMIT,
    NO_USAGE,
    STREAM_TAIL_BYTES,
    ResponseCut,
    bound_body_reads,
    read_up_to,
    read_usage,
    usage_from_stream_tail,
    usage_of_body,
)

log = logging.getLogger("promptier.dispatcher")
ROUTER_PREFIX = "promptier"
HEADER_PREFIX = "x-promptier-"


@dataclass
class Route:
    tier: str
    # classified | pinned | fallback | escalated | no_text | capability | paced | budget_exhausted | explored
    reason: str
    mode: str | None
    confidence: float | None
    classifier_ms: float | None
    decided_by: str | None = None  # model | prior, when the classifier decided
    needs: Needs = NO_NEEDS  # what the request needs of its tier (serving.dispatch.capabilities)
    steered: Steered | None = None  # set when a capability, not the classifier or a policy, chose the tier
    scores: dict[str, float] | None = None  # per-tier probabilities, when the classifier's model decided
    unpaced_tier: str | None = None  # the policy's tier, when the tenant's budget moved the request
    budget_pressure: float | None = None  # the tenant's pacing pressure, when it has a budget
    propensity: float | None = None  # P(this tier | the policy's choice), for a classified request
    explored: bool = False  # exploration's random draw chose the tier (serving.dispatch.exploration)
    # The decision log's prompt_id for this request, sent to the caller so that it can report how the
    # answer served (serving.dispatch.outcomes).
    request_id: str = field(default_factory=lambda: f"dispatcher:{uuid.uuid4().hex}")


class DispatcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("promptier_dispatch_requests", "requests by tier, reason and status",
                                ["tier", "reason", "status"], registry=self.registry)
        self.fallbacks = Counter("promptier_dispatch_classifier_fallbacks",
                                 "requests routed to the fallback tier because the classifier failed",
                                 ["cause"], registry=self.registry)
        self.escalations = Counter("promptier_dispatch_escalations", "retries on a more capable tier",
                                   ["from_tier"], registry=self.registry)
        self.overhead = Histogram("promptier_dispatch_classify_seconds", "time spent asking the classifier",
                                  registry=self.registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05))
        self.outcomes = Counter("promptier_dispatch_outcomes", "outcome scores reported for earlier answers",
                                registry=self.registry)


def _check_tier_names(served: list[str], configured: list[str], source: str) -> None:
    if served != configured:
        raise ConfigError(f"the classifier ({source}) serves tiers {served}, but the dispatcher config maps "
                          f"{configured}; they must be the same, in order")


async def check_config(config: DispatcherConfig) -> str:
    """What `promptier dispatch --check` adds to reading the file: the embedded artifact loads, or the
    gRPC service answers, and the classifier's tiers are the config's. Returns what was checked.

    Raises:
        PromptierError: the artifact does not load, or the tiers differ.
    """
    capabilities = f"; capabilities: {describe_serves({name: tier.serves for name, tier in config.tiers.items()})}"
    tenants = check_tenants_and_store(config)
    return await _check_classifier(config) + capabilities + f"; {tenants}"


async def _check_classifier(config: DispatcherConfig) -> str:
    if config.classifier.embedded:
        model = classifier.load(config.classifier.model)
        _check_tier_names(model.tier_names, config.tier_names, f"embedded model {model.model_version}")
        return f"embedded model {model.model_version} loads and serves tiers {model.tier_names}"
    service = GrpcRouteClassifier(config.classifier.address, timeout_s=0.5, coalesce=False, connections=1)
    try:
        served = await service.tiers()
    finally:
        await service.close()
    if served is None:
        return (f"the gRPC service at {config.classifier.address} did not answer: its tiers are checked when "
                "it does (until then requests go to the fallback tier)")
    names = [tier.name for tier in served]
    _check_tier_names(names, config.tier_names, service.describe())
    return f"the gRPC service at {config.classifier.address} serves tiers {names}"


class Dispatcher:
    def __init__(self, config: DispatcherConfig) -> None:
        self.config = config
        self.tiers = config.tier_names
        self.metrics = DispatcherMetrics()
        self.tenants = Tenants(config, self.metrics.registry)  # opens the spend store: a bad one stops the start
        self.prices: dict[str, tuple[float, float]] = {}
        self.embedded: EmbeddedRouteClassifier | None = None
        if config.classifier.embedded:
            # Loaded here, before the port opens: a bad artifact stops the start with its error.
            self.embedded = EmbeddedRouteClassifier.load(
                config.classifier.model, config.classifier.timeout_ms / 1000,
                BatcherMetrics(self.metrics.registry, "promptier_dispatch_classifier"), config.classifier.threads)
        self.decisions = DecisionLog(config.decision_log)
        self.capabilities = CapabilityRouter(self.tiers, {name: tier.serves for name, tier in config.tiers.items()},
                                             CapabilityMetrics(self.metrics.registry))
        self._rng = random.Random()  # exploration's draws; seeded from the OS, per worker process

    async def start(self) -> None:
        """Open the classifier and the HTTP pool on the serving event loop (they are bound to it)."""
        timeout = self.config.classifier.timeout_ms / 1000
        self.classifier: RouteClassifier
        if self.embedded is not None:
            self.embedded.start()
            self.classifier = self.embedded
        else:
            # One attempt: the deadline is a few ms, and the fallback tier is the answer to a failure.
            self.classifier = GrpcRouteClassifier(self.config.classifier.address, timeout,
                                                  self.config.classifier.coalesce, self.config.classifier.connections)
            self.classifier.start()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
                                          skip_auto_headers=("User-Agent",))
        await self.refresh_prices()
        self.tenants.start()

    async def close(self) -> None:
        await self.http.close()
        await self.classifier.close()
        self.tenants.close()
        self.decisions.close()

    async def refresh_prices(self) -> None:
        """Tier prices come from the classifier; missing prices only leave cost estimates empty.

        Raises:
            ConfigError: the classifier's tiers are not the config's (every request would fall back).
        """
        served = await self.classifier.tiers()
        if served is None:
            return  # the classifier may start later; requests fall back (visibly) until it does
        _check_tier_names([tier.name for tier in served], self.tiers, self.classifier.describe())
        self.prices = {t.name: (t.input_usd_per_mtok, t.output_usd_per_mtok) for t in served}
        self.tenants.set_prices(self.prices)

    # ------------------------------------------------------------------ routing
    def parse_model(self, name: object, tenant: Tenant | None = None) -> tuple[str | None, str | None]:
        """(mode, pinned tier) from `promptier`, `promptier/<mode>` or `promptier/tier/<tier>`; `promptier`
        is the tenant's default mode, and a tier pinned must be one the tenant may use (else 403)."""
        if not isinstance(name, str):
            raise HTTPError(400, "model must be a string", code="invalid_model")
        parts = name.split("/")
        if parts[0] != ROUTER_PREFIX:
            raise HTTPError(404, f"model {name!r} does not exist; use one of {self.model_ids()}",
                            code="model_not_found")
        if len(parts) == 1:
            return (tenant.mode if tenant else self.config.default_mode), None
        if len(parts) == 2 and parts[1] in MODES:
            return parts[1], None
        if len(parts) == 3 and parts[1] == "tier" and parts[2] in self.tiers:
            if tenant is not None and not tenant.may_use(parts[2]):
                raise HTTPError(403, f"tier {parts[2]!r} is not allowed for this API key; allowed: "
                                f"{list(tenant.allowed_names or ())}", kind="permission_error", code="tier_not_allowed")
            return None, parts[2]
        raise HTTPError(404, f"model {name!r} does not exist; use one of {self.model_ids()}", code="model_not_found")

    def model_ids(self) -> list[str]:
        return ([ROUTER_PREFIX] + [f"{ROUTER_PREFIX}/{mode}" for mode in MODES]
                + [f"{ROUTER_PREFIX}/tier/{tier}" for tier in self.tiers])

    async def route(self, messages: list[tuple[str, str]], mode: str | None, pinned: str | None,
                    needs: Needs = NO_NEEDS, tenant: Tenant | None = None) -> Route:
        """Where the request goes: its pinned tier, the classifier's (or the fallback), or for a request
        with no user text the no-text tier; moved to the nearest tier that can serve what it `needs`
        (`CapabilityRouter.check` has refused those that none can serve, or that are pinned to a tier
        that cannot). A tenant's classifier choice and fallback stay within its allowed tiers."""
        if pinned is not None:
            return Route(pinned, "pinned", None, None, None, needs=needs)
        if not needs.has_text:  # nothing to classify: not a classifier failure, so not the fallback tier
            tier = self.config.no_text_tier or self.capabilities.cheapest(needs)
            if tenant is not None and not tenant.may_use(tier):
                tier = self.tiers[tenant.allowed[0]]
            route = Route(tier, "no_text", mode, None, None, needs=needs)
        else:
            route = await self.classify(messages, mode, tenant)
            route.needs = needs
        route.tier, route.reason, route.steered = self.capabilities.steer(route.tier, route.reason, needs)
        return route

    async def classify(self, messages: list[tuple[str, str]], mode: str | None, tenant: Tenant | None = None
                       ) -> Route:
        """The classifier's tier (among the tenant's tiers), or the fallback tier when it fails or is too slow."""
        start = time.perf_counter()
        allowed = tenant.allowed_names if tenant else None
        fallback = tenant.fallback_tier if tenant else self.config.fallback_tier
        try:
            decision = await self.classifier.classify(messages, mode, allowed)
        except ClassifierUnavailable as error:
            cause = error.cause
            self.metrics.fallbacks.labels(cause).inc()
            log.warning(json.dumps({"event": "classifier_fallback", "cause": cause}))
            return Route(fallback, "fallback", mode, None, (time.perf_counter() - start) * 1000)
        finally:
            self.metrics.overhead.observe(time.perf_counter() - start)
        if decision.tier not in self.tiers or (allowed is not None and decision.tier not in allowed):
            self.metrics.fallbacks.labels("unknown_tier").inc()
            return Route(fallback, "fallback", mode, None, (time.perf_counter() - start) * 1000)
        return Route(decision.tier, "classified", mode, decision.scores.get(decision.tier),
                     (time.perf_counter() - start) * 1000, decision.decided_by,
                     scores=decision.scores if decision.decided_by == "model" else None)

    def apply_budget(self, route: Route, tenant: Tenant, messages: list[tuple[str, str]]) -> None:
        """Let the tenant's budget move the route to a cheaper tier (paced, or spent: the cheapest).

        Raises:
            HTTPError: 429, the budget is spent and the tenant's rule is to refuse.
        """
        prompt_tokens = sum(len(content) for _, content in messages) / CHARS_PER_TOKEN
        usable = tenant.allowed  # a move must stay on a tier that can serve what the request needs
        if self.capabilities.restricted:
            usable = tuple(index for index in usable if not self.capabilities.missing(self.tiers[index], route.needs))
        decision = self.tenants.apply_budget(tenant, route.tier, route.scores, prompt_tokens, usable)
        if decision is None:
            return
        route.budget_pressure = decision.pressure
        if decision.reject:
            route.reason = decision.reason or route.reason
            raise HTTPError(429, f"the budget of this API key's tenant ({tenant.name}) for the current period is "
                            "spent; requests are refused until the period ends (see Retry-After)",
                            kind="insufficient_quota", code="budget_exhausted")
        if decision.reason is not None:
            route.unpaced_tier, route.tier, route.reason = route.tier, self.tiers[decision.tier], decision.reason

    def explore(self, route: Route, tenant: Tenant) -> None:
        """With the configured exploration share, send a classified request to a tier drawn at random
        among those it may use, and record the propensity of its tier either way."""
        share = self.config.exploration_share
        if share <= 0.0 or route.reason != "classified":
            return
        usable = [name for name in self.tiers
                  if tenant.may_use(name) and not self.capabilities.missing(name, route.needs)]
        if route.tier not in usable:
            return
        draw = draw_tier(route.tier, usable, share, self._rng)
        route.propensity = draw.propensity
        if draw.explored:
            route.tier, route.reason, route.explored = draw.tier, "explored", True

    # ------------------------------------------------------------------ upstream
    async def open_upstream(self, route: Route, body: dict, tenant: Tenant | None = None
                            ) -> tuple[aiohttp.ClientResponse, str]:
        """Send to the routed tier; on 5xx, timeout or connection failure before the first byte, retry on
        the next more capable tier the tenant may use (never a cheaper one). Returns the response and the
        tier that answered."""
        last_error = "no upstream tried"
        for tier in self.capabilities.escalation(route.tier, route.needs):
            if tenant is not None and not tenant.may_use(tier):
                continue
            upstream = self.config.tiers[tier]
            try:
                payload = json.dumps({**body, "model": upstream.model}, allow_nan=False).encode()
            except (ValueError, RecursionError) as error:  # a number out of float range, or nesting too deep
                raise HTTPError(400, f"request body cannot be sent on as JSON: {error}") from None
            headers = {"content-type": "application/json"}
            key = upstream.api_key()
            if key:
                headers["authorization"] = f"Bearer {key}"
            # asyncio.timeout bounds the wait for headers; read_timeout_s, set once they have come, each gap
            # in the body (as sock_read from the start, it would also cut the wait for headers short).
            timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s, sock_read=None)
            try:
                async with asyncio.timeout(upstream.first_byte_timeout_s):
                    response = await self.http.post(f"{upstream.base_url}/chat/completions", data=payload,
                                                     headers=headers, timeout=timeout)
                bound_body_reads(response, upstream.read_timeout_s)
            except TimeoutError:
                last_error = f"tier {tier}: upstream timed out"
            except aiohttp.ClientError as error:
                last_error = f"tier {tier}: upstream unreachable ({type(error).__name__})"
            else:
                if response.status < 500:
                    if tier != route.tier:
                        route.reason = "escalated"
                    return response, tier
                response.close()
                last_error = f"tier {tier}: upstream returned {response.status}"
            self.metrics.escalations.labels(tier).inc()
            log.warning(json.dumps({"event": "upstream_failed", "tier": tier, "detail": last_error}))
        raise HTTPError(502, f"every eligible upstream failed; last: {last_error}", kind="upstream_error",
                        code="upstream_unavailable")

    def headers(self, route: Route, tier: str) -> dict[str, str]:
        """Every response: tier, upstream model, reason. What only a classification knows (mode,
        confidence, classifier time, who decided) only when the request was classified: an empty
        header would read as a value."""
        headers = {f"{HEADER_PREFIX}tier": tier, f"{HEADER_PREFIX}upstream-model": self.config.tiers[tier].model,
                   f"{HEADER_PREFIX}reason": route.reason, f"{HEADER_PREFIX}request-id": route.request_id}
        if route.confidence is not None:
            headers[f"{HEADER_PREFIX}confidence"] = f"{route.confidence:.4f}"
        if route.mode:
            headers[f"{HEADER_PREFIX}mode"] = route.mode
        if route.classifier_ms is not None:
            headers[f"{HEADER_PREFIX}classifier-ms"] = f"{route.classifier_ms:.3f}"
        if route.decided_by is not None:
            headers[f"{HEADER_PREFIX}decided-by"] = route.decided_by
        if route.needs.features:
            headers[f"{HEADER_PREFIX}needs"] = ",".join(route.needs.features)
        if route.steered is not None:
            headers[f"{HEADER_PREFIX}steered-from"] = route.steered.from_tier
            headers[f"{HEADER_PREFIX}steered-by"] = ",".join(route.steered.by)
        if route.budget_pressure is not None:
            headers[f"{HEADER_PREFIX}budget-pressure"] = f"{route.budget_pressure:.3f}"
        return headers

    def record(self, route: Route, tier: str | None, messages: list[tuple[str, str]], status: int, started: float,
               usage: dict | None, note: str | None = None, tenant: Tenant | None = None,
               completion_chars: int | None = None) -> None:
        """Count the request, charge its cost to its tenant, and append it to the decision log (prompt
        text only with store_prompts).

        `usage` must have passed `read_usage` (token counts that are numbers); `note` says why a
        successful answer is logged without usage or cost. `completion_chars`: the answer's characters,
        counted for a tenant with a budget, whose answer without usage is charged by count.
        """
        tenant = tenant or self.tenants.default
        prompt = conversation = None
        if self.decisions.store_prompts:
            prompt = _logged_prompt(messages)
            if len(messages) > 1:  # for a judge: the conversation as it was, in order
                conversation = [{"role": role, "content": content} for role, content in messages]
        cost = None
        counted = usage
        if usage is None and completion_chars is not None and tier is not None:
            counted = estimated_usage(sum(len(content) for _, content in messages), completion_chars)
            note = f"{note}; {ESTIMATED}" if note else ESTIMATED
        if counted and tier in self.prices:
            price_in, price_out = self.prices[tier]
            cost = (counted["prompt_tokens"] * price_in + counted["completion_tokens"] * price_out) / 1e6
        self.tenants.charge(tenant, tier, cost)
        self.metrics.requests.labels(tier or route.tier, route.reason, str(status)).inc()
        self.decisions.write(DecisionRecord(
            prompt_id=route.request_id, prompt=prompt, messages=conversation,
            model=self.config.tiers[tier].model if tier else None, score=None, cost_usd=cost,
            source="dispatcher", category="", tier=tier, routed_tier=route.tier, reason=route.reason,
            mode=route.mode, confidence=route.confidence, decided_by=route.decided_by,
            classifier_ms=route.classifier_ms, latency_ms=(time.perf_counter() - started) * 1000, usage=usage,
            status=status, note=note, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            needs=list(route.needs.features), estimated_tokens=route.needs.tokens,
            steered=route.steered.as_dict() if route.steered is not None else None, tenant=tenant.name,
            scores=route.scores, unpaced_tier=route.unpaced_tier, budget_pressure=route.budget_pressure,
            propensity=route.propensity, explored=route.explored,
        ).as_dict())


def _logged_prompt(messages: list[tuple[str, str]]) -> str:
    """The text the classifier read for this request, so that training on the decision log sees what
    serving sees (for a conversation: the latest user turn first, then the earlier turns, newest first)."""
    try:
        return render_conversation(messages)
    except InvalidInputError:  # nothing the classifier could read (it fell back): keep what there is
        return "\n\n".join(content for _, content in messages)


def create_app(config: DispatcherConfig) -> ASGIApp:
    """The dispatcher as an ASGI app (tests run it with uvicorn on port 0)."""
    dispatcher = Dispatcher(config)
    fingerprint = config.fingerprint  # a hash of the whole config: once, not per health probe

    shared_metrics_dir = os.environ.get(METRICS_DIR_ENV)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dispatcher.start()
        yield
        await dispatcher.close()
        if shared_metrics_dir:
            multiprocess.mark_process_dead(os.getpid(), shared_metrics_dir)  # its live gauges leave the sums

    async def health(request: Request) -> Response:
        reachable = await dispatcher.classifier.tiers() is not None
        classifier_state = "serving" if reachable else "unavailable (requests go to the fallback tier)"
        body: dict[str, object] = {"status": "ok", "classifier": classifier_state,
                                   "classifier_source": dispatcher.classifier.describe(),
                                   "fallback_tier": config.fallback_tier, "config_fingerprint": fingerprint}
        if isinstance(dispatcher.classifier, GrpcRouteClassifier):
            # How many of the service's processes this dispatcher's connections reach (null: not known yet).
            body["classifier_processes_reached"] = dispatcher.classifier.processes_reached
        body.update(dispatcher.tenants.health())
        return JSONResponse(body)

    def caller(request: Request) -> Tenant:
        """The tenant of a JSON POST's API key. Raises HTTPError: 415 not JSON, 401 no valid key."""
        if not is_json(request.headers.get("content-type", "")):
            raise HTTPError(415, "the request body must be JSON, sent with content-type: application/json",
                            code="unsupported_media_type")
        tenant = dispatcher.tenants.authenticate(request.headers.get("authorization", ""))
        if tenant is None:
            raise HTTPError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")
        return tenant

    async def outcomes(request: Request) -> Response:
        """Scores for earlier answers (serving.dispatch.outcomes), appended to the decision log for training."""
        try:
            caller(request)
            reports = parse_outcomes(await read_body(request, MAX_OUTCOMES_BODY_BYTES))
        except HTTPError as error:
            return error.response()
        except OutcomeError as error:
            return HTTPError(400, str(error), code="invalid_outcome").response()
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        accepted = record_outcomes(dispatcher.decisions, reports)
        dispatcher.metrics.outcomes.inc(accepted)
        return JSONResponse({"accepted": accepted}, status_code=202)

    async def models(request: Request) -> Response:
        data = [{"id": model_id, "object": "model", "owned_by": "promptier"} for model_id in dispatcher.model_ids()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        try:
            tenant = caller(request)
            body, messages = parse_chat(await read_body(request, config.max_request_bytes))
            mode, pinned = dispatcher.parse_model(body.get("model"), tenant)
            needs = request_needs(body, messages)
            dispatcher.capabilities.check(needs, pinned)
        except HTTPError as error:
            return error.response()
        except CapabilityRefusal as refusal:
            # 400 as the OpenAI API answers a request its model cannot take (an image to a text-only
            # model, a prompt past its context): the request, not the server, has to change.
            return HTTPError(400, refusal.message, code=refusal.code).response()
        except ClientDisconnect:
            # A caller that leaves mid-body is routine (and one too slow is cut off by serving.dispatch.inbound).
            client = request.scope.get("client")
            log.info(json.dumps({"event": "client_left_before_its_body_came",
                                 "client": f"{client[0]}:{client[1]}" if client else None}))
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; uvicorn drops it
        streamed = bool(body.get("stream"))
        route = await dispatcher.route(messages, mode, pinned, needs, tenant)  # bounded by the classifier's deadline
        if not tenant.may_use(route.tier):  # steered by a capability to a tier this key may not use
            refused = HTTPError(403, f"this request needs {', '.join(route.steered.by if route.steered else ())}, "
                                f"which none of this API key's tiers ({', '.join(tenant.allowed_names or ())}) "
                                "serves", kind="permission_error", code="tier_not_allowed")
            dispatcher.record(route, None, messages, refused.status, started, None, tenant=tenant)
            return refused.response(dispatcher.headers(route, route.tier))
        metered = tenant.budget is not None  # its answers are charged: by usage, else by counted characters
        meter: StreamMeter | None = None
        if metered:
            try:
                dispatcher.apply_budget(route, tenant, messages)
            except HTTPError as error:
                dispatcher.record(route, None, messages, error.status, started, None, tenant=tenant)
                return error.response({**dispatcher.headers(route, route.tier),
                                       "retry-after": str(dispatcher.tenants.seconds_left(tenant))})
            if streamed:
                meter = StreamMeter(drop_usage_chunk=not wants_usage(body))
                body = ask_for_usage(body)
        dispatcher.explore(route, tenant)  # after the budget: a paced request is not drawn again
        upstream: aiohttp.ClientResponse | None = None
        tier: str | None = None
        try:
            with DisconnectWatch(request.receive):
                if not dispatcher.prices:
                    with contextlib.suppress(ConfigError):  # a late mismatch shows as unknown_tier fallbacks
                        await dispatcher.refresh_prices()
                try:
                    upstream, tier = await dispatcher.open_upstream(route, body, tenant)
                except HTTPError as error:
                    dispatcher.record(route, None, messages, error.status, started, None, tenant=tenant)
                    return error.response(dispatcher.headers(route, route.tier))
                received: list[bytes] = []  # the start of a body too large to hold, relayed first
                whole = False
                if not streamed:
                    try:
                        received, whole = await read_up_to(upstream, BUFFERED_BODY_LIMIT)
                    except (aiohttp.ClientError, TimeoutError) as error:
                        upstream.close()
                        failure = HTTPError(502, f"upstream of tier {tier} failed while sending its response "
                                            f"({type(error).__name__})", kind="upstream_error",
                                            code="upstream_unavailable")
                        dispatcher.record(route, tier, messages, failure.status, started, None, tenant=tenant)
                        return failure.response(dispatcher.headers(route, tier))
        except ClientGone:
            # Closing the upstream connection is what stops its work (vLLM and others abort on it).
            if upstream is not None:
                upstream.close()
            dispatcher.record(route, tier or route.tier, messages, CLIENT_CLOSED, started, None, tenant=tenant)
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; uvicorn drops it
        headers = dispatcher.headers(route, tier)
        media_type = upstream.headers.get("content-type", "application/json")
        if whole:
            upstream.release()
            content = b"".join(received)
            usage, note = usage_of_body(content) if upstream.status < 400 else (None, None)
            counted = answer_chars(content) if metered and usage is None and upstream.status < 400 else None
            dispatcher.record(route, tier, messages, upstream.status, started, usage, note, tenant, counted)
            return Response(content, status_code=upstream.status, media_type=media_type, headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            """The rest of the upstream's body as it comes: an event stream, or a body too large to hold."""
            status = upstream.status
            finished = False
            tail = bytearray()
            relayed = 0  # bytes of a body too large to hold: what a metered answer is charged by
            try:
                while received:
                    relayed += len(received[0])
                    yield received.pop(0)
                async for chunk in upstream.content.iter_any():
                    if meter is not None:
                        chunk = meter.feed(chunk)  # whole events, less a usage chunk the caller did not ask for
                        if not chunk:
                            continue
                    elif streamed:
                        tail += chunk
                        del tail[:-STREAM_TAIL_BYTES]
                    relayed += len(chunk)
                    yield chunk
                if meter is not None and (rest := meter.finish()):
                    yield rest
                finished = True
            except (aiohttp.ClientError, TimeoutError) as error:
                status = 599  # recorded as a broken stream
                detail = f"upstream {'stream' if streamed else 'body'} from tier {tier} broke: {type(error).__name__}"
                if not streamed:
                    raise ResponseCut(detail) from None
                event = {"error": {"message": detail, "type": "upstream_error", "code": "stream_interrupted"}}
                yield f"data: {json.dumps(event)}\n\n".encode()
            except (asyncio.CancelledError, GeneratorExit):
                status = CLIENT_CLOSED  # the caller disconnected mid-stream
                raise
            finally:
                # Also runs when the client disconnects: closing the connection cancels the upstream call.
                # A stream read to its end hands its connection back to the pool instead.
                if finished:
                    upstream.release()
                else:
                    upstream.close()
                usage = note = None
                counted = None
                if metered and upstream.status < 400:  # an answer begun is paid for, even one cut short
                    if meter is not None:
                        usage, note = read_usage(meter.usage)
                        counted = meter.completion_chars if usage is None else None
                    else:
                        counted = relayed
                        note = f"the response body is over {BUFFERED_BODY_LIMIT} bytes: relayed without reading usage"
                elif finished and status < 400:
                    if streamed:
                        usage, note = read_usage(usage_from_stream_tail(bytes(tail)))
                        if usage is None and note == NO_USAGE:
                            note = "the stream carried no usage (sent when the caller asks for it with " \
                                   "stream_options.include_usage)"
                    else:
                        note = f"the response body is over {BUFFERED_BODY_LIMIT} bytes: relayed without reading usage"
                dispatcher.record(route, tier, messages, status, started, usage, note, tenant, counted)

        return StreamingResponse(relay(), status_code=upstream.status, media_type=media_type, headers=headers)

    exposed = dispatcher.metrics.registry
    if shared_metrics_dir:
        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed, shared_metrics_dir)
    app = Starlette(lifespan=lifespan, routes=[
        Endpoint("/health", health, methods=["GET"]),
        Endpoint("/v1/models", models, methods=["GET"]),
        Endpoint("/v1/chat/completions", chat, methods=["POST"]),
        Endpoint("/v1/promptier/outcomes", outcomes, methods=["POST"]),
        Mount("/metrics", make_asgi_app(registry=exposed)),
        *(savings_routes(SavingsReport(config.decision_log.path, config.decision_log.backups,
                                       config.savings_page.max_bytes, dispatcher.tiers, lambda: dispatcher.prices),
                         dispatcher.tenants.keys()) if config.savings_page.enabled else []),
    ])
    app.state.dispatcher = dispatcher

    # Without inbound keys, a browser page must not reach the dispatcher under a name of its own.
    host_allowed = (HostCheck(config.allowed_hosts)
                    if dispatcher.tenants.open and "*" not in config.allowed_hosts else None)
    host_refused = HTTPError(403, "this Host is not allowed: name the dispatcher by localhost or an IP address, "
                             "list its name in allowed_hosts, or configure inbound_api_keys_env",
                             code="host_not_allowed").response()

    async def hot_path(scope: Scope, receive: Receive, send: Send) -> None:
        """Chat completions skip Starlette's middleware and router (a tenth of the per-request work in
        the dispatcher's profile); everything else, lifespan included, goes through the app."""
        if scope["type"] == "http" and host_allowed is not None and not host_allowed(scope["headers"]):
            await host_refused(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
            try:
                response = await chat(Request(scope, receive))
            except Exception:  # what ServerErrorMiddleware would do, without its cost on every request
                log.exception("unhandled error in chat completions")
                response = HTTPError(500, "internal error", kind="server_error").response()
            try:
                await response(scope, receive, send)
            except ResponseCut as cut:
                # Returning with the response unfinished makes uvicorn close the connection, unterminated.
                log.warning(json.dumps({"event": "response_cut", "detail": str(cut)}))
        else:
            await app(scope, receive, send)

    setattr(hot_path, INBOUND_ATTRIBUTE, config.inbound)  # what serving.dispatch.inbound's server reads its limits from
    return hot_path


def app_from_environment() -> ASGIApp:
    """The app of one worker process: the config named by PROMPTIER_DISPATCH_CONFIG.

    A worker that cannot build its app (a config or artifact that does not load) exits with uvicorn's
    start-up failure code: the supervisor then stops, at launch, instead of restarting the worker
    forever (what it does with any other exit code), and on SIGHUP keeps the running workers.
    """
    from uvicorn.config import STARTUP_FAILURE

    configure_json_logging()
    if METRICS_DIR_ENV in os.environ:
        _forget_dead_workers(Path(os.environ[METRICS_DIR_ENV]))
    try:
        app = create_app(load_dispatcher_config(Path(os.environ[CONFIG_ENV])))
    except PromptierError as error:
        log.error(json.dumps({"event": "worker_cannot_start", "error": str(error)}))
        sys.exit(STARTUP_FAILURE)
    except Exception:
        log.exception("worker_cannot_start")
        sys.exit(STARTUP_FAILURE)
    freeze_startup_objects()
    return app


def _forget_dead_workers(metrics_dir: Path) -> None:
    """Drop the live gauges of workers that are gone (a killed worker never removes its own), so that
    sums over live workers stay true; their counters stay, as counts must not go back."""
    import psutil

    for path in metrics_dir.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(metrics_dir))
