"""`promptier loadtest`: a real server process on loopback, driven by an asyncio gRPC load generator
in another process. Reports p50/p99 and throughput per concurrency, and the generator's own CPU use
(on a 2-core machine the generator competes with the server, so its cost is part of the picture)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_serving(target: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"server at {target} did not become SERVING")


CONNECTIONS_PER_GENERATOR = 4


async def _drive(target: str, prompts: list[str], concurrency: int, seconds: float, batch: int,
                 offset: int = 0) -> dict:
    # Several TCP connections of its own (no shared subchannel pool), so that the load spreads over
    # the server's SO_REUSEPORT workers the way a gateway's connection pool does.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(min(concurrency, CONNECTIONS_PER_GENERATOR))]
    try:
        stubs = [router_pb2_grpc.RouterStub(channel) for channel in channels]
        latencies: list[float] = []
        errors = 0
        items = 0
        stop_at = time.perf_counter() + seconds

        async def worker(start_index: int) -> None:
            nonlocal errors, items
            stub = stubs[start_index % len(stubs)]
            i = start_index
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    if batch == 1:
                        await stub.Classify(router_pb2.ClassifyRequest(prompt=prompts[i % len(prompts)]), timeout=5)
                    else:
                        chunk = [router_pb2.ClassifyRequest(prompt=prompts[(i + k) % len(prompts)])
                                 for k in range(batch)]
                        await stub.ClassifyBatch(router_pb2.ClassifyBatchRequest(items=chunk), timeout=5)
                    latencies.append((time.perf_counter() - start) * 1000)
                    items += batch
                except grpc.RpcError:
                    errors += 1
                i += concurrency * batch

        # Warm-up (every connection), then the timed window.
        for stub in stubs:
            await stub.Classify(router_pb2.ClassifyRequest(prompt=prompts[0]), timeout=5)
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        await asyncio.gather(*(worker(offset + k) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for channel in channels:
            await channel.close()
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    return {"latencies": latencies, "errors": errors, "items": items, "elapsed": elapsed, "cpu": cpu}


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
    latencies = np.asarray([value for part in parts for value in part["latencies"]])
    elapsed = max(part["elapsed"] for part in parts)
    return {"concurrency": concurrency, "batch": batch, "generator_processes": generators,
            "calls": int(latencies.size), "errors": sum(part["errors"] for part in parts),
            "prompts_per_s": sum(part["items"] for part in parts) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "generator_cpu_cores": sum(part["cpu"] for part in parts) / elapsed}


def run_loadtest(model: str | None, prompts: list[str], scenarios: list[tuple[int, int, int]], seconds: float,
                 threads: int = 1, workers: int = 1) -> list[dict]:
    """Start `promptier serve` in a subprocess and run each (concurrency, batch, generator processes)
    scenario against it; also report the server's own CPU use."""
    import psutil

    port = _free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "training.cli", "serve", "--port", str(port), "--threads", str(threads),
               "--workers", str(workers)]
    if model:
        command += ["--model", model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_serving(target)
        time.sleep(2.0 if workers > 1 else 0.0)  # health answers once the first worker is up; wait for all
        tree = psutil.Process(server.pid)
        results = []
        for concurrency, batch, generators in scenarios:
            processes = [tree, *tree.children(recursive=True)]
            before = sum(sum(p.cpu_times()[:2]) for p in processes)
            began = time.perf_counter()
            result = _scenario(target, prompts, concurrency, batch, seconds, generators)
            spent = sum(sum(p.cpu_times()[:2]) for p in processes) - before
            result["server_cpu_cores"] = spent / (time.perf_counter() - began)
            results.append(result)
        return results
    finally:
        server.terminate()
        server.wait(15)


def main(model: str | None, out: Path, seconds: float, workers: int = 2) -> dict:
    import classifier
    from classifier.bench import make_prompts, throughput

    runtime = classifier.load(model)
    prompts = make_prompts(runtime, 128, None, 1024, seed=7)
    # The bare runtime's best figure on this machine is the yardstick: a process per core.
    bare = max(throughput(model, prompts, 1, 2, 64, seconds), throughput(model, prompts, 2, 1, 64, seconds))
    scenarios = [(1, 1, 1), (32, 1, 2), (128, 1, 2), (4, 64, 1)]
    report: dict = {"model_version": runtime.model_version, "bare_runtime_prompts_per_s": bare, "servers": {}}
    print(f"bare runtime (best of 1 process x 2 threads and 2 processes x 1 thread, batch 64, 128 tokens): "
          f"{bare:,.0f} prompts/s\n")
    print("| server processes | concurrency | prompts per call | generator processes | prompts/s | vs bare | "
          "p50 ms | p99 ms | server CPU (cores) | generator CPU (cores) | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for server_workers in sorted({1, workers}):
        results = run_loadtest(model, prompts, scenarios, seconds, workers=server_workers)
        report["servers"][str(server_workers)] = results
        for r in results:
            print(f"| {server_workers} | {r['concurrency']} | {r['batch']} | {r['generator_processes']} | "
                  f"{r['prompts_per_s']:,.0f} | {r['prompts_per_s'] / bare:.0%} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['server_cpu_cores']:.2f} | {r['generator_cpu_cores']:.2f} | "
                  f"{r['errors']} |")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report
