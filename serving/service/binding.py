"""The gRPC form of the server's address (whether it can listen there: serving.common.binding)."""

from __future__ import annotations


def grpc_address(address: str) -> str:
    """`address` (host:port) as gRPC parses it: an IPv6 literal in brackets.

    `promptier serve --host ::` makes `:::50051`, which gRPC cannot resolve ("Misformatted domain
    name"), where `[::]:50051` is the dual-stack wildcard the operator asked for.
    """
    host, separator, port = address.rpartition(":")
    if separator and ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return address
