"""The gRPC server's assembly and lifecycle: start (Router, Admin, health, reflection), reload, drain, and
the `promptier serve` loop with its signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import classifier
from classifier import PromptierError, TierClassifier
from serving.common.batcher import Batcher
from serving.common.binding import BindError, ensure_port_free
from serving.common.startup import freeze_startup_objects
from serving.service.admin import ADMIN_SERVICE, ADMIN_TOKEN_ENV, AdminService, admin_handlers, check_admin_token
from serving.service.binding import grpc_address
from serving.service.fleet import FLEET_SIGNAL, FleetModel, same_directory
from serving.service.health import SERVING, ServerHealth
from serving.service.limits import ServerLimits
from serving.service.live_model import ModelHolder
from serving.service.metrics import ServerMetrics
from serving.service.reflection import enable_reflection
from serving.service.router import ROUTER_SERVICE, RouterService, router_handlers
from serving.service.status import bounded_detail

log = logging.getLogger("promptier.server")

# How long a call, once aborted by the server, has to be answered before gRPC cancels it on shutdown.
STOP_ANSWER_S = 5.0


class RunningServer:
    """A started server. `port` is the bound port (useful with port 0 in tests)."""

    def __init__(self, server: grpc.aio.Server, port: int, holder: ModelHolder, batcher: Batcher,
                 health_servicer: ServerHealth, metrics: ServerMetrics, router: RouterService) -> None:
        self.server, self.port, self.holder, self.batcher = server, port, holder, batcher
        self.router = router
        self.health, self.metrics = health_servicer, metrics
        self.fleet: FleetModel | None = None  # set in a `--workers` process: Admin.Reload reaches every worker
        self.fleet_generation: str | None = None  # the fleet file's generation this process has applied
        self._fleet_lock = asyncio.Lock()  # one fleet step at a time: the file's order is the order of swaps

    async def reload(self, directory: Path | None = None) -> tuple[str, str]:
        """Load, validate and swap in a new artifact; on failure the old model keeps serving.

        `directory` None reloads the directory the server was started with (what SIGHUP does).
        """
        try:
            version, previous = await self.holder.reload(directory)
        except PromptierError as error:
            self.metrics.reloads.labels("refused").inc()
            log.error(json.dumps({"event": "reload_refused", "reason": bounded_detail(str(error))}))
            raise
        self.metrics.reloads.labels("ok").inc()
        self.metrics.model.info({"model_version": version})
        log.info(json.dumps({"event": "reloaded", "model_version": version, "previous": previous,
                             "directory": str(self.holder.directory or "the shipped default model")}))
        return version, previous

    async def reload_and_share(self, directory: Path | None = None) -> tuple[str, str]:
        """Admin.Reload: `reload`, then in a `--workers` process have every other worker load the same
        directory (serving.service.fleet)."""
        if self.fleet is None:
            return await self.reload(directory)
        async with self._fleet_lock:
            versions = await self.reload(directory)
            self.fleet_generation = self.fleet.announce(directory) or self.fleet_generation
            return versions

    async def follow_fleet(self) -> None:
        """Load what the fleet file names, unless this process has applied that generation already."""
        if self.fleet is None:
            return
        async with self._fleet_lock:
            state = self.fleet.read()  # read under the lock: of several reloads in a row, the last counts
            if state.generation is None or state.generation == self.fleet_generation:
                return
            self.fleet_generation = state.generation
            with contextlib.suppress(PromptierError):  # logged and counted; the old model keeps serving
                await self.reload(state.directory)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, stop accepting, let in-flight RPCs finish within `grace` seconds,
        then end health Watch streams (they have said NOT_SERVING; they would never end by themselves).

        What still waits for the model after `grace` is answered UNAVAILABLE (counted), before gRPC
        would cancel it. A call that reaches the server in the instant it stops, before the client has
        read its GOAWAY, is cancelled by gRPC core before any handler sees it (a bare CANCELLED, not
        counted): `serving.client` retries those.
        """
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace + STOP_ANSWER_S))
        await self.batcher.drain(grace)
        await self.batcher.stop()
        await self.health.end_watches()  # else an open Watch alone would hold the stop for its whole grace
        await stopping
        self.router.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(model_dir: Path | None = None, address: str = "127.0.0.1:0", threads: int = 1,
                       limits: ServerLimits | None = None, model: TierClassifier | None = None,
                       reuse_port: bool = False, admin_token: str | None = None) -> RunningServer:
    """Load the model, then bind and start. A bad artifact raises here, before any port is opened.

    Args:
        model_dir: artifact directory (None = the shipped default model).
        address: host:port; port 0 picks a free one (see RunningServer.port).
        threads: ONNX Runtime threads for the model worker.
        limits: request, queue and connection bounds (see ServerLimits).
        model: an already loaded model to serve instead of loading `model_dir` (tests).
        reuse_port: share the port with other server processes (SO_REUSEPORT; `--workers`).
        admin_token: the token Admin calls must present; None accepts Admin calls from this host only.

    Raises:
        PromptierError: the artifact is invalid (ArtifactError), the address cannot be bound (BindError) or
            the admin token has a character no call could send.
    """
    check_admin_token(admin_token)
    limits = limits or ServerLimits()
    address = grpc_address(address)
    metrics = ServerMetrics()
    health_servicer = ServerHealth(("", ROUTER_SERVICE))  # NOT_SERVING until started
    if model is None:
        model = await asyncio.get_running_loop().run_in_executor(None, classifier.load, model_dir, threads)
    loaded: TierClassifier = model
    metrics.model.info({"model_version": loaded.model_version})
    holder = ModelHolder(loaded, model_dir, threads)
    batcher = Batcher(lambda: holder.model, metrics.batcher, max_queue=limits.max_queue, max_batch=limits.max_batch,
                      max_batch_queue=limits.max_batch_queue)
    server = grpc.aio.server(options=[
        *limits.grpc_options(),
        # Off unless asked: two servers started by mistake on one port must fail, not split traffic.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    router = RouterService(holder, batcher, metrics, limits)
    server.add_generic_rpc_handlers((router_handlers(router, metrics),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((ROUTER_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                      server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio says only "Failed to bind"; a plain bind says why
        host, _, number = address.rpartition(":")
        if number.isdigit():
            ensure_port_free(host, int(number))
        raise BindError(f"cannot listen on {address}") from error
    running = RunningServer(server, port, holder, batcher, health_servicer, metrics, router)
    server.add_generic_rpc_handlers((admin_handlers(AdminService(running, admin_token)),))
    batcher.start()
    await server.start()
    for service in ("", ROUTER_SERVICE):
        await health_servicer.set(service, SERVING)
    return running


async def serve_forever(model_dir: Path | None, address: str, threads: int, metrics_port: int | None,
                        grace: float = 10.0, reuse_port: bool = False, limits: ServerLimits | None = None,
                        fleet: FleetModel | None = None) -> None:
    """The `promptier serve` loop: SIGTERM/SIGINT drain and exit, SIGHUP reloads the directory the
    server was started with (as an empty Admin.Reload does). In a `--workers` process (`fleet` given)
    it starts on the fleet's model and follows the fleet's reloads (serving.service.fleet).

    Raises:
        PromptierError: the artifact is invalid, or the gRPC or metrics address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    address = grpc_address(address)
    model, serving_dir = None, model_dir
    state = fleet.read() if fleet is not None else None
    if state is not None and state.directory is not None and not same_directory(state.directory, model_dir):
        try:  # a worker started after a reload serves what the others serve
            model = await loop.run_in_executor(None, classifier.load, state.directory, threads)
            serving_dir = state.directory
        except PromptierError as error:
            log.error(json.dumps({"event": "fleet_model_refused", "reason": bounded_detail(str(error)),
                                  "action": "serving the start directory"}))
    running = await start_server(model_dir, address, threads, limits=limits, model=model, reuse_port=reuse_port,
                                 admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    running.holder.directory = serving_dir  # the start directory stays model_dir, for SIGHUP
    running.fleet = fleet
    running.fleet_generation = state.generation if state is not None else None
    freeze_startup_objects()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        # On the gRPC interface: a server kept on loopback does not publish its metrics to the network.
        metrics_host = address.rpartition(":")[0].strip("[]") or "0.0.0.0"
        try:
            start_http_server(metrics_port, addr=metrics_host, registry=running.metrics.registry)
        except OSError as error:
            await running.stop(0)
            raise BindError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {error.strerror}") from error
    log.info(json.dumps({"event": "serving", "address": address, "port": running.port,
                         "model_version": running.holder.model.model_version, "metrics_port": metrics_port}))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    reloads: set[asyncio.Task] = set()

    def reload_in_background() -> None:
        async def reload() -> None:
            # A refused reload is already logged and counted; the old model keeps serving.
            with contextlib.suppress(PromptierError):
                await running.reload()

        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_in_background)
    if fleet is not None:

        def follow_fleet() -> None:
            task = loop.create_task(running.follow_fleet())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(FLEET_SIGNAL, follow_fleet)
    # A `--workers` process starts with its reload signals blocked (serving.service.workers), so that a
    # reload asked for while it loads waits for the handlers above instead of killing it; a pending one is
    # delivered here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, FLEET_SIGNAL})
    await stop.wait()
    log.info(json.dumps({"event": "draining", "grace_seconds": grace}))
    await running.stop(grace)
