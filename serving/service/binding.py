"""Whether the server can listen on its address, and the error that says why not."""

from __future__ import annotations

import socket

from classifier import PromptierError


class BindError(PromptierError):
    """The server could not listen on its address (the port is taken, or the address is not this host's)."""


def ensure_port_free(host: str, port: int) -> None:
    """Raise BindError, saying why, if `host:port` cannot be listened on.

    `--workers` checks this once before starting: the workers bind with SO_REUSEPORT, which a port
    held by another such server would let them share, where this plain bind fails.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as error:
        raise BindError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def grpc_address(address: str) -> str:
    """`address` (host:port) as gRPC parses it: an IPv6 literal in brackets.

    `promptier serve --host ::` makes `:::50051`, which gRPC cannot resolve ("Misformatted domain
    name"), where `[::]:50051` is the dual-stack wildcard the operator asked for.
    """
    host, separator, port = address.rpartition(":")
    if separator and ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return address
