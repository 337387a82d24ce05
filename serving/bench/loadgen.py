"""`promptier loadtest`: a real server process on loopback, driven by a load generator in other
processes. Reports p50/p99 and throughput per concurrency, and the generator's own CPU use (on a
2-core machine the generator competes with the server, so its cost is part of the picture).

Two generators: `h2load` (nghttp2's HTTP/2 load tool, in C: it posts a gRPC-framed request and
costs a few microseconds per call) and a Python asyncio gRPC client (about as costly per call as the
server itself, so it understates what the server can do). h2load checks HTTP status only, so every
h2load scenario is also checked against the server's own Prometheus counters: every call it sent
must be counted there as OK.

With h2load, two no-model servers are measured as well, with the same scenarios: a Python gRPC server
(the floor of the stack `promptier serve` is built on) and a C++ one (`serving/bench/native_floor.py`,
skipped where g++ and libgrpc++ are not installed): what a compiled front end would cost per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TypeVar

import grpc
import numpy as np

from classifier.bench import write_report
from classifier.signals import exit_deferred
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.bench.h2load import cpu_seconds, h2load_scenario, ok_calls, require_all_ok
from serving.bench.ports import free_port, listen_ports, port_taken, wait_serving
from serving.bench.report_path import check_report_path
from serving.bench.soak_processes import stop_process

CONNECTIONS_PER_GENERATOR = 4


async def _closed_loop(call: Callable[[int], Awaitable[int]], concurrency: int, seconds: float,
                       offset: int = 0) -> dict:
    """`concurrency` callers, each making one call after another for `seconds` (caller k starts at
    index offset + k and steps by `concurrency`); `call(index)` returns the prompts it carried."""
    latencies: list[float] = []
    errors = 0
    items = 0
    stop_at = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal errors, items
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                carried = await call(index)  # not `items += await ...`: that reads items before the await
                items += carried
                latencies.append((time.perf_counter() - start) * 1000)
            except grpc.RpcError:
                errors += 1
            index += concurrency

    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    await asyncio.gather(*(caller(offset + k) for k in range(concurrency)))
    elapsed = time.perf_counter() - began
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_seconds(usage_before, usage_after)
    return {"latencies": latencies, "errors": errors, "items": items, "elapsed": elapsed, "cpu": cpu}


def _summary(parts: list[dict], concurrency: int, batch: int, generator: str) -> dict:
    """One scenario's figures from the parts its generator processes returned.

    Raises:
        RuntimeError: a call failed: figures over the calls that succeeded would flatter the server.
    """
    latencies = np.asarray([value for part in parts for value in part["latencies"]])
    elapsed = max(part["elapsed"] for part in parts)
    errors = sum(part["errors"] for part in parts)
    if errors:
        raise RuntimeError(f"{errors} of {errors + latencies.size} calls failed in the {generator} scenario "
                           f"(concurrency {concurrency}, batch {batch})")
    return {"concurrency": concurrency, "batch": batch, "generator": generator, "generator_processes": len(parts),
            "calls": int(latencies.size), "errors": errors,
            "prompts_per_s": sum(part["items"] for part in parts) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "generator_cpu_cores": sum(part["cpu"] for part in parts) / elapsed}


async def _drive(target: str, prompts: list[str], concurrency: int, seconds: float, batch: int,
                 offset: int = 0) -> dict:
    # Several TCP connections of its own (no shared subchannel pool), so that the load spreads over
    # the server's SO_REUSEPORT workers the way a gateway's connection pool does.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(min(concurrency, CONNECTIONS_PER_GENERATOR))]
    try:
        stubs = [router_pb2_grpc.RouterStub(channel) for channel in channels]

        async def call(index: int) -> int:
            start, rounds = offset + (index - offset) % concurrency, (index - offset) // concurrency
            stub = stubs[start % len(stubs)]  # each caller keeps its connection
            first = start + rounds * concurrency * batch  # steps of concurrency * batch keep callers apart
            if batch == 1:
                await stub.Classify(router_pb2.ClassifyRequest(prompt=prompts[first % len(prompts)]), timeout=5)
            else:
                chunk = [router_pb2.ClassifyRequest(prompt=prompts[(first + k) % len(prompts)]) for k in range(batch)]
                await stub.ClassifyBatch(router_pb2.ClassifyBatchRequest(items=chunk), timeout=5)
            return batch

        # Warm-up (every connection), then the timed window.
        for stub in stubs:
            await stub.Classify(router_pb2.ClassifyRequest(prompt=prompts[0]), timeout=5)
        return await _closed_loop(call, concurrency, seconds, offset)
    finally:
        for channel in channels:
            await channel.close()


async def _drive_coalescing_client(target: str, prompts: list[str], concurrency: int, seconds: float) -> dict:
    """`concurrency` callers making unary classify calls through the official asyncio client with
    coalescing on and one connection per server process (spread over them as the dispatcher does):
    what a Python gateway using it gets."""
    from serving.client import AsyncRouterClient

    async with AsyncRouterClient(target, timeout=5, attempts=1, coalesce=True, connections=2) as client:
        await client.spread_connections()

        async def call(index: int) -> int:
            await client.classify(prompts[index % len(prompts)])
            return 1

        await asyncio.gather(*(client.classify(prompts[0]) for _ in range(concurrency)))  # warm-up
        return await _closed_loop(call, concurrency, seconds)


def _coalescing_client(args: tuple[str, list[str], int, float]) -> dict:
    return asyncio.run(_drive_coalescing_client(*args))


def _blocking_coalescing_client(args: tuple[str, list[str], int, float]) -> dict:
    """`concurrency` threads making blocking classify calls through RouterClient(coalesce=True): what a
    gateway that serves requests on threads gets."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.client import RouterClient

    target, prompts, concurrency, seconds = args
    latencies: list[float] = []
    counts = [0, 0]  # calls answered, calls failed
    lock = threading.Lock()
    with RouterClient(target, timeout=5, attempts=1, coalesce=True, connections=2) as client:
        client.classify(prompts[0])  # warm-up
        stop_at = time.perf_counter() + seconds

        def caller(index: int) -> None:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    client.classify(prompts[index % len(prompts)])
                    outcome = 0
                except grpc.RpcError:
                    outcome = 1
                with lock:
                    counts[outcome] += 1
                    if not outcome:
                        latencies.append((time.perf_counter() - start) * 1000)
                index += concurrency

        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(caller, range(concurrency)))
        elapsed = time.perf_counter() - began
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_seconds(usage_before, usage_after)
    return {"latencies": latencies, "errors": counts[1], "items": counts[0], "elapsed": elapsed, "cpu": cpu}


def coalescing_client_scenario(target: str, prompts: list[str], concurrency: int, seconds: float,
                               blocking: bool = False) -> dict:
    """Unary calls at `concurrency` through the project's client with coalescing on, in a process of its
    own: AsyncRouterClient on one event loop, or with `blocking` RouterClient called from threads."""
    drive, label = ((_blocking_coalescing_client, "python client, blocking, coalescing") if blocking
                    else (_coalescing_client, "python client, coalescing"))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        part = pool.apply(drive, ((target, prompts, concurrency, seconds),))
    return _summary([part], concurrency, 1, label)


def _generator(args: tuple[str, list[str], int, float, int, int]) -> dict:
    return asyncio.run(_drive(*args))


def _scenario(target: str, prompts: list[str], concurrency: int, batch: int, seconds: float,
              generators: int) -> dict:
    """Run one scenario with `generators` generator processes splitting the concurrency."""
    generators = max(1, min(generators, concurrency))
    shares = [concurrency // generators + (1 if k < concurrency % generators else 0) for k in range(generators)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(generators) as pool:
        parts = pool.map(_generator, [(target, prompts, share, seconds, batch, 7919 * k)
                                      for k, share in enumerate(shares)])
    return _summary(parts, concurrency, batch, "python")


def _shares(counts: list[int] | None) -> str:
    if not counts or not sum(counts):
        return "-"
    return " / ".join(f"{count / sum(counts):.0%}" for count in counts)


def _with_server_cpu(pid: int, scenario: Callable[[], dict]) -> dict:
    """Run a scenario and add the CPU use (cores) of the server process and its children over it."""
    import psutil

    tree = psutil.Process(pid)
    processes = [tree, *tree.children(recursive=True)]
    before, began = sum(sum(p.cpu_times()[:2]) for p in processes), time.perf_counter()
    result = scenario()
    spent = sum(sum(p.cpu_times()[:2]) for p in processes) - before
    result["server_cpu_cores"] = spent / (time.perf_counter() - began)
    return result


def run_loadtest(model: str | None, prompts: list[str], scenarios: list[tuple[int, int, int]], seconds: float,
                 threads: int = 1, workers: int = 1, generator: str = "h2load",
                 coalescing_concurrency: tuple[int, ...] = ()) -> list[dict]:
    """Start `promptier serve` in a subprocess and run each (concurrency, batch, generator processes)
    scenario against it with `generator` (h2load or python); also report the server's own CPU use."""
    # The workers' metrics ports are a run (P to P + N - 1) outside the range outgoing connections take
    # theirs from: a worker restarted mid-run finds its port free again (see listen_ports).
    port, metrics_port = free_port(), listen_ports(workers)[0]
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "classifier.cli", "serve", "--port", str(port), "--threads", str(threads),
               "--workers", str(workers), "--metrics-port", str(metrics_port)]
    if model:
        command += ["--model", model]
    # The server's stderr is read back only to say why it went away, should a scenario fail.
    with tempfile.TemporaryFile() as stderr, contextlib.ExitStack() as stopping:
        with exit_deferred():  # a SIGTERM while it starts still stops it
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
            stopping.callback(_stop_server, server)
        guarded = functools.partial(_run_scenarios_or_say_why, server, stderr)
        guarded(lambda: wait_serving(target, process=server))
        time.sleep(2.0 if workers > 1 else 0.0)  # health answers once the first worker is up; wait for all
        results = []
        for concurrency, batch, generators in scenarios:
            if generator == "h2load":
                scenario = functools.partial(h2load_scenario, port, prompts, concurrency, batch, seconds,
                                             [metrics_port + i for i in range(workers)])
            else:
                scenario = functools.partial(_scenario, target, prompts, concurrency, batch, seconds, generators)
            results.append(guarded(functools.partial(_with_server_cpu, server.pid, scenario)))
        ports = [metrics_port + i for i in range(workers)]
        for concurrency in coalescing_concurrency:
            for blocking in (False, True):
                before = guarded(lambda: ok_calls(ports, "Classify", "ClassifyBatch")[0])
                result = guarded(functools.partial(_with_server_cpu, server.pid, functools.partial(
                    coalescing_client_scenario, target, prompts, concurrency, seconds, blocking)))
                # Calls (unary and batch) each server process answered: shows how the connections spread.
                after = guarded(lambda: ok_calls(ports, "Classify", "ClassifyBatch")[0])
                result["ok_calls_by_server_process"] = [a - b for a, b in zip(after, before, strict=True)]
                results.append(result)
        return results


def _stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 15 s (a busy machine may take long to drain)."""
    stop_process(server, timeout=15)


T = TypeVar("T")


def _run_scenarios_or_say_why(server: subprocess.Popen, stderr: IO[bytes], step: Callable[[], T]) -> T:
    """`step()`; when it fails (a refused connection, a failed call, a metrics page gone), a
    RuntimeError that says whether the server had exited and what it last wrote, instead of the
    traceback of whichever client noticed first."""
    try:
        return step()
    except (OSError, grpc.RpcError, RuntimeError, TimeoutError, subprocess.SubprocessError) as error:
        time.sleep(0.5)  # a server being killed may take a moment to be reaped
        if server.poll() is None:
            raise RuntimeError(f"the load test failed while the server was up: {error}") from error
        stderr.seek(0)
        tail = "\n".join(stderr.read().decode("utf-8", "replace").strip().splitlines()[-15:])
        raise RuntimeError(f"the server exited with status {server.returncode} during the load test:\n"
                           f"{tail or '(nothing on stderr)'}") from error


ECHO_SERVER = """
import asyncio, sys, grpc
from prometheus_client import start_http_server
from serving.service.metrics import ServerMetrics
from serving._proto.promptier.v1 import router_pb2
metrics = ServerMetrics()
reply = router_pb2.ClassifyResponse(tier="small").SerializeToString()
async def classify(request, context):
    metrics.requests.labels("Classify", "OK").inc()
    return reply
async def main():
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(classify, request_deserializer=bytes, response_serializer=bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("promptier.v1.Router",
                                                                         {"Classify": handler}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=metrics.registry)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def transport_floor(prompts: list[str], seconds: float) -> list[dict]:
    """h2load against a Python gRPC server that answers Classify with a fixed reply and does no work:
    what this machine's Python gRPC stack costs before any model runs."""
    port, metrics_port = free_port(), free_port()
    with contextlib.ExitStack() as stopping:
        with exit_deferred():
            server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), str(metrics_port)])
            stopping.callback(_stop_server, server)
        deadline = time.time() + 30
        while not port_taken(port) or not port_taken(metrics_port):
            if time.time() > deadline:
                raise TimeoutError("echo server did not start")
            time.sleep(0.1)
        return [_with_server_cpu(server.pid, functools.partial(
            h2load_scenario, port, prompts, concurrency, 1, seconds, [metrics_port])) for concurrency in (1, 32)]


def native_transport_floor(prompts: list[str], seconds: float) -> list[dict]:
    """The same two scenarios against a C++ gRPC server that does no work (serving/bench/native_floor.py).

    Raises:
        NativeBuildUnavailable: no compiler or gRPC C++ library here.
    """
    from serving.bench.native_floor import answered_calls, build_echo_server, launch_echo_server, wait_echo_server

    binary = build_echo_server()
    port = free_port()
    with contextlib.ExitStack() as stopping:
        with exit_deferred():
            server = launch_echo_server(binary, port)
            stopping.callback(_stop_server, server)
        wait_echo_server(server, port)

        def counter(rpc: str) -> tuple[list[int], int]:
            return [answered_calls(port)], 0

        return [_with_server_cpu(server.pid, functools.partial(
            h2load_scenario, port, prompts, concurrency, 1, seconds, [], counter=counter))
            for concurrency in (1, 32)]


def main(model: str | None, out: Path, seconds: float, workers: int = 2, generator: str = "auto") -> dict:
    """Run every scenario, print the table and write the JSON to `out`; SIGTERM stops the servers it
    started, as Ctrl-C does.

    Raises:
        FileNotFoundError: h2load asked for and missing.
        RuntimeError: `out` cannot take the report (found before any run), or a scenario failed: whether
            the server had exited, and its last words.
    """
    from classifier.signals import sigterm_as_exit

    check_report_path(out)
    with sigterm_as_exit():
        return _main(model, out, seconds, workers, generator)


def _main(model: str | None, out: Path, seconds: float, workers: int, generator: str) -> dict:
    import classifier
    from classifier.bench import make_prompts, throughput

    if generator == "auto":
        generator = "h2load" if shutil.which("h2load") else "python"
    elif generator == "h2load" and not shutil.which("h2load"):
        raise FileNotFoundError("h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)")
    runtime = classifier.load(model)
    prompts = make_prompts(runtime, 128, None, 1024, seed=7)
    # The bare runtime's best figure on this machine is the yardstick: a process per core.
    bare = max(throughput(model, prompts, 1, 2, 64, seconds), throughput(model, prompts, 2, 1, 64, seconds))
    # (concurrency, prompts per call, generator processes); 32 callers with 16 prompts each is issue #4's
    # concurrency with calls a gateway batches.
    scenarios = [(1, 1, 1), (32, 1, 2), (128, 1, 2), (8, 64, 1), (32, 16, 1)]
    report: dict = {"model_version": runtime.model_version, "generator": generator,
                    "settings": {"seconds": seconds, "workers": workers},  # as asked, to rerun it as measured
                    "bare_runtime_prompts_per_s": bare, "servers": {}}
    print(f"bare runtime (best of 1 process x 2 threads and 2 processes x 1 thread, batch 64, 128 tokens): "
          f"{bare:,.0f} prompts/s; load generator: {generator}\n")
    print("| server processes | concurrency | prompts per call | prompts/s | vs bare | p50 ms | p99 ms | "
          "server CPU (cores) | generator CPU (cores) | errors | share of calls per server process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def row(label: str, r: dict) -> None:
        print(f"| {label} | {r['concurrency']} | {r['batch']} | {r['prompts_per_s']:,.0f} | "
              f"{r['prompts_per_s'] / bare:.0%} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r.get('server_cpu_cores', float('nan')):.2f} | {r['generator_cpu_cores']:.2f} | {r['errors']} | "
              f"{_shares(r.get('ok_calls_by_server_process'))} |")

    for server_workers in sorted({1, workers}):
        results = run_loadtest(model, prompts, scenarios, seconds, workers=server_workers, generator=generator,
                               coalescing_concurrency=(32,) if server_workers > 1 else ())
        report["servers"][str(server_workers)] = results
        for r in results:
            if r["generator"] == "h2load":
                require_all_ok(r)
            label = str(server_workers) + (", via the blocking coalescing client (threads)"
                                           if "blocking" in r["generator"] else
                                           ", via the coalescing client" if "coalescing" in r["generator"] else "")
            row(label, r)
    if generator == "h2load":
        report["transport_floor"] = transport_floor(prompts, seconds)
        for r in report["transport_floor"]:
            require_all_ok(r)
            row("1, no model (transport floor)", r)
        from serving.bench.native_floor import NativeBuildUnavailable

        skipped = None
        try:
            report["native_transport_floor"] = native_transport_floor(prompts, seconds)
        except NativeBuildUnavailable as reason:
            skipped = str(reason)
        except subprocess.CalledProcessError as error:
            # protoc or g++ failed (headers of another gRPC version than protoc's, say): that costs this
            # row, not the rows measured for minutes before it, which the report is written with.
            output = (error.stderr or error.stdout or "").strip()
            skipped = f"building the C++ echo server failed ({error.cmd[0]}): {output[-800:]}"
        if skipped is not None:
            report["native_transport_floor_skipped"] = skipped  # the JSON says why its row is missing too
            print(f"\n(C++ transport floor skipped: {skipped})")
        else:
            for r in report["native_transport_floor"]:
                require_all_ok(r)
                row("1, no model, C++ gRPC (transport floor)", r)
    write_report(out, report)
    print(f"\nwrote {out}")
    return report
