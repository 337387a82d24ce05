"""The Router service: Classify, ClassifyBatch and Info, from request fields to the batcher and back."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from classifier import ClassificationResult, InvalidInputError, PromptierError, RoutingRequest
from classifier.conversation import MAX_MESSAGES, render_conversation
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.common.batcher import Batcher, Lane, QueueFullError, monotonic_ms
from serving.service.limits import ServerLimits
from serving.service.live_model import ModelHolder
from serving.service.metrics import ServerMetrics
from serving.service.parsing import parsing_handlers
from serving.service.status import BadRequest, abort, status_of

log = logging.getLogger("promptier.server")

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
# A cancellation this close to the call's deadline is the client's deadline passing (its clock started
# a network hop before ours), not the client cancelling.
DEADLINE_SLACK_S = 0.1
# A ClassifyBatch whose conversations hold more messages than this in all is turned into prompts on a
# thread of its own rather than on the event loop: one 16 MiB batch of conversations (a million
# messages) took 0.6 s to render there, and held every other caller's call for as long. One
# conversation at the limit (MAX_MESSAGES) costs a few milliseconds and stays on the loop.
INLINE_MESSAGES = MAX_MESSAGES
Prepared = tuple[object, RoutingRequest | None]  # a batch item's text and policy
# Metadata a proxy in front of the service sets to name the client a call is from (read only when the
# server trusts it): callers take turns at the model, and each holds only its share of the batch queue.
CALLER_METADATA = "x-promptier-caller"
MAX_CALLER_CHARS = 128


def _caller(context: grpc.aio.ServicerContext, trust_metadata: bool) -> str:
    """Who a call is from, for turns and shares at the model: the connection (peer address and port), or
    with `trust_metadata` the caller a proxy names in CALLER_METADATA (its clients share its connections)."""
    if trust_metadata:
        for key, value in context.invocation_metadata() or ():
            if key == CALLER_METADATA and isinstance(value, str) and value:
                return "caller:" + value[:MAX_CALLER_CHARS]
    return "peer:" + context.peer()


def _routing_request(request: router_pb2.ClassifyRequest) -> RoutingRequest | None:
    if not request.HasField("policy"):  # most requests: a quarter of the cost of reading an empty policy
        return None
    policy = request.policy
    has = {field.name for field, _ in policy.ListFields()}
    if not has:
        return None
    return RoutingRequest(
        mode=policy.mode or None,
        threshold=policy.threshold if "threshold" in has else None,
        top_share=policy.top_share if "top_share" in has else None,
        allowed_tiers=tuple(policy.allowed_tiers) if policy.allowed_tiers else None,
    )


def _prompt_text(request: router_pb2.ClassifyRequest, limits: ServerLimits) -> str:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        text = request.prompt
    elif kind == "conversation":
        if len(request.conversation.messages) > MAX_MESSAGES:  # before any per-message work on the event loop
            raise BadRequest(f"conversation has {len(request.conversation.messages)} messages; the limit is "
                             f"{MAX_MESSAGES}")
        messages = [(m.role, m.content) for m in request.conversation.messages]
        if any(len(content) > limits.max_prompt_chars for _, content in messages):
            raise BadRequest(f"a message is longer than {limits.max_prompt_chars} characters")
        text = render_conversation(messages)
    else:
        raise BadRequest("request has neither prompt nor conversation")
    if len(text) > limits.max_prompt_chars:
        # A conversation's messages may each be under the limit and their sum too: what the model reads, and
        # what is counted, is the conversation rendered with its role markers.
        what = "prompt" if kind == "prompt" else "conversation, rendered with its role markers,"
        raise BadRequest(f"{what} has {len(text)} characters; the limit is {limits.max_prompt_chars}")
    return text


def _prepared(requests: Sequence[router_pb2.ClassifyRequest], limits: ServerLimits
              ) -> list[Prepared | BaseException]:
    """Each batch item's (text, policy), or the error that refuses that item alone."""
    items: list[Prepared | BaseException] = []
    for item in requests:
        try:
            items.append((_prompt_text(item, limits), _routing_request(item)))
        except (BadRequest, InvalidInputError) as error:
            items.append(error)
    return items


def _fill(response: router_pb2.ClassifyResponse, result: ClassificationResult, latency_ms: float
          ) -> router_pb2.ClassifyResponse:
    """Write a result into a response in place. For batch items this is about half the cost of building
    a message and copying it in (`items.add(result=...)`), and it runs under the GIL that the model
    thread's tokenizer needs."""
    response.tier, response.threshold, response.truncated = result.tier, result.threshold, result.truncated
    response.tokens, response.model_version, response.server_latency_ms = (result.tokens, result.model_version,
                                                                           latency_ms)
    response.decided_by = result.decided_by
    if result.familiarity is not None:
        response.familiarity = result.familiarity
    if result.cheap_floor is not None:
        response.cheap_floor = result.cheap_floor
    scores = response.scores
    for tier, score in result.scores.items():  # the map's update() is a Python loop anyway
        scores[tier] = score
    return response


class RouterService(router_pb2_grpc.RouterServicer):
    """Classify, ClassifyBatch and Info, answered from the live model through the batcher."""

    def __init__(self, holder: ModelHolder, batcher: Batcher, metrics: ServerMetrics, limits: ServerLimits) -> None:
        self._holder, self._batcher, self._metrics, self._limits = holder, batcher, metrics, limits
        self._instance = uuid.uuid4().hex[:16]  # per process: each --workers process has its own service
        # One thread: large batches wait for one another there, and the event loop keeps its share of the GIL.
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="promptier-prepare")

    def close(self) -> None:
        """Let the preparer thread end once the server has stopped: a process that starts and stops
        servers (an embedding application, the tests) would otherwise keep one idle thread per server."""
        self._preparer.shutdown(wait=False, cancel_futures=True)

    def _record(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()
        self._metrics.latency.labels(rpc).observe(time.perf_counter() - start)

    def _count(self, results: list[ClassificationResult]) -> None:
        """Tier decisions and truncations, one counter update per tier rather than per prompt."""
        counts: dict[str, int] = {}  # a plain dict: a Counter costs more than it saves for one result
        for result in results:
            counts[result.tier] = counts.get(result.tier, 0) + 1
        for tier, count in counts.items():
            self._metrics.tiers.labels(tier).inc(count)
        truncated = sum(result.truncated for result in results)
        if truncated:
            self._metrics.truncations.inc(truncated)

    async def _fail(self, context: grpc.aio.ServicerContext, rpc: str, error: BaseException, start: float
                    ) -> NoReturn:
        code, message = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", rpc, exc_info=error)
        if isinstance(error, QueueFullError):
            reason = "caller_share_full" if error.by_caller else "queue_full"
            self._metrics.overload.labels(rpc, f"{error.lane}_{reason}").inc()
        self._record(rpc, code, start)
        await abort(context, code, message)

    def _cancelled(self, context: grpc.aio.ServicerContext, rpc: str, start: float) -> None:
        """Count a call that gRPC cancelled under its handler: the client's deadline passed or it went away."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        self._record(rpc, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED, start)

    async def _prepare(self, requests: Sequence[router_pb2.ClassifyRequest]) -> list[Prepared | BaseException]:
        """`_prepared` on the event loop, or for a batch of many conversation messages on the preparer
        thread, so that one large batch does not hold every other call."""
        if sum(len(item.conversation.messages) for item in requests if item.HasField("conversation")) \
                <= INLINE_MESSAGES:
            return _prepared(requests, self._limits)
        with self._batcher.arriving():
            return await asyncio.get_running_loop().run_in_executor(self._preparer, _prepared, requests,
                                                                    self._limits)

    async def _submit(self, items: list[tuple[object, RoutingRequest | None]], context: grpc.aio.ServicerContext,
                      lane: Lane) -> list[ClassificationResult | PromptierError]:
        caller = _caller(context, self._limits.trust_caller_metadata)
        return await self._batcher.submit(items, context.time_remaining(), lane, caller=caller)

    async def Classify(self, request: router_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
                       ) -> router_pb2.ClassifyResponse:
        start = time.perf_counter()
        try:
            item = (_prompt_text(request, self._limits), _routing_request(request))
            (outcome,) = await self._submit([item], context, "unary")
            if isinstance(outcome, PromptierError):
                raise outcome
        except asyncio.CancelledError:
            self._cancelled(context, "Classify", start)
            raise
        except Exception as error:
            await self._fail(context, "Classify", error, start)
        self._count([outcome])
        self._record("Classify", grpc.StatusCode.OK, start)
        return _fill(router_pb2.ClassifyResponse(), outcome, monotonic_ms(start))

    async def ClassifyBatch(self, request: router_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
                            ) -> router_pb2.ClassifyBatchResponse:
        start = time.perf_counter()
        try:
            if len(request.items) > self._limits.max_batch_items:
                raise BadRequest(f"{len(request.items)} items; the limit is {self._limits.max_batch_items}")
            items = await self._prepare(request.items)
            valid = [item for item in items if not isinstance(item, BaseException)]
            outcomes = iter(await self._submit(valid, context, "batch") if valid else [])
        except asyncio.CancelledError:
            self._cancelled(context, "ClassifyBatch", start)
            raise
        except Exception as error:
            await self._fail(context, "ClassifyBatch", error, start)
        latency = monotonic_ms(start)
        response = router_pb2.ClassifyBatchResponse()
        answered: list[ClassificationResult] = []
        for item in items:
            outcome = item if isinstance(item, BaseException) else next(outcomes)
            if isinstance(outcome, BaseException):
                code, message = status_of(outcome)
                if code == grpc.StatusCode.INTERNAL:  # the caller sees "internal error"; the operator, why
                    log.error("ClassifyBatch item failed: %s", outcome)
                response.items.add(error=router_pb2.ItemError(code=code.name, message=message))
            else:
                answered.append(outcome)
                _fill(response.items.add().result, outcome, latency)
        self._count(answered)
        self._record("ClassifyBatch", grpc.StatusCode.OK, start)
        return response

    async def Info(self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> router_pb2.InfoResponse:
        manifest = self._holder.model.manifest
        self._metrics.requests.labels("Info", "OK").inc()
        return router_pb2.InfoResponse(
            model_version=manifest.model_version,
            tiers=[router_pb2.Tier(name=t.name, input_usd_per_mtok=t.input_usd_per_mtok,
                                   output_usd_per_mtok=t.output_usd_per_mtok) for t in manifest.tiers],
            mode_thresholds=manifest.policy.thresholds, mode_cheap_floors=manifest.policy.cheap_floors,
            default_mode=manifest.policy.default_mode,
            max_tokens=manifest.truncation.max_tokens, max_prompt_chars=self._limits.max_prompt_chars,
            max_batch_items=self._limits.max_batch_items, data_fingerprint=manifest.data_fingerprint,
            server_instance=self._instance,
        )


def router_handlers(service: RouterService, metrics: ServerMetrics) -> grpc.GenericRpcHandler:
    """The Router methods as handlers of raw bytes; a malformed request is counted and refused INVALID_ARGUMENT."""
    async def malformed(method: str, context: grpc.aio.ServicerContext, error: DecodeError) -> NoReturn:
        metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")

    return parsing_handlers(ROUTER_SERVICE, {
        "Classify": (service.Classify, router_pb2.ClassifyRequest),
        "ClassifyBatch": (service.ClassifyBatch, router_pb2.ClassifyBatchRequest),
        "Info": (service.Info, router_pb2.InfoRequest),
    }, malformed)
