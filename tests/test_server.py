"""The real gRPC server on a real port (0 = any free one), driven by real clients."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import classifier
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.client import AsyncRouterClient, Decision, RouterClient
from serving.service.server import RunningServer, ServerLimits, is_local_peer
from tests.grpc_server import EASY, HARD, ServerThread, spawned_workers, worker_serving


@pytest.fixture(scope="module")
def server(trained_artifact: Path) -> Iterator[ServerThread]:
    running = ServerThread(model_dir=trained_artifact, limits=ServerLimits(max_prompt_chars=200_000,
                                                                          max_batch_items=16))
    yield running
    running.stop()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[router_pb2_grpc.RouterStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def _code(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def test_classify_prompt_and_policies(server: ServerThread) -> None:
    with RouterClient(server.target, timeout=5) as client:
        easy = client.classify("hello thanks say hi cat dog")
        hard = client.classify("prove theorem derive integral eigenvalue lemma")
        assert (easy.tier, hard.tier) == ("small", "large")
        assert set(easy.scores) == {"small", "medium", "large"} and easy.model_version == "tiny-test-1"
        assert easy.server_latency_ms > 0 and easy.tokens > 2 and not easy.truncated
        assert client.classify(EASY, allowed_tiers=["medium", "large"]).tier == "medium"
        assert client.classify(HARD, threshold=0.0).tier == "small"  # everything passes 0
        cost = client.classify(EASY, mode="cost")
        info = client.info()
        assert cost.threshold == pytest.approx(info.mode_thresholds["cost"])
        assert [t.name for t in info.tiers] == ["small", "medium", "large"]
        assert info.max_batch_items == 16 and info.max_tokens == 32
        assert len(info.server_instance) == 16 and client.info().server_instance == info.server_instance


def test_conversation_weighs_latest_turn_with_context(server: ServerThread) -> None:
    with RouterClient(server.target, timeout=5) as client:
        plan = [("user", "prove theorem derive integral eigenvalue lemma quantum entropy"),
                ("assistant", "Here is a plan for the proof."), ("user", "hello say hi")]
        alone = client.classify("hello say hi")
        in_context = client.classify(messages=plan)
        assert in_context.scores["small"] < alone.scores["small"]


def test_batch_answers_per_item(server: ServerThread) -> None:
    with RouterClient(server.target, timeout=5) as client:
        outcomes = client.classify_batch([EASY, "", HARD, "x" * 200_001])
    assert outcomes[0].tier == "small" and outcomes[2].tier == "large"  # type: ignore[union-attr]
    assert outcomes[1] == grpc.StatusCode.INVALID_ARGUMENT and outcomes[3] == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_items_carry_what_single_calls_do_and_are_counted(server: ServerThread) -> None:
    assert server.running is not None
    registry = server.running.metrics.registry

    def decisions() -> dict[str, float]:
        return {tier: registry.get_sample_value("promptier_tier_decisions_total", {"tier": tier}) or 0.0
                for tier in ("small", "medium", "large")}

    def truncated() -> float:
        return registry.get_sample_value("promptier_truncated_prompts_total") or 0.0

    tiers_before, truncated_before = decisions(), truncated()
    long = " ".join(["word"] * 400)  # past the model's token window
    prompts = [EASY, HARD, EASY, long]
    with RouterClient(server.target, timeout=5) as client:
        batch = client.classify_batch([*prompts, ""])
        singles = [client.classify(prompt) for prompt in prompts]
    assert batch[4] == grpc.StatusCode.INVALID_ARGUMENT
    for item, single in zip(batch, singles, strict=False):
        assert isinstance(item, Decision)
        assert (item.tier, item.threshold, item.truncated, item.tokens, item.model_version) == (
            single.tier, single.threshold, single.truncated, single.tokens, single.model_version)
        assert item.scores == pytest.approx(single.scores, abs=1e-5) and item.server_latency_ms > 0
    assert [item.truncated for item in singles] == [False, False, False, True]
    counted = {tier: count - tiers_before[tier] for tier, count in decisions().items()}
    expected = {tier: 2 * [d.tier for d in singles].count(tier) for tier in counted}
    assert counted == expected  # every answered prompt once, the refused one not at all
    assert truncated() - truncated_before == 2


def test_invalid_arguments(stub: router_pb2_grpc.RouterStub) -> None:
    request = router_pb2.ClassifyRequest
    policy = router_pb2.Policy
    for bad in (request(prompt=""), request(prompt="  "), request(), request(prompt="x" * 200_001),
                request(prompt="hi", policy=policy(mode="cheapest")),
                request(prompt="hi", policy=policy(threshold=1.5)),
                request(prompt="hi", policy=policy(allowed_tiers=["gigantic"])),
                request(conversation=router_pb2.Conversation()),
                request(conversation=router_pb2.Conversation(messages=[router_pb2.Message(role="bot", content="a")]))):
        assert _code(stub.Classify, bad, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    too_many = router_pb2.ClassifyBatchRequest(items=[request(prompt="hi")] * 17)
    assert _code(stub.ClassifyBatch, too_many, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request(prompt="hi", policy=policy(mode="cheapest")), timeout=5)
    assert "unknown mode 'cheapest'" in info.value.details()


def test_invalid_utf8_is_rejected_and_server_keeps_serving(server: ServerThread) -> None:
    # A protobuf string must be UTF-8; send raw bytes the Python stub would refuse to build.
    raw = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompt), length 3, invalid UTF-8
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/promptier.v1.Router/Classify", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        code = _code(call, raw, timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    with RouterClient(server.target, timeout=5) as client:
        assert client.classify(EASY).tier == "small"


def test_deadline_expiry(trained_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose deadline passes while it waits for the model fails with DEADLINE_EXCEEDED, and the
    server goes on serving. The model is held on an event, not raced against the clock."""
    release, entered = threading.Event(), threading.Event()
    classify_items = classifier.TierClassifier.classify_items

    def held(self, items):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return classify_items(self, items)

    monkeypatch.setattr(classifier.TierClassifier, "classify_items", held)
    running = ServerThread(model_dir=trained_artifact)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            occupying = stub.Classify.future(router_pb2.ClassifyRequest(prompt="hi"), timeout=60)
            # Calls on one channel may reach the server in either order: the short one must queue behind.
            assert entered.wait(60)
            code = _code(stub.Classify, router_pb2.ClassifyRequest(prompt="hi"), timeout=0.3)
            release.set()
            assert occupying.result().tier
            assert stub.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=30).tier
    finally:
        release.set()
        running.stop()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # gRPC cancelled the expired call under its handler; it is counted with the status its caller saw.
    assert running.running is not None
    assert _counted(running.running, "Classify", "DEADLINE_EXCEEDED") == 1
    assert _counted(running.running, "Classify", "OK") == 2


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "promptier.v1.Router"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"promptier.v1.Router", "promptier.v1.Admin", "grpc.health.v1.Health"} <= services


def test_reflection_v1_lists_and_describes_the_services(server: ServerThread) -> None:
    """grpcurl and other current tools ask for grpc.reflection.v1 first; v1alpha stays for older ones."""
    from google.protobuf import descriptor_pb2, message_factory

    from serving.service.reflection import v1_file_descriptor

    v1 = v1_file_descriptor()
    request_type = message_factory.GetMessageClass(v1.message_types_by_name["ServerReflectionRequest"])
    response_type = message_factory.GetMessageClass(v1.message_types_by_name["ServerReflectionResponse"])
    with grpc.insecure_channel(server.target) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=request_type.SerializeToString,
                                     response_deserializer=response_type.FromString)
        listed, router, itself = info(iter([
            request_type(list_services=""), request_type(file_containing_symbol="promptier.v1.Router"),
            request_type(file_containing_symbol="grpc.reflection.v1.ServerReflection")]), timeout=10)
    services = {service.name for service in listed.list_services_response.service}
    assert {"promptier.v1.Router", "promptier.v1.Admin", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= services
    for described, package, service_name in ((router, "promptier.v1", "Router"),
                                             (itself, "grpc.reflection.v1", "ServerReflection")):
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in described.file_descriptor_response.file_descriptor_proto]
        assert any(file.package == package and service.name == service_name
                   for file in files for service in file.service), described


def test_concurrent_clients_get_consistent_answers(server: ServerThread) -> None:
    prompts = [EASY, "prove lemma theorem", "sort python list"]
    with RouterClient(server.target, timeout=5) as client:
        expected = {p: client.classify(p).tier for p in prompts}

        def worker(seed: int) -> list[bool]:
            rng = random.Random(seed)
            picks = [rng.choice(prompts) for _ in range(40)]
            return [client.classify(p).tier == expected[p] for p in picks]

        with ThreadPoolExecutor(8) as pool:
            results = [ok for batch in pool.map(worker, range(8)) for ok in batch]
    assert len(results) == 320 and all(results)


def test_async_client(server: ServerThread) -> None:
    async def run() -> list[str]:
        async with AsyncRouterClient(server.target, timeout=5) as client:
            decisions = await asyncio.gather(*(client.classify(EASY) for _ in range(20)))
            return [d.tier for d in decisions]

    assert asyncio.run(run()) == ["small"] * 20


def test_async_client_coalesces_concurrent_calls_into_batches(server: ServerThread) -> None:
    distinct = [EASY, HARD, "sort python list"]
    prompts = distinct * 10 + [""]  # the empty prompt is invalid: only its caller gets the error
    assert server.running is not None
    running = server.running

    def rpcs() -> tuple[float, float]:
        return _counted(running, "Classify", "OK"), _counted(running, "ClassifyBatch", "OK")

    async def run() -> tuple[dict, list, tuple, tuple, bool]:
        async with AsyncRouterClient(server.target, timeout=5) as plain:
            expected = {p: await plain.classify(p) for p in distinct}
        before = rpcs()
        async with AsyncRouterClient(server.target, timeout=5, coalesce=True, max_in_flight=1, max_batch=8,
                                     connections=2) as client:
            outcomes = await asyncio.gather(*(client.classify(p) for p in prompts), return_exceptions=True)
            after = rpcs()
            # A caller that gives up while waiting is dropped; the others are answered.
            tasks = [asyncio.ensure_future(client.classify(p)) for p in distinct * 3]
            await asyncio.sleep(0)
            tasks[4].cancel()
            rest = await asyncio.gather(*tasks, return_exceptions=True)
            others_ok = all(isinstance(r, Decision) for i, r in enumerate(rest) if i != 4)
            cancelled = isinstance(rest[4], asyncio.CancelledError)
        return expected, outcomes, before, after, others_ok and cancelled

    expected, outcomes, before, after, cancel_ok = asyncio.run(run())
    for prompt, outcome in zip(prompts[:-1], outcomes[:-1], strict=True):
        assert isinstance(outcome, Decision) and outcome.tier == expected[prompt].tier
        # The same answer as a call of its own (a dynamic-int8 model's scores may move ~0.02 with batch neighbours).
        assert outcome.scores == pytest.approx(expected[prompt].scores, abs=0.03)
    assert isinstance(outcomes[-1], grpc.RpcError) and outcomes[-1].code() == grpc.StatusCode.INVALID_ARGUMENT
    unary, batches = after[0] - before[0], after[1] - before[1]
    assert batches >= 3 and unary + batches <= 6  # 31 calls in a handful of RPCs, not 31
    assert cancel_ok

    async def too_late() -> list:
        async with AsyncRouterClient(server.target, timeout=1e-6, coalesce=True) as client:
            return await asyncio.gather(*(client.classify(EASY) for _ in range(5)), return_exceptions=True)

    late = asyncio.run(too_late())
    assert all(isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.DEADLINE_EXCEEDED for r in late)


def test_blocking_client_coalesces_calls_from_many_threads(server: ServerThread) -> None:
    assert server.running is not None
    running = server.running

    def rpcs() -> tuple[float, float]:
        return _counted(running, "Classify", "OK"), _counted(running, "ClassifyBatch", "OK")

    prompts = [EASY, HARD] * 24 + [""]  # the empty prompt is invalid: only its caller gets the error
    before = rpcs()
    with RouterClient(server.target, timeout=5, coalesce=True, connections=2) as client, \
            ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        barrier = threading.Barrier(len(prompts))

        def call(prompt: str) -> str:
            barrier.wait()  # all at once, so that calls queue behind one another
            try:
                return client.classify(prompt).tier
            except grpc.RpcError as error:
                return error.code().name

        tiers = list(pool.map(call, prompts))
    after = rpcs()
    assert tiers == ["small", "large"] * 24 + ["INVALID_ARGUMENT"]
    unary, batches = after[0] - before[0], after[1] - before[1]
    assert batches >= 1 and unary + batches < len(prompts) / 2  # grouped, not one RPC per call

    with RouterClient("127.0.0.1:1", timeout=0.2, attempts=1, coalesce=True) as nowhere:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            nowhere.classify(EASY)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.perf_counter() - started < 2  # within its deadline, not the hand-off's grace
    assert not any(thread.name == "promptier-client" for thread in threading.enumerate())  # closed


def test_fuzz_then_still_serving(server: ServerThread, stub: router_pb2_grpc.RouterStub) -> None:
    rng = random.Random(0)
    for _ in range(150):
        kind = rng.randrange(4)
        if kind == 0:
            text = "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(rng.randrange(0, 300)))
            text = text.encode("utf-8", "replace").decode("utf-8", "replace")
            request = router_pb2.ClassifyRequest(prompt=text)
        elif kind == 1:
            messages = [router_pb2.Message(role=rng.choice(["user", "assistant", "x", ""]),
                                           content=rng.choice(["", "hi", "prove " * rng.randrange(1, 2000)]))
                        for _ in range(rng.randrange(0, 8))]
            request = router_pb2.ClassifyRequest(conversation=router_pb2.Conversation(messages=messages))
        elif kind == 2:
            request = router_pb2.ClassifyRequest(prompt="hi", policy=router_pb2.Policy(
                threshold=rng.uniform(-2, 2), mode=rng.choice(["", "cost", "??"])))
        else:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            with grpc.insecure_channel(server.target) as channel:
                call = channel.unary_unary("/promptier.v1.Router/Classify", request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
                try:
                    call(raw, timeout=5)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            continue
        try:
            stub.Classify(request, timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert stub.Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=5).tier == "small"


class _SlowModel:
    """Wraps a real model, adds latency (overload test) or fails (internal error test)."""

    def __init__(self, model: classifier.TierClassifier, delay: float = 0.0, fail: bool = False) -> None:
        self._model, self._delay, self._fail = model, delay, fail
        self.manifest, self.model_version = model.manifest, model.model_version

    def classify_items(self, items):  # type: ignore[no-untyped-def]
        time.sleep(self._delay)
        if self._fail and any("boom" in str(text) for text, _ in items):
            raise RuntimeError("secret internal detail /etc/passwd")
        return self._model.classify_items(items)


def test_overload_is_refused_not_queued_forever(trained_artifact: Path) -> None:
    slow = _SlowModel(classifier.load(trained_artifact), delay=0.3)
    running = ServerThread(model=slow, limits=ServerLimits(max_queue=2, max_batch=1))
    try:
        with RouterClient(running.target, timeout=10, attempts=1) as client, ThreadPoolExecutor(12) as pool:
            def call(_: int) -> str:
                try:
                    return client.classify(EASY).tier
                except grpc.RpcError as error:
                    return error.code().name

            outcomes = list(pool.map(call, range(12)))
        assert "RESOURCE_EXHAUSTED" in outcomes and "small" in outcomes
        assert set(outcomes) <= {"RESOURCE_EXHAUSTED", "small"}
    finally:
        running.stop()


class _HeldModel:
    """Wraps a real model; every model call waits on `release` (a test holds work on this event, never
    on a timer) and is recorded, so a test can see which prompts each model call carried."""

    def __init__(self, model: classifier.TierClassifier) -> None:
        self._model = model
        self.manifest, self.model_version = model.manifest, model.model_version
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def classify_items(self, items):  # type: ignore[no-untyped-def]
        self.calls.append([str(text) for text, _ in items])
        self.entered.set()
        assert self.release.wait(120), "the test never released the model"
        return self._model.classify_items(items)


def _wait_until(condition, what: str, bound_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """A bounded poll: the bound is generous, it only keeps a broken build from hanging."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _counted(running: RunningServer, rpc: str, code: str) -> float:
    return _sample(running, "promptier_requests", rpc=rpc, code=code)


def _sample(running: RunningServer, counter: str, **labels: str) -> float:
    """A counter of the service as its /metrics exposes it (0 before its first increment)."""
    return running.metrics.registry.get_sample_value(f"{counter}_total", labels) or 0.0


def test_batch_flood_cannot_starve_single_calls(trained_artifact: Path) -> None:
    """One client keeping ClassifyBatch x 256 calls coming fills only the room batch calls have (counted
    in prompts); unary calls are admitted beside it and run between its chunks, and the flooder is told
    RESOURCE_EXHAUSTED, counted with its reason. The model is held on an event while the queues fill,
    so nothing here depends on how fast it runs."""
    held = _HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held, limits=ServerLimits(max_queue=100, max_batch_queue=1024))
    assert running.running is not None
    batcher = running.running.batcher
    flood_request = router_pb2.ClassifyBatchRequest(items=[router_pb2.ClassifyRequest(prompt=HARD)] * 256)
    try:
        with grpc.insecure_channel(running.target) as flood_channel, \
                grpc.insecure_channel(running.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            flooder, router = router_pb2_grpc.RouterStub(flood_channel), router_pb2_grpc.RouterStub(channel)
            flood = [flooder.ClassifyBatch.future(flood_request, timeout=300) for _ in range(150)]
            # Every flood call is either refused by now or admitted (waiting, or in the held model).
            _wait_until(lambda: held.entered.is_set() and sum(f.done() for f in flood) + batcher.calls("batch") == 150,
                        "the flood to be admitted or refused")
            assert batcher.queued("batch") <= 1024
            single = [router.Classify.future(router_pb2.ClassifyRequest(prompt=EASY), timeout=300)
                      for _ in range(100)]
            _wait_until(lambda: batcher.calls("unary") == 100 or any(f.done() for f in single),
                        "the single calls to be admitted")
            more_flood = [flooder.ClassifyBatch.future(flood_request, timeout=300) for _ in range(20)]
            _wait_until(lambda: all(f.done() for f in more_flood), "the second wave to be refused")
            held_calls = len(held.calls)
            held.release.set()
            tiers = [f.result().tier for f in single]
            flood_codes = [f.code() for f in flood + more_flood]
    finally:
        held.release.set()
        running.stop()
    assert tiers == ["small"] * 100  # every single call served, none refused for the flood
    refused = flood_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 140 and set(flood_codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in more_flood)
    assert _counted(running.running, "ClassifyBatch", "RESOURCE_EXHAUSTED") == refused
    assert _sample(running.running, "promptier_overload_refusals", rpc="ClassifyBatch", reason="batch_queue_full") \
        == refused
    assert _counted(running.running, "ClassifyBatch", "OK") == flood_codes.count(grpc.StatusCode.OK)
    assert _counted(running.running, "Classify", "OK") == 100
    # Fair turns: the 100 single prompts ran within the first model calls after the held one, between
    # chunks of at most max_batch batch prompts, not behind the ~1,000 batch prompts queued before them,
    # and in model calls of their own: none waited for batch prompts' compute in its own call.
    after = held.calls[held_calls:]
    last_single = max(index for index, call in enumerate(after) if EASY in call)
    assert last_single <= 4 and all(len(call) <= 64 for call in held.calls), [len(c) for c in after]
    assert all(set(call) == {EASY} for call in after if EASY in call), [sorted(set(c)) for c in after]


def test_every_call_reaches_a_handler_and_is_counted_with_its_status(trained_artifact: Path) -> None:
    """gRPC core sheds calls the application has not picked up past a backlog of 1,000 with a bare
    CANCELLED that no handler sees. 3,000 concurrent calls over 12 connections: each is answered OK or
    RESOURCE_EXHAUSTED (never CANCELLED) and counted once. Deadlines are generous, so no outcome
    depends on speed."""
    slow = _SlowModel(classifier.load(trained_artifact), delay=0.005)
    running = ServerThread(model=slow, limits=ServerLimits(max_queue=64))
    assert running.running is not None

    async def flood() -> list[grpc.StatusCode]:
        channels = [grpc.aio.insecure_channel(running.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(12)]
        stubs = [router_pb2_grpc.RouterStub(channel) for channel in channels]

        async def one(index: int) -> grpc.StatusCode:
            try:
                await stubs[index % 12].Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=300)
                return grpc.StatusCode.OK
            except grpc.RpcError as error:
                return error.code()

        try:
            return await asyncio.gather(*(one(index) for index in range(3000)))
        finally:
            for channel in channels:
                await channel.close()

    try:
        codes = asyncio.run(flood())
    finally:
        running.stop()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, collections.Counter(codes)
    for code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert _counted(running.running, "Classify", code.name) == codes.count(code)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _sample(running.running, "promptier_overload_refusals", rpc="Classify", reason="unary_queue_full") == refused


def test_shutdown_answers_waiting_calls_unavailable(trained_artifact: Path) -> None:
    """Calls still waiting for the model when the drain's grace ends are answered UNAVAILABLE (which
    clients retry elsewhere) and counted, rather than cancelled by gRPC with a bare CANCELLED."""
    held = _HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held)
    assert running.running is not None
    batcher = running.running.batcher
    stopper = threading.Thread(target=running.stop, args=(0.2,))
    try:
        with grpc.insecure_channel(running.target) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            calls = [router.Classify.future(router_pb2.ClassifyRequest(prompt=EASY), timeout=300) for _ in range(6)]
            _wait_until(lambda: held.entered.is_set() and batcher.calls("unary") == 6, "six calls in the server")
            stopper.start()
            _wait_until(lambda: all(call.done() for call in calls), "the calls to be answered")
            codes = [call.code() for call in calls]
    finally:
        held.release.set()
        stopper.join(60)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 6
    assert _counted(running.running, "Classify", "UNAVAILABLE") == 6


def test_internal_errors_do_not_leak_and_server_survives(trained_artifact: Path) -> None:
    failing = _SlowModel(classifier.load(trained_artifact), fail=True)
    running = ServerThread(model=failing)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(router_pb2.ClassifyRequest(prompt="boom"), timeout=5)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "internal error"
            assert stub.Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=5).tier == "small"
    finally:
        running.stop()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` by now (reading and dropping whatever it sent before)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:  # reset by the server
        return True
    return True


def test_slow_and_idle_connections_are_closed_while_real_calls_go_on(trained_artifact: Path) -> None:
    """A connection that sends nothing, or half an HTTP/2 preface, is closed after the handshake
    timeout; one that completed its preface and carries no call, after the idle timeout. Both are
    configured short here; the bound on each wait is generous."""
    running = ServerThread(model_dir=trained_artifact,
                           limits=ServerLimits(handshake_timeout_s=1.0, idle_timeout_s=2.0))
    assert running.running is not None
    port = running.running.port
    sockets: dict[str, list[socket.socket]] = {"silent": [], "half preface": [], "idle": []}
    try:
        for _ in range(5):
            sockets["silent"].append(socket.create_connection(("127.0.0.1", port)))
            half = socket.create_connection(("127.0.0.1", port))
            half.sendall(HTTP2_PREFACE[:10])
            sockets["half preface"].append(half)
            idle = socket.create_connection(("127.0.0.1", port))
            idle.sendall(HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)
            sockets["idle"].append(idle)
        everything = [sock for socks in sockets.values() for sock in socks]
        with RouterClient(running.target, timeout=10) as client:
            assert [client.classify(EASY).tier for _ in range(5)] == ["small"] * 5
            _wait_until(lambda: all(_closed_now(sock) for sock in everything), "the server to close them all",
                        bound_s=60)
            assert client.classify(HARD).tier == "large"
    finally:
        for sock in (sock for socks in sockets.values() for sock in socks):
            sock.close()
        running.stop()


def test_connections_past_the_limit_are_refused_and_existing_ones_keep_serving(trained_artifact: Path) -> None:
    running = ServerThread(model_dir=trained_artifact,
                           limits=ServerLimits(max_connections=4, handshake_timeout_s=300.0))
    assert running.running is not None
    port = running.running.port
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    hogs: list[socket.socket] = []
    try:
        with grpc.insecure_channel(running.target, options=own_connection) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            assert router.Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=10).tier == "small"
            hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # 3 fit beside ours
            _wait_until(lambda: sum(_closed_now(sock) for sock in hogs) >= 3, "connections past the limit to close")
            assert sum(_closed_now(sock) for sock in hogs) == 3  # the other three wait in their long handshake
            assert router.Classify(router_pb2.ClassifyRequest(prompt=HARD), timeout=10).tier == "large"
            with grpc.insecure_channel(running.target, options=own_connection) as newcomer:
                code = _code(router_pb2_grpc.RouterStub(newcomer).Classify,
                             router_pb2.ClassifyRequest(prompt=EASY), timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE
            for sock in hogs:
                sock.close()

            def newcomer_served() -> bool:
                with grpc.insecure_channel(running.target, options=own_connection) as fresh:
                    try:
                        return router_pb2_grpc.RouterStub(fresh).Classify(
                            router_pb2.ClassifyRequest(prompt=EASY), timeout=5).tier == "small"
                    except grpc.RpcError:
                        return False

            _wait_until(newcomer_served, "a new connection to be accepted once the others closed")
    finally:
        for sock in hogs:
            sock.close()
        running.stop()


def test_serve_applies_its_connection_options(trained_artifact: Path) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                               "--port", str(port), "--handshake-timeout", "1", "--idle-timeout", "2",
                               "--max-connections", "50", "--max-streams", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        silent = socket.create_connection(("127.0.0.1", port))
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)
        _wait_until(lambda: _closed_now(silent) and _closed_now(idle), "serve to close both", bound_s=60)
        with RouterClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.classify(EASY).tier == "small"
    finally:
        server.terminate()
        server.wait(30)


def test_long_invalid_fields_are_invalid_argument_with_bounded_details(stub: router_pb2_grpc.RouterStub) -> None:
    """An error that quoted a 20 KB field whole would pass the client's metadata limit, and the caller
    would see RESOURCE_EXHAUSTED (which clients retry) instead of INVALID_ARGUMENT."""
    request, policy = router_pb2.ClassifyRequest, router_pb2.Policy
    long_role = router_pb2.Conversation(messages=[router_pb2.Message(role="r" * 20_000, content="hi")])
    for bad, says in ((request(prompt="hi", policy=policy(mode="m" * 20_000)), "unknown mode 'mmm"),
                      (request(prompt="hi", policy=policy(mode="é" * 20_000)), "unknown mode 'ééé"),
                      (request(prompt="hi", policy=policy(allowed_tiers=["t" * 40] * 2_000)), "unknown tier"),
                      (request(conversation=long_role), "unknown role 'rrr")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details()
        assert says in details and len(details.encode()) <= 2_200
    batch = stub.ClassifyBatch(router_pb2.ClassifyBatchRequest(items=[
        request(prompt="hi", policy=policy(mode="m" * 20_000)), request(prompt=EASY)]), timeout=10)
    assert batch.items[0].error.code == "INVALID_ARGUMENT" and len(batch.items[0].error.message) <= 2_200
    assert batch.items[1].result.tier == "small"


def test_reload_errors_are_clear_codes_and_never_echo_files(trained_artifact: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    shutil.copytree(trained_artifact, secret)
    (secret / "manifest.json").write_text('{"api_key": "SECRET-TOKEN-1", "nested": {"password": "SECRET-2"}}')
    running = ServerThread(model_dir=trained_artifact)
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            raw = channel.unary_unary("/promptier.v1.Admin/Reload", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\x0a\x03\xff\xfe\xfd", timeout=30)  # model_dir that is not UTF-8
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed request" in info.value.details() and "class" not in info.value.details()
            for model_dir, says in (("a\0b", "NUL"), ("/" + "a" * 5_000, "longer than 4096 bytes")):
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(model_dir=model_dir), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in info.value.details()
            for model_dir, says in (("/" + "a" * 300, "File name too long"), (str(secret), "manifest.json is invalid")):
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(model_dir=model_dir), timeout=30)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
                assert says in info.value.details() and "SECRET" not in info.value.details()
                assert "old model still serving" in info.value.details()
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=10).model_version == "tiny-test-1"
    finally:
        running.stop()
    assert running.running is not None
    assert _sample(running.running, "promptier_model_reloads", outcome="invalid") == 3
    assert _sample(running.running, "promptier_model_reloads", outcome="refused") == 2


def _tagged_copy(artifact: Path, target: Path, version: str) -> Path:
    shutil.copytree(artifact, target)
    manifest = target / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tiny-test-1"', f'"{version}"'))
    return target


def test_empty_reload_reloads_the_start_directory(trained_artifact: Path, tmp_path: Path) -> None:
    """As the proto says: an empty Admin.Reload (and SIGHUP, which calls the same reload) loads the
    directory the server was started with, even after a reload from another directory."""
    start = _tagged_copy(trained_artifact, tmp_path / "start", "start-1")
    other = _tagged_copy(trained_artifact, tmp_path / "other", "other-1")
    running = ServerThread(model_dir=start)
    assert running.running is not None
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            reply = admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("other-1", "start-1")
            reply = admin.Reload(router_pb2.ReloadRequest(), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("start-1", "other-1")
            admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert running.call(running.running.reload()) == ("start-1", "other-1")  # what SIGHUP runs
    finally:
        running.stop()


def test_sighup_reloads_the_start_directory_after_an_admin_reload(trained_artifact: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    start = _tagged_copy(trained_artifact, tmp_path / "start", "start-1")
    other = _tagged_copy(trained_artifact, tmp_path / "other", "other-1")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(start), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            router = router_pb2_grpc.RouterStub(channel)
            router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=60)
            assert router.Info(router_pb2.InfoRequest(), timeout=10).model_version == "other-1"
            server.send_signal(signal.SIGHUP)
            _wait_until(lambda: router.Info(router_pb2.InfoRequest(), timeout=10).model_version == "start-1",
                        "SIGHUP to reload the start directory")
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_busy_port_says_so_and_exits_2(trained_artifact: Path, workers: int) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                                 "--port", str(port), "--workers", str(workers)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_reload_good_and_bad_and_drain(trained_artifact: Path, tmp_path: Path) -> None:
    running = ServerThread(model_dir=trained_artifact)
    try:
        other = tmp_path / "v2"
        shutil.copytree(trained_artifact, other)
        manifest = (other / "manifest.json").read_text().replace('"tiny-test-1"', '"tiny-test-2"')
        (other / "manifest.json").write_text(manifest)
        broken = tmp_path / "broken"
        shutil.copytree(trained_artifact, broken)
        (broken / "model.onnx").write_bytes(b"not onnx")
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            router = router_pb2_grpc.RouterStub(channel)
            reply = admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("tiny-test-2", "tiny-test-1")
            assert router.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=5).model_version == "tiny-test-2"
            with pytest.raises(grpc.RpcError) as info:
                admin.Reload(router_pb2.ReloadRequest(model_dir=str(broken)), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "old model still serving" in info.value.details()
            assert router.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=5).model_version == "tiny-test-2"
            health = health_pb2_grpc.HealthStub(channel)
            assert running.running is not None
            running.call(running.running.health.enter_graceful_shutdown())
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _sample(running.running, "promptier_model_reloads", outcome="refused") == 1
    finally:
        running.stop()


def test_admin_needs_the_token_when_the_server_has_one(trained_artifact: Path) -> None:
    running = ServerThread(model_dir=trained_artifact, admin_token="s3cret")
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cre"),)]:
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(), metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # from this host too
            reply = admin.Reload(router_pb2.ReloadRequest(), metadata=(("authorization", "Bearer s3cret"),),
                                 timeout=30)
            assert reply.model_version == "tiny-test-1"
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=5).tier == "small"
        assert running.running is not None
        assert _sample(running.running, "promptier_model_reloads", outcome="denied") == 3
        assert _sample(running.running, "promptier_model_reloads", outcome="ok") == 1
    finally:
        running.stop()


def _non_loopback_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


def test_admin_without_a_token_refuses_callers_from_other_hosts(trained_artifact: Path) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no network interface besides loopback")
    running = ServerThread(model_dir=trained_artifact, address="0.0.0.0:0")
    try:
        assert running.running is not None
        with grpc.insecure_channel(f"{address}:{running.running.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "PROMPTIER_ADMIN_TOKEN" in info.value.details()
            # The Router itself is for everyone who can reach the port.
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=5).tier == "small"
        with grpc.insecure_channel(f"127.0.0.1:{running.running.port}") as channel:
            assert router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(), timeout=30).model_version
    finally:
        running.stop()


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:50051", True), ("ipv4:127.8.0.1:1", True), ("ipv4:192.0.2.2:50051", False),
    ("ipv6:[::1]:50051", True), ("ipv6:%5B::1%5D:50051", True), ("ipv6:[fd00::2]:50051", False),
    ("ipv6:[::ffff:10.0.0.1]:1", False), ("ipv6:[::ffff:127.0.0.1]:1", True), ("unix:/run/promptier.sock", True),
    ("", False), ("ipv4:nonsense", False),
])
def test_which_peers_count_as_this_host(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


def _metric(port: int, name: str) -> float:
    """Sum of a Prometheus counter's samples scraped from a worker's metrics endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_workers_share_one_port_reload_restart_and_drain(trained_artifact: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    def workers() -> list[psutil.Process]:
        return spawned_workers(parent.pid)

    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact), "--port", str(port),
               "--workers", "2", "--metrics-port", str(metrics_port)]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"

    def classify_over_new_connections(count: int) -> None:
        for _ in range(count):  # one TCP connection each: the kernel spreads connections, not calls
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = router_pb2_grpc.RouterStub(channel).Classify(
                    router_pb2.ClassifyRequest(prompt="prove the theorem"), timeout=60, wait_for_ready=True)
                assert reply.tier in {"small", "medium", "large"}

    try:
        wait_serving(target)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # every worker serves once the kernel has spread connections
            classify_over_new_connections(8)
            served = [_metric(metrics_port + i, "promptier_requests_total") for i in (0, 1)]
            if all(count > 0 for count in served):
                break
        assert all(count > 0 for count in served), served
        outside = _non_loopback_address()
        if outside is not None:  # metrics are on --host (127.0.0.1 here), not published to the network
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, metrics_port), timeout=5).close()

        os.kill(parent.pid, signal.SIGHUP)  # reload reaches every worker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                _metric(metrics_port + i, "promptier_model_reloads_total") >= 1 for i in (0, 1)):
            time.sleep(0.2)
        assert all(_metric(metrics_port + i, "promptier_model_reloads_total") == 1 for i in (0, 1))

        # A killed worker is replaced; the port keeps answering meanwhile.
        victim = workers()[0]
        victim.kill()
        classify_over_new_connections(4)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            children = workers()
            if len(children) == 2 and victim.pid not in {child.pid for child in children}:
                break
            time.sleep(0.2)
        assert len(children) == 2 and victim.pid not in {child.pid for child in children}

        parent.send_signal(signal.SIGTERM)  # drains every worker, then the parent exits cleanly
        assert parent.wait(120) == 0
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        if parent.poll() is None:
            for child in workers():
                child.kill()
            parent.kill()


def test_client_spreads_its_connections_over_the_server_processes(trained_artifact: Path,
                                                                    server: ServerThread) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                               "--port", str(port), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def my_connections(to_port: int) -> set[int]:
        return {c.laddr.port for c in psutil.Process().net_connections("tcp")
                if c.status == "ESTABLISHED" and c.raddr and c.raddr.port == to_port}

    def processes_reached(local_ports: set[int]) -> list[int]:
        """The server process behind each of our connections."""
        return [worker_serving(parent.pid, port, local) for local in local_ports]

    async def spread(connections: int) -> tuple[int, list[int], bool]:
        client = AsyncRouterClient(f"127.0.0.1:{port}", timeout=1.0, attempts=1, coalesce=True,
                                   connections=connections)
        try:
            reached = await client.spread_connections(tries=16)
            ports = my_connections(port)
            owners = processes_reached(ports)
            assert await client.spread_connections(tries=16) == reached
            unchanged = my_connections(port) == ports  # spread already: nothing reopened
            assert (await client.classify(EASY)).tier in {"small", "medium", "large"}
            return reached, owners, unchanged
        finally:
            await client.close()

    try:
        wait_serving(f"127.0.0.1:{port}")
        time.sleep(3.0)  # health answers once the first worker is up
        for _ in range(3):
            reached, owners, unchanged = asyncio.run(spread(2))
            assert reached == 2 and len(owners) == 2 and len(set(owners)) == 2 and unchanged
        # More connections than processes: evenly spread, and left alone once it is.
        reached, owners, unchanged = asyncio.run(spread(3))
        assert reached == 2 and sorted(owners.count(pid) for pid in set(owners)) == [1, 2] and unchanged
    finally:
        parent.terminate()
        parent.wait(30)

    async def one_process() -> tuple[int, bool]:
        client = AsyncRouterClient(server.target, timeout=1.0, attempts=1, connections=2)
        try:
            reached = await client.spread_connections(tries=3)
            ports = my_connections(server.running.port)
            await client.spread_connections(tries=3)
            return reached, my_connections(server.running.port) == ports
        finally:
            await client.close()

    assert asyncio.run(one_process()) == (1, True)  # a single process: tried, then left alone


def test_coalescing_client_keeps_batches_within_the_server_limit(server: ServerThread) -> None:
    async def run() -> list[str]:
        # The fixture's server takes at most 16 items per ClassifyBatch; the client would group 64.
        async with AsyncRouterClient(server.target, timeout=5.0, attempts=1, coalesce=True, max_in_flight=1,
                                     max_batch=64) as client:
            first = asyncio.ensure_future(client.classify(EASY))  # in flight: the rest must queue up
            await asyncio.sleep(0)
            rest = await asyncio.gather(*(client.classify(HARD if i % 3 else EASY) for i in range(100)))
            return [d.tier for d in [await first, *rest]]

    tiers = asyncio.run(run())  # a batch over the limit would fail all its callers with INVALID_ARGUMENT
    assert len(tiers) == 101 and set(tiers) <= {"small", "medium", "large"}


def test_calls_in_flight_survive_connections_being_reopened(server: ServerThread) -> None:
    async def run() -> list[str]:
        # One server process and two connections: spreading reopens the second one, several times.
        async with AsyncRouterClient(server.target, timeout=5.0, attempts=1, coalesce=True,
                                     connections=2) as client:
            calls = [asyncio.ensure_future(client.classify(EASY if i % 2 else HARD)) for i in range(64)]
            await asyncio.sleep(0)  # the first calls are on the wire when the reopening starts
            reached = await client.spread_connections(tries=4)
            decisions = await asyncio.gather(*calls)
            assert reached == 1
            return [d.tier for d in decisions]

    tiers = asyncio.run(run())
    assert len(tiers) == 64 and set(tiers) <= {"small", "medium", "large"}


def test_workers_drain_when_the_supervisor_is_killed(trained_artifact: Path) -> None:
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                               "--port", str(port), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        wait_serving(f"127.0.0.1:{port}")
        children = psutil.Process(parent.pid).children()
        parent.send_signal(signal.SIGKILL)  # no chance to forward anything
        parent.wait(10)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "workers outlived their supervisor and kept the port"
    finally:
        parent.kill()
        for child in children:
            if child.is_running():
                child.kill()


def test_a_reload_asked_while_a_worker_starts_reaches_it_once_it_serves(trained_artifact: Path,
                                                                       tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.err"
    with log.open("wb") as err:
        parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                                   "--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port)],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_serving(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(spawned_workers(parent.pid)) < 2:
            time.sleep(0.1)
        victim = spawned_workers(parent.pid)[0]
        victim.kill()
        replacement = None
        deadline = time.monotonic() + 30
        while replacement is None and time.monotonic() < deadline:
            fresh = [w for w in spawned_workers(parent.pid) if w.pid != victim.pid and w.create_time() >
                     victim.create_time() + 0.5]
            replacement = fresh[0] if fresh else None
            time.sleep(0.02)
        assert replacement is not None
        os.kill(parent.pid, signal.SIGHUP)  # the replacement is still importing and loading its model

        def reloads(index: int) -> float:
            try:
                return _metric(metrics_port + index, "promptier_model_reloads_total")
            except OSError:  # the replacement does not serve its metrics yet
                return -1

        deadline = time.monotonic() + 120  # both workers count the reload, the replacement once it serves
        while time.monotonic() < deadline and not all(reloads(i) >= 1 for i in (0, 1)):
            time.sleep(0.2)
        assert [reloads(i) for i in (0, 1)] == [1, 1]
        assert replacement.is_running()
        deaths = [json.loads(line) for line in log.read_text().splitlines() if '"worker_died"' in line]
        assert [death["exitcode"] for death in deaths] == [-signal.SIGKILL]  # only the one killed here
    finally:
        parent.terminate()
        try:
            parent.wait(60)
        except subprocess.TimeoutExpired:
            for child in spawned_workers(parent.pid):
                child.kill()
            parent.kill()


def test_workers_refuse_a_bad_artifact_before_starting(artifact_copy: Path) -> None:
    import subprocess
    import sys

    (artifact_copy / "model.onnx").write_bytes(b"not onnx")
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "serve", "--model", str(artifact_copy),
                             "--port", "50999", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not a loadable ONNX model" in result.stderr


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_generator_counts_only_calls_the_server_answered_ok(trained_artifact: Path) -> None:
    """The loadtest's h2load figures are of successful calls: the server's own counters must agree with
    what h2load sent, and a scenario whose calls the server refuses is reported as errors."""
    import subprocess
    import sys

    from serving.bench.loadgen import h2load_scenario, require_all_ok
    from serving.bench.ports import free_port, wait_serving

    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact), "--port", str(port),
               "--metrics-port", str(metrics_port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        good = h2load_scenario(port, [EASY, HARD], 4, 1, 1.0, [metrics_port])
        assert good["calls"] > 0 and good["errors"] == 0
        assert good["server_counted_ok"] >= good["calls"]  # every timed call was answered OK
        assert good["ok_calls_by_server_process"] == [good["server_counted_ok"]]
        assert good["p99_ms"] >= good["p50_ms"] > 0
        # 300 items exceed the server's batch limit (256): HTTP 200 for h2load, INVALID_ARGUMENT for gRPC.
        refused = h2load_scenario(port, [EASY] * 300, 1, 300, 1.0, [metrics_port])
        assert refused["errors"] > 0 and refused["server_counted_ok"] == 0
        require_all_ok(good)
        with pytest.raises(RuntimeError, match="would not be of successful calls"):
            require_all_ok(refused)
    finally:
        server.terminate()
        server.wait(15)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_native_echo_floor_answers_and_counts_only_what_it_answered(tmp_path: Path) -> None:
    from serving.bench.loadgen import h2load_scenario, require_all_ok
    from serving.bench.native_floor import NativeBuildUnavailable, answered_calls, build_echo_server, start_echo_server
    from serving.bench.ports import free_port

    try:
        binary = build_echo_server(tmp_path / "cache")
    except NativeBuildUnavailable as reason:
        pytest.skip(str(reason))
    assert build_echo_server(tmp_path / "cache") == binary  # cached by source hash: not rebuilt
    port = free_port()
    server = start_echo_server(binary, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=5)
        assert reply.tier == "small" and answered_calls(port) == 1

        def counter(rpc: str) -> tuple[list[int], int]:
            return [answered_calls(port)], 0

        good = h2load_scenario(port, [EASY], 4, 1, 0.5, [], counter=counter)
        assert good["calls"] > 0
        require_all_ok(good)
        # The echo server has no ClassifyBatch: HTTP 200 for h2load, UNIMPLEMENTED in gRPC, and its count
        # of answered calls does not move, so the figure is refused.
        refused = h2load_scenario(port, [EASY, HARD], 1, 2, 0.5, [], counter=counter)
        assert refused["calls"] > 0 and refused["server_counted_ok"] == 0
        with pytest.raises(RuntimeError, match="would not be of successful calls"):
            require_all_ok(refused)
    finally:
        server.terminate()
        server.wait(15)


def test_freeze_startup_objects_takes_them_out_of_collections() -> None:
    import gc

    from serving.common.startup import freeze_startup_objects

    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this test process has imported grpc, numpy, onnxruntime...
        assert len(gc.get_objects(generation=2)) < frozen  # what a full collection still walks
    finally:
        gc.unfreeze()


def test_native_build_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import serving.bench.native_floor as native_floor

    monkeypatch.setattr(native_floor.shutil, "which", lambda tool: None if tool == "grpc_cpp_plugin" else "/bin/x")
    with pytest.raises(native_floor.NativeBuildUnavailable, match=r"missing grpc_cpp_plugin.*protobuf-compiler-grpc"):
        native_floor.build_echo_server(tmp_path)


def test_closed_loop_counts_every_prompt_its_concurrent_callers_carried() -> None:
    from serving.bench.loadgen import _closed_loop

    seen: list[int] = []

    async def call(index: int) -> int:
        seen.append(index)
        await asyncio.sleep(0)  # callers interleave here, as they do around a real RPC
        return 3

    result = asyncio.run(_closed_loop(call, concurrency=8, seconds=0.2, offset=100))
    assert result["errors"] == 0 and len(result["latencies"]) > 8
    assert result["items"] == 3 * len(result["latencies"])  # no increment lost between callers
    assert {index % 8 for index in seen} == {(100 + k) % 8 for k in range(8)} and min(seen) == 100


@pytest.mark.parametrize("blocking", [False, True])
def test_coalescing_client_scenarios_count_calls_and_group_them(server: ServerThread, blocking: bool) -> None:
    from serving.bench.loadgen import coalescing_client_scenario

    assert server.running is not None
    before = _counted(server.running, "ClassifyBatch", "OK")
    result = coalescing_client_scenario(server.target, [EASY, HARD, "sort a list"], 16, 1.0, blocking)
    assert result["errors"] == 0 and result["calls"] > 16 and result["prompts_per_s"] > 0
    assert ("blocking" in result["generator"]) is blocking and result["p99_ms"] >= result["p50_ms"] > 0
    assert _counted(server.running, "ClassifyBatch", "OK") > before  # concurrent calls went out grouped
