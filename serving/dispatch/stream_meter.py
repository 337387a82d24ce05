"""What an answer cost when its tenant has a budget: upstream usage, or counted characters.

For a streamed request of a tenant with a budget, the dispatcher asks the upstream for usage
(`stream_options.include_usage`, which OpenAI-compatible servers answer with a last, choiceless chunk
that carries `usage`). When the caller did not ask for it, that chunk is taken out of the relayed
stream, so the caller gets the stream it asked for. An upstream that sends no usage (or a stream cut
short) is charged by count: `ceil(characters / 4)` tokens of the prompt's text and of the answer's
text (content, reasoning and tool-call arguments), about what English text averages per token.
"""

from __future__ import annotations

import json
import math
import re

CHARS_PER_TOKEN = 4
ESTIMATED = "spend counted as 4 characters per token of prompt and answer"
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
MAX_EVENT_BYTES = 1 << 20  # held back at most until an event's end: more is relayed unread


def estimated_usage(prompt_chars: int, completion_chars: int) -> dict[str, int]:
    """Token counts estimated from characters (CHARS_PER_TOKEN per token)."""
    prompt = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    completion = math.ceil(completion_chars / CHARS_PER_TOKEN)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def wants_usage(body: dict) -> bool:
    """Whether the caller asked for usage in its stream itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ask_for_usage(body: dict) -> dict:
    """The request body with `stream_options.include_usage` set (the caller's other options kept)."""
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


def text_chars(choices: object, part: str) -> int:
    """Characters of answer text in `choices` (`part`: "delta" in a stream chunk, "message" in an answer)."""
    if not isinstance(choices, list):
        return 0
    count = 0
    for choice in choices:
        message = choice.get(part) if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for field in ("content", "reasoning_content"):
            if isinstance(message.get(field), str):
                count += len(message[field])
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                count += len(function["arguments"])
    return count


def answer_chars(body: bytes) -> int:
    """Characters of answer text in a non-streaming chat completion (0 if it cannot be read)."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return 0
    return text_chars(answer.get("choices"), "message") if isinstance(answer, dict) else 0


def event_payload(event: bytes) -> bytes:
    """The data of one event: its `data:` lines' values, joined."""
    return b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))


def is_done(event: bytes) -> bool:
    """Whether `event` ends the stream: its whole data is `[DONE]`."""
    return b"[DONE]" in event and event_payload(event) == b"[DONE]"


class EventFramer:
    """Cuts a relayed event stream at the ends of its events.

    `split` returns the whole events come so far, byte for byte, and holds back an event still on its
    way (up to MAX_EVENT_BYTES: more is returned apart, as bytes to relay unread). A stream that breaks
    then leaves the caller no half event, which would run into the error event that ends it and make
    it unreadable. `done` says that `data: [DONE]` has gone by: the caller has the whole answer.
    """

    def __init__(self) -> None:
        self.done = False
        self._pending = bytearray()

    def split(self, chunk: bytes) -> tuple[list[bytes], bytes]:
        """(the events `chunk` completes, bytes past MAX_EVENT_BYTES without an event's end)."""
        # Only the new bytes are searched, with the 3 before them that may begin an event's end: a long
        # event arriving in small chunks costs its length once, not once per chunk.
        searched_from = max(0, len(self._pending) - 3)
        self._pending += chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(self._pending, searched_from):
            events.append(bytes(self._pending[start:match.end()]))
            start = match.end()
        del self._pending[:start]
        self.done = self.done or any(is_done(event) for event in events)
        if len(self._pending) > MAX_EVENT_BYTES:  # not an event stream, or an event too large to hold
            overflow = bytes(self._pending)
            self._pending.clear()
            return events, overflow
        return events, b""

    def feed(self, chunk: bytes) -> bytes:
        """What to relay of `chunk`: whole events, or bytes past MAX_EVENT_BYTES."""
        events, overflow = self.split(chunk)
        return b"".join(events) + overflow

    def finish(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line, or a body that is no stream)."""
        rest = bytes(self._pending)
        self._pending.clear()
        self.done = self.done or is_done(rest)
        return rest


class StreamMeter:
    """Reads a relayed event stream event by event: the usage it carries and the characters of its text.

    `feed` returns what to relay: whole events only (EventFramer's), byte for byte, less the usage chunk
    when `drop_usage_chunk` (the dispatcher asked for it, not the caller). `finish` returns what is left
    at the end of the stream. `done`, as EventFramer's, says that `data: [DONE]` has gone by.
    """

    def __init__(self, drop_usage_chunk: bool) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: object = None  # the stream's `usage`, as sent (serving.dispatch.upstream_body.read_usage checks it)
        self.completion_chars = 0
        self._framer = EventFramer()

    @property
    def done(self) -> bool:
        return self._framer.done

    def feed(self, chunk: bytes) -> bytes:
        events, overflow = self._framer.split(chunk)
        relayed = [event for event in events if self._read(event)]
        if overflow:  # relayed unread, counted by its size
            relayed.append(overflow)
            self.completion_chars += len(overflow)
        return b"".join(relayed)

    def finish(self) -> bytes:
        rest = self._framer.finish()
        return rest if rest and self._read(rest) else b""

    def _read(self, event: bytes) -> bool:
        """Take what the event says; False when it is the usage chunk to leave out."""
        payload = event_payload(event)
        if not payload or payload == b"[DONE]":
            return True
        try:
            parsed = json.loads(payload)
        except (ValueError, RecursionError):
            return True  # not ours to judge: relayed as it came
        if not isinstance(parsed, dict):
            return True
        choices = parsed.get("choices")
        self.completion_chars += text_chars(choices, "delta")
        if parsed.get("usage") is not None:
            self.usage = parsed["usage"]
            if self.drop_usage_chunk and choices == []:
                return False
        return True
