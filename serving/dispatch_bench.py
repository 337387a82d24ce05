"""`promptier dispatch-bench`: latency the dispatcher adds over calling the upstream directly.

Everything runs on loopback, each in its own process: a minimal OpenAI-compatible upstream that
answers at once (so any difference is the dispatcher's), the gRPC classifier, and the dispatcher,
first asking the gRPC classifier, then with the classifier embedded. Measures non-streaming latency
and time to first streamed byte, p50/p99.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
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


def _timed_request(client: httpx.Client, url: str, body: dict, stream: bool) -> float:
    """Milliseconds to the whole response (non-streaming) or to the first streamed byte."""
    start = time.perf_counter()
    if stream:
        with client.stream("POST", url, json={**body, "stream": True}) as response:
            chunks = response.iter_raw()
            next(chunks)
            elapsed = (time.perf_counter() - start) * 1000
            for _ in chunks:
                pass
        return elapsed
    client.post(url, json=body).raise_for_status()
    return (time.perf_counter() - start) * 1000


def _measure_interleaved(client: httpx.Client, direct: tuple[str, dict], routed: tuple[str, dict], count: int,
                         stream: bool) -> tuple[list[float], list[float]]:
    """Direct and routed requests in alternation (which goes first alternates too), so that a change in
    the machine's load during the run shows in both series instead of in their difference."""
    direct_ms: list[float] = []
    routed_ms: list[float] = []
    for index in range(count):
        pair = [(direct, direct_ms), (routed, routed_ms)]
        for (url, body), samples in (pair if index % 2 == 0 else pair[::-1]):
            samples.append(_timed_request(client, url, body, stream))
    return direct_ms, routed_ms


def _start_upstream(port: int) -> subprocess.Popen:
    """The echo upstream in a process of its own, so that it does not share the client's interpreter."""
    code = ("import uvicorn; from serving.dispatch_bench import echo_upstream; "
            f"uvicorn.run(echo_upstream(), host='127.0.0.1', port={port}, log_level='error')")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer")


def _measure_pair(upstream_url: str, dispatcher_url: str, count: int) -> dict:
    prompt = ("Explain how a write-ahead log lets a database recover after a crash, and what fsync has to do "
              "with it. Give an example with two concurrent transactions.")
    body = {"model": "promptier", "messages": [{"role": "user", "content": prompt}]}
    direct_body = {**body, "model": "small-model"}
    report: dict = {}
    with httpx.Client(timeout=10) as client:
        for stream in (False, True):
            kind = "time_to_first_byte" if stream else "non_streaming"
            direct_target = (f"{upstream_url}/chat/completions", direct_body)
            routed_target = (f"{dispatcher_url}/chat/completions", body)
            _measure_interleaved(client, direct_target, routed_target, 50, stream)  # warm-up
            direct, routed = _measure_interleaved(client, direct_target, routed_target, count, stream)
            report[kind] = {
                "direct_p50_ms": float(np.percentile(direct, 50)),
                "direct_p99_ms": float(np.percentile(direct, 99)),
                "dispatcher_p50_ms": float(np.percentile(routed, 50)),
                "dispatcher_p99_ms": float(np.percentile(routed, 99)),
                "added_p50_ms": float(np.percentile(routed, 50) - np.percentile(direct, 50)),
                "added_p99_ms": float(np.percentile(routed, 99) - np.percentile(direct, 99)),
            }
    return report


def main(model: str | None, out: Path, count: int) -> dict:
    """Measure the dispatcher with the gRPC classifier and with the classifier embedded in-process."""
    upstream_port, grpc_port, http_port = _free_port(), _free_port(), _free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    workdir = Path(tempfile.mkdtemp(prefix="promptier-dispatch-bench-"))
    tiers = {name: {"base_url": upstream_url, "model": f"{name}-model"} for name in ("small", "medium", "large")}
    classifiers = {
        "grpc": {"address": f"127.0.0.1:{grpc_port}", "timeout_ms": 20},
        "embedded": {"embedded": True, "timeout_ms": 20, **({"model": model} if model else {})},
    }
    serve = [sys.executable, "-m", "training.cli", "serve", "--port", str(grpc_port)]
    serve += ["--model", model] if model else []
    processes = [_start_upstream(upstream_port),
                 subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    report: dict = {"requests_per_measure": count}
    try:
        _wait_serving(f"127.0.0.1:{grpc_port}")
        for name, classifier in classifiers.items():
            config = workdir / f"dispatcher-{name}.yaml"
            config.write_text(json.dumps({"classifier": classifier, "tiers": tiers, "fallback_tier": "large",
                                          "decision_log": {"path": str(workdir / f"decisions-{name}.jsonl")}}))
            dispatch = subprocess.Popen([sys.executable, "-m", "training.cli", "dispatch", "--config", str(config),
                                         "--port", str(http_port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            try:
                _wait_http(f"http://127.0.0.1:{http_port}/health")
                _wait_http(f"http://127.0.0.1:{upstream_port}/docs")
                report[name] = _measure_pair(upstream_url, f"http://127.0.0.1:{http_port}/v1", count)
                reasons = {json.loads(line)["reason"] for line in
                           (workdir / f"decisions-{name}.jsonl").read_text().splitlines()}
                if reasons != {"classified"}:  # a fallback would measure the wrong path
                    raise RuntimeError(f"{name}: requests were not all classified: {sorted(reasons)}")
            finally:
                dispatch.terminate()
                dispatch.wait(15)
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| classifier | measure | direct p50 | via dispatcher p50 | added p50 | direct p99 | via dispatcher p99 | "
          "added p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in classifiers:
        for kind in ("non_streaming", "time_to_first_byte"):
            r = report[name][kind]
            print(f"| {name} | {kind} | {r['direct_p50_ms']:.2f} ms | {r['dispatcher_p50_ms']:.2f} ms | "
                  f"{r['added_p50_ms']:.2f} ms | {r['direct_p99_ms']:.2f} ms | {r['dispatcher_p99_ms']:.2f} ms | "
                  f"{r['added_p99_ms']:.2f} ms |")
    print(f"\nwrote {out}")
    return report
