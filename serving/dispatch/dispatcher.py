"""The dispatcher's routing core, without HTTP serving: where each chat request goes and what is kept of it.

`Dispatcher` decides a request's tier (pinned, the classifier's, the fallback when the classifier fails,
moved by what the request needs, by its tenant's budget or by exploration), sends it to that tier's
upstream (escalating to a more capable tier when the upstream fails before answering), says why in
x-promptier-* headers, and records it: metrics, the tenant's spend, the decision log.
`serving.dispatch.app` serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram

from classifier.artifact import MODES
from classifier.conversation import render_conversation
from classifier.errors import InvalidInputError
from serving.common.batcher import BatcherMetrics
from serving.dispatch.capabilities import NO_NEEDS, CapabilityMetrics, CapabilityRouter, Needs, Steered
from serving.dispatch.config_check import check_tier_names
from serving.dispatch.decision_log import DecisionLog, DecisionRecord, cut_messages, cut_text
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig
from serving.dispatch.exploration import draw_tier
from serving.dispatch.http_error import HTTPError
from serving.dispatch.route_classifier import (
    ClassifierUnavailable,
    EmbeddedRouteClassifier,
    GrpcRouteClassifier,
    RouteClassifier,
)
from serving.dispatch.stream_meter import CHARS_PER_TOKEN, ESTIMATED, estimated_usage
from serving.dispatch.tenants import Tenant, Tenants
from serving.dispatch.upstream_body import bound_body_reads
from serving.dispatch.upstream_health import UpstreamHealth

log = logging.getLogger("promptier.dispatcher")
OWED = ("tier prices unknown when answered (the classifier had not answered since the start): charged to the "
        "budget once they are known")
ROUTER_PREFIX = "promptier"
HEADER_PREFIX = "x-promptier-"
# How often a dispatcher in front of a gRPC service reads its prices again: the service reloads models on
# its own, and a new model's manifest may price its tiers differently.
PRICES_REFRESH_S = 30.0
# An upstream's 401 is about the key the dispatcher sent it (the tier's api_key_env), not the caller's:
# relayed, it would tell the caller its own key is invalid, in a body that often quotes the tier's key
# (in part or whole). It is a failure of the tier, as a 5xx is.
UPSTREAM_KEY_REFUSED = 401


@dataclass
class Route:
    """Where one request goes and why: what its headers and its decision log line say."""

    tier: str
    # classified | pinned | fallback | escalated | no_text | capability | paced | budget_exhausted | explored
    reason: str
    mode: str | None
    confidence: float | None
    classifier_ms: float | None
    decided_by: str | None = None  # model | prior, when the classifier decided
    cause: str | None = None  # why the classifier gave no tier, on a fallback (a gRPC status name, timeout, ...)
    needs: Needs = NO_NEEDS  # what the request needs of its tier (serving.dispatch.capabilities)
    steered: Steered | None = None  # set when a capability, not the classifier or a policy, chose the tier
    scores: dict[str, float] | None = None  # per-tier probabilities, when the classifier's model decided
    unpaced_tier: str | None = None  # the policy's tier, when the tenant's budget moved the request
    budget_pressure: float | None = None  # the tenant's pacing pressure, when it has a budget
    budget_spent: bool = False  # the tenant's budget for the period is spent: no escalation to a dearer tier
    propensity: float | None = None  # P(this tier | the policy's choice), for a classified request
    explored: bool = False  # exploration's random draw chose the tier (serving.dispatch.exploration)
    # The tiers whose upstream failed (5xx, timeout, unreachable) before one answered or none did, in order.
    failed_tiers: list[str] = field(default_factory=list)
    # The classifier's model and the rule it applied, when it gave the tier: with `scores`, what
    # reproduces the decision.
    model_version: str | None = None
    threshold: float | None = None
    cheap_floor: float | None = None
    # The tier whose upstream was asked last: the one that answered, or the one at work when the caller left.
    upstream_tier: str | None = None
    # The decision log's prompt_id for this request, sent to the caller so that it can report how the
    # answer served (serving.dispatch.outcomes).
    request_id: str = field(default_factory=lambda: f"dispatcher:{uuid.uuid4().hex}")

    def serve_on(self, tier: str, reason: str) -> None:
        """Move the request to `tier` for `reason` (a budget, exploration). Its confidence becomes that
        tier's probability, as a classified request's is (None when the model's scores are not known):
        left as the policy tier's, a line would pair one tier with another's probability."""
        self.tier, self.reason = tier, reason
        self.confidence = self.scores.get(tier) if self.scores else None


class DispatcherMetrics:
    """The dispatcher's own Prometheus metrics, in one registry with the tenants', capabilities' and classifier's."""

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
        # Answered without a routing decision, so neither in the requests above nor in the decision log
        # (whose rows are routing decisions): counted here by status and the error's code, both from a
        # fixed set.
        self.refused = Counter("promptier_dispatch_refused", "requests answered with an error before a routing "
                               "decision: bad input, no or an unknown API key, an unknown or forbidden model, a "
                               "caller gone, a Host not allowed, an internal error",
                               ["status", "code"], registry=self.registry)
        self.decisions_not_written = Counter("promptier_dispatch_decision_log_errors",
                                             "request lines the decision log could not take (a full disk, say): "
                                             "each went to the process log instead", registry=self.registry)


class Dispatcher:
    """Routes, forwards and records chat requests for one config; `start` on the serving event loop first."""

    def __init__(self, config: DispatcherConfig) -> None:
        self.config = config
        self.tiers = config.tier_names
        self.metrics = DispatcherMetrics()
        self.tenants = Tenants(config, self.metrics.registry)  # opens the spend store: a bad one stops the start
        self.prices: dict[str, tuple[float, float]] = {}
        self.prices_version: str | None = None  # the classifier model whose manifest `prices` come from
        # The model version whose decision last asked for the prices again, and when (monotonic).
        self._prices_asked: tuple[str | None, float] = (None, 0.0)
        self._following_prices: asyncio.Task | None = None
        # The tokens of budgeted answers given before any prices were known, per (tenant, tier): charged then.
        self._owed: dict[tuple[str, str], tuple[Tenant, dict[str, int]]] = {}
        self.embedded: EmbeddedRouteClassifier | None = None
        if config.classifier.embedded:
            # Loaded here, before the port opens: a bad artifact stops the start with its error.
            self.embedded = EmbeddedRouteClassifier.load(
                config.classifier.model, config.classifier.timeout_ms / 1000,
                BatcherMetrics(self.metrics.registry, "promptier_dispatch_classifier"), config.classifier.threads)
            # Its tiers are known now: a mismatch is refused as a bad artifact is, before any port opens
            # (a worker started by SIGHUP then logs worker_cannot_start with the reason).
            check_tier_names(self.embedded.model.tier_names, self.tiers, self.embedded.describe())
        self.decisions = DecisionLog(config.decision_log)
        self.capabilities = CapabilityRouter(self.tiers, {name: tier.serves for name, tier in config.tiers.items()},
                                             CapabilityMetrics(self.metrics.registry))
        self._rng = random.Random()  # exploration's draws; seeded from the OS, per worker process
        self.upstream_health = UpstreamHealth(self.tiers)

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
        if self.embedded is None:  # an embedded model is this worker's for its life; a service reloads
            self._following_prices = asyncio.get_running_loop().create_task(self._follow_prices())
        self.tenants.start()
        await asyncio.to_thread(self.tenants.wait_for_spend)

    async def _follow_prices(self) -> None:
        """Read the service's prices again every PRICES_REFRESH_S: after it reloads a model whose prices
        changed, costs, budgets and pacing move to them, pinned traffic (which carries no model version)
        included."""
        while True:
            await asyncio.sleep(PRICES_REFRESH_S)
            try:
                await self.refresh_prices()
            except ConfigError as error:  # the service's tiers changed: requests fall back, visibly
                log.warning(json.dumps({"event": "classifier_tiers_changed", "reason": str(error)}))
            except Exception:  # never let the loop die quietly: the next read may succeed
                log.exception("reading the classifier's prices failed")

    def prices_outdated(self, route: Route) -> bool:
        """Whether the model that classified `route` is not the one the prices were read from, and no
        decision of that model asked for them in the last second (a fleet mid-reload answers with both
        versions for a moment, and its Info may come from a process still on the old one)."""
        if not self.prices:
            return True
        if route.model_version is None or route.model_version == self.prices_version:
            return False
        asked_by, asked_at = self._prices_asked
        if route.model_version == asked_by and time.monotonic() - asked_at < 1.0:
            return False
        self._prices_asked = (route.model_version, time.monotonic())
        return True

    async def close(self) -> None:
        if self._owed:
            # Answers given while the classifier never reported prices: their tokens were held to be charged
            # once it did. Stopping first, they would leave the budgets unseen; said with their counts, so an
            # operator can charge them (each answer's usage is also on its decision-log line).
            unpriced = [{"tenant": tenant, "tier": tier, **usage} for (tenant, tier), (_, usage) in self._owed.items()]
            log.error(json.dumps({"event": "spend_unpriced_at_stop", "detail": "the classifier never reported "
                                  "tier prices, so these answers were not charged to their tenants' budgets",
                                  "unpriced": unpriced}))
        if self._following_prices is not None:
            self._following_prices.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following_prices
        await self.http.close()
        await self.classifier.close()
        self.tenants.close()
        self.decisions.close()

    async def refresh_prices(self) -> None:
        """Tier prices come from the classifier; missing prices only leave cost estimates empty.

        Raises:
            ConfigError: the classifier's tiers are not the config's (every request would fall back).
        """
        served = await self.classifier.served()
        if served is None:
            return  # the classifier may start later; requests fall back (visibly) until it does
        check_tier_names([tier.name for tier in served.tiers], self.tiers, self.classifier.describe())
        prices = {t.name: (t.input_usd_per_mtok, t.output_usd_per_mtok) for t in served.tiers}
        if self.prices and prices != self.prices:
            log.info(json.dumps({"event": "prices_changed", "model_version": served.model_version,
                                 "previous_model_version": self.prices_version, "usd_per_mtok": prices}))
        self.prices, self.prices_version = prices, served.model_version
        self.tenants.set_prices(self.prices)
        owed, self._owed = self._owed, {}
        for (_, tier), (tenant, usage) in owed.items():
            self.tenants.add_spend(tenant, self._cost(tier, usage))

    def _cost(self, tier: str, usage: dict) -> float:
        price_in, price_out = self.prices[tier]
        return (usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out) / 1e6

    # ------------------------------------------------------------------ routing
    def parse_model(self, name: object, tenant: Tenant | None = None) -> tuple[str | None, str | None]:
        """(mode, pinned tier) from `promptier`, `promptier/<mode>` or `promptier/tier/<tier>`; `promptier`
        is the tenant's default mode, and a tier pinned must be one the tenant may use (else 403)."""
        if name is None:  # as the OpenAI API has it: the field is required, and the caller is told what to send
            raise HTTPError(400, f"model is required; use one of {self.model_ids(tenant)}", code="invalid_model")
        if not isinstance(name, str):
            raise HTTPError(400, "model must be a string", code="invalid_model")
        parts = name.split("/")
        if parts[0] != ROUTER_PREFIX:
            raise HTTPError(404, f"model {name!r} does not exist; use one of {self.model_ids(tenant)}",
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
        raise HTTPError(404, f"model {name!r} does not exist; use one of {self.model_ids(tenant)}",
                        code="model_not_found")

    def model_ids(self, tenant: Tenant | None = None) -> list[str]:
        """The names requests may ask for: the router, its modes, and a pin per tier (the tenant's tiers)."""
        return ([ROUTER_PREFIX] + [f"{ROUTER_PREFIX}/{mode}" for mode in MODES]
                + [f"{ROUTER_PREFIX}/tier/{tier}" for tier in self.tiers if tenant is None or tenant.may_use(tier)])

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
        tier, reason, steered = self.capabilities.steer(route.tier, route.reason, needs,
                                                        tenant.allowed_names if tenant else None)
        if steered is not None:
            route.serve_on(tier, reason)  # its confidence becomes the steered-to tier's probability
            route.steered = steered
        return route

    async def classify(self, messages: list[tuple[str, str]], mode: str | None, tenant: Tenant | None = None
                       ) -> Route:
        """The classifier's tier (among the tenant's tiers), or the fallback tier when it fails or is too slow."""
        start = time.perf_counter()
        allowed = tenant.allowed_names if tenant else None
        fallback = tenant.fallback_tier if tenant else self.config.fallback_tier
        try:
            decision = await self.classifier.classify(messages, mode, allowed, tenant.name if tenant else None)
        except ClassifierUnavailable as error:
            cause = error.cause
            self.metrics.fallbacks.labels(cause).inc()
            detail = {"detail": error.detail} if error.detail else {}
            log.warning(json.dumps({"event": "classifier_fallback", "cause": cause, **detail}))
            return Route(fallback, "fallback", mode, None, (time.perf_counter() - start) * 1000, cause=cause)
        finally:
            self.metrics.overhead.observe(time.perf_counter() - start)
        if decision.tier not in self.tiers or (allowed is not None and decision.tier not in allowed):
            self.metrics.fallbacks.labels("unknown_tier").inc()
            return Route(fallback, "fallback", mode, None, (time.perf_counter() - start) * 1000, cause="unknown_tier")
        by_model = decision.decided_by == "model"  # the prior's tier comes from no scores and no threshold
        return Route(decision.tier, "classified", mode, decision.scores.get(decision.tier),
                     (time.perf_counter() - start) * 1000, decision.decided_by,
                     scores=decision.scores if by_model else None, model_version=decision.model_version,
                     threshold=decision.threshold if by_model else None,
                     cheap_floor=decision.cheap_floor if by_model else None)

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
        route.budget_spent = decision.exhausted
        if decision.reject:
            route.reason = decision.reason or route.reason
            raise HTTPError(429, f"the budget of this API key's tenant ({tenant.name}) for the current period is "
                            "spent; requests are refused until the period ends (see Retry-After)",
                            kind="insufficient_quota", code="budget_exhausted")
        if decision.reason is not None:
            route.unpaced_tier = route.tier
            route.serve_on(self.tiers[decision.tier], decision.reason)

    def explore(self, route: Route, tenant: Tenant) -> None:
        """With the configured exploration share, send a classified request to a tier drawn at random
        among those it may use, and record the propensity of its tier either way. A request of a tenant
        whose spend is ahead of its budget's pace, or spent, is never drawn (and has no propensity)."""
        share = self.config.exploration_share
        if share <= 0.0 or route.reason != "classified":
            return
        if route.budget_pressure is not None and route.budget_pressure > 0.0:
            return  # spend is ahead of the budget (or the budget is spent): no dearer tier by chance
        usable = [name for name in self.tiers
                  if tenant.may_use(name) and not self.capabilities.missing(name, route.needs)]
        if route.tier not in usable:
            return
        draw = draw_tier(route.tier, usable, share, self._rng)
        route.propensity = draw.propensity
        if draw.explored:
            route.serve_on(draw.tier, "explored")
            route.explored = True

    # ------------------------------------------------------------------ upstream
    async def open_upstream(self, route: Route, body: dict, tenant: Tenant | None = None
                            ) -> tuple[aiohttp.ClientResponse, str]:
        """Send to the routed tier; on 5xx, 401 (the tier's own key refused), a redirect, timeout or
        connection failure before the first byte, retry on the next more capable tier the tenant may use
        (never a cheaper one; none once the tenant's budget is spent). Returns the response and the tier
        that answered."""
        last_error = "no upstream tried"
        for tier in self.capabilities.escalation(route.tier, route.needs):
            if tenant is not None and not tenant.may_use(tier):
                continue
            if route.budget_spent and tier != route.tier:
                # A spent budget serves only the tier it was given: escalating every request to a dearer
                # tier while a cheap upstream is down would overrun the budget without bound.
                last_error += "; no escalation: this API key's tenant has spent its budget for the period"
                break
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
            route.upstream_tier = tier
            if route.failed_tiers:
                route.reason = "escalated"  # now, not once it answers: the caller may leave before that
            try:
                async with asyncio.timeout(upstream.first_byte_timeout_s):
                    # Redirects not followed: a chat completion is never redirected by a real upstream, and
                    # following one would post the caller's prompt (and, to the same origin, the tier's
                    # key) wherever the upstream, or anyone on a plain-HTTP path to it, points.
                    response = await self.http.post(f"{upstream.base_url}/chat/completions", data=payload,
                                                     headers=headers, timeout=timeout, allow_redirects=False)
                bound_body_reads(response, upstream.read_timeout_s)
            except TimeoutError:
                last_error = f"tier {tier}: upstream timed out"
            except aiohttp.ClientError as error:
                last_error = f"tier {tier}: upstream unreachable ({type(error).__name__})"
            else:
                status = response.status
                if status < 300 or (400 <= status < 500 and status != UPSTREAM_KEY_REFUSED):
                    if tier != route.tier:
                        route.reason = "escalated"
                    self.upstream_health.answered(tier)
                    return response, tier
                response.close()
                last_error = f"tier {tier}: upstream returned {status}"
                if status == UPSTREAM_KEY_REFUSED:
                    last_error += " (it refused the dispatcher's key for the tier)"
                elif status < 400:
                    last_error += " (a redirect, not followed)"
            route.failed_tiers.append(tier)
            self.metrics.escalations.labels(tier).inc()
            self.upstream_health.failed(tier, last_error)
            log.warning(json.dumps({"event": "upstream_failed", "tier": tier, "detail": last_error}))
        raise HTTPError(502, f"every eligible upstream failed; last: {last_error}", kind="upstream_error",
                        code="upstream_unavailable")

    def last_tier(self, route: Route) -> str:
        """Where the request ended: the last tier whose upstream was asked, else the routed tier."""
        return route.upstream_tier or route.tier

    def headers(self, route: Route, tier: str | None) -> dict[str, str]:
        """Every response: tier and upstream model (None: the request was refused before any upstream, and
        names none, least of all one its key may not use), reason. What only a classification knows (mode,
        confidence, classifier time, who decided) only when the request was classified: an empty
        header would read as a value."""
        headers = {f"{HEADER_PREFIX}reason": route.reason, f"{HEADER_PREFIX}request-id": route.request_id}
        if tier is not None:
            headers[f"{HEADER_PREFIX}tier"] = tier
            headers[f"{HEADER_PREFIX}upstream-model"] = self.config.tiers[tier].model
        if route.confidence is not None:
            headers[f"{HEADER_PREFIX}confidence"] = f"{route.confidence:.4f}"
        if route.mode:
            headers[f"{HEADER_PREFIX}mode"] = route.mode
        if route.classifier_ms is not None:
            headers[f"{HEADER_PREFIX}classifier-ms"] = f"{route.classifier_ms:.3f}"
        if route.decided_by is not None:
            headers[f"{HEADER_PREFIX}decided-by"] = route.decided_by
        if route.cause is not None:
            headers[f"{HEADER_PREFIX}cause"] = route.cause
        if route.needs.features:
            headers[f"{HEADER_PREFIX}needs"] = ",".join(route.needs.features)
        if route.steered is not None:
            headers[f"{HEADER_PREFIX}steered-from"] = route.steered.from_tier
            headers[f"{HEADER_PREFIX}steered-by"] = ",".join(route.steered.by)
        if route.budget_pressure is not None:
            headers[f"{HEADER_PREFIX}budget-pressure"] = f"{route.budget_pressure:.3f}"
        if route.failed_tiers:
            headers[f"{HEADER_PREFIX}failed-tiers"] = ",".join(route.failed_tiers)
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
        text_cut = 0
        if self.decisions.store_prompts:
            limit = self.config.decision_log.max_text_chars
            prompt, text_cut = cut_text(_logged_prompt(messages), limit)
            if len(messages) > 1:  # for a judge: the conversation as it was, in order
                conversation, cut = cut_messages([{"role": role, "content": content} for role, content in messages],
                                                 limit)
                text_cut += cut
        cost = None
        counted = usage
        if usage is None and completion_chars is not None and tier is not None:
            counted = estimated_usage(sum(len(content) for _, content in messages), completion_chars)
            note = f"{note}; {ESTIMATED}" if note else ESTIMATED
        if counted and tier in self.prices:
            cost = self._cost(tier, counted)
        elif counted and tier is not None and tenant.budget is not None:
            # Prices come from the classifier, which has not answered since the start: the answer is paid
            # for all the same, so its tokens are held and charged once the prices are known.
            owed = self._owed.setdefault((tenant.name, tier), (tenant, {"prompt_tokens": 0, "completion_tokens": 0}))[1]
            owed["prompt_tokens"] += counted["prompt_tokens"]
            owed["completion_tokens"] += counted["completion_tokens"]
            note = f"{note}; {OWED}" if note else OWED
        self.tenants.charge(tenant, tier, cost)
        self.metrics.requests.labels(tier or self.last_tier(route), route.reason, str(status)).inc()
        line = DecisionRecord(
            prompt_id=route.request_id, prompt=prompt, messages=conversation,
            model=self.config.tiers[tier].model if tier else None, score=None, cost_usd=cost,
            source="dispatcher", category="", tier=tier, routed_tier=route.tier, reason=route.reason,
            mode=route.mode, confidence=route.confidence, decided_by=route.decided_by,
            classifier_ms=route.classifier_ms, latency_ms=(time.perf_counter() - started) * 1000, usage=counted,
            status=status, note=note, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            needs=list(route.needs.features), estimated_tokens=route.needs.tokens,
            steered=route.steered.as_dict() if route.steered is not None else None, tenant=tenant.name,
            scores=route.scores, unpaced_tier=route.unpaced_tier, budget_pressure=route.budget_pressure,
            propensity=route.propensity, explored=route.explored, failed_tiers=list(route.failed_tiers),
            model_version=route.model_version, threshold=route.threshold, cheap_floor=route.cheap_floor,
            text_cut_chars=text_cut or None, cause=route.cause,
        ).as_dict()
        try:
            self.decisions.write(line)
        except OSError as error:
            # The caller's answer is already paid for: a log that cannot take its line must not turn it into
            # a 500. The line goes to the process log, where its routing and spend can be recovered, and is
            # counted; not its prompt text, which that log (kept by other people, for other times) must not get.
            self.metrics.decisions_not_written.inc()
            kept = {key: value for key, value in line.items() if key not in ("prompt", "messages")}
            log.error(json.dumps({"event": "decision_not_written", "detail": str(error), "line": kept}))


def _logged_prompt(messages: list[tuple[str, str]]) -> str:
    """The text the classifier read for this request, so that training on the decision log sees what
    serving sees (for a conversation: the latest user turn first, then the earlier turns, newest first)."""
    try:
        return render_conversation(messages)
    except InvalidInputError:  # nothing the classifier could read (it fell back): keep what there is
        return "\n\n".join(content for _, content in messages)

