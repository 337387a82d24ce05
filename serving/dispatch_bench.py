"""`promptier dispatch-bench`: latency the dispatcher adds over calling the upstream directly.

Everything runs on loopback: a minimal OpenAI-compatible upstream that answers at once (so any
difference is the dispatcher's), the gRPC classifier in its own process, and the dispatcher in its
own process. Measures non-streaming latency and time to first streamed byte, p50/p99.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serving.loadgen import _free_port, _wait_serving


def echo_upstream() -> FastAPI:
    """An upstream that answers immediately: a completion, or a 3-chunk stream."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        if body.get("stream"):
            async def chunks():  # type: ignore[no-untyped-def]
                for index in range(3):
                    chunk = {"object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": f"t{index}"}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return {"object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}

    return app


def _measure(client: httpx.Client, url: str, body: dict, count: int, stream: bool) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        if stream:
            with client.stream("POST", url, json={**body, "stream": True}) as response:
                chunks = response.iter_raw()
                next(chunks)
                samples.append((time.perf_counter() - start) * 1000)
                for _ in chunks:
                    pass
        else:
            client.post(url, json=body).raise_for_status()
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def main(model: str | None, out: Path, count: int) -> dict:
    upstream = uvicorn.Server(uvicorn.Config(echo_upstream(), host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=upstream.run, daemon=True).start()
    while not upstream.started:
        time.sleep(0.02)
    upstream_url = f"http://127.0.0.1:{upstream.servers[0].sockets[0].getsockname()[1]}/v1"
    grpc_port, http_port = _free_port(), _free_port()
    serve = [sys.executable, "-m", "training.cli", "serve", "--port", str(grpc_port)]
    serve += ["--model", model] if model else []
    workdir = Path(tempfile.mkdtemp(prefix="promptier-dispatch-bench-"))
    config = workdir / "dispatcher.yaml"
    tiers = {name: {"base_url": upstream_url, "model": f"{name}-model"} for name in ("small", "medium", "large")}
    config.write_text(json.dumps({"classifier": {"address": f"127.0.0.1:{grpc_port}", "timeout_ms": 20},
                                  "tiers": tiers, "fallback_tier": "large",
                                  "decision_log": {"path": str(workdir / "decisions.jsonl")}}))
    dispatch = [sys.executable, "-m", "training.cli", "dispatch", "--config", str(config), "--port", str(http_port)]
    processes = [subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_serving(f"127.0.0.1:{grpc_port}")
        processes.append(subprocess.Popen(dispatch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        dispatcher_url = f"http://127.0.0.1:{http_port}/v1"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        prompt = ("Explain how a write-ahead log lets a database recover after a crash, and what fsync has to do "
                  "with it. Give an example with two concurrent transactions.")
        body = {"model": "promptier", "messages": [{"role": "user", "content": prompt}]}
        direct_body = {**body, "model": "small-model"}
        report: dict = {"requests_per_measure": count}
        with httpx.Client(timeout=10) as client:
            for stream in (False, True):
                kind = "time_to_first_byte" if stream else "non_streaming"
                _measure(client, f"{upstream_url}/chat/completions", direct_body, 50, stream)  # warm-up
                _measure(client, f"{dispatcher_url}/chat/completions", body, 50, stream)
                direct = _measure(client, f"{upstream_url}/chat/completions", direct_body, count, stream)
                routed = _measure(client, f"{dispatcher_url}/chat/completions", body, count, stream)
                report[kind] = {
                    "direct_p50_ms": float(np.percentile(direct, 50)),
                    "direct_p99_ms": float(np.percentile(direct, 99)),
                    "dispatcher_p50_ms": float(np.percentile(routed, 50)),
                    "dispatcher_p99_ms": float(np.percentile(routed, 99)),
                    "added_p50_ms": float(np.percentile(routed, 50) - np.percentile(direct, 50)),
                    "added_p99_ms": float(np.percentile(routed, 99) - np.percentile(direct, 99)),
                }
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
        upstream.should_exit = True
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| measure | direct p50 | via dispatcher p50 | added p50 | direct p99 | via dispatcher p99 | added p99 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("non_streaming", "time_to_first_byte"):
        r = report[kind]
        print(f"| {kind} | {r['direct_p50_ms']:.2f} ms | {r['dispatcher_p50_ms']:.2f} ms | "
              f"{r['added_p50_ms']:.2f} ms | {r['direct_p99_ms']:.2f} ms | {r['dispatcher_p99_ms']:.2f} ms | "
              f"{r['added_p99_ms']:.2f} ms |")
    print(f"\nwrote {out}")
    return report
