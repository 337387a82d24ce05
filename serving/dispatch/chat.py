"""POST /v1/chat/completions: admit a caller's request, route it, send it to its tier's upstream, and pass
the answer back, whole or relayed as it comes, recording each routed request once in the decision log
(a request refused before routing is counted in the dispatcher's metrics instead).

Request and response bodies pass through untouched except the request's model name; a metered tenant's
stream also asks its upstream for usage, and drops the usage chunk that its caller did not ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from serving.dispatch.capabilities import CapabilityRefusal, request_needs
from serving.dispatch.decision_log import BROKEN_STREAM, CLIENT_CLOSED
from serving.dispatch.dispatch_config import ConfigError
from serving.dispatch.dispatcher import HEADER_PREFIX, Dispatcher, Route
from serving.dispatch.http_error import HTTPError
from serving.dispatch.inbound_request import (
    ClientGone,
    DisconnectWatch,
    caller,
    parse_chat,
    read_body,
)
from serving.dispatch.stream_meter import EventFramer, StreamMeter, answer_chars, ask_for_usage, wants_usage
from serving.dispatch.tenants import Tenant
from serving.dispatch.upstream_body import (
    BUFFERED_BODY_LIMIT,
    NO_USAGE,
    STREAM_TAIL_BYTES,
    ResponseCut,
    read_up_to,
    read_usage,
    relayed_headers,
    usage_from_stream_tail,
    usage_of_body,
)

log = logging.getLogger("promptier.dispatcher")
OVER_BUFFER_NOTE = f"the response body is over {BUFFERED_BODY_LIMIT} bytes: relayed without reading usage"
CALLER_LEFT_NOTE = "the caller left before any of the answer reached it"


@dataclass
class ChatExchange:
    """One chat completion on its way through: what its answer is relayed and recorded with."""

    tenant: Tenant
    body: dict
    messages: list[tuple[str, str]]
    route: Route
    started: float  # time.perf_counter() when the request came: the decision log's latency
    streamed: bool
    metered: bool  # its answers are charged: by usage, else by counted characters
    meter: StreamMeter | None = None  # a metered stream's usage and characters, read as it is relayed


class ChatCompletions:
    """The chat completions endpoint of one dispatcher: `handle` answers a request."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def handle(self, request: Request) -> Response:
        """Answer one chat completion request: refused with the OpenAI API's error shape, or the upstream's
        answer with x-promptier-* headers that say where it went and why."""
        started = time.perf_counter()
        dispatcher = self.dispatcher
        try:
            tenant = caller(request, dispatcher.tenants)
            body, messages = parse_chat(await read_body(request, dispatcher.config.max_request_bytes))
            mode, pinned = dispatcher.parse_model(body.get("model"), tenant)
            needs = request_needs(body, messages)
            dispatcher.capabilities.check(needs, pinned)
        except HTTPError as error:
            return self._refused(error)
        except CapabilityRefusal as refusal:
            # 400 as the OpenAI API answers a request its model cannot take (an image to a text-only
            # model, a prompt past its context): the request, not the server, has to change. It says what
            # the request needs, as every response to such a request does.
            needed = {f"{HEADER_PREFIX}needs": ",".join(needs.features)} if needs.features else None
            return self._refused(HTTPError(400, refusal.message, code=refusal.code), needed)
        except ClientDisconnect:
            # A caller that leaves mid-body is routine (and one too slow is cut off by serving.dispatch.inbound).
            client = request.scope.get("client")
            log.info(json.dumps({"event": "client_left_before_its_body_came",
                                 "client": f"{client[0]}:{client[1]}" if client else None}))
            dispatcher.metrics.refused.labels(str(CLIENT_CLOSED), "client_left").inc()
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; uvicorn drops it
        streamed = bool(body.get("stream"))
        route = await dispatcher.route(messages, mode, pinned, needs, tenant)  # bounded by the classifier's deadline
        chat = ChatExchange(tenant, body, messages, route, started, streamed, metered=tenant.budget is not None)
        if not tenant.may_use(route.tier):  # steered by a capability to a tier this key may not use
            refused = HTTPError(403, f"this request needs {', '.join(route.steered.by if route.steered else ())}, "
                                f"which none of this API key's tiers ({', '.join(tenant.allowed_names or ())}) "
                                "serves", kind="permission_error", code="tier_not_allowed")
            self._record(chat, None, refused.status)
            return refused.response(dispatcher.headers(route, None))
        if chat.metered:
            try:
                dispatcher.apply_budget(route, tenant, messages)
            except HTTPError as error:
                self._record(chat, None, error.status)
                return error.response({**dispatcher.headers(route, None),
                                       "retry-after": str(dispatcher.tenants.seconds_left(tenant))})
            if streamed:
                chat.meter = StreamMeter(drop_usage_chunk=not wants_usage(body))
                chat.body = ask_for_usage(body)
        dispatcher.explore(route, tenant)  # after the budget: a paced request is not drawn again
        return await self._forward(request, chat)

    def _refused(self, error: HTTPError, headers: dict[str, str] | None = None) -> Response:
        """The answer to a request refused before routing, counted by status and code."""
        self.dispatcher.metrics.refused.labels(str(error.status), error.code or error.kind).inc()
        return error.response(headers)

    async def _forward(self, request: Request, chat: ChatExchange) -> Response:
        """Send the request to its tier's upstream (escalating on failure) and answer with what comes back:
        a body small enough to hold, whole; an event stream, or a body too large to hold, relayed."""
        dispatcher, route = self.dispatcher, chat.route
        upstream: aiohttp.ClientResponse | None = None
        tier: str | None = None
        try:
            with DisconnectWatch(request.receive):
                if dispatcher.prices_outdated(route):
                    with contextlib.suppress(ConfigError):  # a late mismatch shows as unknown_tier fallbacks
                        await dispatcher.refresh_prices()
                try:
                    upstream, tier = await dispatcher.open_upstream(route, chat.body, chat.tenant)
                except HTTPError as error:
                    self._record(chat, None, error.status)
                    return error.response(dispatcher.headers(route, dispatcher.last_tier(route)))
                if chat.streamed and not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                    # Asked to stream, it sent one whole body (an upstream that cannot stream, or an error): read
                    # as one, for its usage, which an event stream's meter would never find in it.
                    chat.streamed, chat.meter = False, None
                received: list[bytes] = []  # the start of a body too large to hold, relayed first
                whole = False
                if not chat.streamed:
                    try:
                        received, whole = await read_up_to(upstream, BUFFERED_BODY_LIMIT)
                    except (aiohttp.ClientError, TimeoutError) as error:
                        upstream.close()
                        return self._broke_before_relaying(chat, tier, error)
        except ClientGone:
            # Closing the upstream connection is what stops its work (vLLM and others abort on it).
            if upstream is not None:
                upstream.close()
            # An upstream that was sent the request has read its prompt, and a hosted one bills for it: a
            # budget that let such requests go free would let a caller whose timeout is shorter than the
            # answer (and retries it) spend without limit. The prompt is charged by count, the answer as none.
            sent = chat.metered and route.upstream_tier is not None
            note = CALLER_LEFT_NOTE if sent else None
            self._record(chat, tier or dispatcher.last_tier(route), CLIENT_CLOSED, note=note,
                         completion_chars=0 if sent else None)
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; uvicorn drops it
        headers = {**relayed_headers(upstream.headers), **dispatcher.headers(route, tier)}
        media_type = upstream.headers.get("content-type", "application/json")
        if whole:
            upstream.release()
            content = b"".join(received)
            usage, note = usage_of_body(content) if upstream.status < 400 else (None, None)
            counted = answer_chars(content) if chat.metered and usage is None and upstream.status < 400 else None
            self._record(chat, tier, upstream.status, usage, note, counted)
            return Response(content, status_code=upstream.status, media_type=media_type, headers=headers)
        return StreamingResponse(self._relay(chat, upstream, tier, received), status_code=upstream.status,
                                 media_type=media_type, headers=headers)

    def _broke_before_relaying(self, chat: ChatExchange, tier: str, error: Exception) -> Response:
        """A 502 for an upstream that broke off a body of which nothing has reached the caller: its tier
        failed, and says so where a tier that fails before answering does (headers, log, decision log)."""
        detail = f"upstream of tier {tier} failed while sending its response ({type(error).__name__})"
        chat.route.failed_tiers.append(tier)
        self.dispatcher.upstream_health.failed(tier, detail)
        log.warning(json.dumps({"event": "upstream_failed", "tier": tier, "detail": detail}))
        failure = HTTPError(502, detail, kind="upstream_error", code="upstream_unavailable")
        # No tier answered, as for a request every upstream failed: the savings page counts answers by it.
        self._record(chat, None, failure.status)
        return failure.response(self.dispatcher.headers(chat.route, tier))

    async def _relay(self, chat: ChatExchange, upstream: aiohttp.ClientResponse, tier: str,
                     received: list[bytes]) -> AsyncIterator[bytes]:
        """The rest of the upstream's body as it comes (after `received`, its start): an event stream, whole
        events at a time, or a body too large to hold. Recorded once it ends, however it ends."""
        streamed = chat.streamed
        # A stream goes out whole events at a time: the meter's, or a framer's for a stream not metered.
        framer: StreamMeter | EventFramer | None = chat.meter if chat.meter is not None else (
            EventFramer() if streamed else None)
        status = upstream.status
        finished = False
        tail = bytearray()  # the end of a stream not metered, where its usage chunk is
        relayed = 0  # bytes of a body too large to hold: what a metered answer is charged by
        try:
            while received:
                relayed += len(received[0])
                yield received.pop(0)
            async for chunk in upstream.content.iter_any():
                if framer is not None and not (chunk := framer.feed(chunk)):
                    continue  # an event still on its way (or a usage chunk the caller did not ask for)
                _keep_tail(chat, tail, chunk)
                relayed += len(chunk)
                yield chunk
            if framer is not None and (rest := framer.finish()):
                _keep_tail(chat, tail, rest)
                yield rest
            finished = True
        except (aiohttp.ClientError, TimeoutError) as error:
            if framer is not None and framer.done:
                return  # broken after its last event: the caller has the whole answer (recorded below)
            status = BROKEN_STREAM
            detail = f"upstream {'stream' if streamed else 'body'} from tier {tier} broke: {type(error).__name__}"
            self.dispatcher.upstream_health.failed(tier, detail)
            if not streamed:
                raise ResponseCut(detail) from None  # logged where the connection is closed
            log.warning(json.dumps({"event": "stream_interrupted", "tier": tier, "detail": detail}))
            event = {"error": {"message": detail, "type": "upstream_error", "code": "stream_interrupted"}}
            yield f"data: {json.dumps(event)}\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            # The caller disconnected mid-stream, unless it had the whole answer: OpenAI's SDK closes
            # its connection as soon as it has read `data: [DONE]`, before the body's end comes.
            if framer is None or not framer.done:
                status = CLIENT_CLOSED
            raise
        finally:
            # Also runs when the client disconnects: closing the connection cancels the upstream call.
            # A stream read to its end hands its connection back to the pool instead.
            if finished:
                upstream.release()
            else:
                upstream.close()
            answered = finished or (framer is not None and framer.done)
            usage, note, counted = _relayed_usage(chat, upstream.status, status, answered, tail, relayed)
            self._record(chat, tier, status, usage, note, counted)

    def _record(self, chat: ChatExchange, tier: str | None, status: int, usage: dict | None = None,
                note: str | None = None, completion_chars: int | None = None) -> None:
        self.dispatcher.record(chat.route, tier, chat.messages, status, chat.started, usage, note, chat.tenant,
                               completion_chars)


def _keep_tail(chat: ChatExchange, tail: bytearray, chunk: bytes) -> None:
    """Keep the end of a stream that is not metered in `tail`: its usage chunk, if any, is there."""
    if chat.streamed and chat.meter is None:
        tail += chunk
        del tail[:-STREAM_TAIL_BYTES]


def _relayed_usage(chat: ChatExchange, upstream_status: int, status: int, finished: bool, tail: bytearray,
                   relayed: int) -> tuple[dict | None, str | None, int | None]:
    """What the decision log keeps of a relayed answer: (usage, the note on why there is none, and for a
    metered answer without usage the characters or bytes it is charged by). `finished`: the caller got
    all of it."""
    usage: dict | None = None
    note: str | None = None
    counted: int | None = None
    if chat.metered and upstream_status < 400:  # an answer begun is paid for, even one cut short
        if chat.meter is not None:
            usage, note = read_usage(chat.meter.usage)
            counted = chat.meter.completion_chars if usage is None else None
            if usage is None and not finished:  # no usage because the stream ended early, not because none is sent
                note = "the stream was cut before its usage came (the caller left, or the upstream broke off)"

        else:
            counted = relayed
            note = OVER_BUFFER_NOTE
    elif finished and status < 400:
        if chat.streamed:
            usage, note = read_usage(usage_from_stream_tail(bytes(tail)))
            if usage is None and note == NO_USAGE:
                note = "the stream carried no usage (sent when the caller asks for it with " \
                       "stream_options.include_usage)"
        else:
            note = OVER_BUFFER_NOTE
    return usage, note, counted
