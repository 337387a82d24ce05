"""The traffic of `promptier soak`, one kind per process: each function runs for a fixed time, on
loopback, and returns plain counts (a dict that pickles), so that `serving.bench.soak` can run it in a
process of its own and judge the run from what came back.

- `measure_capacity`: ClassifyBatch calls with a few in flight, alone on the service: prompts/s.
- `flood`: ClassifyBatch calls of many prompts at a fixed rate (open loop), counted by status.
- `well_behaved`: single Classify calls with a short deadline at a modest fixed rate.
- `dispatch_traffic`: chat completions through the dispatcher, each answer checked against what
  the fake upstream (`serving.bench.soak_upstream`) sent.

Slow connections have a module of their own, `serving.bench.soak_slow_clients`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine

import grpc

from classifier.bench import CORPUS
from serving._proto.promptier.v1 import router_pb2

CLASSIFY_BATCH = "/promptier.v1.Router/ClassifyBatch"
# An open-loop sender that fell further behind its schedule than this drops the backlog (counted)
# instead of sending it in one burst.
MAX_LAG_S = 1.0


def prompts(count: int, words: int, seed: int) -> list[str]:
    """`count` different prompts of `words` words of the benchmark corpus (about 1.3 tokens a word)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS) for _ in range(words)) for _ in range(count)]


def batch_request(batch: int, seed: int) -> bytes:
    """A serialized ClassifyBatchRequest of `batch` prompts of ~128 tokens: serialized once, so the
    sender spends nothing per call on it."""
    items = [router_pb2.ClassifyRequest(prompt=text) for text in prompts(batch, 96, seed)]
    return router_pb2.ClassifyBatchRequest(items=items).SerializeToString()


def _raw_batch_calls(target: str, connections: int) -> tuple[list[grpc.aio.Channel], list[Callable]]:
    """Channels with a connection each (no retries: every refusal is seen), and a bytes-in, bytes-out
    ClassifyBatch method on each (the answer is counted, not parsed)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0),
               ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    return channels, [channel.unary_unary(CLASSIFY_BATCH) for channel in channels]


def _code(error: grpc.RpcError) -> str:
    """The status code's name of a failed call."""
    code = getattr(error, "code", None)
    status = code() if callable(code) else None
    return status.name if isinstance(status, grpc.StatusCode) else type(error).__name__


async def sleep_until(start_at: float) -> None:
    """Sleep until `start_at` (a `time.time()`): traffic set up in several processes starts together."""
    await asyncio.sleep(max(0.0, start_at - time.time()))


async def _open_loop(rate: float, seconds: float, max_in_flight: int,
                     call: Callable[[int], Coroutine[object, object, None]]) -> dict:
    """Start `call(i)` at `rate` per second for `seconds`, never more than `max_in_flight` at once; then
    wait (bounded) for those in flight. Calls that could not start on time are counted, not sent later."""
    tasks: set[asyncio.Task] = set()
    started = skipped = 0
    begin = time.monotonic()
    end = begin + seconds
    while (now := time.monotonic()) < end:
        due = int((now - begin) * rate) + 1 - started - skipped
        if due > rate * MAX_LAG_S:  # the process was starved: drop the backlog rather than burst it
            skipped += due - 1
            due = 1
        for _ in range(due):
            if len(tasks) >= max_in_flight:
                skipped += 1
                continue
            task = asyncio.get_running_loop().create_task(call(started))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += 1
        next_at = begin + (started + skipped) / rate
        await asyncio.sleep(max(0.0, min(next_at, end) - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    return {"sent": started, "not_sent": skipped, "seconds": time.monotonic() - begin}


# ---------------------------------------------------------------- gRPC service
def measure_capacity(target: str, batch: int, seconds: float, in_flight: int = 4) -> dict:
    """Prompts/s the service classifies with `in_flight` ClassifyBatch calls of `batch` prompts kept
    going over as many connections (after a one-second warm-up); the flood is sized from it."""
    return asyncio.run(_measure_capacity(target, batch, seconds, in_flight))


async def _measure_capacity(target: str, batch: int, seconds: float, in_flight: int) -> dict:
    request = batch_request(batch, seed=1)
    channels, calls = _raw_batch_calls(target, in_flight)
    counts: Counter[str] = Counter()
    try:
        async def caller(index: int, stop_at: float, counted: bool) -> None:
            while time.monotonic() < stop_at:
                try:
                    await calls[index](request, timeout=10)
                    code = "OK"
                except grpc.RpcError as error:
                    code = _code(error)
                if counted:
                    counts[code] += 1

        warm_until = time.monotonic() + 1.0
        await asyncio.gather(*(caller(k, warm_until, False) for k in range(in_flight)))
        began = time.monotonic()
        await asyncio.gather(*(caller(k, began + seconds, True) for k in range(in_flight)))
        elapsed = time.monotonic() - began
    finally:
        for channel in channels:
            await channel.close()
    return {"prompts_per_s": counts["OK"] * batch / elapsed, "calls": dict(counts), "batch": batch,
            "in_flight": in_flight, "seconds": elapsed}


def flood(target: str, batch: int, calls_per_s: float, seconds: float, connections: int = 8,
          max_in_flight: int = 64, start_at: float | None = None) -> dict:
    """ClassifyBatch calls of `batch` prompts at `calls_per_s` (open loop) over `connections`
    connections for `seconds` from `start_at` (a `time.time()`; default now), without retries; every
    call counted by how it ended."""
    return asyncio.run(_flood(target, batch, calls_per_s, seconds, connections, max_in_flight,
                              start_at or time.time()))


async def _flood(target: str, batch: int, calls_per_s: float, seconds: float, connections: int,
                 max_in_flight: int, start_at: float) -> dict:
    request = batch_request(batch, seed=2)
    channels, calls = _raw_batch_calls(target, connections)
    outcomes: Counter[str] = Counter()
    try:
        async def call(index: int) -> None:
            try:
                await calls[index % len(calls)](request, timeout=10)
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[_code(error)] += 1

        await sleep_until(start_at)
        schedule = await _open_loop(calls_per_s, seconds, max_in_flight, call)
    finally:
        for channel in channels:
            await channel.close()
    return {**schedule, "batch": batch, "calls_per_s": calls_per_s, "outcomes": dict(outcomes)}


def well_behaved(target: str, calls_per_s: float, deadline_s: float, seconds: float,
                 start_at: float | None = None) -> dict:
    """Single Classify calls at `calls_per_s` (open loop) through the project's client (one connection
    per server process, retries on UNAVAILABLE within the deadline), each with a `deadline_s`
    deadline, for `seconds` from `start_at` (a `time.time()`; default now); counted by status.

    Also what tells a starved service from a starved machine: the latency the client saw and the time
    the server says it held each answered call (`server_latency_ms`, queueing for the model included),
    the second each failure fell in (counted from `start_at`: to set beside the chaos events), and how
    late this
    process's own event loop woke from 10 ms sleeps (when the client itself waits that long for a core,
    so does everything else on the machine).
    """
    return asyncio.run(_well_behaved(target, calls_per_s, deadline_s, seconds, start_at or time.time()))


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max by nearest rank: the smallest sample with at least that share of the samples at
    or below it (of 100 samples the 99th, not the largest)."""
    ordered = sorted(values)

    def at(q: float) -> float | None:
        # The rank is ceil(q * n); the small allowance keeps a product like 0.07 * 100 = 7.000000000000001
        # from rounding up past a whole rank.
        rank = math.ceil(q * len(ordered) - 1e-9)
        return ordered[min(len(ordered), max(1, rank)) - 1] if ordered else None

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] if ordered else None}


async def _loop_lag(until: float, lags: list[float], tick_s: float = 0.01) -> None:
    """How late each `tick_s` sleep of this event loop ends, in ms, until `until`."""
    while time.monotonic() < until:
        asked = time.perf_counter()
        await asyncio.sleep(tick_s)
        lags.append((time.perf_counter() - asked - tick_s) * 1000)


async def _well_behaved(target: str, calls_per_s: float, deadline_s: float, seconds: float,
                        start_at: float) -> dict:
    from serving.client import AsyncRouterClient

    texts = prompts(512, 40, seed=3)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    server_ms: list[float] = []
    failed_at: Counter[int] = Counter()
    lags: list[float] = []
    async with AsyncRouterClient(target, timeout=deadline_s, attempts=3, connections=2) as client:
        # Unspread, the calls still work, on whichever processes the connections reached.
        with contextlib.suppress(grpc.RpcError, TimeoutError):
            await asyncio.wait_for(client.spread_connections(), timeout=10)
        await sleep_until(start_at)
        begin = time.monotonic()

        async def call(index: int) -> None:
            start = time.perf_counter()
            try:
                decision = await client.classify(texts[index % len(texts)])
            except grpc.RpcError as error:
                outcomes[_code(error)] += 1
                failed_at[int(time.time() - start_at)] += 1
                return
            latencies.append((time.perf_counter() - start) * 1000)
            server_ms.append(decision.server_latency_ms)
            outcomes["OK"] += 1

        lag = asyncio.get_running_loop().create_task(_loop_lag(begin + seconds, lags))
        schedule = await _open_loop(calls_per_s, seconds, 256, call)
        await lag
    late = sum(latency > deadline_s * 1000 for latency in latencies)
    return {**schedule, "calls_per_s": calls_per_s, "deadline_ms": deadline_s * 1000, "outcomes": dict(outcomes),
            **_percentiles(latencies), "answered_but_seen_late": late,
            "server_held": _percentiles(server_ms), "client_loop_lag": _percentiles(lags),
            "client_loop_lags_over_deadline": sum(value > deadline_s * 1000 for value in lags),
            "failures_by_second": {str(second): count for second, count in sorted(failed_at.items())}}


# ---------------------------------------------------------------- slow connections
# ---------------------------------------------------------------- dispatcher
def dispatch_traffic(base_url: str, calls_per_s: float, seconds: float, first_id: int = 0,
                     start_at: float | None = None) -> dict:
    """Chat completions through the dispatcher at `calls_per_s` (open loop) for `seconds` from
    `start_at` (a `time.time()`; default now), cycling
    through the fake upstream's behaviours (serving.bench.soak_upstream.BEHAVIOURS); each answer is checked
    against what the upstream sent for it. Returns the ids delivered intact, counts per outcome, and
    the first failures (with the second they came at, counted from `start_at`)."""
    return asyncio.run(_dispatch_traffic(base_url, calls_per_s, seconds, first_id, start_at or time.time()))


def _events(raw: bytes) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    return [line[5:].strip().decode() for line in raw.split(b"\n") if line.startswith(b"data:")]


def judge_answer(request_id: int, behaviour: str, include_usage: bool, status: int, model: str | None,
                 raw: bytes) -> str:
    """How a caller's answer came out: `intact` (exactly what the upstream sent), `interrupted` (a cut
    stream, ended with the dispatcher's stream_interrupted event), `returned_5xx` (the upstream's
    failure on every tier, said as a 5xx), `failed_5xx:<status>` (a 5xx where the upstream would have
    answered), or `mangled:<why>` (an answer other than the upstream's)."""
    from serving.bench.soak_upstream import completion, stream_events

    if status >= 500:  # not an answer: nothing was paid for (an upstream timeout, a refused connection)
        return "returned_5xx" if behaviour == "500-always" else f"failed_5xx:status {status}"
    if status != 200 or model is None:
        return f"mangled:status {status}, upstream model {model}"
    if not behaviour.startswith("stream"):
        try:
            same = json.loads(raw) == json.loads(json.dumps(completion(request_id, behaviour, model)))
        except ValueError:
            return "mangled:body is not JSON"
        return "intact" if same else "mangled:body differs"
    events = _events(raw)
    expected = stream_events(request_id, behaviour, model, include_usage)
    if behaviour == "stream-cut":
        if events[:len(expected)] != expected or len(events) != len(expected) + 1:
            return "mangled:cut stream's events differ"
        try:
            code = json.loads(events[-1])["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return "mangled:cut stream does not end with an error event"
        return "interrupted" if code == "stream_interrupted" else f"mangled:error code {code}"
    if [event if event == "[DONE]" else json.loads(event) for event in events] != \
            [event if event == "[DONE]" else json.loads(event) for event in expected]:
        return "mangled:stream events differ"
    return "intact"


async def _dispatch_traffic(base_url: str, calls_per_s: float, seconds: float, first_id: int,
                            start_at: float) -> dict:
    import httpx

    from serving.bench.soak_upstream import BEHAVIOURS, tag

    texts = prompts(256, 30, seed=4)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    intact: list[int] = []
    mangled: list[dict] = []
    url = f"{base_url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:
        async def call(index: int) -> None:
            request_id = first_id + index
            behaviour = BEHAVIOURS[index % len(BEHAVIOURS)]
            streamed = behaviour.startswith("stream")
            include_usage = streamed and index % 3 != 0  # some streams ask for usage, some do not
            body: dict = {"model": "promptier", "stream": streamed, "messages": [
                {"role": "user", "content": f"{texts[index % len(texts)]} ({tag(request_id, behaviour)})"}]}
            if include_usage:
                body["stream_options"] = {"include_usage": True}
            try:
                async with client.stream("POST", url, json=body) as response:
                    raw = await response.aread()
                    status, model = response.status_code, response.headers.get("x-promptier-upstream-model")
                    reasons[response.headers.get("x-promptier-reason", "none")] += 1
            except httpx.HTTPError as error:
                outcome = f"transport_error:{type(error).__name__}: {error}"
            else:
                outcome = judge_answer(request_id, behaviour, include_usage, status, model, raw)
            kind = outcome.partition(":")[0]
            outcomes[kind] += 1
            if kind == "intact":
                intact.append(request_id)
            elif kind in ("mangled", "failed_5xx", "transport_error") and len(mangled) < 20:
                mangled.append({"id": request_id, "behaviour": behaviour, "outcome": outcome,
                                "at_s": round(time.time() - start_at, 2)})

        await sleep_until(start_at)
        schedule = await _open_loop(calls_per_s, seconds, 64, call)
    return {**schedule, "calls_per_s": calls_per_s, "outcomes": dict(outcomes), "routing_reasons": dict(reasons),
            "intact_ids": intact, "failures": mangled}
