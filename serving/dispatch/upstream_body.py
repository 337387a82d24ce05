"""What the dispatcher reads from an upstream's answer: bounded reads of its body, and the token usage in
it (for a stream, in its last event), checked before it prices anything."""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp

STREAM_TAIL_BYTES = 16 * 1024  # kept of each relayed stream: enough for its last event, where usage is
# A non-streaming answer up to this size is read whole, for the usage in it; a larger one is relayed as
# it comes (and logged without usage), so that one huge answer cannot take the process's memory.
BUFFERED_BODY_LIMIT = 4 * 1024 * 1024
TOKEN_COUNT_LIMIT = 1e12  # a count at least this large is nonsense, and would make a nonsense cost
NO_USAGE = "the upstream sent no usage"


def usage_from_stream_tail(tail: bytes) -> object:
    """The `usage` of the last event of a chat-completions event stream, if the upstream sent one
    (as sent: `read_usage` checks it).

    OpenAI-compatible servers send usage in a last chunk when the caller asks for it
    (`stream_options: {"include_usage": true}`); the dispatcher does not add that to the request, as
    bodies pass through untouched.
    """
    for line in reversed(tail.splitlines()):
        payload = line.removeprefix(b"data:").strip()
        if not line.startswith(b"data:") or payload == b"[DONE]":
            continue
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return None  # the last event is not JSON (cut, or not an OpenAI stream): no usage
        return event.get("usage") if isinstance(event, dict) else None
    return None


_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _describe(value: object) -> str:
    return "null or missing" if value is None else _KINDS.get(type(value), type(value).__name__)


def read_usage(usage: object) -> tuple[dict | None, str | None]:
    """(usage, None) when an upstream's `usage` has token counts a cost can be computed from; otherwise
    (None, why not). What an upstream sends there is its own affair: the answer is relayed either way."""
    if usage is None:
        return None, NO_USAGE
    if not isinstance(usage, dict):
        return None, f"usage is {_describe(usage)}, not an object"
    for count_name in ("prompt_tokens", "completion_tokens"):
        count = usage.get(count_name)
        if isinstance(count, bool) or not isinstance(count, int | float):
            return None, f"usage.{count_name} is {_describe(count)}, not a token count"
        if not 0 <= count < TOKEN_COUNT_LIMIT:  # NaN fails this too
            return None, f"usage.{count_name} is {count!r}, not a token count"
    return usage, None


def usage_of_body(content: bytes) -> tuple[dict | None, str | None]:
    """`read_usage` of a non-streaming chat-completions body."""
    try:
        answer = json.loads(content)
    except (ValueError, RecursionError):
        return None, "the response body is not JSON"
    if not isinstance(answer, dict):
        return None, "the response body is not a JSON object"
    return read_usage(answer.get("usage"))


def bound_body_reads(response: aiohttp.ClientResponse, seconds: float) -> None:
    """Bound each gap in the response body by `seconds` from now on (its headers have come)."""
    connection = response.connection
    if connection is None or connection.protocol is None or response.content.is_eof():
        return  # all of it has come: nothing to wait for (and no end of body left to stop a timer)
    connection.protocol.read_timeout = seconds
    connection.protocol.start_timeout()


async def read_up_to(response: aiohttp.ClientResponse, limit: int) -> tuple[list[bytes], bool]:
    """(the body's chunks, True) when it ends within `limit` bytes; else (those come so far, False)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks, False
    return chunks, True


# The upstream's response headers that go back to the caller with its answer: what OpenAI's SDKs act on
# when they retry (how long to wait before retrying a 429 or a 503, and whether to retry at all). The
# others are the upstream's own (its account's rate limits, its request ids) and are not passed on.
RELAYED_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an upstream's response that its caller gets too (RELAYED_HEADERS), as they came."""
    return {name: headers[name] for name in RELAYED_HEADERS if name in headers}


class ResponseCut(Exception):
    """The upstream failed in the middle of a body that has no way to carry an error: the caller's
    connection must be closed without ending the response, so that it sees the body incomplete."""
