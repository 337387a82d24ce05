"""The dispatcher's HTTP app: OpenAI-compatible chat completions in front of the tiers' upstreams, with
health, the models list, outcome reports, metrics and the savings page.

`create_app(config)` builds the ASGI app (plain Starlette: FastAPI's per-request middleware layers
showed in the dispatcher's profile); `promptier dispatch --config dispatcher.yaml` serves it, one app per
worker process (`serving.dispatch.worker`). Every chat response says, in x-promptier-* headers, which
tier and upstream model served it and why.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.routing import Route as Endpoint
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.dispatch.chat import ChatCompletions
from serving.dispatch.decision_log import CLIENT_CLOSED
from serving.dispatch.dispatch_config import DispatcherConfig
from serving.dispatch.dispatch_supervisor import METRICS_DIR_ENV
from serving.dispatch.dispatcher import Dispatcher
from serving.dispatch.http_error import HTTPError
from serving.dispatch.inbound import INBOUND_ATTRIBUTE
from serving.dispatch.inbound_request import HostCheck, caller, read_body
from serving.dispatch.outcomes import MAX_OUTCOMES_BODY_BYTES, OutcomeError, parse_outcomes, record_outcomes
from serving.dispatch.route_classifier import GrpcRouteClassifier
from serving.dispatch.savings_page import EVERY_TENANT, SavingsAccess, SavingsReport, savings_routes
from serving.dispatch.upstream_body import ResponseCut

log = logging.getLogger("promptier.dispatcher")


class _Asgi:
    """An ASGI app that a Route serves as it is (a plain function would be taken for a request handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _OperatorsOnly:
    """An ASGI app answered only to a caller whose key sees every tenant's figures (an operator key),
    others 401: /metrics has every tenant's spend, budget and requests by tier in its labels, which the
    savings page shows a tenant's key only for its own tenant."""

    def __init__(self, app: ASGIApp, access: SavingsAccess) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = Request(scope).headers.get("authorization", "")
        if self.access.view(authorization) != EVERY_TENANT:
            refused = HTTPError(401, "/metrics shows every tenant's figures: it needs an operator key "
                                "(savings_page.operator_keys_env) as `authorization: Bearer KEY`",
                                kind="authentication_error", code="invalid_api_key")
            await refused.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    """An unknown path in the OpenAI error shape (OpenAI's SDKs read `error.message` from it)."""
    return HTTPError(404, f"no such endpoint: {request.url.path}", code="unknown_url").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    """A method a path does not take, in the OpenAI error shape, with the `Allow` header HTTP asks for."""
    allowed = getattr(exc, "headers", None) or {}
    return HTTPError(405, f"{request.method} is not allowed on {request.url.path}",
                     code="method_not_allowed").response(headers=dict(allowed))


def _model_object(model_id: str) -> dict[str, object]:
    """A router model name in OpenAI's Model shape (whose `created` is always an integer)."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "promptier"}


def create_app(config: DispatcherConfig) -> ASGIApp:
    """The dispatcher as an ASGI app (tests run it with uvicorn on port 0)."""
    dispatcher = Dispatcher(config)
    fingerprint = config.fingerprint  # a hash of the whole config: once, not per health probe

    shared_metrics_dir = os.environ.get(METRICS_DIR_ENV)
    # Who sees what of the tenants' figures (the savings page, /health's details, /metrics once operator
    # keys are set): an operator key every tenant's, a tenant's key its own, anyone all where no key is set.
    access = SavingsAccess(dispatcher.tenants, config.operator_keys())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dispatcher.start()
        yield
        await dispatcher.close()
        if shared_metrics_dir:
            multiprocess.mark_process_dead(os.getpid(), shared_metrics_dir)  # its live gauges leave the sums

    async def health(request: Request) -> Response:
        """Liveness and state for anyone (a load balancer has no key). Where the classifier and the spend
        store live and which tenants have budgets only for whoever sees every tenant's figures: an operator
        key, or anyone on a dispatcher without keys."""
        reachable = await dispatcher.classifier.served() is not None
        classifier_state = "serving" if reachable else "unavailable (requests go to the fallback tier)"
        upstreams = dispatcher.upstream_health
        # 200 all the same: the process serves, and a load balancer that took every replica out because
        # the upstreams are down would turn callers' 502s, which say why, into refused connections.
        status = "degraded: every tier's upstream failed its last request" if upstreams.every_tier_failing() else "ok"
        body: dict[str, object] = {"status": status, "classifier": classifier_state,
                                   "fallback_tier": config.fallback_tier, "config_fingerprint": fingerprint,
                                   "upstreams": upstreams.states()}
        if isinstance(dispatcher.classifier, GrpcRouteClassifier):
            # How many of the service's processes this dispatcher's connections reach (null: not known yet).
            body["classifier_processes_reached"] = dispatcher.classifier.processes_reached
        spend = dispatcher.tenants.health()
        if spend:
            body["spend_store_state"] = "ok" if spend["spend_store_state"] == "ok" else "failing"
        if access.view(request.headers.get("authorization", "")) == EVERY_TENANT:
            body["classifier_source"] = dispatcher.classifier.describe()
            body["upstream_failures"] = upstreams.failures()
            body.update(spend)
        return JSONResponse(body)

    async def outcomes(request: Request) -> Response:
        """Scores for earlier answers (serving.dispatch.outcomes), appended to the decision log for training."""
        try:
            reporter = caller(request, dispatcher.tenants)
            reports = parse_outcomes(await read_body(request, MAX_OUTCOMES_BODY_BYTES))
        except HTTPError as error:
            return error.response()
        except OutcomeError as error:
            return HTTPError(400, str(error), code="invalid_outcome").response()
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        try:
            accepted = record_outcomes(dispatcher.decisions, reports, reporter.name)
        except OSError as error:
            # None of the batch is kept, so the judge can send it again as it is: a 503, which clients retry.
            log.error(json.dumps({"event": "outcomes_not_written", "tenant": reporter.name, "outcomes": len(reports),
                                  "detail": str(error)}))
            return HTTPError(503, f"the outcomes could not be written ({error.strerror or error}); none of them "
                                  "was kept: send them again", kind="server_error",
                             code="outcomes_not_written").response()
        dispatcher.metrics.outcomes.inc(accepted)
        return JSONResponse({"accepted": accepted}, status_code=202)

    async def models(request: Request) -> Response:
        """The model names a caller may ask for: with inbound keys, the key's tenant's (as OpenAI's API,
        a key is needed), so that no tier pin the tenant would be refused is offered."""
        tenant = dispatcher.tenants.authenticate(request.headers.get("authorization", ""))
        if tenant is None:
            return HTTPError(401, "invalid or missing API key", kind="authentication_error",
                             code="invalid_api_key").response()
        data = [_model_object(model_id) for model_id in dispatcher.model_ids(tenant)]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        """One model name, as OpenAI's `GET /v1/models/{model}` gives it (the SDK's `models.retrieve`)."""
        tenant = dispatcher.tenants.authenticate(request.headers.get("authorization", ""))
        if tenant is None:
            return HTTPError(401, "invalid or missing API key", kind="authentication_error",
                             code="invalid_api_key").response()
        name = request.path_params["name"]
        if name not in dispatcher.model_ids(tenant):
            return HTTPError(404, f"model {name[:200]!r} does not exist; use one of {dispatcher.model_ids(tenant)}",
                             code="model_not_found").response()
        return JSONResponse(_model_object(name))

    chat = ChatCompletions(dispatcher)

    exposed = dispatcher.metrics.registry
    if shared_metrics_dir:
        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed, shared_metrics_dir)
    metrics = make_asgi_app(registry=exposed)
    if access.has_operators:  # operators are told apart from tenants: the per-tenant series are theirs alone
        metrics = _OperatorsOnly(metrics, access)
    elif not dispatcher.tenants.open:
        # Callers need keys, yet /metrics labels every tenant's spend and budget for anyone who reaches the
        # port: as documented, but a team that set keys to keep tenants apart would not expect it.
        log.warning(json.dumps({"event": "metrics_open", "detail": "requests need a key, but /metrics shows "
                                "every tenant's spend, budget and requests to any caller: set "
                                "savings_page.operator_keys_env to keep it to operators"}))
    app = Starlette(lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_allowed}, routes=[
        Endpoint("/health", health, methods=["GET"]),
        Endpoint("/v1/models", models, methods=["GET"]),
        Endpoint("/v1/models/{name:path}", model, methods=["GET"]),  # path: ids hold slashes (promptier/cost)
        Endpoint("/v1/chat/completions", chat.handle, methods=["POST"]),
        Endpoint("/v1/promptier/outcomes", outcomes, methods=["POST"]),
        # Both /metrics and /metrics/: a Mount alone answers the first with a redirect plain curl does not follow.
        Endpoint("/metrics", _Asgi(metrics), methods=["GET", "HEAD"]),
        Mount("/metrics", metrics),
        *(savings_routes(SavingsReport(config.decision_log.path, config.decision_log.backups,
                                       config.savings_page.max_bytes, dispatcher.tiers, lambda: dispatcher.prices,
                                       dispatcher.tenants.top_tiers()),
                         access)
          if config.savings_page.enabled else []),
    ])
    app.state.dispatcher = dispatcher
    # Starlette answers `/v1/models/` with a redirect to the URL built from the request's own Host header,
    # which a cache in front would keep and serve to others; OpenAI's API answers a 404, and so does this.
    app.router.redirect_slashes = False

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
            dispatcher.metrics.refused.labels("403", "host_not_allowed").inc()
            await host_refused(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
            try:
                response = await chat.handle(Request(scope, receive))
            except Exception:  # what ServerErrorMiddleware would do, without its cost on every request
                log.exception("unhandled error in chat completions")
                dispatcher.metrics.refused.labels("500", "server_error").inc()
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
