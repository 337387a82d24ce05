"""Whether a server can listen on its address, and the error that says why not: the gRPC service's and the
dispatcher's, so that a port in use reads the same from `promptier serve` and `promptier dispatch`."""

from __future__ import annotations

import socket

from classifier import PromptierError


class BindError(PromptierError):
    """The server could not listen on its address (the port is taken, or the address is not this host's)."""


def ensure_port_free(host: str, port: int) -> None:
    """Raise BindError, saying why, if `host:port` cannot be listened on.

    `serve --workers` checks this once before starting: the workers bind with SO_REUSEPORT, which a port
    held by another such server would let them share, where this plain bind fails. `dispatch` checks it
    before its supervisor binds, so that a port in use is said as `serve` says it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as error:
        raise BindError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
