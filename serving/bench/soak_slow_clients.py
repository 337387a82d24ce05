"""Slow connections for `promptier soak`: clients that send nothing or trickle a request a byte at a
time, to both the gRPC service and the dispatcher, reopened whenever the server closes them. Like
`serving.bench.soak_clients`, it runs in a process of its own and returns plain counts."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

from serving.bench.soak_clients import sleep_until

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _slow_modes(kind: str) -> dict[str, tuple[bytes, bytes]]:
    """Per mode: (bytes sent at once, bytes then trickled one at a time)."""
    if kind == "grpc":
        return {"silent": (b"", b""), "trickle-preface": (b"", HTTP2_PREFACE * 8)}
    body = json.dumps({"model": "promptier", "messages": [{"role": "user", "content": "x" * 400}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return {"silent": (b"", b""), "trickle-headers": (b"", head + body), "trickle-body": (head, body)}


def slow_connections(ports: dict[str, int], per_port: int, seconds: float, trickle_gap_s: float = 0.5,
                     start_at: float | None = None) -> dict:
    """Keep `per_port` slow connections open to each port of `ports` (kind -> port; kind "grpc" or
    "http") for `seconds` from `start_at` (a `time.time()`; default now), spread over the modes: send
    nothing, or trickle a request a byte every `trickle_gap_s`. A connection the server closes is
    reopened (after a short pause), so the pressure stays; counted per kind and mode: opened, closed by
    the server, refused or failed to connect, and the largest number open at once."""
    return asyncio.run(_slow_connections(ports, per_port, seconds, trickle_gap_s, start_at or time.time()))


async def _slow_connections(ports: dict[str, int], per_port: int, seconds: float, trickle_gap_s: float,
                            start_at: float) -> dict:
    await sleep_until(start_at)
    end = time.monotonic() + seconds
    stats: dict[str, Counter[str]] = {}
    open_now: Counter[str] = Counter()
    most_open: Counter[str] = Counter()

    async def hold(kind: str, port: int, mode: str, first: bytes, trickle: bytes) -> None:
        counts = stats.setdefault(f"{kind}/{mode}", Counter())
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=5)
            except (OSError, TimeoutError):
                counts["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            counts["opened"] += 1
            open_now[kind] += 1
            most_open[kind] = max(most_open[kind], open_now[kind])
            try:
                writer.write(first)
                position = 0
                while time.monotonic() < end:
                    reading = asyncio.ensure_future(reader.read(65536))
                    done, _ = await asyncio.wait({reading}, timeout=trickle_gap_s)
                    if not done:
                        reading.cancel()
                        if trickle:
                            writer.write(trickle[position % len(trickle):position % len(trickle) + 1])
                            position += 1
                        continue
                    data = reading.result()
                    if not data:
                        counts["closed_by_server"] += 1
                        break
                    if data.startswith(b"HTTP/1.1 408"):
                        counts["answered_408"] += 1
                    elif data.startswith(b"HTTP/1.1 503"):
                        counts["answered_503"] += 1
            except (OSError, asyncio.IncompleteReadError):
                counts["closed_by_server"] += 1
            finally:
                open_now[kind] -= 1
                writer.close()
            await asyncio.sleep(0.2)  # bounded churn: at most five reconnects a second per slot

    tasks = []
    for kind, port in ports.items():
        modes = _slow_modes(kind)
        for index in range(per_port):
            mode = list(modes)[index % len(modes)]
            tasks.append(hold(kind, port, mode, *modes[mode]))
    await asyncio.gather(*tasks)
    return {"per_port": per_port, "modes": {key: dict(value) for key, value in sorted(stats.items())},
            "most_open_at_once": dict(most_open)}
