"""What the dispatcher reads from its callers, and how: a bounded body, parsed chat requests, the caller's
tenant, the Host check, and the watch that notices a caller who left."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import Receive

from classifier.conversation import content_text
from serving.dispatch.http_error import HTTPError

if TYPE_CHECKING:
    from serving.dispatch.tenants import Tenant, Tenants



class ClientGone(Exception):
    """The caller disconnected before the response started."""


class DisconnectWatch:
    """While entered, stops a request's work when its caller disconnects before the response starts.

    uvicorn does not cancel a handler whose client went away, so without this a caller that gives up
    (a timeout, a closed tab) would leave the upstream generating, and paid for, until it finished, and
    a first-byte timeout would then escalate the request to a dearer tier for nobody. After
    `WATCH_AFTER_S` the watch reads the ASGI `receive` channel (the body has been read, so the next
    message is the disconnect) and cancels the handler's task; leaving the block turns that
    cancellation into `ClientGone` and stops the watch. Leave it before handing the response over (a
    streaming response watches for itself).
    """

    # A watcher task per request cost 10-26% of the dispatcher's throughput under load (interleaved
    # h2load runs); a timer costs next to nothing, and a request answered within it needs no watch.
    WATCH_AFTER_S = 0.05

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._client_gone = False
        self._request_task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> DisconnectWatch:
        self._request_task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER_S, self._start_watching)
        return self

    def _start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._client_gone = True
        if self._request_task is not None:
            self._request_task.cancel()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        # Runs on the event loop between awaits, so a disconnect seen after it cancels nothing.
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if kind is asyncio.CancelledError and self._client_gone and self._request_task is not None:
            self._request_task.uncancel()
            raise ClientGone() from None
        # Anything else, a shutdown's cancellation included, goes on as it came.


class HostCheck:
    """Whether a request's Host header may reach a dispatcher that asks for no API key.

    A web page can make the browser send requests to the dispatcher (a cross-site POST with a body that
    is not JSON, which the 415 stops), and through DNS rebinding (its own name made to resolve to the
    dispatcher's address) it can even read the answers: the browser then sends the page's name as
    Host. So without keys, Host must be `localhost`, an IP address (a name is needed to rebind), or a
    name in `allowed_hosts`. A request without Host (HTTP/1.0) comes from no browser. Answers are
    cached per Host value, so that the check costs a dict lookup.
    """

    CACHED = 1024

    def __init__(self, allowed: list[str]) -> None:
        self.names = frozenset({"localhost", *allowed})
        self.seen: dict[bytes, bool] = {}

    def __call__(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name == b"host":
                allowed = self.seen.get(value)
                if allowed is None:
                    allowed = self.judge(value.decode("latin-1"))
                    if len(self.seen) < self.CACHED:
                        self.seen[value] = allowed
                return allowed
        return True

    def judge(self, host: str) -> bool:
        host = host.strip().lower()
        # [IPv6]:port, or name:port (IPv4 included)
        host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
        host = host.rstrip(".")
        if host in self.names:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, up to `limit` bytes.

    Raises:
        HTTPError: 413, the body is larger.
        ClientDisconnect: the caller left (or took too long: serving.dispatch.inbound) before sending all of it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> object:
    raise HTTPError(400, f"request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused here when it overflows (1e999 reads as inf): no upstream takes
    it, and finding that only once the request is routed would cost a classification for a 400."""
    value = float(text)
    if not math.isfinite(value):
        raise HTTPError(400, f"request body has a number out of range: {text[:40]} (Out of range float)")
    return value


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.partition(";")[0].strip().lower() == "application/json"


def caller(request: Request, tenants: Tenants) -> Tenant:
    """The tenant of a JSON POST's API key.

    Raises:
        HTTPError: 415, the body is not JSON; 401, no valid API key.
    """
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPError(415, "the request body must be JSON, sent with content-type: application/json",
                        code="unsupported_media_type")
    tenant = tenants.authenticate(request.headers.get("authorization", ""))
    if tenant is None:
        raise HTTPError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")
    return tenant


def parse_chat(raw: bytes) -> tuple[dict, list[tuple[str, str]]]:
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HTTPError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    except ValueError as error:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise HTTPError(400, f"request body has a number that cannot be read: {str(error).split(';')[0]}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    if not isinstance(body.get("stream", False), bool) and body["stream"] is not None:
        raise HTTPError(400, "stream must be true or false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HTTPError(400, f"messages[{index}] must be an object with a role")
        content = message.get("content")
        # Another type has no text to route on: routed, it would go to the cheapest tier as an empty
        # prompt, and only the upstream's refusal would show the caller's mistake.
        if content is not None and not isinstance(content, str | list):
            raise HTTPError(400, f"messages[{index}].content must be a string, a list of content parts or null, "
                                 f"got {type(content).__name__}")
        pairs.append((message["role"], content_text(message.get("content"))))
    return body, pairs
