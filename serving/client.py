"""Python clients (sync and asyncio) for the Router service, with deadlines and retries.

Retries use gRPC's own retry policy (service config): UNAVAILABLE and RESOURCE_EXHAUSTED are retried
with exponential backoff inside the call's deadline; every other status is returned at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from classifier.runtime import ClassificationResult
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc


def _service_config(attempts: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": "promptier.v1.Router"}],
        "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.005s", "maxBackoff": "0.1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
    }]})


def _options(attempts: int) -> list[tuple[str, object]]:
    sizes: list[tuple[str, object]] = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                       ("grpc.max_send_message_length", 16 * 1024 * 1024)]
    if attempts <= 1:  # gRPC's retry policy needs at least 2 attempts; 1 means "no retries"
        return [("grpc.enable_retries", 0), *sizes]
    return [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(attempts)), *sizes]


@dataclass(frozen=True)
class Decision(ClassificationResult):
    """A routing decision as returned by the server: the runtime's result plus the server's latency."""

    server_latency_ms: float

    @classmethod
    def from_proto(cls, response: router_pb2.ClassifyResponse) -> Decision:
        return cls(response.tier, dict(response.scores), response.threshold, response.truncated, response.tokens,
                   response.model_version, response.server_latency_ms)


def build_request(prompt: str | None = None, messages: Sequence[tuple[str, str]] | None = None,
                  mode: str | None = None, threshold: float | None = None, top_share: float | None = None,
                  allowed_tiers: Sequence[str] | None = None) -> router_pb2.ClassifyRequest:
    """A ClassifyRequest from a prompt or (role, content) messages and an optional policy."""
    policy = router_pb2.Policy(mode=mode or "", allowed_tiers=list(allowed_tiers or []))
    if threshold is not None:
        policy.threshold = threshold
    if top_share is not None:
        policy.top_share = top_share
    if messages is not None:
        conversation = router_pb2.Conversation(messages=[router_pb2.Message(role=r, content=c) for r, c in messages])
        return router_pb2.ClassifyRequest(conversation=conversation, policy=policy)
    return router_pb2.ClassifyRequest(prompt=prompt or "", policy=policy)


class RouterClient:
    """Blocking client. `timeout` is the per-call deadline in seconds."""

    def __init__(self, target: str, timeout: float = 0.05, attempts: int = 3) -> None:
        self._channel = grpc.insecure_channel(target, options=_options(attempts))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout

    def classify(self, prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                 timeout: float | None = None, **policy: object) -> Decision:
        request = build_request(prompt, messages, **policy)  # type: ignore[arg-type]
        return Decision.from_proto(self._stub.Classify(request, timeout=timeout or self.timeout))

    def classify_batch(self, prompts: Sequence[str], timeout: float | None = None, **policy: object
                       ) -> list[Decision | grpc.StatusCode]:
        """One decision per prompt, or the status code of that item's error."""
        request = router_pb2.ClassifyBatchRequest(items=[build_request(p, **policy) for p in prompts])  # type: ignore[arg-type]
        response = self._stub.ClassifyBatch(request, timeout=timeout or self.timeout * 10)
        return [Decision.from_proto(item.result) if item.HasField("result") else grpc.StatusCode[item.error.code]
                for item in response.items]

    def info(self) -> router_pb2.InfoResponse:
        return self._stub.Info(router_pb2.InfoRequest(), timeout=self.timeout * 10)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRouterClient:
    """asyncio client; same surface as RouterClient."""

    def __init__(self, target: str, timeout: float = 0.05, attempts: int = 3) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=_options(attempts))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout

    async def classify(self, prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                       timeout: float | None = None, **policy: object) -> Decision:
        request = build_request(prompt, messages, **policy)  # type: ignore[arg-type]
        return Decision.from_proto(await self._stub.Classify(request, timeout=timeout or self.timeout))

    async def info(self) -> router_pb2.InfoResponse:
        return await self._stub.Info(router_pb2.InfoRequest(), timeout=self.timeout * 10)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
