"""Loopback ports for the tools that start services: find a free one, wait for a gRPC server."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_serving(target: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Block until the gRPC health service at `target` answers SERVING; TimeoutError after `timeout` s.

    Raises:
        RuntimeError: `process` (the server, when the caller started it) exited first: waiting on would
            only end in the timeout.
    """
    deadline = time.time() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} before it served")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"server at {target} did not become SERVING")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def listen_ports(count: int) -> list[int]:
    """`count` consecutive free ports on 127.0.0.1, outside the kernel's range for outgoing connections.

    For a service that takes a run of ports (`serve --workers N --metrics-port P` serves metrics on P to
    P + N - 1): a port picked by binding port 0 guarantees only itself, and it comes from the range
    outgoing connections use, so on a busy host one of them may take the port of a worker killed a
    moment before, and its replacement, failing to bind it, would count as a failed start.

    Raises:
        RuntimeError: no such run of free ports was found in a bounded number of tries.
    """
    low, high = _ephemeral_range()
    first, last = (1024, low - 1) if low - 1024 > high - 65535 else (high + 1, 65535)
    for _ in range(200):
        start = random.randint(first, last - count + 1)
        try:
            with contextlib.ExitStack() as held:
                for port in range(start, start + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return list(range(start, start + count))
        except OSError:
            continue
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1 between {first} and {last}")
