"""Helpers the server's test modules share: failed calls' codes, bounded polls, the service's counters."""

from __future__ import annotations

import ipaddress
import socket
import time

import grpc
import psutil
import pytest

from serving.service.server import RunningServer


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def wait_until(condition, what: str, bound_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """A bounded poll: the bound is generous, it only keeps a broken build from hanging."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def counted(running: RunningServer, rpc: str, code: str) -> float:
    """How many `rpc` calls the service counted as answered with `code`."""
    return sample(running, "promptier_requests", rpc=rpc, code=code)


def sample(running: RunningServer, counter: str, **labels: str) -> float:
    """A counter of the service as its /metrics exposes it (0 before its first increment)."""
    return running.metrics.registry.get_sample_value(f"{counter}_total", labels) or 0.0


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (None when it has none)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None

