"""grpc.health.v1.Health for the server: Check and Watch, NOT_SERVING while draining, and Watch streams
that end once the server has drained."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.service.status import abort

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ServerHealth(health_pb2_grpc.HealthServicer):
    """The health of the server's services, as grpcio-health-checking's asyncio servicer reports it,
    except that Watch streams end when the server has drained (`end_watches`).

    A Watch never ends by itself, and a server's graceful stop waits for every call in flight: one
    open Watch (gRPC clients with health checking configured keep one per connection, as do watch
    probes) would hold every drain for its whole grace period, although nothing else was running.
    """

    def __init__(self, services: Iterable[str] = ("",), status: int = NOT_SERVING) -> None:
        self._statuses: dict[str, int] = dict.fromkeys(services, status)
        self._changed = asyncio.Condition()
        self._draining = False
        self._ended = False

    async def set(self, service: str, status: int) -> None:
        """Set `service`'s status (ignored once draining: a draining server never serves again)."""
        if not self._draining:
            await self._update({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good; Watch streams are told and stay open until `end_watches`."""
        if not self._draining:
            self._draining = True
            await self._update(dict.fromkeys(self._statuses, NOT_SERVING))

    async def end_watches(self) -> None:
        """End every Watch stream, now and later, once it has sent the latest status (after the drain)."""
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def _update(self, statuses: dict[str, int]) -> None:
        async with self._changed:
            self._statuses.update(statuses)
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        sent: int | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._news, request.service, sent))
                status, ended = self._status(request.service), self._ended
            if status != sent:  # written outside the lock: a slow reader must not hold up `set`
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if ended:
                return

    def _news(self, service: str, sent: int | None) -> bool:
        """Whether a Watch of `service` that last sent `sent` has something to do."""
        return self._ended or self._status(service) != sent

    def _status(self, service: str) -> int:
        return self._statuses.get(service, SERVICE_UNKNOWN)
