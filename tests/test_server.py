"""The Router service's API on a running server: answers, policies, batches, bad input, health, reflection."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.client import Decision, ItemError, RouterClient
from serving.service.limits import ServerLimits
from tests.grpc_server import EASY, HARD, ServerThread
from tests.server_probes import code_of


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
    # Each error says which item failed and why, as a single call's would.
    assert isinstance(outcomes[1], ItemError) and isinstance(outcomes[3], ItemError)
    assert "empty" in outcomes[1].message and "200001" in outcomes[3].message.replace(",", "")


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
        assert code_of(stub.Classify, bad, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    too_many = router_pb2.ClassifyBatchRequest(items=[request(prompt="hi")] * 17)
    assert code_of(stub.ClassifyBatch, too_many, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request(prompt="hi", policy=policy(mode="cheapest")), timeout=5)
    assert "unknown mode 'cheapest'" in info.value.details()
    # Each message fits, and so does the sum of their contents; the rendered conversation does not.
    half = router_pb2.Message(role="user", content="x" * 100_000)
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request(conversation=router_pb2.Conversation(messages=[half, half])), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation, rendered with its role markers, has 2000" in info.value.details()
    assert "the limit is 200000" in info.value.details()


def test_invalid_utf8_is_rejected_and_server_keeps_serving(server: ServerThread) -> None:
    # A protobuf string must be UTF-8; send raw bytes the Python stub would refuse to build.
    raw = b"\x0a\x03\xff\xfe\xfd"  # field 1 (prompt), length 3, invalid UTF-8
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/promptier.v1.Router/Classify", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        code = code_of(call, raw, timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    with RouterClient(server.target, timeout=5) as client:
        assert client.classify(EASY).tier == "small"


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


# The dev extra installs it beside the interpreter, which a run of the venv's python need not have on PATH.
GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (the dev extra installs it on x86-64 Linux)")
def test_grpcurl_calls_the_service_as_the_readme_shows(server: ServerThread) -> None:
    """The README's grpcurl calls, made by the real grpcurl binary, which learns the service through
    reflection: the Python client's decisions, JSON field names as the proto gives them, and a refused
    request's status as grpcurl prints it."""
    assert GRPCURL is not None

    def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)

    listed = grpcurl(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "promptier.v1.Router" in listed.stdout.split()
    with RouterClient(server.target, timeout=5) as client:
        for prompt in (EASY, HARD):
            answer = grpcurl("-d", json.dumps({"prompt": prompt}), server.target, "promptier.v1.Router/Classify")
            assert answer.returncode == 0, answer.stderr
            decision, expected = json.loads(answer.stdout), client.classify(prompt)
            assert decision["tier"] == expected.tier and decision["decided_by"] == expected.decided_by
            assert decision["scores"] == pytest.approx(expected.scores)
            assert decision["model_version"] == expected.model_version
        conversation = {"conversation": {"messages": [{"role": "user", "content": HARD},
                                                      {"role": "assistant", "content": "..."},
                                                      {"role": "user", "content": "ok, do it"}]},
                        "policy": {"mode": "cost"}}
        answer = grpcurl("-d", json.dumps(conversation), server.target, "promptier.v1.Router/Classify")
        assert answer.returncode == 0, answer.stderr
        expected = client.classify(messages=[("user", HARD), ("assistant", "..."), ("user", "ok, do it")], mode="cost")
        assert json.loads(answer.stdout)["tier"] == expected.tier
    refused = grpcurl("-d", json.dumps({"prompt": ""}), server.target, "promptier.v1.Router/Classify")
    assert refused.returncode != 0
    assert "Code: InvalidArgument" in refused.stderr and "prompt is empty" in refused.stderr


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



def test_a_batch_of_many_conversation_messages_does_not_hold_other_calls(server: ServerThread,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering a 16 MiB batch of conversations (a million messages) ran on the event loop and held
    every other caller's call for 0.6 s. Here rendering is held on an event, not timed: a single call
    must be answered while the batch is still being rendered."""
    import threading

    import serving.service.router as router_module

    rendering, release = threading.Event(), threading.Event()
    render = router_module.render_conversation

    def held(messages):  # type: ignore[no-untyped-def]
        if messages[-1][1] == "hold the render":
            rendering.set()
            assert release.wait(60), "the test never released the render"
        return render(messages)

    monkeypatch.setattr(router_module, "render_conversation", held)
    turns = [router_pb2.Message(role="user", content="hi")] * 5_999 + [router_pb2.Message(role="user",
                                                                                          content="hold the render")]
    item = router_pb2.ClassifyRequest(conversation=router_pb2.Conversation(messages=turns))
    with grpc.insecure_channel(server.target) as channel, RouterClient(server.target, timeout=30) as client:
        batch = router_pb2_grpc.RouterStub(channel).ClassifyBatch.future(
            router_pb2.ClassifyBatchRequest(items=[item, item]), timeout=120)
        try:
            assert rendering.wait(60), "the batch never reached its rendering"
            assert client.classify(HARD).tier == "large"  # answered while the batch is held
        finally:
            release.set()
        answers = batch.result().items
        assert [answer.WhichOneof("outcome") for answer in answers] == ["result", "result"], answers[0].error


def test_a_prompt_the_model_fails_on_fails_alone_and_the_server_keeps_serving(trained_artifact: Path,
                                                                            tokenizer_panics: str) -> None:
    """A failure that ended the model thread would leave every later call waiting forever while health
    still said SERVING."""
    running = ServerThread(model_dir=trained_artifact)
    try:
        with RouterClient(running.target, timeout=5) as client:
            assert code_of(client.classify, tokenizer_panics) == grpc.StatusCode.INTERNAL
            easy, failed, hard = client.classify_batch([EASY, tokenizer_panics, HARD])
            assert failed == grpc.StatusCode.INTERNAL
            assert (easy.tier, hard.tier) == ("small", "large")  # type: ignore[union-attr]
            assert client.classify(EASY).tier == "small"
    finally:
        running.stop()


def test_a_decision_carries_the_cheap_floor_it_routed_under(shipped_artifact: Path) -> None:
    """With its scores and threshold, what a client needs to reproduce the decision."""
    import classifier

    floors = classifier.load(shipped_artifact).manifest.policy.cheap_floors
    assert floors  # the shipped model has floors for some modes
    running = ServerThread(model_dir=shipped_artifact)
    try:
        with RouterClient(running.target, timeout=5) as client:
            assert dict(client.info().mode_cheap_floors) == floors
            for mode in ("quality", "balanced", "cost"):
                assert client.classify("What is the capital of France?", mode=mode).cheap_floor == floors.get(mode)
            assert client.classify("What is the capital of France?", threshold=0.5).cheap_floor is None
    finally:
        running.stop()


def test_a_batch_call_may_not_be_larger_than_a_callers_share_of_the_batch_queue() -> None:
    with pytest.raises(ValueError, match=r"max_batch_items \(256\) must be at most 50% of max_batch_queue \(500\)"):
        ServerLimits(max_batch_queue=500)
    assert ServerLimits(max_batch_queue=512).max_batch_items == 256
