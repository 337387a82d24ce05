"""The one table from errors to gRPC status codes, and status messages bounded to what a client accepts."""

from __future__ import annotations

import re
from typing import NoReturn

import grpc

from classifier import InvalidInputError
from serving.common.batcher import CALLER_SHARE, BatcherStoppedError, DeadlineExpiredError, QueueFullError


class BadRequest(Exception):
    """INVALID_ARGUMENT with a message meant for the caller."""


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


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message`, bounded (see bounded_detail)."""
    await context.abort(code, bounded_detail(message))
    raise AssertionError("unreachable: abort raises")


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one table from errors to gRPC status codes. Unexpected errors never leak their text."""
    if isinstance(error, InvalidInputError | BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, bounded_detail(str(error))
    if isinstance(error, QueueFullError) and error.by_caller:
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this caller already holds {CALLER_SHARE:.0%} of the {error.lane} classification queue (no caller "
                f"may hold more, so that others are served); retry later")
    if isinstance(error, QueueFullError):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded: the {error.lane} classification queue is full; retry later")
    if isinstance(error, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the model could run"
    if isinstance(error, BatcherStoppedError):
        return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another instance"
    return grpc.StatusCode.INTERNAL, "internal error"
