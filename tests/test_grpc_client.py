"""The client library on a real server: async and blocking clients, coalescing, spread connections."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from classifier.errors import InvalidInputError
from serving.client import AsyncRouterClient, Decision, RouterClient
from serving.service.limits import ServerLimits
from tests.grpc_server import EASY, HARD, HeldModel, ServerThread, worker_serving
from tests.server_probes import counted


@pytest.fixture(scope="module")
def server(trained_artifact: Path) -> Iterator[ServerThread]:
    """The service on the test model, taking at most 16 items per ClassifyBatch (a limit the coalescing
    client must keep to)."""
    running = ServerThread(model_dir=trained_artifact, limits=ServerLimits(max_prompt_chars=200_000,
                                                                          max_batch_items=16))
    yield running
    running.stop()


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
        return counted(running, "Classify", "OK"), counted(running, "ClassifyBatch", "OK")

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
        return counted(running, "Classify", "OK"), counted(running, "ClassifyBatch", "OK")

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
        with pytest.raises(grpc.RpcError) as info:  # not the TimeoutError of a hand-off that outlived it
            nowhere.classify(EASY)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not any(thread.name == "promptier-client" for thread in threading.enumerate())  # closed


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


@pytest.mark.parametrize("blocking", [False, True])
def test_coalescing_client_scenarios_count_calls_and_group_them(server: ServerThread, blocking: bool) -> None:
    from serving.bench.loadgen import coalescing_client_scenario

    assert server.running is not None
    before = counted(server.running, "ClassifyBatch", "OK")
    result = coalescing_client_scenario(server.target, [EASY, HARD, "sort a list"], 16, 1.0, blocking)
    assert result["errors"] == 0 and result["calls"] > 16 and result["prompts_per_s"] > 0
    assert ("blocking" in result["generator"]) is blocking and result["p99_ms"] >= result["p50_ms"] > 0
    assert counted(server.running, "ClassifyBatch", "OK") > before  # concurrent calls went out grouped



@pytest.mark.parametrize("close_cancelled", [False, True])
def test_closing_a_coalescing_client_answers_every_caller(trained_artifact: Path, close_cancelled: bool) -> None:
    """close() used to cancel the sends in flight without answering their callers, who then waited
    forever (the deadline was the cancelled call's); every caller gets an RpcError instead, also when
    close() is itself cancelled while it waits for its sends to end (a shutdown task cancelled, a
    wait_for run out)."""
    import classifier

    held = HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held)

    async def run() -> list[BaseException | Decision]:
        client = AsyncRouterClient(running.target, timeout=300, attempts=1, coalesce=True, max_in_flight=1)
        calls = [asyncio.ensure_future(client.classify(EASY)) for _ in range(5)]
        while not held.entered.is_set():  # one call is in the model, the others wait in the client
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)  # close() has cancelled the send in flight and waits for it to end
        if close_cancelled:
            closing.cancel()
        else:
            await closing
        # Bounded only so that a regression fails instead of hanging: every caller is answered by now.
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        with pytest.raises(grpc.RpcError) as info:
            await client.classify(EASY)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        return outcomes

    try:
        outcomes = asyncio.run(run())
    finally:
        held.release.set()
        running.stop()
    assert len(outcomes) == 5
    for outcome in outcomes:
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.CANCELLED, outcome
        assert "client was closed" in (outcome.details() or "")


def test_a_client_closed_before_its_send_started_answers_the_caller(trained_artifact: Path) -> None:
    """The send a call creates is cancelled by a close() in the same turn of the event loop, before
    its first step: nothing in it runs, so close() itself must answer the caller."""
    import classifier

    running = ServerThread(model=classifier.load(trained_artifact))

    async def run() -> list[BaseException | Decision]:
        client = AsyncRouterClient(running.target, timeout=300, attempts=1, coalesce=True)
        call = asyncio.ensure_future(client.classify(EASY))
        await asyncio.sleep(0)  # the call has queued and created its send, which has not started
        await client.close()
        # Bounded only so that a regression fails instead of hanging.
        return await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 60)

    try:
        (outcome,) = asyncio.run(run())
    finally:
        running.stop()
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.CANCELLED, outcome
    assert "client was closed" in (outcome.details() or "")


def test_a_coalesced_call_keeps_its_own_deadline_whatever_its_batch_neighbours(trained_artifact: Path) -> None:
    """A call with a short deadline grouped with one with a long deadline: the short one expires on its
    own, and the long one is answered, as each would be had it made its own call."""
    import classifier

    held = HeldModel(classifier.load(trained_artifact))
    running = ServerThread(model=held)

    async def run() -> tuple[BaseException | Decision, BaseException | Decision]:
        async with AsyncRouterClient(running.target, timeout=300, attempts=1, coalesce=True,
                                     max_in_flight=2) as client:
            first = asyncio.ensure_future(client.classify(EASY))
            while not held.entered.is_set():  # the first call is in the model: the next two go out together
                await asyncio.sleep(0.01)
            short = asyncio.ensure_future(client.classify(EASY, timeout=0.05))
            long = asyncio.ensure_future(client.classify(HARD, timeout=300))
            # Bounded only so that a regression fails instead of hanging.
            (short_outcome,) = await asyncio.wait_for(asyncio.gather(short, return_exceptions=True), 60)
            held.release.set()
            await first
            (long_outcome,) = await asyncio.wait_for(asyncio.gather(long, return_exceptions=True), 60)
            return short_outcome, long_outcome

    try:
        short_outcome, long_outcome = asyncio.run(run())
    finally:
        held.release.set()
        running.stop()
    assert isinstance(short_outcome, grpc.RpcError) and short_outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(long_outcome, Decision), long_outcome


def test_coalesced_batches_stay_within_the_message_size_limit(trained_artifact: Path) -> None:
    """Calls that are each valid and each fit a message are never grouped into one ClassifyBatch larger
    than a connection carries (which would fail all of them at once with RESOURCE_EXHAUSTED)."""
    running = ServerThread(model_dir=trained_artifact)
    # 900,000 characters (under the server's 1,000,000) of 2.25 MB: eight of them are over 16 MiB.
    prompts = [f"{index} " + "\N{GRINNING FACE} " * 450_000 for index in range(9)]

    async def run() -> list[BaseException | Decision]:
        async with AsyncRouterClient(running.target, timeout=300, attempts=1, coalesce=True) as client:
            first = asyncio.ensure_future(client.classify(prompts[0]))  # in flight: the rest queue up
            await asyncio.sleep(0)
            rest = await asyncio.gather(*(client.classify(p) for p in prompts[1:]), return_exceptions=True)
            return [await first, *rest]

    try:
        outcomes = asyncio.run(run())
    finally:
        running.stop()
    assert all(isinstance(outcome, Decision) for outcome in outcomes), outcomes


def test_a_call_cancelled_before_any_handler_saw_it_is_retried() -> None:
    """A server that stops cancels, in gRPC core, the calls that reached it just before its GOAWAY (a bare
    CANCELLED no handler sees). A Router call only reads its request, so the client sends it again."""
    from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc

    class CancelsFirst(router_pb2_grpc.RouterServicer):
        calls = 0

        def Classify(self, request: router_pb2.ClassifyRequest,
                     context: grpc.ServicerContext) -> router_pb2.ClassifyResponse:
            CancelsFirst.calls += 1
            if CancelsFirst.calls == 1:
                context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            return router_pb2.ClassifyResponse(tier="small", scores={"small": 0.9, "large": 0.95}, threshold=0.5)

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    router_pb2_grpc.add_RouterServicer_to_server(CancelsFirst(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RouterClient(f"127.0.0.1:{port}", timeout=30) as router:
            assert router.classify(EASY).tier == "small"
        assert CancelsFirst.calls == 2
        CancelsFirst.calls = 0
        with RouterClient(f"127.0.0.1:{port}", timeout=30, attempts=1) as router, \
                pytest.raises(grpc.RpcError) as refused:
            router.classify(EASY)  # attempts=1: no retry, the status as it came
        assert refused.value.code() == grpc.StatusCode.CANCELLED
    finally:
        server.stop(None)


def test_the_service_config_documented_for_other_languages_is_the_python_clients() -> None:
    """serving/README.md gives gateways in other languages the Python client's retry policy to copy:
    it must be the one the client uses, with its default number of attempts."""
    import inspect
    import json
    import re

    from serving.client import RouterClient, _service_config

    readme = (Path(__file__).resolve().parents[1] / "serving" / "README.md").read_text(encoding="utf-8")
    documented = re.search(r"service config;.*?```json\n(.*?)\n```", readme, re.DOTALL)
    assert documented, "the service config for other languages is missing from serving/README.md"
    attempts = inspect.signature(RouterClient).parameters["attempts"].default
    assert json.loads(documented.group(1)) == json.loads(_service_config(attempts))


def test_a_closed_coalescing_client_says_so_and_a_batch_is_never_one_string() -> None:
    """Neither needs a server: both are answered before anything is sent."""
    with RouterClient("127.0.0.1:1", timeout=0.2, attempts=1) as plain, \
            pytest.raises(InvalidInputError, match="not one string"):
        plain.classify_batch("What is 2+2?")  # one decision per character otherwise
    client = RouterClient("127.0.0.1:1", timeout=0.2, attempts=1, coalesce=True)
    client.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coroutine left never awaited
        with pytest.raises(grpc.RpcError) as info:  # as a call that raced the close, not "Event loop is closed"
            client.classify(EASY)
    assert info.value.code() == grpc.StatusCode.CANCELLED and "client was closed" in (info.value.details() or "")
    client.close()  # a second close does nothing, as a channel's


def test_a_deadline_that_is_no_positive_number_of_seconds_is_refused_by_name() -> None:
    """`timeout=0` read as "the default" (a falsy value), and a negative or NaN one reached gRPC: each is a
    caller's mistake, said before any call goes out."""
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            RouterClient("127.0.0.1:1", timeout=bad)
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            AsyncRouterClient("127.0.0.1:1", timeout=bad)
    with RouterClient("127.0.0.1:1", timeout=0.2, attempts=1) as client:
        for bad in (0, -0.5):
            with pytest.raises(ValueError, match=rf"got {bad}"):
                client.classify(EASY, timeout=bad)
            with pytest.raises(ValueError, match=rf"got {bad}"):
                client.classify_batch([EASY], timeout=bad)

    async def async_call() -> None:
        client = AsyncRouterClient("127.0.0.1:1", timeout=0.2, attempts=1)
        try:
            with pytest.raises(ValueError, match="got 0"):
                await client.classify(EASY, timeout=0)
        finally:
            await client.close()

    asyncio.run(async_call())


def test_a_prompt_or_messages_of_the_wrong_shape_are_refused_before_anything_is_sent() -> None:
    """A string passed as the messages was sent one character per role and content; a number as the prompt
    ended in protobuf's "bad argument type". Messages are read as the runtime reads them, objects included."""
    from serving.client import build_request

    with RouterClient("127.0.0.1:1", timeout=0.2, attempts=1) as client:
        for prompt, messages, message in ((5, None, "prompt must be a string, got int"),
                                          (None, "hi", "not one string"),
                                          (None, [("user", 5)], "message 0 content must be a string"),
                                          (None, [("boss", "hi")], "message 0 has unknown role 'boss'")):
            with pytest.raises(InvalidInputError, match=message):
                client.classify(prompt, messages=messages)  # type: ignore[arg-type]
    request = build_request(messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert [(m.role, m.content) for m in request.conversation.messages] == [("system", "Be brief."), ("user", "hi")]


def test_the_reconnect_backoff_documented_for_other_languages_is_the_python_clients() -> None:
    """Every channel the clients open (and so the dispatcher's) caps gRPC's reconnection wait, as
    serving/README.md tells gateways in other languages to."""
    from serving.client import RECONNECT_BACKOFF, _options

    readme = (Path(__file__).resolve().parents[1] / "serving" / "README.md").read_text(encoding="utf-8")
    for name, value in RECONNECT_BACKOFF:
        assert f"`{name}={value}`" in readme
    for attempts in (1, 3):
        assert set(RECONNECT_BACKOFF) <= set(_options(attempts))


@pytest.mark.parametrize(("options", "refusal"), [
    ({"threshold": True}, "threshold must be a number, got True"),
    ({"top_share": False}, "top_share must be a number, got False"),
    ({"threshold": "0.5"}, "threshold must be a number"),
    ({"allowed_tiers": "large"}, "allowed_tiers must be a list of tier names, not one string"),
])
def test_the_client_refuses_a_policy_protobuf_would_silently_change(options: dict, refusal: str) -> None:
    """Sent as they were, True was a threshold of 1.0 (every prompt to the top tier) and "large" the tiers
    l, a, r, g, e; the runtime refuses both, and the client now does before sending."""
    from serving.client import build_request

    with pytest.raises(InvalidInputError, match=refusal):
        build_request("hi", **options)
    assert build_request("hi", threshold=1, top_share=0.25, allowed_tiers=["large"]).policy.threshold == 1.0
