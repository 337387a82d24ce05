"""How a conversation becomes the one text the classifier reads."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import classifier
from classifier.conversation import MAX_MESSAGES, render_conversation
from classifier.errors import InvalidInputError
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from tests.grpc_server import ServerThread
from tests.server_probes import code_of

QUESTION = "Prove rigorously that exponential backoff bounds the expected number of retries, and derive the bound."
PASTE = "The service was degraded between 10:00 and 11:00 while the cache warmed up again. " * 12


def test_turns_after_the_latest_user_turn_are_read() -> None:
    """An agent's next call continues its tool results and last step, which come after the user's turn."""
    text = render_conversation([("user", "ok go ahead"), ("assistant", "calling the test runner"),
                                ("tool", "FAILED test_lock.py::test_two_writers - deadlock"),
                                ("assistant", "The locking protocol must be redesigned.")])
    assert text.startswith("ok go ahead\n\nassistant: The locking protocol must be redesigned.")
    assert "tool: FAILED test_lock.py" in text and text.endswith("assistant: calling the test runner")


def test_every_role_openais_api_accepts_is_read() -> None:
    """A function result (the older form of a tool result) is part of a valid request, not invalid input
    that would send it to the fallback tier."""
    text = render_conversation([("developer", "Answer briefly."), ("user", "What is the weather in Paris?"),
                                ("assistant", ""), ("function", '{"temperature": 21}')])
    assert text == 'What is the weather in Paris?\n\nfunction: {"temperature": 21}\n\ndeveloper: Answer briefly.'
    with pytest.raises(InvalidInputError, match="unknown role 'robot'"):
        render_conversation([("robot", "beep"), ("user", "hi")])
    # One message, or one string, in place of the list: said as such, not as its keys or characters.
    for single in ({"role": "user", "content": "hi"}, "hi"):
        with pytest.raises(InvalidInputError, match=r"must be a list of messages, got one .*wrap a single message"):
            render_conversation(single)  # type: ignore[arg-type]


def test_the_end_of_a_long_latest_turn_is_among_the_tokens_read(shipped_artifact: Path) -> None:
    """Where a pasted text puts the question: the tail of the window is the turn's end, not the oldest
    turn's (here a system prompt)."""
    encoder = classifier.load(shipped_artifact).encoder
    system = "You are a helpful assistant for ACME Corp. Answer politely and concisely. " * 8
    (question,) = encoder.token_ids([QUESTION])
    end = question[-10:]  # "... derive the bound."
    for length in (0, 100, 180, 250, 350, 450, 550, 800, len(PASTE)):
        turn = PASTE[:length] + QUESTION
        batch = encoder.encode_batch([render_conversation([("system", system), ("user", turn)])])
        read = batch.input_ids[0].tolist()
        assert any(read[i : i + len(end)] == end for i in range(len(read))), length
    short = render_conversation([("system", system), ("user", "What is 2 + 2?")])
    assert short == f"What is 2 + 2?\n\nsystem: {system}"  # a short turn stays whole, first


def test_a_conversation_past_the_message_limit_is_refused(trained_artifact: Path) -> None:
    many = [("user", "hi"), ("assistant", "hello")] * (MAX_MESSAGES // 2) + [("user", "and now?")]
    with pytest.raises(InvalidInputError, match=f"the limit is {MAX_MESSAGES}"):
        render_conversation(many)
    running = ServerThread(model_dir=trained_artifact)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            request = router_pb2.ClassifyRequest(conversation=router_pb2.Conversation(
                messages=[router_pb2.Message(role=role, content=content) for role, content in many]))
            assert code_of(stub.Classify, request, timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
            request = router_pb2.ClassifyRequest(conversation=router_pb2.Conversation(
                messages=[router_pb2.Message(role=role, content=content) for role, content in many[-3:]]))
            assert stub.Classify(request, timeout=30).tier
    finally:
        running.stop()


def test_openai_chat_messages_render_as_their_pairs_do() -> None:
    """The public renderer takes what an application holds: OpenAI message objects (null content on a
    tool-calling turn, content as a list of parts) and any iterable, with a clear refusal otherwise."""
    pairs = [("system", "Be brief."), ("user", "Plan the migration."), ("assistant", ""), ("tool", "done"),
             ("user", "describe this picture")]
    objects = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan the migration."},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
               {"role": "tool", "content": "done", "tool_call_id": "1"},
               {"role": "user", "content": [{"type": "text", "text": "describe this picture"},
                                            {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    expected = render_conversation(pairs)
    assert render_conversation(objects) == expected
    assert render_conversation(message for message in objects) == expected
    assert render_conversation([("assistant", None), ("user", [{"type": "text", "text": "hi"}])]) == "hi"
    for bad, message in (([("user", "a", "b")], "must be a \\(role, content\\) pair or an object"),
                         (["user: hi"], "must be a \\(role, content\\) pair"),
                         ([{"content": "hi"}], "unknown role None"),
                         ([("user", 5)], "content must be a string, a list of parts or null, got int")):
        with pytest.raises(InvalidInputError, match=message):
            render_conversation(bad)  # type: ignore[arg-type]
