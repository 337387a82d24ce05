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


async def _drive(target: str, prompts: list[str], concurrency: int, seconds: float, batch: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        latencies: list[float] = []
        errors = 0
        items = 0
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal errors, items
            i = offset
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

        # Warm-up, then the timed window.
        await stub.Classify(router_pb2.ClassifyRequest(prompt=prompts[0]), timeout=5)
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    values = np.asarray(latencies)
    return {"concurrency": concurrency, "batch": batch, "calls": len(latencies), "errors": errors,
            "prompts_per_s": items / elapsed, "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99)), "generator_cpu_cores": cpu / elapsed}


def _generator(args: tuple[str, list[str], int, float, int]) -> dict:
    return asyncio.run(_drive(*args))


def run_loadtest(model: str | None, prompts: list[str], scenarios: list[tuple[int, int]], seconds: float,
                 threads: int = 1) -> list[dict]:
    """Start `promptier serve` in a subprocess and run each (concurrency, batch) scenario against it."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "training.cli", "serve", "--port", str(port), "--threads", str(threads)]
    if model:
        command += ["--model", model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_serving(target)
        context = multiprocessing.get_context("spawn")
        results = []
        for concurrency, batch in scenarios:
            with context.Pool(1) as pool:
                results.append(pool.apply(_generator, ((target, prompts, concurrency, seconds, batch),)))
        return results
    finally:
        server.terminate()
        server.wait(15)


def main(model: str | None, out: Path, seconds: float) -> dict:
    import classifier
    from classifier.bench import make_prompts, throughput

    runtime = classifier.load(model)
    prompts = make_prompts(runtime, 128, None, 1024, seed=7)
    bare = throughput(model, prompts, 1, 2, 64, seconds)
    scenarios = [(1, 1), (32, 1), (128, 1), (4, 64)]
    results = run_loadtest(model, prompts, scenarios, seconds)
    report = {"model_version": runtime.model_version, "bare_runtime_prompts_per_s": bare, "scenarios": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"bare runtime (1 process x 2 threads, batch 64, 128 tokens): {bare:,.0f} prompts/s\n")
    print("| concurrency | prompts per call | prompts/s | vs bare | p50 ms | p99 ms | generator CPU (cores) | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['batch']} | {r['prompts_per_s']:,.0f} | {r['prompts_per_s'] / bare:.0%} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['generator_cpu_cores']:.2f} | {r['errors']} |")
    print(f"\nwrote {out}")
    return report
