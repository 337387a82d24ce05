"""The dispatcher's HTTP server: uvicorn with deadlines on reading each request and a cap on connections.

uvicorn closes a keep-alive connection that stays idle between requests, but sets no deadline on a
request's headers or body: a client that connects and sends nothing, or trickles its request a byte
at a time, holds its socket (a file descriptor) as long as it likes, and about a thousand of them
make real requests fail. Here a request's headers must have come in full within `header_timeout_s`
of its first byte (of the connection, for the first request) and its body within `body_timeout_s` of
its headers; these are deadlines, not idle gaps, so trickling does not extend them. Nor does httptools
bound the size of a request line or header (uvicorn joins the pieces as they come, copying the whole
each time): a request whose line and headers pass `max_header_bytes` is answered 431 and its
connection closed, where one caller could otherwise send hundreds of MB within the deadline and hold
the event loop and the memory meanwhile. A request past
its deadline (checked a few times per timeout, at least once a second) is answered 408 and its
connection closed (a connection that has sent nothing is closed without a word, as an idle keep-alive
one is). Past `max_connections` open connections a new one is answered 503 and closed at once, before
the process runs out of descriptors; with `max_connections_per_client`, so is one from an address that
already holds that many, so that one client's flood of connections cannot take every slot.

The limits are the `inbound` section of the dispatcher config the app was built from: each worker
reads them when it loads its app, so a SIGHUP applies them like the rest of the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import time
import weakref
from collections import Counter
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from serving.dispatch.dispatch_config import InboundConfig

log = logging.getLogger("promptier.dispatcher")

# The attribute of the ASGI app (set by `serving.dispatch.app.create_app`) that holds its inbound limits.
INBOUND_ATTRIBUTE = "promptier_inbound"
# Descriptors kept for everything that is not a caller's connection (listening socket, decision log,
# classifier channels, imports).
RESERVED_DESCRIPTORS = 64
HEADERS, BODY = "headers", "body"
INFINITY = math.inf
# When a worker retires (SIGHUP, SIGTERM), how long a connection it accepted just before, on which no
# byte has come yet, may take to send its request.
SHUTDOWN_GRACE_S = 2.0


def _raw_response(status: str, message: str, code: str, kind: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


TOO_MANY_CONNECTIONS = _raw_response("503 Service Unavailable", "too many open connections; try again later",
                                     "too_many_connections", "server_error")
TOO_MANY_CLIENT_CONNECTIONS = _raw_response(
    "503 Service Unavailable", "too many open connections from this client address; close some or try again later",
    "too_many_client_connections", "server_error")


def _client_address(transport: asyncio.BaseTransport) -> str | None:
    """The peer's IP address (None on a Unix socket, whose callers share no address to tell them apart)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def default_max_connections() -> int:
    """Half of this process's open-file limit, less a reserve: each caller connection may need an
    upstream connection of its own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


def inbound_of(app: object) -> InboundConfig:
    """The inbound limits the app was built with (through uvicorn's wrapping middlewares), or the defaults."""
    for _ in range(8):
        inbound = getattr(app, INBOUND_ATTRIBUTE, None)
        if isinstance(inbound, InboundConfig):
            return inbound
        app = getattr(app, "app", None)
        if app is None:
            break
    return InboundConfig()


class DispatchServerConfig(uvicorn.Config):
    """uvicorn's config for the dispatcher: its guarded HTTP protocol, with the limits of the app it loads.

    No WebSocket support (the dispatcher serves none): an upgrade request is answered as plain HTTP.
    """

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedHttpToolsProtocol, ws="none", **kwargs)
        self.inbound = InboundConfig()
        self.max_connections = default_max_connections()

    def load(self) -> None:
        super().load()
        self.inbound = inbound_of(self.loaded_app)
        self.timeout_keep_alive = self.inbound.keep_alive_timeout_s
        self.max_connections = self.inbound.max_connections or default_max_connections()


class _RefusalLog:
    """At most one log line a second about refused connections (a flood must not flood the log too)."""

    def __init__(self, event: str, limit_name: str) -> None:
        self.event, self.limit_name = event, limit_name
        self.refused = 0
        self.last = 0.0

    def add(self, limit: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.last >= 1.0:
            log.warning(json.dumps({"event": self.event, "count": self.refused, self.limit_name: limit}))
            self.refused, self.last = 0, now


_refusals = _RefusalLog("connections_refused", "max_connections")
_client_refusals = _RefusalLog("client_connections_refused", "max_connections_per_client")
# Open connections per client address, per server (each worker process runs one).
_per_client: weakref.WeakKeyDictionary[ServerState, Counter[str]] = weakref.WeakKeyDictionary()


class _Sweeper:
    """Closes, every `interval` seconds, the connections of one server whose request is past its deadline.

    One timer per server instead of one per request: arming and cancelling a timer for each phase of
    each request cost ~10 us a request here (uvloop), a sweep costs a comparison per open connection.
    A deadline is thus enforced up to `interval` late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set, interval: float) -> None:
        self.loop, self.connections, self.interval = loop, connections, interval
        self.loop.call_later(self.interval, self.sweep)

    def sweep(self) -> None:
        try:
            now = self.loop.time()
            for connection in [c for c in self.connections if getattr(c, "deadline", INFINITY) <= now]:
                try:
                    connection.timed_out(now)
                except Exception:  # one connection's trouble must not stop the sweeps
                    log.exception("request deadline check failed")
        finally:
            self.loop.call_later(self.interval, self.sweep)


_sweepers: weakref.WeakKeyDictionary[ServerState, _Sweeper] = weakref.WeakKeyDictionary()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, then on its body, and a
    cap on the server's open connections."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        inbound = config.inbound if isinstance(config, DispatchServerConfig) else InboundConfig()
        self.header_timeout_s = inbound.header_timeout_s
        self.body_timeout_s = inbound.body_timeout_s
        self.max_header_bytes = inbound.max_header_bytes
        self.in_headers = False  # the parser has begun a request whose headers have not ended
        self.header_bytes = 0  # received since that request began
        self.max_connections = (config.max_connections if isinstance(config, DispatchServerConfig)
                                else default_max_connections())
        self.max_per_client = inbound.max_connections_per_client
        self.counted_as: str | None = None  # the client address this connection is counted under
        self.per_client = _per_client.setdefault(server_state, Counter())
        self.deadline = INFINITY  # loop time by which the current phase must be done
        self.phase = HEADERS
        self.received_any = False
        self.last_request = False  # the server is shutting down: answer the request under way, then close
        if server_state not in _sweepers:
            interval = min(max(min(self.header_timeout_s, self.body_timeout_s) / 4, 0.05), 1.0)
            _sweepers[server_state] = _Sweeper(self.loop, self.connections, interval)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.transport = transport  # for connection_lost; never added to the server's connections
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            _refusals.add(self.max_connections)
            return
        address = _client_address(transport)
        if self.max_per_client is not None and address is not None:
            if self.per_client[address] >= self.max_per_client:
                self.transport = transport
                transport.write(TOO_MANY_CLIENT_CONNECTIONS)
                transport.close()
                _client_refusals.add(self.max_per_client)
                return
            self.per_client[address] += 1
            self.counted_as = address
        super().connection_made(transport)
        self.deadline, self.phase = self.loop.time() + self.header_timeout_s, HEADERS

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted_as is not None:
            self.per_client[self.counted_as] -= 1
            if not self.per_client[self.counted_as]:
                del self.per_client[self.counted_as]  # the table holds only addresses with connections open
            self.counted_as = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self.deadline == INFINITY and (self.cycle is None or self.cycle.response_complete):
            # The first bytes of the next request on this connection.
            self.deadline, self.phase = self.loop.time() + self.header_timeout_s, HEADERS
        super().data_received(data)
        # Counted whole chunks at a time, so a chunk that also holds the end of the previous request may
        # count against this one: an overshoot of one read, against a bound far above real headers.
        # Pipelined requests are counted too: their headers are parsed while the one before is answered.
        if self.in_headers and not self.transport.is_closing():
            self.header_bytes += len(data)
            if self.header_bytes > self.max_header_bytes:
                self.headers_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers, self.header_bytes = True, 0

    def headers_too_large(self) -> None:
        """The request's line and headers passed `max_header_bytes` before they ended: answer 431 (unless a
        response of ours is under way, which the answer would corrupt) and close."""
        cycle = self.cycle
        self.deadline, self.in_headers = INFINITY, False
        if cycle is None or cycle.response_complete:
            self.transport.write(_raw_response(
                "431 Request Header Fields Too Large",
                f"the request's line and headers exceed {self.max_header_bytes} bytes",
                "request_header_fields_too_large", "invalid_request_error"))
        client = f"{self.client[0]}:{self.client[1]}" if self.client else None
        log.info(json.dumps({"event": "request_headers_too_large", "max_header_bytes": self.max_header_bytes,
                             "client": client}))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self.in_headers = False
        super().on_headers_complete()
        if self.last_request and self.cycle is not None:
            self.cycle.keep_alive = False
        self.deadline, self.phase = self.loop.time() + self.body_timeout_s, BODY

    def on_message_complete(self) -> None:
        self.deadline = INFINITY
        super().on_message_complete()

    def shutdown(self) -> None:
        """Graceful shutdown without resetting a caller: uvicorn closes every connection with no response
        under way, including one accepted a moment ago whose request is still arriving (or is unread in
        the socket), and the caller then sees its request reset, unanswered. Such a connection instead
        gets its request answered (within the usual deadlines) and is then closed. A response under way
        finishes and then closes, as in uvicorn; anything else (an idle keep-alive connection, the rest of
        a body the app has already answered) is closed at once."""
        cycle = self.cycle
        in_flight = cycle is not None and not cycle.response_complete
        request_arriving = self.deadline != INFINITY and self.phase == HEADERS and not in_flight
        if self.transport.is_closing() or not (in_flight or request_arriving):
            super().shutdown()
            return
        self.last_request = True
        if in_flight:
            assert cycle is not None
            cycle.keep_alive = False
        elif not self.received_any:
            self.deadline = min(self.deadline, self.loop.time() + SHUTDOWN_GRACE_S)

    def timed_out(self, now: float) -> None:
        """The current phase is past its deadline: answer 408 where that can be read as an answer, and close."""
        seconds = self.header_timeout_s if self.phase == HEADERS else self.body_timeout_s
        self.deadline = INFINITY
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # Reading is paused on our side (the app has not taken the body so far, or a pipelined request
            # waits for the one before it): the wait is not the caller's.
            self.deadline = now + seconds
            return
        cycle = self.cycle
        if self.phase == BODY:
            answer = cycle is not None and not cycle.response_started  # else the app has answered already
            if cycle is not None:
                cycle.disconnected = True  # a handler still reading the body sees the caller gone, and stops
                cycle.message_event.set()
        else:
            # Not on a connection that never sent a byte (closed quietly, like an idle keep-alive one: a
            # client that sends its request as we answer would read our 408 as the answer to it), nor
            # while a response of ours is under way (a pipelined request coming in pieces).
            answer = self.received_any and (cycle is None or cycle.response_complete)
        if answer:
            self.transport.write(_raw_response("408 Request Timeout",
                                               f"the request's {self.phase} did not come in full within {seconds:g} s",
                                               "request_timeout", "invalid_request_error"))
        client = f"{self.client[0]}:{self.client[1]}" if self.client else None
        log.info(json.dumps({"event": "request_read_timeout", "phase": self.phase, "timeout_s": seconds,
                             "client": client}))
        self.transport.close()
