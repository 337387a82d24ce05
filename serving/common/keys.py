"""Keys and tokens that callers present in a header: checked where they are configured."""

from __future__ import annotations


def header_safe(value: str) -> bool:
    """Whether `value` can travel as an HTTP header or gRPC metadata value from any client: printable ASCII.

    A key with any other character could never be presented (clients refuse to send it, and servers
    decode header bytes as Latin-1, so UTF-8 arrives as other characters): such a key must be refused
    where it is configured, not left to match nothing.
    """
    return value.isascii() and value.isprintable()


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, as RFC 9110 has it);
    None when the header names another scheme, or none."""
    scheme, _, rest = authorization.strip().partition(" ")
    return rest.strip() if rest and scheme.casefold() == "bearer" else None
