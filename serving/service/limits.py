"""The server's bounds: request and queue limits, and the gRPC channel arguments that bound connections."""

from __future__ import annotations

import resource
from dataclasses import dataclass

from serving.common.batcher import CALLER_SHARE

# Kept free for what else a server process opens (model files, metrics, logs) when the connection
# limit is derived from the open-file limit.
RESERVED_FILE_DESCRIPTORS = 128
# An upper bound for the derived connection limit, for processes whose open-file limit is huge.
DEFAULT_MAX_CONNECTIONS_CAP = 10_000


def default_max_connections() -> int:
    """Connections to accept at once: the open-file limit less a reserve, so that a flood of connections
    cannot take the descriptors the process needs to go on serving the connections it has."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS_CAP
    return max(16, min(DEFAULT_MAX_CONNECTIONS_CAP, soft - RESERVED_FILE_DESCRIPTORS))


@dataclass(frozen=True)
class ServerLimits:
    """Bounds enforced at the boundary (and reported by Info), and how connections are bounded.

    Queues are counted in prompts: `max_queue` for Classify calls, `max_batch_queue` for
    ClassifyBatch calls, so batch traffic cannot fill the room single calls need (see
    serving.common.batcher). A call that does not fit is refused RESOURCE_EXHAUSTED at once.

    Connections: one that has not completed its HTTP/2 preface within `handshake_timeout_s` is
    closed, as is one without a call for `idle_timeout_s` (None: never) or older than
    `max_connection_age_s` (None: never; calls in flight get `max_connection_age_grace_s` more).
    A silent peer is pinged after `keepalive_time_s` (None: gRPC's default, 2 hours) and dropped if it
    does not answer within `keepalive_timeout_s`. Beyond `max_connections` (None: derived from the
    open-file limit) new connections are closed at once; a client may have `max_streams` calls in flight
    per connection (it queues more itself).

    Callers take turns at the model, and each may hold only its share of the batch queue. A caller is a
    connection, or with `trust_caller_metadata` the client a proxy in front names in x-promptier-caller
    (any peer could set it, to take many shares or spend another's: trust it only behind such a proxy).
    """

    max_prompt_chars: int = 1_000_000
    max_batch_items: int = 256
    max_queue: int = 1024
    max_batch_queue: int = 1024
    max_batch: int = 64
    max_message_bytes: int = 16 * 1024 * 1024
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float | None = 300.0
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    keepalive_time_s: float | None = 60.0
    keepalive_timeout_s: float = 20.0
    max_connections: int | None = None
    max_streams: int = 256
    trust_caller_metadata: bool = False

    def __post_init__(self) -> None:
        required = (self.max_prompt_chars, self.max_batch_items, self.max_queue, self.max_batch_queue,
                    self.max_batch, self.max_message_bytes, self.handshake_timeout_s, self.keepalive_timeout_s,
                    self.max_streams)
        optional = (self.idle_timeout_s, self.max_connection_age_s, self.keepalive_time_s, self.max_connections)
        if (not all(value > 0 for value in required) or not all(value is None or value > 0 for value in optional)
                or self.max_connection_age_grace_s < 0):
            raise ValueError(f"every limit must be positive (None where allowed: no limit): {self}")
        if self.max_batch_items > self.max_batch_queue * CALLER_SHARE:
            # One call larger than a caller's share would be admitted whole and hold the lane alone.
            raise ValueError(f"max_batch_items ({self.max_batch_items}) must be at most {CALLER_SHARE:.0%} of "
                             f"max_batch_queue ({self.max_batch_queue}), the most one caller may hold")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC core channel arguments that enforce the connection bounds."""
        def ms(seconds: float) -> int:
            return max(1, min(2**31 - 1, round(seconds * 1000)))

        connections = self.max_connections or default_max_connections()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
            ("grpc.max_allowed_incoming_connections", connections),
            ("grpc.max_concurrent_streams", self.max_streams),
            # gRPC core sheds calls that wait for the application past a backlog of 1,000 (randomly, up
            # to 3,000), and the caller sees a bare CANCELLED that no handler ever counted. Every call
            # must reach the handlers, which refuse overload explicitly: the backlog is bounded by
            # connections x streams instead.
            ("grpc.server.max_pending_requests", min(2**31 - 1, connections * self.max_streams)),
            ("grpc.server.max_pending_requests_hard_limit", min(2**31 - 1, connections * self.max_streams)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that carries no data
        ]
        if self.idle_timeout_s is not None:
            options.append(("grpc.max_connection_idle_ms", ms(self.idle_timeout_s)))
        if self.max_connection_age_s is not None:
            options += [("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]
        if self.keepalive_time_s is not None:
            options.append(("grpc.keepalive_time_ms", ms(self.keepalive_time_s)))
        return options
