"""Python clients (sync and asyncio) for the Router service, with deadlines and retries.

Retries use gRPC's own retry policy (service config): UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED are
retried with exponential backoff inside the call's deadline; every other status is returned at once.
CANCELLED is retried because a server that stops cancels, in gRPC core, the calls that reached it in the
instant before its GOAWAY did, before any handler saw them; a Router call reads nothing but its request,
so sending it again is safe, and a call this client cancels itself is never retried.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc.aio import Metadata

from classifier.conversation import Message, message_pairs
from classifier.errors import InvalidInputError
from classifier.runtime import ClassificationResult
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc

T = TypeVar("T")
# The largest message either side of a connection accepts (the server's default max_message_bytes).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _service_config(attempts: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": "promptier.v1.Router"}],
        "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.005s", "maxBackoff": "0.1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]},
    }]})


# gRPC waits up to 120 s between reconnection attempts once a server has been down a while (its backoff
# doubles from 1 s), and every channel to the same target shares that wait: a service back after a
# restart stayed unreachable for 10-17 s of a router's calls. At most 1 s between attempts, from 100 ms.
RECONNECT_BACKOFF: list[tuple[str, object]] = [("grpc.initial_reconnect_backoff_ms", 100),
                                               ("grpc.min_reconnect_backoff_ms", 100),
                                               ("grpc.max_reconnect_backoff_ms", 1000)]


def _options(attempts: int) -> list[tuple[str, object]]:
    sizes: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                       ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *RECONNECT_BACKOFF]
    if attempts <= 1:  # gRPC's retry policy needs at least 2 attempts; 1 means "no retries"
        return [("grpc.enable_retries", 0), *sizes]
    return [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(attempts)), *sizes]


@dataclass(frozen=True)
class Decision(ClassificationResult):
    """A routing decision as returned by the server: the runtime's result plus the server's latency."""

    server_latency_ms: float = 0.0

    @classmethod
    def from_proto(cls, response: router_pb2.ClassifyResponse) -> Decision:
        return cls(tier=response.tier, scores=dict(response.scores), threshold=response.threshold,
                   truncated=response.truncated, tokens=response.tokens, model_version=response.model_version,
                   decided_by=response.decided_by or "model",
                   familiarity=response.familiarity if response.HasField("familiarity") else None,
                   cheap_floor=response.cheap_floor if response.HasField("cheap_floor") else None,
                   server_latency_ms=response.server_latency_ms)


def build_request(prompt: str | None = None, messages: Sequence[Message] | None = None,
                  mode: str | None = None, threshold: float | None = None, top_share: float | None = None,
                  allowed_tiers: Sequence[str] | None = None) -> router_pb2.ClassifyRequest:
    """A ClassifyRequest from a prompt or messages (as the runtime takes them: (role, content) pairs or
    OpenAI chat message objects) and an optional policy.

    Raises:
        InvalidInputError: a prompt that is not a string, or a message that is not one (a string in
            place of the list would otherwise be sent a character per role and content); a threshold or
            top share that is not a number; allowed tiers given as one string; text with a lone surrogate,
            which protobuf cannot encode.
    """
    if messages is not None:
        if isinstance(messages, str | bytes):
            raise InvalidInputError("messages must be a list of (role, content) pairs, not one string")
        messages = message_pairs(messages)
    elif prompt is not None and not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
    # As the runtime refuses them: protobuf would send True as a threshold of 1.0 (every prompt to the top
    # tier, without a word) and a tier name as its letters.
    for name, value in (("threshold", threshold), ("top_share", top_share)):
        if isinstance(value, bool) or (value is not None and not isinstance(value, int | float)):
            raise InvalidInputError(f"{name} must be a number, got {value!r}")
    if isinstance(allowed_tiers, str | bytes):
        raise InvalidInputError(f"allowed_tiers must be a list of tier names, not one string ({allowed_tiers!r})")
    policy = router_pb2.Policy(mode=mode or "", allowed_tiers=list(allowed_tiers or []))
    if threshold is not None:
        policy.threshold = threshold
    if top_share is not None:
        policy.top_share = top_share
    try:
        if messages is not None:
            conversation = router_pb2.Conversation(messages=[router_pb2.Message(role=r, content=c)
                                                             for r, c in messages])
            return router_pb2.ClassifyRequest(conversation=conversation, policy=policy)
        return router_pb2.ClassifyRequest(prompt=prompt or "", policy=policy)
    except UnicodeEncodeError as error:
        # A protobuf string is UTF-8, which a lone surrogate (JSON's "\ud800", read into a str) has no
        # bytes for: the runtime refuses such text as invalid input, and so must the client.
        raise InvalidInputError(f"text is not valid Unicode: {error.reason} at character {error.start}") from None


def _deadline(timeout: float | None, default: float) -> float:
    """A call's deadline in seconds: `timeout`, or `default` when it is None.

    Raises:
        ValueError: it is not a positive, finite number of seconds (0 is not "the default": it would
            fail every call at once, as would a negative one; NaN never expires in some stacks).
    """
    chosen = default if timeout is None else timeout
    if isinstance(chosen, bool) or not isinstance(chosen, int | float) or not 0 < chosen < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {chosen!r}")
    return float(chosen)


@dataclass(frozen=True, eq=False)
class ItemError:
    """One batch item's error: its status code and what the server said of it (which prompt was empty,
    which was too long). It compares equal to its code, so `item == grpc.StatusCode.INVALID_ARGUMENT`
    reads as a bare code would."""

    code: grpc.StatusCode
    message: str

    def __eq__(self, other: object) -> bool:
        if isinstance(other, grpc.StatusCode):
            return self.code == other
        if isinstance(other, ItemError):
            return (self.code, self.message) == (other.code, other.message)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.code)  # equal to its code, so hashed as it is


class RouterClient:
    """Blocking client. `timeout` is the per-call deadline in seconds.

    With `coalesce=True`, `classify` calls made from many threads at once go out together as
    ClassifyBatch calls, as with AsyncRouterClient (which does it, on an event loop of its own in a
    background thread): for a gateway that serves requests on threads. Measured with 32 threads
    against `promptier serve --workers 2`: 2.3-2.4x the classifications per second of plain calls,
    p50 13 against 31 ms. A call made alone pays a hand-off between threads, so leave it off for one
    caller at a time. `connections` > 1 spreads the connections over the server's processes once, at
    start (see AsyncRouterClient.spread_connections).
    """

    def __init__(self, target: str, timeout: float = 0.05, attempts: int = 3, *, coalesce: bool = False,
                 connections: int = 1) -> None:
        self.timeout = _deadline(timeout, timeout)
        self._channel = grpc.insecure_channel(target, options=_options(attempts))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._coalescer = _ThreadedCoalescer(target, timeout, attempts, connections) if coalesce else None

    def classify(self, prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                 timeout: float | None = None, **policy: object) -> Decision:
        if self._coalescer is not None:
            return self._coalescer.classify(prompt, messages, _deadline(timeout, self.timeout), policy)
        request = build_request(prompt, messages, **policy)  # type: ignore[arg-type]
        return Decision.from_proto(self._stub.Classify(request, timeout=_deadline(timeout, self.timeout)))

    def classify_batch(self, prompts: Sequence[str], timeout: float | None = None, **policy: object
                       ) -> list[Decision | ItemError]:
        """One decision per prompt, or that item's error (its status code and the server's message).

        Raises:
            InvalidInputError: `prompts` is one string (each of its characters would be a prompt).
        """
        if isinstance(prompts, str | bytes):
            raise InvalidInputError("classify_batch takes a list of prompts, not one string")
        request = router_pb2.ClassifyBatchRequest(items=[build_request(p, **policy) for p in prompts])  # type: ignore[arg-type]
        response = self._stub.ClassifyBatch(request, timeout=_deadline(timeout, self.timeout * 10))
        return [Decision.from_proto(item.result) if item.HasField("result")
                else ItemError(grpc.StatusCode[item.error.code], item.error.message) for item in response.items]

    def info(self) -> router_pb2.InfoResponse:
        return self._stub.Info(router_pb2.InfoRequest(), timeout=self.timeout * 10)

    def close(self) -> None:
        if self._coalescer is not None:
            self._coalescer.close()
        self._channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Waiting:
    request: router_pb2.ClassifyRequest
    deadline: float  # event-loop time
    future: asyncio.Future[Decision]
    size: int  # bytes the request adds to a ClassifyBatchRequest


def _batch_item_bytes(request: router_pb2.ClassifyRequest) -> int:
    """What `request` adds to a ClassifyBatchRequest: its bytes, its field tag and its length prefix."""
    size = request.ByteSize()
    return size + 1 + max(1, -(-size.bit_length() // 7))


class AsyncRouterClient:
    """asyncio client; same surface as RouterClient.

    With `coalesce=True`, calls made while `max_in_flight` RPCs are already out wait and then go
    together as one ClassifyBatch (results and per-item errors are handed back to each caller, as if
    each had made its own call, under its own deadline); a call made while nothing waits goes out at
    once as a plain Classify. There is no wait window: at concurrency 1 nothing changes, under load the server runs full
    batches instead of queueing unary calls. `connections` opens that many HTTP/2 connections and
    sends each RPC on the least busy one, so that a server with several SO_REUSEPORT processes gets
    work on all of them (the kernel pins a connection to one process).
    """

    def __init__(self, target: str, timeout: float = 0.05, attempts: int = 3, *, coalesce: bool = False,
                 max_in_flight: int = 4, max_batch: int = 64, connections: int = 1) -> None:
        if connections < 1 or max_in_flight < 1 or max_batch < 1:
            raise ValueError("connections, max_in_flight and max_batch must be at least 1")
        timeout = _deadline(timeout, timeout)
        # A local subchannel pool gives each channel its own connection (by default equal channels share one).
        options = _options(attempts) + ([("grpc.use_local_subchannel_pool", 1)] if connections > 1 else [])
        self._target, self._channel_options = target, options
        self._seen_instances: set[str] = set()
        self._server_batch_limit: int | None = None  # learnt from Info before the first batch
        self._all_processes_reached = False
        self._channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
        self._stubs = [router_pb2_grpc.RouterStub(channel) for channel in self._channels]
        self._busy = [0] * connections
        self._stub = self._stubs[0]
        self.timeout = timeout
        self._coalesce, self._max_in_flight, self._max_batch = coalesce, max_in_flight, max_batch
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._sending: dict[asyncio.Task, list[_Waiting]] = {}  # each send and the callers it answers
        self._closed = False

    async def classify(self, prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                       timeout: float | None = None, **policy: object) -> Decision:
        if self._closed:
            raise _client_closed()
        request = build_request(prompt, messages, **policy)  # type: ignore[arg-type]
        limit = _deadline(timeout, self.timeout)
        if not self._coalesce:
            index = self._least_busy()
            self._busy[index] += 1
            try:
                return Decision.from_proto(await self._stubs[index].Classify(request, timeout=limit))
            finally:
                self._busy[index] -= 1
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, loop.time() + limit, loop.create_future(), _batch_item_bytes(request))
        self._waiting.append(waiting)
        if self._in_flight == 0:
            self._flush()  # idle: send now, no event-loop turn in between
        elif not self._flush_scheduled:
            # Busy: let the calls made in this event-loop turn join the same batch.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # Each caller's own deadline, kept here: the batch it travels in carries the latest of its callers'.
        try:
            return await asyncio.wait_for(waiting.future, limit)
        except TimeoutError:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(),
                                       "Deadline Exceeded") from None

    def _least_busy(self) -> int:
        return min(range(len(self._busy)), key=self._busy.__getitem__)

    def _flush(self) -> None:
        """Send what waits, in groups of up to max_batch, while fewer than max_in_flight RPCs are out."""
        self._flush_scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight and not self._closed:
            # Split what waits over the connections: one big batch on one server process and crumbs on
            # the other would keep the second process idle (measured: 31 of 32 callers in one batch).
            parts = max(1, min(self._max_in_flight - self._in_flight, len(self._stubs)))
            group = self._take_group(min(self._max_batch, -(-len(self._waiting) // parts)))
            if not group:
                break
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(group))
            self._sending[task] = group
            task.add_done_callback(self._sent)

    def _take_group(self, size: int) -> list[_Waiting]:
        """Up to `size` waiting callers, fewer where more would make a ClassifyBatchRequest larger than
        a connection carries: valid calls that fit one by one must not fail together as one oversized message."""
        group: list[_Waiting] = []
        total = 0
        while self._waiting and len(group) < size:
            waiting = self._waiting[0]
            if waiting.future.done():  # a cancelled caller (or one past its deadline) is not sent
                self._waiting.popleft()
                continue
            if group and total + waiting.size > MAX_MESSAGE_BYTES:
                break
            group.append(self._waiting.popleft())
            total += waiting.size
        return group

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.pop(task, None)

    async def _send(self, group: list[_Waiting]) -> None:
        index = self._least_busy()  # by prompts in flight on each connection
        stub = self._stubs[index]
        loop = asyncio.get_running_loop()
        counted = 0  # prompts this send has added to the connection's busy count
        try:
            if len(group) > 1 and self._server_batch_limit is None:
                # Before the first batch: how many items the server takes per ClassifyBatch (a larger
                # one would be refused whole). What does not fit goes back to wait for the next send.
                with contextlib.suppress(grpc.RpcError):
                    limit = min(waiting.deadline for waiting in group) - loop.time()
                    self._note_limits(await stub.Info(router_pb2.InfoRequest(), timeout=max(limit, 0.001)))
                if len(group) > self._max_batch:
                    self._waiting.extendleft(reversed(group[self._max_batch:]))
                    group = group[: self._max_batch]
                    self._flush()  # a free slot may take the rest at once
            counted = len(group)
            self._busy[index] += counted
            # The latest deadline: a caller with a short one must not cut short the others' calls (each
            # caller's own deadline is kept in `classify`).
            remaining = max(waiting.deadline for waiting in group) - loop.time()
            if remaining <= 0:
                _fail(group, grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(),
                                                  "deadline expired before the call was sent"))
                return
            try:
                if len(group) == 1:
                    outcomes: list[Decision | grpc.RpcError] = [
                        Decision.from_proto(await stub.Classify(group[0].request, timeout=remaining))]
                else:
                    batch = router_pb2.ClassifyBatchRequest(items=[waiting.request for waiting in group])
                    response = await stub.ClassifyBatch(batch, timeout=remaining)
                    outcomes = [_outcome(item) for item in response.items]
            except grpc.RpcError as error:
                _fail(group, error)
                return
            for waiting, outcome in zip(group, outcomes, strict=True):
                if not waiting.future.done():
                    if isinstance(outcome, Decision):
                        waiting.future.set_result(outcome)
                    else:
                        waiting.future.set_exception(outcome)
        except Exception as error:  # never leave a caller waiting forever
            _fail(group, error)
        finally:
            self._busy[index] -= counted
            self._in_flight -= 1
            if self._waiting:
                self._flush()

    async def info(self) -> router_pb2.InfoResponse:
        info = await self._stub.Info(router_pb2.InfoRequest(), timeout=self.timeout * 10)
        self._note_limits(info)
        return info

    def _note_limits(self, info: router_pb2.InfoResponse) -> None:
        """Keep coalesced batches within the server's ClassifyBatch limit."""
        if info.max_batch_items > 0:
            self._server_batch_limit = info.max_batch_items
            self._max_batch = min(self._max_batch, info.max_batch_items)

    async def spread_connections(self, tries: int = 8) -> int:
        """Spread the connections evenly over the server's processes, as far as it has them.

        `promptier serve --workers N` runs N processes on one port, and the kernel keeps each
        connection with the process it hashed it to: with two processes, two connections share one half
        of the time, and that process then does all of this client's work (measured: 5 times in 8).
        This asks each connection which process answers it (`Info.server_instance`) and reopens one
        that shares its process, until it reaches a process with fewer connections, up to `tries`
        times. When `tries` new connections find no such process, the server is taken to have no more
        processes, and later calls leave a spread within one connection per process alone (until a
        process the client has not seen answers: the server restarted or grew). Cheap when already
        spread: one Info per connection. RPCs in flight on a reopened connection finish on it.

        Returns:
            The number of distinct server processes the connections reach (0: the server does not say).

        Raises:
            grpc.RpcError: the server could not be asked.
        """
        if tries < 1:
            raise ValueError("tries must be at least 1")
        instances = [await self._instance_of(index) for index in range(len(self._channels))]
        if not all(instances):
            return 0
        if not set(instances) <= self._seen_instances:  # a process started or restarted: look around again
            self._seen_instances.update(instances)
            self._all_processes_reached = False
        counts = collections.Counter(instances)
        for index, current in enumerate(instances):
            if counts[current] == 1 or (self._all_processes_reached and counts[current] - min(counts.values()) <= 1):
                continue
            for _ in range(tries):
                await self._reopen(index)
                instance = await self._instance_of(index)
                self._seen_instances.add(instance)
                if counts[instance] + 1 < counts[current]:  # moving there evens the spread
                    break
            else:
                self._all_processes_reached = True
            counts[current] -= 1
            counts[instance] += 1
        return sum(1 for count in counts.values() if count > 0)

    async def _instance_of(self, index: int) -> str:
        info = await self._stubs[index].Info(router_pb2.InfoRequest(), timeout=self.timeout * 10)
        self._note_limits(info)
        return str(info.server_instance)

    async def _reopen(self, index: int) -> None:
        """A new connection in place of connection `index` (a new source port, so a new hash)."""
        old = self._channels[index]
        self._channels[index] = grpc.aio.insecure_channel(self._target, options=self._channel_options)
        self._stubs[index] = router_pb2_grpc.RouterStub(self._channels[index])
        self._stub = self._stubs[0]
        await old.close(grace=self.timeout * 10)

    async def close(self) -> None:
        """Close the connections. Calls not yet answered fail with CANCELLED (coalesced ones: an
        RpcError saying the client was closed), and so do later calls."""
        self._closed = True
        while self._waiting:
            _fail([self._waiting.popleft()], _client_closed())
        sending = dict(self._sending)
        for task, group in sending.items():
            task.cancel()
            # Answered here, before any await: a send cancelled before it started never runs to answer
            # its own, and a close() cancelled while it waits below must leave nobody waiting.
            _fail(group, _client_closed())
        await asyncio.gather(*sending, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _ThreadedCoalescer:
    """A coalescing AsyncRouterClient on its own event loop in a daemon thread, for blocking callers."""

    # How long past its own deadline a blocking caller waits for the loop thread before giving up on it.
    HAND_OFF_GRACE_S = 1.0

    def __init__(self, target: str, timeout: float, attempts: int, connections: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._loop.run_forever, name="promptier-client", daemon=True)
        self._thread.start()
        self._client: AsyncRouterClient = self._run(self._open(target, timeout, attempts, connections),
                                                    timeout * 10 + self.HAND_OFF_GRACE_S)

    @staticmethod
    async def _open(target: str, timeout: float, attempts: int, connections: int) -> AsyncRouterClient:
        client = AsyncRouterClient(target, timeout, attempts, coalesce=True, connections=connections)
        if connections > 1:
            with contextlib.suppress(grpc.RpcError):  # the server may not be up yet: calls still work
                await client.spread_connections()
        return client

    def _run(self, coroutine: Coroutine[object, object, T], wait_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(wait_s)
        except TimeoutError:
            future.cancel()  # the loop thread is stuck; do not leave the call running there
            raise

    def classify(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None, timeout: float,
                 policy: dict[str, object]) -> Decision:
        if self._closed:
            # What a call racing the close gets; the closed loop would say "Event loop is closed" and
            # leave the call's coroutine never awaited.
            raise _client_closed()
        call = self._client.classify(prompt, messages=messages, timeout=timeout, **policy)
        return self._run(call, timeout + self.HAND_OFF_GRACE_S)  # the deadline itself is the client's

    def close(self) -> None:
        if self._closed:
            return  # as a channel's close(): a second one does nothing
        self._closed = True
        self._run(self._client.close(), self.HAND_OFF_GRACE_S * 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _outcome(item: router_pb2.ClassifyBatchItem) -> Decision | grpc.RpcError:
    """One item of a ClassifyBatch answer as its caller would have got it from Classify."""
    if item.HasField("result"):
        return Decision.from_proto(item.result)
    return grpc.aio.AioRpcError(grpc.StatusCode[item.error.code], Metadata(), Metadata(), item.error.message)


def _client_closed() -> grpc.aio.AioRpcError:
    """What a call gets when its client is closed before the call is answered."""
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, Metadata(), Metadata(),
                                "the client was closed before the call was answered")


def _fail(group: list[_Waiting], error: BaseException) -> None:
    for waiting in group:
        if not waiting.future.done():
            waiting.future.set_exception(error)
