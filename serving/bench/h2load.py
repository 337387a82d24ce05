"""h2load, nghttp2's HTTP/2 load tool, as a gRPC load generator: a gRPC-framed request posted over
and over, its per-call log read back, and every timed call checked against the server's own
Prometheus counters (h2load sees only HTTP status, and a gRPC error travels as HTTP 200)."""

from __future__ import annotations

import resource
import struct
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving._proto.promptier.v1 import router_pb2


def cpu_seconds(before: resource.struct_rusage, after: resource.struct_rusage) -> float:
    """User plus system CPU time spent between two getrusage() readings."""
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed), the body h2load posts."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def ok_calls(metrics_ports: list[int], *rpcs: str) -> tuple[list[int], int]:
    """OK counts of the `rpcs` per server (one Prometheus endpoint each, read once), and the calls of
    them the server failed, summed.

    CANCELLED calls are neither: the caller gave up on them. h2load ends each run by closing its
    connections with calls still in flight; the server counts those as CANCELLED (when it notices,
    possibly after the next reading), and h2load logs them as no call at all."""
    from prometheus_client.parser import text_string_to_metric_families

    ok_by_server, other = [], 0
    for port in metrics_ports:
        ok = 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "promptier_requests_total" and sample.labels.get("rpc") in rpcs:
                    if sample.labels.get("code") == "OK":
                        ok += int(sample.value)
                    elif sample.labels.get("code") != "CANCELLED":
                        other += int(sample.value)
        ok_by_server.append(ok)
    return ok_by_server, other


def h2load_log(path: Path) -> dict:
    """Calls, span (first start to last finish), p50/p99 and non-200 count from h2load's --log-file
    (one row per request: start time in us, HTTP status, duration in us).

    Raises:
        RuntimeError: no call finished. h2load exits 0 even when it could not connect at all, and
            there would be no percentiles or rate to report.
    """
    if not path.read_text().strip():
        raise RuntimeError("h2load finished no call in its run: could it connect, and did the server answer?")
    rows = np.loadtxt(path, ndmin=2)
    durations_ms = rows[:, 2] / 1000.0
    return {"calls": int(rows.shape[0]), "span_s": float(((rows[:, 0] + rows[:, 2]).max() - rows[:, 0].min()) / 1e6),
            "p50_ms": float(np.percentile(durations_ms, 50)), "p99_ms": float(np.percentile(durations_ms, 99)),
            "not_200": int((rows[:, 1] != 200).sum())}


def _run_h2load(command: list[str]) -> None:
    """Run h2load; a failure is raised with what h2load said, which a bare exit status would hide.

    Raises:
        RuntimeError: h2load exited with another status than 0.
    """
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-2000:] or "(nothing)"
        raise RuntimeError(f"h2load exited with status {done.returncode}: {said}")


CallCounter = Callable[[str], tuple[list[int], int]]
"""(OK calls per server process, other calls) of an RPC, as the server itself counted them."""


def h2load_scenario(port: int, prompts: list[str], concurrency: int, batch: int, seconds: float,
                    metrics_ports: list[int], counter: CallCounter | None = None) -> dict:
    """One scenario driven by h2load: `concurrency` streams over min(concurrency, 8) connections.
    The server's own counts come from its Prometheus endpoints, or from `counter` if given."""
    count = counter or (lambda rpc: ok_calls(metrics_ports, rpc))
    rpc = "Classify" if batch == 1 else "ClassifyBatch"
    if batch == 1:
        message = router_pb2.ClassifyRequest(prompt=prompts[0]).SerializeToString()
    else:
        message = router_pb2.ClassifyBatchRequest(
            items=[router_pb2.ClassifyRequest(prompt=p) for p in prompts[:batch]]).SerializeToString()
    connections = min(concurrency, 8)
    with tempfile.TemporaryDirectory(prefix="promptier-h2load-") as workdir:
        body, log = Path(workdir) / "request.bin", Path(workdir) / "calls.tsv"
        body.write_bytes(grpc_frame(message))
        command = ["h2load", "-c", str(connections), "-m", str(max(1, concurrency // connections)),
                   "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                   f"http://127.0.0.1:{port}/promptier.v1.Router/{rpc}"]
        _run_h2load([*command, "-D", "1"])  # warm-up
        ok_before, other_before = count(rpc)
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        _run_h2load([*command, "-D", f"{round(seconds * 1000)}ms", f"--log-file={log}"])
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        ok_after, other_after = count(rpc)
        timings = h2load_log(log)
    span_s, calls = timings["span_s"], timings["calls"]
    cpu = cpu_seconds(usage_before, usage_after)
    # Per server process: with SO_REUSEPORT the kernel pins each connection to one process, so a
    # lopsided split (say 3 of 4 connections on one process) shows here and explains a low figure.
    ok_by_server = [after - before for before, after in zip(ok_before, ok_after, strict=True)]
    return {"concurrency": concurrency, "batch": batch, "generator": "h2load", "connections": connections,
            "calls": calls, "errors": timings["not_200"] + (other_after - other_before),
            "server_counted_ok": sum(ok_by_server), "ok_calls_by_server_process": ok_by_server,
            "prompts_per_s": calls * batch / span_s,
            "p50_ms": timings["p50_ms"], "p99_ms": timings["p99_ms"], "generator_cpu_cores": cpu / span_s}


def require_all_ok(result: dict) -> None:
    """Refuse an h2load figure unless the server counted every timed call as OK (h2load sees only HTTP
    status, and a gRPC error travels as HTTP 200)."""
    if result["errors"] or result["server_counted_ok"] < result["calls"]:
        raise RuntimeError(f"h2load sent {result['calls']} calls but the server counted {result['server_counted_ok']} "
                           f"OK and {result['errors']} errors: the figures would not be of successful calls")
