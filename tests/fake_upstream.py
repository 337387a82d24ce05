"""Recording OpenAI-compatible upstream servers on loopback, for the dispatcher's and LiteLLM's tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

MISSING = object()  # an Upstream.usage that leaves the field out
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
SLOW_S = 10.0  # a "slow" upstream answers after this long: twice the longest timeout the dispatcher tests set


def huge_answer(model: str, megabytes: int) -> tuple[bytes, bytes, bytes]:
    """A chat completion of `megabytes` MiB, as (head, one MiB of content, tail): sent as head, the
    MiB `megabytes` times, then tail, so that neither end holds it whole."""
    answer = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "@"}}], "usage": USAGE})
    head, tail = answer.split("@")
    return head.encode(), b"x" * (1 << 20), tail.encode()


class Upstream:
    """An OpenAI-compatible server that records what it received. `behaviour` is set per test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict] = []
        self.behaviour = "ok"
        self.cancelled = threading.Event()
        self.generation_s = 5.0  # how long "generating" works before it answers
        self.finish = threading.Event()  # ends every "generating" call at once
        self.generations_cancelled = 0
        self.usage: object = USAGE  # what its answers say in `usage` (MISSING: nothing)
        self.delay_s = 1.0  # how long "delay" waits before it answers
        self.huge_mb = 80  # the size of a "huge" answer
        self.redirect_to = ""  # where "redirect" sends its caller
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request):  # type: ignore[no-untyped-def]
            if self.behaviour == "401":
                return JSONResponse({"error": {"message": "bad key", "code": "invalid_api_key"}}, status_code=401)
            return {"object": "list", "data": [{"id": f"{self.name}-upstream-model", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):  # type: ignore[no-untyped-def]
            body = await request.json()
            self.received.append({"body": body, "authorization": request.headers.get("authorization")})
            if self.behaviour == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if self.behaviour == "400":
                return JSONResponse({"error": {"message": "bad temperature", "type": "invalid_request_error"}},
                                    status_code=400)
            if self.behaviour == "401":  # as some OpenAI-compatible servers do: the key it was sent, echoed
                echoed = f"Incorrect API key provided: {request.headers.get('authorization')}"
                return JSONResponse({"error": {"message": echoed, "type": "invalid_request_error",
                                               "code": "invalid_api_key"}}, status_code=401)
            if self.behaviour == "redirect":  # sends its caller on to another server (`redirect_to`)
                return RedirectResponse(self.redirect_to, status_code=307)
            if self.behaviour == "429":  # as hosted APIs do: when to try again, and a header of its own
                return JSONResponse({"error": {"message": "rate limit reached", "type": "rate_limit_error"}},
                                    status_code=429, headers={"retry-after": "7", "retry-after-ms": "7000",
                                                              "x-should-retry": "true", "x-upstream-secret": "s"})
            if self.behaviour == "slow":
                await asyncio.sleep(SLOW_S)
            if self.behaviour == "delay":
                await asyncio.sleep(self.delay_s)
            if self.behaviour in ("huge", "huge_break"):
                head, block, tail = huge_answer(body["model"], self.huge_mb)

                async def huge():  # type: ignore[no-untyped-def]
                    yield head
                    for index in range(self.huge_mb):
                        if self.behaviour == "huge_break" and index == self.huge_mb // 2:
                            raise RuntimeError("upstream died mid-answer")
                        yield block
                    yield tail

                return StreamingResponse(huge(), media_type="application/json")
            if self.behaviour == "generating":
                # Like vLLM: a long generation that stops when its caller disconnects.
                for _ in range(round(self.generation_s / 0.05)):
                    if self.finish.is_set():
                        break
                    if await request.is_disconnected():
                        self.generations_cancelled += 1
                        self.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    await asyncio.sleep(0.05)
            if body.get("stream") and self.behaviour != "no_stream":  # no_stream: a whole body, asked or not
                return StreamingResponse(self._stream(body), media_type="text/event-stream")
            answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": f"answer from {self.name}"}}]}
            if self.usage is not MISSING:
                answer["usage"] = self.usage
            return answer

        @app.post("/v1/responses")
        async def responses(request: Request):  # type: ignore[no-untyped-def]
            # OpenAI's Responses API, answered as briefly as chat is: LiteLLM calls it for `/v1/responses`.
            body = await request.json()
            self.received.append({"body": body, "authorization": request.headers.get("authorization"),
                                  "path": "/v1/responses"})
            return {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                    "model": body["model"], "output": [{
                        "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": f"answer from {self.name}", "annotations": []}]}],
                    "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.port = run_uvicorn(self.server)

    async def _stream(self, body: dict):  # type: ignore[no-untyped-def]
        try:
            for index in range(5):
                if self.behaviour == "break" and index == 2:
                    raise RuntimeError("upstream died mid-stream")
                if self.behaviour == "break_mid_event" and index == 2:
                    yield 'data: {"id": "s1", "object": "chat.comp'  # the first bytes of an event, then it dies
                    await asyncio.sleep(0.2)  # so that they go out on their own, before the connection drops
                    raise RuntimeError("upstream died mid-event")
                chunk = {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": f"{self.name}-{index} "},
                                      # as OpenAI does, the last content chunk says why it ended
                                      "finish_reason": "stop" if index == 4 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.3 if self.behaviour == "slowstream" else 0)
                if self.behaviour == "stall" and index == 1:
                    await asyncio.sleep(5)  # goes quiet mid-stream
            if (body.get("stream_options") or {}).get("include_usage"):  # as OpenAI does: a last, choiceless chunk
                last = {"id": "s1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                        "choices": []}
                if self.usage is not MISSING:
                    last["usage"] = ({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
                                     if self.usage is USAGE else self.usage)
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
            if self.behaviour == "linger":  # the body ends a while after its last event (a slow proxy, a busy server)
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def run_uvicorn(server: uvicorn.Server) -> int:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    return int(server.servers[0].sockets[0].getsockname()[1])
