"""`promptier dispatch-bench`: latency the dispatcher adds over calling the upstream directly.

Everything runs on loopback, each in its own process: a minimal OpenAI-compatible upstream that
answers at once (so any difference is the dispatcher's), the gRPC classifier, and the dispatcher,
first asking the gRPC classifier (2 server processes), then with the classifier embedded. Measures
non-streaming latency and time to first streamed byte, p50/p99, one request at a time; then, with
h2load installed, throughput, latency and the share of requests that fell back under 8 and 32
concurrent requests, also for the dispatcher without coalescing (one unary call per request).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from classifier.bench import write_report
from classifier.signals import exit_deferred, sigterm_as_exit
from serving.bench.h2load import h2load_log
from serving.bench.ports import free_port
from serving.bench.report_path import check_report_path
from serving.bench.soak_processes import (
    answers_grpc,
    answers_http,
    cli_command,
    start_process,
    stop_process,
    wait_started,
)

WARM_UP_REQUESTS = 50  # per measure, before the timed ones; left out of every figure
SEQUENTIAL = ("grpc", "embedded")  # the classifier configurations measured one request at a time
LOAD_PROMPT = ("Explain how a write-ahead log lets a database recover after a crash, and what fsync has to do "
               "with it. Give an example with two concurrent transactions.")


def echo_upstream() -> FastAPI:
    """An upstream that answers immediately: a completion, or a 3-chunk stream, for any model name.

    It lists one model, as OpenAI's `GET /v1/models` does, so that `promptier dispatch --check`, which
    asks each tier's upstream for that list, finds it answering."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "promptier-bench"}]}

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


def refuse_failed_answer(response: httpx.Response) -> None:
    """Raise RuntimeError, with the status and the start of the body, for an answer that is not a 2xx.

    Its time is not that of a served request, and streamed it would be timed as if it were; a bench
    whose every request fails (a config overlay with tenants that need keys, say) would otherwise end
    in httpx's traceback instead of naming the answer."""
    if not response.is_success:
        response.read()
        raise RuntimeError(f"POST {response.request.url} answered {response.status_code}: "
                           f"{response.text[:300]}")


def _timed_request(client: httpx.Client, url: str, body: dict, stream: bool) -> tuple[float, str | None]:
    """Milliseconds to the whole response (non-streaming) or to the first streamed byte, and the
    dispatcher's request id (None from the upstream).

    Raises:
        RuntimeError: the answer is not a 2xx.
    """
    start = time.perf_counter()
    if stream:
        with client.stream("POST", url, json={**body, "stream": True}) as response:
            refuse_failed_answer(response)
            chunks = response.iter_raw()
            next(chunks)
            elapsed = (time.perf_counter() - start) * 1000
            for _ in chunks:
                pass
        return elapsed, response.headers.get("x-promptier-request-id")
    response = client.post(url, json=body)
    elapsed = (time.perf_counter() - start) * 1000
    refuse_failed_answer(response)
    return elapsed, response.headers.get("x-promptier-request-id")


@dataclass
class Interleaved:
    """One sequential measure: milliseconds per request, direct and routed, and the routed ones' ids."""

    direct_ms: list[float] = field(default_factory=list)
    routed_ms: list[float] = field(default_factory=list)
    routed_ids: set[str] = field(default_factory=set)


def _measure_interleaved(client: httpx.Client, direct: tuple[str, dict], routed: tuple[str, dict], count: int,
                         stream: bool) -> Interleaved:
    """Direct and routed requests in alternation (which goes first alternates too), so that a change in
    the machine's load during the run shows in both series instead of in their difference."""
    measured = Interleaved()
    for index in range(count):
        pair = [(direct, measured.direct_ms), (routed, measured.routed_ms)]
        for (url, body), samples in (pair if index % 2 == 0 else pair[::-1]):
            elapsed, request_id = _timed_request(client, url, body, stream)
            samples.append(elapsed)
            if samples is measured.routed_ms and request_id is not None:
                measured.routed_ids.add(request_id)
    return measured


def start_upstream(port: int, workdir: Path) -> subprocess.Popen:
    """The echo upstream in a process of its own, so that it does not share the client's interpreter."""
    code = ("import uvicorn; from serving.bench.dispatch_bench import echo_upstream; "
            f"uvicorn.run(echo_upstream(), host='127.0.0.1', port={port}, log_level='error')")
    return start_process([sys.executable, "-c", code], workdir, "upstream")


def _measure_pair(upstream_url: str, dispatcher_url: str, count: int) -> tuple[dict, set[str]]:
    """Both measures' figures, and the request ids of the timed routed requests (not the warm-up's)."""
    body = {"model": "promptier", "messages": [{"role": "user", "content": LOAD_PROMPT}]}
    direct_body = {**body, "model": "small-model"}
    report: dict = {}
    timed: set[str] = set()
    with httpx.Client(timeout=10) as client:
        for stream in (False, True):
            kind = "time_to_first_byte" if stream else "non_streaming"
            direct_target = (f"{upstream_url}/chat/completions", direct_body)
            routed_target = (f"{dispatcher_url}/chat/completions", body)
            _measure_interleaved(client, direct_target, routed_target, WARM_UP_REQUESTS, stream)
            measured = _measure_interleaved(client, direct_target, routed_target, count, stream)
            direct, routed = measured.direct_ms, measured.routed_ms
            timed |= measured.routed_ids
            report[kind] = {
                "direct_p50_ms": float(np.percentile(direct, 50)),
                "direct_p99_ms": float(np.percentile(direct, 99)),
                "dispatcher_p50_ms": float(np.percentile(routed, 50)),
                "dispatcher_p99_ms": float(np.percentile(routed, 99)),
                "added_p50_ms": float(np.percentile(routed, 50) - np.percentile(direct, 50)),
                "added_p99_ms": float(np.percentile(routed, 99) - np.percentile(direct, 99)),
            }
    return report, timed


def _reasons(metrics_url: str) -> dict[str, float]:
    """Requests the dispatcher has answered so far, by routing reason."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        for sample in family.samples:
            if sample.name == "promptier_dispatch_requests_total":
                reason = sample.labels["reason"]
                counts[reason] = counts.get(reason, 0.0) + sample.value
    return counts


def _load(dispatcher_url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """h2load (HTTP/1.1, one connection per concurrent client) against the dispatcher: throughput,
    latency, and which share of the requests fell back instead of being classified."""
    metrics_url = dispatcher_url.removesuffix("/v1") + "/metrics/"
    with tempfile.TemporaryDirectory(prefix="promptier-dispatch-load-") as workdir:
        request, log = Path(workdir) / "body.json", Path(workdir) / "calls.tsv"
        request.write_text(json.dumps(body))
        command = ["h2load", "--h1", "-c", str(concurrency), "-m", "1", "-d", str(request),
                   "-H", "content-type: application/json", f"{dispatcher_url}/chat/completions"]
        subprocess.run([*command, "-D", "1"], check=True, capture_output=True)  # warm-up
        before = _reasons(metrics_url)
        subprocess.run([*command, "-D", f"{round(seconds * 1000)}ms", f"--log-file={log}"], check=True,
                       capture_output=True)
        after = _reasons(metrics_url)
        timings = h2load_log(log)
    answered = {reason: after.get(reason, 0.0) - before.get(reason, 0.0) for reason in after}
    total = sum(answered.values()) or 1.0
    return {"concurrency": concurrency, "requests": timings["calls"],
            "requests_per_s": timings["calls"] / timings["span_s"], "p50_ms": timings["p50_ms"],
            "p99_ms": timings["p99_ms"], "not_2xx": timings["not_200"],
            "fallback_share": answered.get("fallback", 0.0) / total}


# The config sections each measured dispatcher gets from the bench; a config overlay adds others.
BENCH_OWNED_SECTIONS = ("classifier", "tiers", "fallback_tier", "decision_log")


def main(model: str | None, out: Path, count: int, load_seconds: float = 6.0, overlay: dict | None = None,
         load: bool = True) -> dict:
    """Measure the dispatcher with the gRPC classifier and with the classifier embedded in-process:
    sequential added latency, then (with h2load installed, unless `load` is False) throughput and
    fallbacks under load. `overlay`: top-level config sections added to every dispatcher's config (say,
    tenants and a spend store, to measure what they cost)."""
    check_report_path(out)
    # Configs and decision logs (tens of MB per run) go away with the run.
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="promptier-dispatch-bench-") as scratch:
        report = _run(model, Path(scratch), count, load_seconds, overlay or {}, load)
    write_report(out, report)
    _print_report(report, load_seconds)
    print(f"\nwrote {out}")
    return report


def _run(model: str | None, workdir: Path, count: int, load_seconds: float, overlay: dict, load_wanted: bool
         ) -> dict:
    """Start the upstream and the service, then each dispatcher in turn; measure; stop everything."""
    upstream_port, grpc_port, http_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    tiers = {name: {"base_url": upstream_url, "model": f"{name}-model"} for name in ("small", "medium", "large")}
    address = f"127.0.0.1:{grpc_port}"
    embedded = {"embedded": True, "timeout_ms": 20, **({"model": model} if model else {})}
    # name -> (classifier config, dispatcher processes)
    classifiers = {
        "grpc": ({"address": address, "timeout_ms": 20}, 1),
        # The dispatcher before coalescing: one connection, one unary call per request.
        "grpc, unary calls": ({"address": address, "timeout_ms": 20, "coalesce": False, "connections": 1}, 1),
        "embedded": (embedded, 1),
        "grpc, 2 dispatcher processes": ({"address": address, "timeout_ms": 20}, 2),
        "embedded, 2 dispatcher processes": (embedded, 2),
    }
    load = load_wanted and shutil.which("h2load") is not None
    serve = cli_command("serve", "--port", str(grpc_port), "--workers", "2", *(["--model", model] if model else []))
    processes: list[subprocess.Popen] = []
    report: dict = {"requests_per_measure": count, "load": {}, "config_overlay": overlay,
                    "load_skipped": None if load else "--no-load" if not load_wanted else
                    "h2load is not installed; Debian: apt-get install nghttp2-client"}
    body = {"model": "promptier", "messages": [{"role": "user", "content": LOAD_PROMPT}]}
    try:
        with exit_deferred():  # a SIGTERM while it starts still stops it
            processes.append(upstream := start_upstream(upstream_port, workdir))
        with exit_deferred():
            processes.append(service := start_process(serve, workdir, "classifier service"))
        wait_started(upstream, "upstream", workdir, answers_http(f"http://127.0.0.1:{upstream_port}/docs"))
        wait_started(service, "classifier service", workdir, answers_grpc(address))
        time.sleep(2.0)  # health answers once the first of the two workers is up
        for name, (classifier, workers) in classifiers.items():
            if name not in SEQUENTIAL and not load:
                continue
            config = workdir / f"dispatcher-{name.replace(' ', '_')}.yaml"
            decisions = workdir / f"decisions-{name.replace(' ', '_')}.jsonl"
            config.write_text(json.dumps({"classifier": classifier, "tiers": tiers, "fallback_tier": "large",
                                          "decision_log": {"path": str(decisions)}, **overlay}))
            label = f"dispatcher ({name})"
            dispatch: subprocess.Popen | None = None
            try:
                with exit_deferred():
                    dispatch = start_process(cli_command("dispatch", "--config", str(config), "--port",
                                                         str(http_port), "--workers", str(workers)), workdir, label)
                wait_started(dispatch, label, workdir, answers_http(f"http://127.0.0.1:{http_port}/health"))
                if workers > 1:
                    time.sleep(3.0)  # health answers once the first worker is up; let the others load too
                dispatcher_url = f"http://127.0.0.1:{http_port}/v1"
                if name in SEQUENTIAL:
                    report[name], timed = _measure_pair(upstream_url, dispatcher_url, count)
                    logged = [json.loads(line) for line in decisions.read_text().splitlines()]
                    reasons = {row["reason"] for row in logged}
                    if reasons != {"classified"}:  # a fallback would measure the wrong path
                        raise RuntimeError(f"{name}: requests were not all classified: {sorted(reasons)}")
                    # How much of the dispatcher's time went to asking the classifier (from its own log), over
                    # the timed requests only: the warm-up's first calls are the slowest.
                    asked = classifier_ms_of(logged, timed)
                    report[name]["classifier_p50_ms"] = float(np.percentile(asked, 50))
                    report[name]["classifier_p99_ms"] = float(np.percentile(asked, 99))
                    report[name]["classifier_samples"] = len(asked)
                if load:
                    report["load"][name] = [_load(dispatcher_url, body, concurrency, load_seconds)
                                            for concurrency in (8, 32)]
            finally:
                if dispatch is not None:
                    with exit_deferred():
                        stop_process(dispatch)
    finally:
        with exit_deferred():  # a signal acted on midway would leave the rest running
            for process in processes:
                stop_process(process)
    return report


def classifier_ms_of(logged: list[dict], request_ids: set[str]) -> list[float]:
    """The `classifier_ms` of the decision-log rows of these requests.

    Raises:
        RuntimeError: a request's row is missing (the figures would be of other requests).
    """
    asked = [row["classifier_ms"] for row in logged if row.get("prompt_id") in request_ids]
    if len(asked) != len(request_ids):
        raise RuntimeError(f"{len(request_ids) - len(asked)} of {len(request_ids)} timed requests are not in the "
                           "decision log")
    return asked


def _print_report(report: dict, load_seconds: float) -> None:
    print("| classifier | measure | direct p50 | via dispatcher p50 | added p50 | direct p99 | via dispatcher p99 | "
          "added p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SEQUENTIAL:
        for kind in ("non_streaming", "time_to_first_byte"):
            r = report[name][kind]
            print(f"| {name} | {kind} | {r['direct_p50_ms']:.2f} ms | {r['dispatcher_p50_ms']:.2f} ms | "
                  f"{r['added_p50_ms']:.2f} ms | {r['direct_p99_ms']:.2f} ms | {r['dispatcher_p99_ms']:.2f} ms | "
                  f"{r['added_p99_ms']:.2f} ms |")
    asked = [f"{name} p50 {report[name]['classifier_p50_ms']:.2f} ms, p99 {report[name]['classifier_p99_ms']:.2f} ms"
             for name in SEQUENTIAL]
    print("\nOf which asking the classifier, inside the dispatcher (its decision log's classifier_ms, both "
          f"measures): {'; '.join(asked)}")
    if report["load"]:
        print(f"\nUnder load (h2load, HTTP/1.1, {load_seconds:g} s per row; the classifier service runs 2 "
              "processes):\n")
        print("| classifier | concurrent requests | requests/s | p50 | p99 | fell back | not 2xx |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in report["load"].items():
            for r in rows:
                print(f"| {name} | {r['concurrency']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} ms | "
                      f"{r['p99_ms']:.1f} ms | {r['fallback_share']:.1%} | {r['not_2xx']} |")
    else:
        print(f"\n(load rows skipped: {report['load_skipped']})")
