"""Where the dispatcher gets its routing decision: the gRPC service, or the runtime embedded in-process.

Both answer `classify(messages, mode)` within the configured deadline or raise `ClassifierUnavailable`,
which the dispatcher turns into a visible fallback. The embedded form saves the network hop (about
two thirds of the dispatcher's added latency on loopback) for single-host deployments; the gRPC form
lets many dispatchers share one classifier and reload it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import grpc

import classifier
from classifier import ClassificationResult, InvalidInputError, PromptierError, RoutingRequest, TierClassifier
from classifier.artifact import TierSpec
from classifier.conversation import render_conversation
from serving.client import AsyncRouterClient
from serving.common.batcher import Batcher, BatcherMetrics, DeadlineExpiredError, QueueFullError

log = logging.getLogger("promptier.dispatcher")
SPREAD_CHECK_S = 10.0


class ServedModel(NamedTuple):
    """The model a classifier serves now: its version and its tiers with their prices."""

    model_version: str
    tiers: list[TierSpec]


class ClassifierUnavailable(Exception):
    """No decision in time; `cause` names why (`timeout`, `overloaded`, `invalid_input`, `error`, or the
    name of a gRPC status that has none of these meanings, such as `UNAVAILABLE`); `detail`, when set, is
    the gRPC status behind a cause of that shared vocabulary."""

    def __init__(self, cause: str, detail: str | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.detail = detail


# gRPC statuses that mean what an embedded classifier's causes mean, so that a fallback is counted and
# logged under one name whichever classifier a gateway runs (RESOURCE_EXHAUSTED is also a message over
# the service's 16 MiB, larger than any request body the dispatcher reads by default).
SHARED_CAUSES = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
                 grpc.StatusCode.INVALID_ARGUMENT: "invalid_input", grpc.StatusCode.INTERNAL: "error"}


def unavailable_for(code: object) -> ClassifierUnavailable:
    """The fallback a gRPC call that failed with status `code` stands for."""
    if not isinstance(code, grpc.StatusCode):
        return ClassifierUnavailable("error")
    if code in SHARED_CAUSES:
        return ClassifierUnavailable(SHARED_CAUSES[code], detail=code.name)
    return ClassifierUnavailable(code.name)


class GrpcRouteClassifier:
    """Asks `promptier serve` over gRPC, with one attempt per request (the fallback tier is the retry)."""

    def __init__(self, address: str, timeout_s: float, coalesce: bool = True, connections: int = 2) -> None:
        self.address = address
        self.connections = connections
        # Coalescing keeps the service batching under load: measured at 32 concurrent dispatcher requests,
        # unary calls queued past the 20 ms deadline and a quarter of the requests fell back.
        self._client = AsyncRouterClient(address, timeout=timeout_s, attempts=1, coalesce=coalesce,
                                         connections=connections)
        self._spreading: asyncio.Task | None = None
        self.processes_reached: int | None = None

    def start(self) -> None:
        """Keep the connections spread over the service's processes (call on the serving loop)."""
        if self.connections > 1:
            self._spreading = asyncio.get_running_loop().create_task(self._keep_connections_spread())

    async def _keep_connections_spread(self) -> None:
        # Checked at start and every SPREAD_CHECK_S: a service process that restarts takes its
        # connections down, and gRPC reconnects them to wherever the kernel hashes the new ones.
        while True:
            try:
                reached = await self._client.spread_connections()
            except grpc.RpcError:
                reached = None  # the service is down (requests fall back, visibly): try again later
            except Exception:  # never let the check die quietly: the next one may succeed
                log.exception("checking the classifier connections failed")
                reached = None
            if reached is not None and reached != self.processes_reached:
                log.info(json.dumps({"event": "classifier_connections", "connections": self.connections,
                                     "service_processes_reached": reached}))
                self.processes_reached = reached
            await asyncio.sleep(SPREAD_CHECK_S)

    async def classify(self, messages: Sequence[tuple[str, str]], mode: str | None,
                       allowed_tiers: Sequence[str] | None = None, caller: str | None = None) -> ClassificationResult:
        """`caller` (the tenant) is not sent: the service's callers are its connections, and coalescing
        mixes tenants' prompts in one ClassifyBatch call."""
        try:
            return await self._client.classify(messages=messages, mode=mode, allowed_tiers=allowed_tiers)
        except InvalidInputError as error:  # refused before it is sent, as the embedded runtime refuses it
            raise ClassifierUnavailable("invalid_input") from error
        except grpc.RpcError as error:
            # grpc.aio's errors are not grpc.Call instances, but they do have code().
            code = error.code() if callable(getattr(error, "code", None)) else None  # type: ignore[attr-defined]
            raise unavailable_for(code) from error

    async def served(self) -> ServedModel | None:
        """The served model's version and tiers with prices, or None while the service cannot be reached."""
        try:
            info = await self._client.info()
        except grpc.RpcError:
            return None
        return ServedModel(info.model_version, [TierSpec(name=t.name, input_usd_per_mtok=t.input_usd_per_mtok,
                                                         output_usd_per_mtok=t.output_usd_per_mtok)
                                                for t in info.tiers])

    def describe(self) -> str:
        return f"gRPC service at {self.address}"

    async def close(self) -> None:
        if self._spreading is not None:
            self._spreading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spreading
        await self._client.close()


def _read_outcome(task: asyncio.Future) -> None:
    """Mark a finished task's exception as read (it is handled, or its caller has gone)."""
    if not task.cancelled():
        task.exception()


class EmbeddedRouteClassifier:
    """The runtime inside the dispatcher process. The model runs on its own worker thread (never on the
    event loop), with the same no-wait micro-batching as the gRPC server."""

    def __init__(self, model: TierClassifier, timeout_s: float, metrics: BatcherMetrics,
                 max_queue: int = 1024) -> None:
        self.model = model
        self._timeout_s = timeout_s
        self._batcher = Batcher(lambda: self.model, metrics, max_queue=max_queue)

    @classmethod
    def load(cls, model_dir: Path | None, timeout_s: float, metrics: BatcherMetrics,
             threads: int = 1) -> EmbeddedRouteClassifier:
        """Load and validate the artifact (raises PromptierError on a bad one, before serving starts).
        `metrics` receives the embedded model's queue depth and batch sizes."""
        return cls(classifier.load(model_dir, threads), timeout_s, metrics)

    def start(self) -> None:
        self._batcher.start()

    async def classify(self, messages: Sequence[tuple[str, str]], mode: str | None,
                       allowed_tiers: Sequence[str] | None = None, caller: str | None = None) -> ClassificationResult:
        """`caller`: who sends the prompt (the dispatcher's tenant). Callers take turns in the model's
        queue, so one tenant's flood delays another tenant's request by one model call, not by the whole
        flood (which would push it past the deadline, onto the fallback tier)."""
        try:
            text = render_conversation(messages)
            allowed = tuple(allowed_tiers) if allowed_tiers is not None else None
            request = RoutingRequest(mode=mode, allowed_tiers=allowed) if mode or allowed else None
            # The timeout also bounds a model call already running, not only the wait in the queue. It is
            # judged by whether the answer is there when the loop takes the timeout up, not by which of the
            # two the loop reaches first (asyncio.timeout): a loop busy with other requests past the deadline
            # would otherwise discard a decision made in time, for a fallback that saves no time.
            submitted = asyncio.ensure_future(self._batcher.submit([(text, request)], self._timeout_s,
                                                                 caller=caller))
            # A caller gone while the call failed (a full queue, under overload) never reads its error:
            # read here, or asyncio logs it as never retrieved, with a traceback, for every such caller.
            submitted.add_done_callback(_read_outcome)
            try:
                done, _ = await asyncio.wait((submitted,), timeout=self._timeout_s)
            finally:  # timed out, or the caller went away: the prompt no longer holds the queue
                if not submitted.done():
                    submitted.cancel()
            if not done:
                raise TimeoutError
            (outcome,) = submitted.result()
        except InvalidInputError as error:
            raise ClassifierUnavailable("invalid_input") from error
        except (TimeoutError, DeadlineExpiredError) as error:
            raise ClassifierUnavailable("timeout") from error
        except QueueFullError as error:
            raise ClassifierUnavailable("overloaded") from error
        except Exception as error:  # a model failure must become a visible fallback, not a 500
            raise ClassifierUnavailable("error") from error
        if isinstance(outcome, InvalidInputError):
            raise ClassifierUnavailable("invalid_input")
        if isinstance(outcome, PromptierError):  # the model failed on this prompt: a visible fallback
            raise ClassifierUnavailable("error") from outcome
        return outcome

    async def served(self) -> ServedModel | None:
        return ServedModel(self.model.model_version, list(self.model.manifest.tiers))

    def describe(self) -> str:
        return f"embedded model {self.model.model_version}"

    async def close(self) -> None:
        await self._batcher.stop()


RouteClassifier = GrpcRouteClassifier | EmbeddedRouteClassifier
