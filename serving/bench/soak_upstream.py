"""A fake OpenAI-compatible upstream for `promptier soak`, misbehaving the ways real ones do.

Each request says in its last user message which answer it wants (`soak id=N behaviour=B`), so that
the caller can recompute exactly what the upstream sent and check that the dispatcher relayed it
intact. The behaviours: answers whose `usage` the dispatcher cannot read (null, null counts, counts as
strings, a bare number, missing, negative, absurdly large), 500 errors (on every tier, or on all but
the top one so that the dispatcher escalates), and streams cut in the middle.

The upstream keeps the ids of the answers it finished sending with status 200, the "paid" answers
(an upstream bills what it generated), and hands them out on `GET /soak/paid`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MISSING = "missing"  # a usage kind that leaves the field out
# What an answer says in `usage`, by kind (MISSING: no such field).
USAGE_KINDS: dict[str, object] = {
    "normal": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    "null": None,
    "null-counts": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    "strings": {"prompt_tokens": "12", "completion_tokens": "5", "total_tokens": "17"},
    "number": 17,
    MISSING: MISSING,
    "negative": {"prompt_tokens": -12, "completion_tokens": 5, "total_tokens": -7},
    "huge": {"prompt_tokens": 1e300, "completion_tokens": 5, "total_tokens": 1e300},
}
# Behaviours, as `FAULT:USAGE` or `FAULT`; the caller picks them in this order, round robin.
#   ok / stream: a normal answer / event stream with the given usage
#   stream-cut: the stream breaks after CUT_AFTER chunks (no usage, no end)
#   500-escalate: 500 except on the top tier; 500-always: 500 on every tier
BEHAVIOURS: tuple[str, ...] = (
    *(f"ok:{kind}" for kind in USAGE_KINDS),
    *(f"stream:{kind}" for kind in USAGE_KINDS),
    "stream-cut", "500-escalate", "500-always", "stream-cut", "ok:normal", "500-escalate",
)
STREAM_CHUNKS = 5
CUT_AFTER = 2
_TAG = re.compile(r"soak id=(\d+) behaviour=([\w:-]+)")


def tag(request_id: int, behaviour: str) -> str:
    """The text a request carries to choose its answer."""
    return f"soak id={request_id} behaviour={behaviour}"


def content_of(request_id: int) -> str:
    """The answer text for a request: unique to it, so a swapped or mangled answer shows."""
    digest = hashlib.sha256(str(request_id).encode()).hexdigest()
    return f"answer {request_id}: {digest}"


def _usage_kind(behaviour: str) -> str:
    return behaviour.partition(":")[2] or "normal"


def completion(request_id: int, behaviour: str, model: str) -> dict:
    """The non-streaming answer the upstream sends for a request (the caller's expectation too)."""
    answer: dict = {"id": f"soak-{request_id}", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content_of(request_id)}}]}
    usage = USAGE_KINDS[_usage_kind(behaviour)]
    if usage != MISSING:
        answer["usage"] = usage
    return answer


def stream_events(request_id: int, behaviour: str, model: str, include_usage: bool) -> list[str]:
    """The `data:` payloads of the event stream the upstream sends for a request, `[DONE]` included
    (for a cut stream, only those it sends before breaking)."""
    text = content_of(request_id)
    size = -(-len(text) // STREAM_CHUNKS)
    events = []
    for index in range(STREAM_CHUNKS):
        chunk = {"id": f"soak-{request_id}", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": 0, "delta": {"content": text[index * size:(index + 1) * size]},
                              "finish_reason": None if index < STREAM_CHUNKS - 1 else "stop"}]}
        events.append(json.dumps(chunk))
    if behaviour == "stream-cut":
        return events[:CUT_AFTER]
    if include_usage:  # as OpenAI does: a last event without choices, carrying usage
        last: dict = {"id": f"soak-{request_id}", "object": "chat.completion.chunk", "created": 1, "model": model,
                      "choices": []}
        usage = USAGE_KINDS[_usage_kind(behaviour)]
        if usage != MISSING:
            last["usage"] = usage
        events.append(json.dumps(last))
    events.append("[DONE]")
    return events


class StreamCut(Exception):
    """Raised inside a streaming response to break it: uvicorn then closes the connection unterminated."""


def create_upstream(top_model: str) -> Starlette:
    """The fake upstream's app. `top_model` is the model name of the most capable tier, the one
    `500-escalate` answers on."""
    paid: list[int] = []
    answers: Counter[str] = Counter()

    async def chat(request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model"))
        text = " ".join(str(message.get("content")) for message in body.get("messages", []))
        match = _TAG.search(text)
        if match is None:
            answers["untagged"] += 1
            return JSONResponse({"error": {"message": "no soak tag"}}, status_code=400)
        request_id, behaviour = int(match.group(1)), match.group(2)
        if behaviour == "500-always" or (behaviour == "500-escalate" and model != top_model):
            answers["500"] += 1
            return JSONResponse({"error": {"message": "upstream failure (soak)", "type": "server_error"}},
                                status_code=500)
        if not behaviour.startswith("stream"):
            answers["200"] += 1
            paid.append(request_id)  # small: sent whole as soon as the handler returns
            return Response(json.dumps(completion(request_id, behaviour, model)), media_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = stream_events(request_id, behaviour, model, include_usage)

        async def send() -> AsyncIterator[bytes]:
            for event in events:
                yield f"data: {event}\n\n".encode()
            if behaviour == "stream-cut":
                answers["cut"] += 1
                raise StreamCut(f"soak: stream {request_id} cut after {len(events)} events")
            # Runs once the last event has been handed to the server: the whole answer went out.
            answers["200"] += 1
            paid.append(request_id)

        return StreamingResponse(send(), media_type="text/event-stream")

    async def report(request: Request) -> Response:
        return JSONResponse({"paid": paid, "answers": dict(answers)})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/soak/paid", report, methods=["GET"])])


def run_upstream(port: int, top_model: str) -> None:
    """Serve the fake upstream on 127.0.0.1:`port` until terminated (a process of its own)."""
    import uvicorn

    # Critical only: each cut stream is an exception by design, and would log a traceback.
    uvicorn.run(create_upstream(top_model), host="127.0.0.1", port=port, log_level="critical", access_log=False)
