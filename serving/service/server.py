"""The gRPC server: Router (Classify, ClassifyBatch, Info), Admin (Reload), health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import socket
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import classifier
from classifier import ClassificationResult, InvalidInputError, PromptierError, RoutingRequest, TierClassifier
from classifier.conversation import render_conversation
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.common.batcher import (
    Batcher,
    BatcherStoppedError,
    DeadlineExpiredError,
    Lane,
    QueueFullError,
    monotonic_ms,
)
from serving.common.startup import freeze_startup_objects
from serving.service.metrics import ServerMetrics
from serving.service.reflection import enable_reflection

log = logging.getLogger("promptier.server")

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
ADMIN_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
ADMIN_TOKEN_ENV = "PROMPTIER_ADMIN_TOKEN"  # read from the environment: a command line is visible in `ps`


# Kept free for what else a server process opens (model files, metrics, logs) when the connection
# limit is derived from the open-file limit.
RESERVED_FILE_DESCRIPTORS = 128
# An upper bound for the derived connection limit, for processes whose open-file limit is huge.
DEFAULT_MAX_CONNECTIONS_CAP = 10_000
# How long a call, once aborted by the server, has to be answered before gRPC cancels it on shutdown.
STOP_ANSWER_S = 5.0
# A cancellation this close to the call's deadline is the client's deadline passing (its clock started
# a network hop before ours), not the client cancelling.
DEADLINE_SLACK_S = 0.1
# The longest model_dir an Admin.Reload accepts (Linux PATH_MAX).
MAX_MODEL_DIR_BYTES = 4096


def default_max_connections() -> int:
    """Connections to accept at once: the open-file limit less a reserve, so that a flood of connections
    cannot take the descriptors the process needs to go on serving the connections it has."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS_CAP
    return max(16, min(DEFAULT_MAX_CONNECTIONS_CAP, soft - RESERVED_FILE_DESCRIPTORS))


@dataclass(frozen=True)
class ServerLimits:
    """Bounds enforced at the boundary (and reported by Info), and how connections are bounded.

    Queues are counted in prompts: `max_queue` for Classify calls, `max_batch_queue` for
    ClassifyBatch calls, so batch traffic cannot fill the room single calls need (see
    serving.common.batcher). A call that does not fit is refused RESOURCE_EXHAUSTED at once.

    Connections: one that has not completed its HTTP/2 preface within `handshake_timeout_s` is
    closed, as is one without a call for `idle_timeout_s` (None: never) or older than
    `max_connection_age_s` (None: never; calls in flight get `max_connection_age_grace_s` more).
    A silent peer is pinged after `keepalive_time_s` (None: gRPC's default, 2 hours) and dropped if it
    does not answer within `keepalive_timeout_s`. Beyond `max_connections` (None: derived from the
    open-file limit) new connections are closed at once; a client may have `max_streams` calls in flight
    per connection (it queues more itself).
    """

    max_prompt_chars: int = 1_000_000
    max_batch_items: int = 256
    max_queue: int = 1024
    max_batch_queue: int = 1024
    max_batch: int = 64
    max_message_bytes: int = 16 * 1024 * 1024
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float | None = 300.0
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    keepalive_time_s: float | None = 60.0
    keepalive_timeout_s: float = 20.0
    max_connections: int | None = None
    max_streams: int = 256

    def __post_init__(self) -> None:
        required = (self.max_prompt_chars, self.max_batch_items, self.max_queue, self.max_batch_queue,
                    self.max_batch, self.max_message_bytes, self.handshake_timeout_s, self.keepalive_timeout_s,
                    self.max_streams)
        optional = (self.idle_timeout_s, self.max_connection_age_s, self.keepalive_time_s, self.max_connections)
        if (not all(value > 0 for value in required) or not all(value is None or value > 0 for value in optional)
                or self.max_connection_age_grace_s < 0):
            raise ValueError(f"every limit must be positive (None where allowed: no limit): {self}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC core channel arguments that enforce the connection bounds."""
        def ms(seconds: float) -> int:
            return max(1, min(2**31 - 1, round(seconds * 1000)))

        connections = self.max_connections or default_max_connections()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
            ("grpc.max_allowed_incoming_connections", connections),
            ("grpc.max_concurrent_streams", self.max_streams),
            # gRPC core sheds calls that wait for the application past a backlog of 1,000 (randomly, up
            # to 3,000), and the caller sees a bare CANCELLED that no handler ever counted. Every call
            # must reach the handlers, which refuse overload explicitly: the backlog is bounded by
            # connections x streams instead.
            ("grpc.server.max_pending_requests", min(2**31 - 1, connections * self.max_streams)),
            ("grpc.server.max_pending_requests_hard_limit", min(2**31 - 1, connections * self.max_streams)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that carries no data
        ]
        if self.idle_timeout_s is not None:
            options.append(("grpc.max_connection_idle_ms", ms(self.idle_timeout_s)))
        if self.max_connection_age_s is not None:
            options += [("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]
        if self.keepalive_time_s is not None:
            options.append(("grpc.keepalive_time_ms", ms(self.keepalive_time_s)))
        return options


class BadRequest(Exception):
    """INVALID_ARGUMENT with a message meant for the caller."""


class BindError(PromptierError):
    """The server could not listen on its address (the port is taken, or the address is not this host's)."""


def ensure_port_free(host: str, port: int) -> None:
    """Raise BindError, saying why, if `host:port` cannot be listened on.

    `--workers` checks this once before starting: the workers bind with SO_REUSEPORT, which a port
    held by another such server would let them share, where this plain bind fails.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as error:
        raise BindError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


# Bounds on what a status message echoes back. gRPC sends the message percent-encoded in the
# trailers, and a client refuses trailers past its metadata limit (8 KiB by default) with
# RESOURCE_EXHAUSTED, which clients retry: a long invalid field must still read INVALID_ARGUMENT.
MAX_QUOTED_CHARS = 200
MAX_DETAIL_BYTES = 2048
_QUOTED = re.compile("'[^'\\n]*'|\"[^\"\\n]*\"")


def bounded_detail(text: str) -> str:
    """`text` with each quoted value cut to MAX_QUOTED_CHARS characters and the whole to MAX_DETAIL_BYTES
    bytes once percent-encoded. Every status message and item error goes through here."""
    def shorten(match: re.Match[str]) -> str:
        quoted = match.group(0)
        if len(quoted) <= MAX_QUOTED_CHARS + 2:
            return quoted
        return f"{quoted[: MAX_QUOTED_CHARS + 1]}...{quoted[-1]} ({len(quoted) - 2} characters)"

    text = _QUOTED.sub(shorten, text)
    encoded = 0
    for index, char in enumerate(text):
        encoded += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "replace"))
        if encoded > MAX_DETAIL_BYTES:
            return text[:index] + "... (cut)"
    return text


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, bounded_detail(message))
    raise AssertionError("unreachable: abort raises")


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one table from errors to gRPC status codes. Unexpected errors never leak their text."""
    if isinstance(error, InvalidInputError | BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, bounded_detail(str(error))
    if isinstance(error, QueueFullError):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded: the {error.lane} classification queue is full; retry later")
    if isinstance(error, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the model could run"
    if isinstance(error, BatcherStoppedError):
        return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another instance"
    return grpc.StatusCode.INTERNAL, "internal error"


class ModelHolder:
    """The live model. Reload validates a new artifact fully before swapping the reference.

    `start_directory` is the directory the server was started with (None: the shipped default model):
    what an empty Admin.Reload and SIGHUP load, even after a reload from another directory.
    `directory` is the one the serving model came from.
    """

    def __init__(self, model: TierClassifier, directory: Path | None, threads: int) -> None:
        self.model = model
        self.start_directory = directory
        self.directory = directory
        self._threads = threads
        self._lock = asyncio.Lock()

    async def reload(self, directory: Path | None) -> tuple[str, str]:
        """Load `directory` (None: the start directory) and swap it in; returns (new, previous) versions."""
        async with self._lock:
            target = self.start_directory if directory is None else directory
            loop = asyncio.get_running_loop()
            new = await loop.run_in_executor(None, classifier.load, target, self._threads)
            previous = self.model.model_version
            self.model, self.directory = new, target  # one reference assignment: atomic for readers
            return new.model_version, previous


def _routing_request(request: router_pb2.ClassifyRequest) -> RoutingRequest | None:
    if not request.HasField("policy"):  # most requests: a quarter of the cost of reading an empty policy
        return None
    policy = request.policy
    has = {field.name for field, _ in policy.ListFields()}
    if not has:
        return None
    return RoutingRequest(
        mode=policy.mode or None,
        threshold=policy.threshold if "threshold" in has else None,
        top_share=policy.top_share if "top_share" in has else None,
        allowed_tiers=tuple(policy.allowed_tiers) if policy.allowed_tiers else None,
    )


def _prompt_text(request: router_pb2.ClassifyRequest, limits: ServerLimits) -> str:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        text = request.prompt
    elif kind == "conversation":
        messages = [(m.role, m.content) for m in request.conversation.messages]
        if any(len(content) > limits.max_prompt_chars for _, content in messages):
            raise BadRequest(f"a message is longer than {limits.max_prompt_chars} characters")
        text = render_conversation(messages)
    else:
        raise BadRequest("request has neither prompt nor conversation")
    if len(text) > limits.max_prompt_chars:
        raise BadRequest(f"prompt has {len(text)} characters; the limit is {limits.max_prompt_chars}")
    return text


def _fill(response: router_pb2.ClassifyResponse, result: ClassificationResult, latency_ms: float
          ) -> router_pb2.ClassifyResponse:
    """Write a result into a response in place. For batch items this is about half the cost of building
    a message and copying it in (`items.add(result=...)`), and it runs under the GIL that the model
    thread's tokenizer needs."""
    response.tier, response.threshold, response.truncated = result.tier, result.threshold, result.truncated
    response.tokens, response.model_version, response.server_latency_ms = (result.tokens, result.model_version,
                                                                           latency_ms)
    response.decided_by = result.decided_by
    if result.familiarity is not None:
        response.familiarity = result.familiarity
    scores = response.scores
    for tier, score in result.scores.items():  # the map's update() is a Python loop anyway
        scores[tier] = score
    return response


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, holder: ModelHolder, batcher: Batcher, metrics: ServerMetrics, limits: ServerLimits) -> None:
        self._holder, self._batcher, self._metrics, self._limits = holder, batcher, metrics, limits
        self._instance = uuid.uuid4().hex[:16]  # per process: each --workers process has its own service

    def _record(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()
        self._metrics.latency.labels(rpc).observe(time.perf_counter() - start)

    def _count(self, results: list[ClassificationResult]) -> None:
        """Tier decisions and truncations, one counter update per tier rather than per prompt."""
        counts: dict[str, int] = {}  # a plain dict: a Counter costs more than it saves for one result
        for result in results:
            counts[result.tier] = counts.get(result.tier, 0) + 1
        for tier, count in counts.items():
            self._metrics.tiers.labels(tier).inc(count)
        truncated = sum(result.truncated for result in results)
        if truncated:
            self._metrics.truncations.inc(truncated)

    async def _fail(self, context: grpc.aio.ServicerContext, rpc: str, error: BaseException, start: float
                    ) -> NoReturn:
        code, message = _status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", rpc, exc_info=error)
        if isinstance(error, QueueFullError):
            self._metrics.overload.labels(rpc, f"{error.lane}_queue_full").inc()
        self._record(rpc, code, start)
        await _abort(context, code, message)

    def _cancelled(self, context: grpc.aio.ServicerContext, rpc: str, start: float) -> None:
        """Count a call that gRPC cancelled under its handler: the client's deadline passed or it went away."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        self._record(rpc, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED, start)

    async def _submit(self, items: list[tuple[object, RoutingRequest | None]], context: grpc.aio.ServicerContext,
                      lane: Lane) -> list[ClassificationResult | InvalidInputError]:
        return await self._batcher.submit(items, context.time_remaining(), lane)

    async def Classify(self, request: router_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
                       ) -> router_pb2.ClassifyResponse:
        start = time.perf_counter()
        try:
            item = (_prompt_text(request, self._limits), _routing_request(request))
            (outcome,) = await self._submit([item], context, "unary")
            if isinstance(outcome, InvalidInputError):
                raise outcome
        except asyncio.CancelledError:
            self._cancelled(context, "Classify", start)
            raise
        except Exception as error:
            await self._fail(context, "Classify", error, start)
        self._count([outcome])
        self._record("Classify", grpc.StatusCode.OK, start)
        return _fill(router_pb2.ClassifyResponse(), outcome, monotonic_ms(start))

    async def ClassifyBatch(self, request: router_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
                            ) -> router_pb2.ClassifyBatchResponse:
        start = time.perf_counter()
        items: list[tuple[object, RoutingRequest | None] | BaseException] = []
        try:
            if len(request.items) > self._limits.max_batch_items:
                raise BadRequest(f"{len(request.items)} items; the limit is {self._limits.max_batch_items}")
            for item in request.items:
                try:
                    items.append((_prompt_text(item, self._limits), _routing_request(item)))
                except (BadRequest, InvalidInputError) as error:
                    items.append(error)
            valid = [item for item in items if not isinstance(item, BaseException)]
            outcomes = iter(await self._submit(valid, context, "batch") if valid else [])
        except asyncio.CancelledError:
            self._cancelled(context, "ClassifyBatch", start)
            raise
        except Exception as error:
            await self._fail(context, "ClassifyBatch", error, start)
        latency = monotonic_ms(start)
        response = router_pb2.ClassifyBatchResponse()
        answered: list[ClassificationResult] = []
        for item in items:
            outcome = item if isinstance(item, BaseException) else next(outcomes)
            if isinstance(outcome, BaseException):
                code, message = _status_of(outcome)
                response.items.add(error=router_pb2.ItemError(code=code.name, message=message))
            else:
                answered.append(outcome)
                _fill(response.items.add().result, outcome, latency)
        self._count(answered)
        self._record("ClassifyBatch", grpc.StatusCode.OK, start)
        return response

    async def Info(self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> router_pb2.InfoResponse:
        manifest = self._holder.model.manifest
        self._metrics.requests.labels("Info", "OK").inc()
        return router_pb2.InfoResponse(
            model_version=manifest.model_version,
            tiers=[router_pb2.Tier(name=t.name, input_usd_per_mtok=t.input_usd_per_mtok,
                                   output_usd_per_mtok=t.output_usd_per_mtok) for t in manifest.tiers],
            mode_thresholds=manifest.policy.thresholds, default_mode=manifest.policy.default_mode,
            max_tokens=manifest.truncation.max_tokens, max_prompt_chars=self._limits.max_prompt_chars,
            max_batch_items=self._limits.max_batch_items, data_fingerprint=manifest.data_fingerprint,
            server_instance=self._instance,
        )


_Handler = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]
# Answers a request that does not parse (it must abort): (method name, context, the parse error).
_OnMalformed = Callable[[str, grpc.aio.ServicerContext, DecodeError], Awaitable[NoReturn]]


def _parsing_handlers(service: str, methods: dict[str, tuple[_Handler, type[Message]]],
                      on_malformed: _OnMalformed) -> grpc.GenericRpcHandler:
    """Unary handlers that parse requests themselves, so a malformed message (invalid UTF-8 in a
    string field, truncated bytes) is answered by `on_malformed` (INVALID_ARGUMENT) rather than by
    grpcio's UNKNOWN naming a Python exception class."""

    def parsing(name: str, method: _Handler, message_type: type[Message]) -> grpc.RpcMethodHandler:
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            try:
                request = message_type.FromString(raw)
            except DecodeError as error:
                await on_malformed(name, context, error)
            return await method(request, context)

        return grpc.unary_unary_rpc_method_handler(handler, response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(
        service, {name: parsing(name, method, message_type) for name, (method, message_type) in methods.items()})


def _router_handlers(service: RouterService, metrics: ServerMetrics) -> grpc.GenericRpcHandler:
    async def malformed(method: str, context: grpc.aio.ServicerContext, error: DecodeError) -> NoReturn:
        metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")

    return _parsing_handlers(ROUTER_SERVICE, {
        "Classify": (service.Classify, router_pb2.ClassifyRequest),
        "ClassifyBatch": (service.ClassifyBatch, router_pb2.ClassifyBatchRequest),
        "Info": (service.Info, router_pb2.InfoRequest),
    }, malformed)


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`) is this host."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # some gRPC versions write IPv6 brackets as %5B and %5D
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%")[0]
    else:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 caller of a dual-stack [::] listener
    return address.is_loopback


class AdminService(router_pb2_grpc.AdminServicer):
    """Reload swaps the model every caller is routed by, from any directory the server can read, so it
    is not open to whoever reaches the port: with a token (PROMPTIER_ADMIN_TOKEN) a call must present
    it as `authorization: Bearer <token>`; without one, only callers on this host are accepted."""

    def __init__(self, server: RunningServer, token: str | None = None) -> None:
        self._server = server
        self._token = token

    def _refusal(self, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        if self._token is not None:
            metadata = {key: value for key, value in context.invocation_metadata() or ()}
            supplied = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
            if not hmac.compare_digest(supplied.encode(), self._token.encode()):
                return grpc.StatusCode.UNAUTHENTICATED, "Admin calls need the header 'authorization: Bearer <token>'"
            return None
        if not is_local_peer(context.peer()):
            return (grpc.StatusCode.PERMISSION_DENIED, "Admin calls are accepted only from this host unless the "
                    "server is started with PROMPTIER_ADMIN_TOKEN set (then with that token); SIGHUP also reloads")
        return None

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Abort (counted, logged) unless the caller may use Admin."""
        refusal = self._refusal(context)
        if refusal is not None:
            self._server.metrics.reloads.labels("denied").inc()
            log.warning(json.dumps({"event": "admin_denied", "rpc": "Reload", "peer": context.peer(),
                                    "code": refusal[0].name}))
            await _abort(context, *refusal)

    async def malformed(self, method: str, context: grpc.aio.ServicerContext, error: DecodeError) -> NoReturn:
        """A request that does not parse: refused as any Admin call first, then INVALID_ARGUMENT."""
        await self._authorize(context)
        self._server.metrics.reloads.labels("invalid").inc()
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")

    async def Reload(self, request: router_pb2.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> router_pb2.ReloadResponse:
        await self._authorize(context)
        problem = _model_dir_problem(request.model_dir)
        if problem is not None:
            self._server.metrics.reloads.labels("invalid").inc()
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            version, previous = await self._server.reload(Path(request.model_dir) if request.model_dir else None)
        except PromptierError as error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"reload refused, old model still serving: {error}")
        except Exception:
            log.exception("unexpected error in Reload")
            self._server.metrics.reloads.labels("error").inc()
            await _abort(context, grpc.StatusCode.INTERNAL, "reload failed on an internal error; the old model "
                         "is still serving")
        return router_pb2.ReloadResponse(model_version=version, previous_model_version=previous)


def _model_dir_problem(model_dir: str) -> str | None:
    """Why `model_dir` cannot name a directory (None: it can, or it is empty, meaning the start directory)."""
    if "\0" in model_dir:
        return "model_dir contains a NUL character; it must be a directory path"
    if len(model_dir.encode("utf-8")) > MAX_MODEL_DIR_BYTES:
        return f"model_dir is longer than {MAX_MODEL_DIR_BYTES} bytes; it must be a directory path"
    return None


def _admin_handlers(service: AdminService) -> grpc.GenericRpcHandler:
    return _parsing_handlers(ADMIN_SERVICE, {"Reload": (service.Reload, router_pb2.ReloadRequest)},
                             service.malformed)


class RunningServer:
    """A started server. `port` is the bound port (useful with port 0 in tests)."""

    def __init__(self, server: grpc.aio.Server, port: int, holder: ModelHolder, batcher: Batcher,
                 health_servicer: health.aio.HealthServicer, metrics: ServerMetrics) -> None:
        self.server, self.port, self.holder, self.batcher = server, port, holder, batcher
        self.health, self.metrics = health_servicer, metrics

    async def reload(self, directory: Path | None = None) -> tuple[str, str]:
        """Load, validate and swap in a new artifact; on failure the old model keeps serving.

        `directory` None reloads the directory the server was started with (what SIGHUP does).
        """
        try:
            version, previous = await self.holder.reload(directory)
        except PromptierError as error:
            self.metrics.reloads.labels("refused").inc()
            log.error(json.dumps({"event": "reload_refused", "reason": bounded_detail(str(error))}))
            raise
        self.metrics.reloads.labels("ok").inc()
        log.info(json.dumps({"event": "reloaded", "model_version": version, "previous": previous,
                             "directory": str(self.holder.directory or "the shipped default model")}))
        return version, previous

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, stop accepting, let in-flight RPCs finish within `grace` seconds.

        What still waits for the model after `grace` is answered UNAVAILABLE (counted), before gRPC
        would cancel it: a caller never sees a bare CANCELLED from a shutdown.
        """
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace + STOP_ANSWER_S))
        await self.batcher.drain(grace)
        await self.batcher.stop()
        await stopping

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(model_dir: Path | None = None, address: str = "127.0.0.1:0", threads: int = 1,
                       limits: ServerLimits | None = None, model: TierClassifier | None = None,
                       reuse_port: bool = False, admin_token: str | None = None) -> RunningServer:
    """Load the model, then bind and start. A bad artifact raises here, before any port is opened.

    Args:
        model_dir: artifact directory (None = the shipped default model).
        address: host:port; port 0 picks a free one (see RunningServer.port).
        threads: ONNX Runtime threads for the model worker.
        limits: request, queue and connection bounds (see ServerLimits).
        model: an already loaded model to serve instead of loading `model_dir` (tests).
        reuse_port: share the port with other server processes (SO_REUSEPORT; `--workers`).
        admin_token: the token Admin calls must present; None accepts Admin calls from this host only.

    Raises:
        PromptierError: the artifact is invalid (ArtifactError) or the address cannot be bound (BindError).
    """
    limits = limits or ServerLimits()
    metrics = ServerMetrics()
    health_servicer = health.aio.HealthServicer()
    for service in ("", ROUTER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    if model is None:
        model = await asyncio.get_running_loop().run_in_executor(None, classifier.load, model_dir, threads)
    loaded: TierClassifier = model
    holder = ModelHolder(loaded, model_dir, threads)
    batcher = Batcher(lambda: holder.model, metrics.batcher, max_queue=limits.max_queue, max_batch=limits.max_batch,
                      max_batch_queue=limits.max_batch_queue)
    server = grpc.aio.server(options=[
        *limits.grpc_options(),
        # Off unless asked: two servers started by mistake on one port must fail, not split traffic.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    server.add_generic_rpc_handlers((_router_handlers(RouterService(holder, batcher, metrics, limits), metrics),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((ROUTER_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                      server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio says only "Failed to bind"; a plain bind says why
        host, _, number = address.rpartition(":")
        if number.isdigit():
            ensure_port_free(host, int(number))
        raise BindError(f"cannot listen on {address}") from error
    running = RunningServer(server, port, holder, batcher, health_servicer, metrics)
    server.add_generic_rpc_handlers((_admin_handlers(AdminService(running, admin_token)),))
    batcher.start()
    await server.start()
    for service in ("", ROUTER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return running


async def serve_forever(model_dir: Path | None, address: str, threads: int, metrics_port: int | None,
                        grace: float = 10.0, reuse_port: bool = False, limits: ServerLimits | None = None) -> None:
    """The `promptier serve` loop: SIGTERM/SIGINT drain and exit, SIGHUP reloads the directory the
    server was started with (as an empty Admin.Reload does).

    Raises:
        PromptierError: the artifact is invalid, or the gRPC or metrics address cannot be bound.
    """
    running = await start_server(model_dir, address, threads, limits=limits, reuse_port=reuse_port,
                                 admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    freeze_startup_objects()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        # On the gRPC interface: a server kept on loopback does not publish its metrics to the network.
        metrics_host = address.rpartition(":")[0].strip("[]") or "0.0.0.0"
        try:
            start_http_server(metrics_port, addr=metrics_host, registry=running.metrics.registry)
        except OSError as error:
            await running.stop(0)
            raise BindError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {error.strerror}") from error
    log.info(json.dumps({"event": "serving", "address": address, "port": running.port,
                         "model_version": running.holder.model.model_version, "metrics_port": metrics_port}))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    reloads: set[asyncio.Task] = set()

    def reload_in_background() -> None:
        async def reload() -> None:
            # A refused reload is already logged and counted; the old model keeps serving.
            with contextlib.suppress(PromptierError):
                await running.reload()

        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_in_background)
    # A `--workers` process starts with SIGHUP blocked (serving.service.workers), so that a reload asked for while
    # it loads waits for the handler above instead of killing it; a pending one is delivered here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    await stop.wait()
    log.info(json.dumps({"event": "draining", "grace_seconds": grace}))
    await running.stop(grace)
