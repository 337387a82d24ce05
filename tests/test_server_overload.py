"""Admission control: overload refused and counted, fair turns for single calls, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import classifier
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.client import RouterClient
from serving.service.limits import ServerLimits
from tests.grpc_server import EASY, HARD, HeldModel, ServerThread
from tests.server_probes import code_of, counted, sample, wait_until


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


def test_batch_flood_cannot_starve_single_calls(trained_artifact: Path) -> None:
    """One client keeping ClassifyBatch x 256 calls coming fills only its share (half) of the room batch
    calls have (counted in prompts); unary calls and another connection's batch call are admitted beside
    it and run between its chunks, and the flooder is told RESOURCE_EXHAUSTED, counted with its reason.
    The model is held on an event while the queues fill, so nothing here depends on how fast it runs."""
    held = HeldModel(classifier.load(trained_artifact))
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
            wait_until(lambda: held.entered.is_set() and sum(f.done() for f in flood) + batcher.calls("batch") == 150,
                        "the flood to be admitted or refused")
            assert batcher.queued("batch") <= 512
            single = [router.Classify.future(router_pb2.ClassifyRequest(prompt=EASY), timeout=300)
                      for _ in range(100)]
            wait_until(lambda: batcher.calls("unary") == 100 or any(f.done() for f in single),
                        "the single calls to be admitted")
            other_batch = router.ClassifyBatch.future(flood_request, timeout=300)  # another connection's
            wait_until(lambda: batcher.queued("batch") > 512 or other_batch.done(), "the other batch to be admitted")
            more_flood = [flooder.ClassifyBatch.future(flood_request, timeout=300) for _ in range(20)]
            wait_until(lambda: all(f.done() for f in more_flood), "the second wave to be refused")
            held_calls = len(held.calls)
            held.release.set()
            tiers = [f.result().tier for f in single]
            other_tiers = {item.result.tier for item in other_batch.result().items}
            flood_codes = [f.code() for f in flood + more_flood]
    finally:
        held.release.set()
        running.stop()
    assert tiers == ["small"] * 100  # every single call served, none refused for the flood
    assert other_tiers == {"large"}  # the other connection's batch call too
    refused = flood_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 140 and set(flood_codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in more_flood)
    assert counted(running.running, "ClassifyBatch", "RESOURCE_EXHAUSTED") == refused
    assert sample(running.running, "promptier_overload_refusals", rpc="ClassifyBatch",
                  reason="batch_caller_share_full") == refused
    assert counted(running.running, "ClassifyBatch", "OK") == flood_codes.count(grpc.StatusCode.OK) + 1
    assert counted(running.running, "Classify", "OK") == 100
    # Fair turns: the 100 single prompts ran within the first model calls after the held one, between
    # chunks of at most max_batch batch prompts, not behind the ~1,000 batch prompts queued before them,
    # and in model calls of their own: none waited for batch prompts' compute in its own call.
    after = held.calls[held_calls:]
    last_single = max(index for index, call in enumerate(after) if EASY in call)
    assert last_single <= 4 and all(len(call) <= 64 for call in held.calls), [len(c) for c in after]
    assert all(set(call) == {EASY} for call in after if EASY in call), [sorted(set(c)) for c in after]


@pytest.mark.parametrize("trusted", [True, False])
def test_callers_a_trusted_proxy_names_on_one_connection_each_have_their_share(trained_artifact: Path,
                                                                               trusted: bool) -> None:
    """Behind a proxy every client shares its connections: the caller it names in x-promptier-caller,
    not the connection, holds a share of the batch queue, when the server trusts the metadata; when it
    does not, a name is no way to take another share."""
    held = HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held, limits=ServerLimits(max_batch_queue=1024, trust_caller_metadata=trusted))
    assert running.running is not None
    batcher = running.running.batcher
    request = router_pb2.ClassifyBatchRequest(items=[router_pb2.ClassifyRequest(prompt=HARD)] * 256)

    def send(stub: router_pb2_grpc.RouterStub, caller: str) -> grpc.Future:
        return stub.ClassifyBatch.future(request, timeout=300, metadata=[("x-promptier-caller", caller)])

    try:
        with grpc.insecure_channel(running.target) as channel:  # one connection for every caller
            stub = router_pb2_grpc.RouterStub(channel)
            first = send(stub, "alice")
            wait_until(held.entered.is_set, "alice's first call to enter the model")
            alice = [send(stub, "alice") for _ in range(4)]
            wait_until(lambda: sum(f.done() for f in alice) + batcher.calls("batch") == 5,
                       "alice's calls to be admitted or refused")
            bob = send(stub, "bob")
            wait_until(lambda: batcher.calls("batch") == 1 + sum(not f.done() for f in alice) + 1 or bob.done(),
                       "bob's call to be admitted")
            held.release.set()
            codes = [f.code() for f in alice]
            bob_code = bob.code()
            bob_tiers = {item.result.tier for item in bob.result().items} if bob_code == grpc.StatusCode.OK else set()
            first.result()
    finally:
        held.release.set()
        running.stop()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # alice beyond her half
    if trusted:
        assert bob_tiers == {"large"}  # bob, on the same connection, has a share of his own
    else:
        assert bob_code == grpc.StatusCode.RESOURCE_EXHAUSTED  # one connection, one share, whatever it says


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
        assert counted(running.running, "Classify", code.name) == codes.count(code)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert sample(running.running, "promptier_overload_refusals", rpc="Classify", reason="unary_queue_full") == refused


def test_shutdown_answers_waiting_calls_unavailable(trained_artifact: Path) -> None:
    """Calls still waiting for the model when the drain's grace ends are answered UNAVAILABLE (which
    clients retry elsewhere) and counted, rather than cancelled by gRPC with a bare CANCELLED."""
    held = HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held)
    assert running.running is not None
    batcher = running.running.batcher
    stopper = threading.Thread(target=running.stop, args=(0.2,))
    try:
        with grpc.insecure_channel(running.target) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            calls = [router.Classify.future(router_pb2.ClassifyRequest(prompt=EASY), timeout=300) for _ in range(6)]
            wait_until(lambda: held.entered.is_set() and batcher.calls("unary") == 6, "six calls in the server")
            stopper.start()
            wait_until(lambda: all(call.done() for call in calls), "the calls to be answered")
            codes = [call.code() for call in calls]
    finally:
        held.release.set()
        stopper.join(60)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 6
    assert counted(running.running, "Classify", "UNAVAILABLE") == 6


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
            code = code_of(stub.Classify, router_pb2.ClassifyRequest(prompt="hi"), timeout=0.3)
            release.set()
            assert occupying.result().tier
            assert stub.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=30).tier
    finally:
        release.set()
        running.stop()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # gRPC cancelled the expired call under its handler; it is counted with the status its caller saw.
    assert running.running is not None
    assert counted(running.running, "Classify", "DEADLINE_EXCEEDED") == 1
    assert counted(running.running, "Classify", "OK") == 2



def test_drain_ends_health_watches_instead_of_waiting_out_the_grace(trained_artifact: Path) -> None:
    """A Watch never ends by itself: an open one (gRPC client-side health checking keeps one per
    connection) held every drain for its whole grace, although nothing else was in flight. It is told
    NOT_SERVING, then ended once the drain is done."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = ServerThread(model_dir=trained_artifact)
    assert running.running is not None
    seen: list[str] = []
    with grpc.insecure_channel(running.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=600)
        first = next(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        with RouterClient(running.target, timeout=10) as client:
            assert client.classify(EASY).tier == "small"
        # A grace far longer than the bound on the call: the stop must not wait it out.
        running.call(running.running.stop(grace=300))
        try:
            for update in watch:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(update.status))
        except grpc.RpcError as error:  # the stream may also end with the connection
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)
    assert seen == ["NOT_SERVING"]


def test_a_drain_waits_for_a_batch_still_being_prepared_on_its_thread(trained_artifact: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of many conversation messages is rendered on a thread before it reaches the model's queue;
    a drain that began meanwhile must wait for it, not stop the queue under it (UNAVAILABLE)."""
    import serving.service.router as router_module

    preparing, release = threading.Event(), threading.Event()
    render = router_module._prepared

    def held_render(*args):  # type: ignore[no-untyped-def]
        preparing.set()
        assert release.wait(120), "the test never released the preparation"
        return render(*args)

    monkeypatch.setattr(router_module, "INLINE_MESSAGES", 0)  # every conversation batch goes to the thread
    monkeypatch.setattr(router_module, "_prepared", held_render)
    running = ServerThread(model=classifier.load(trained_artifact))
    assert running.running is not None
    draining = threading.Event()
    drain = running.running.batcher.drain

    async def noted_drain(timeout: float) -> bool:
        draining.set()
        return await drain(timeout)

    running.running.batcher.drain = noted_drain  # type: ignore[method-assign]
    conversation = router_pb2.Conversation(messages=[router_pb2.Message(role="user", content=EASY)])
    request = router_pb2.ClassifyBatchRequest(items=[router_pb2.ClassifyRequest(conversation=conversation)])
    with grpc.insecure_channel(running.target) as channel:
        call = router_pb2_grpc.RouterStub(channel).ClassifyBatch.future(request, timeout=300)
        wait_until(preparing.is_set, "the batch to be prepared on its thread")
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 60})
        stopper.start()
        wait_until(draining.is_set, "the drain to begin")
        release.set()
        tiers = [item.result.tier for item in call.result().items]
        stopper.join(120)
    assert tiers == ["small"]


def test_a_stopped_server_leaves_no_preparer_thread(trained_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that prepares large conversation batches ends with its server: an application that
    starts and stops servers must not gather one idle thread per server."""
    import serving.service.router as router_module

    monkeypatch.setattr(router_module, "INLINE_MESSAGES", 0)  # every conversation batch goes to the thread
    before = set(threading.enumerate())
    running = ServerThread(model=classifier.load(trained_artifact))
    conversation = router_pb2.Conversation(messages=[router_pb2.Message(role="user", content=EASY)])
    request = router_pb2.ClassifyBatchRequest(items=[router_pb2.ClassifyRequest(conversation=conversation)])
    with grpc.insecure_channel(running.target) as channel:
        reply = router_pb2_grpc.RouterStub(channel).ClassifyBatch(request, timeout=60)
    assert [item.result.tier for item in reply.items] == ["small"]
    preparers = [thread for thread in set(threading.enumerate()) - before
                 if thread.name.startswith("promptier-prepare")]
    assert preparers, "the batch was not prepared on the preparer thread"
    running.stop()
    for thread in preparers:
        thread.join(30)
    assert not [thread.name for thread in preparers if thread.is_alive()]
