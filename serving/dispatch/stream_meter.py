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


def last_event_end(data: bytes) -> int:
    """Where the last whole event of an event stream's `data` ends (0: no event has ended in it)."""
    if data.endswith(b"\n\n"):  # the usual case: a chunk that ends with an event
        return len(data)
    end = 0
    for match in _EVENT_END.finditer(data):
        end = match.end()
    return end


def ends_with_done(events: bytes) -> bool:
    """Whether the last event of `events` (whole events) is the stream's end, `data: [DONE]`."""
    lines = events.rstrip(b"\r\n")
    last = lines[max(lines.rfind(b"\n"), lines.rfind(b"\r")) + 1:]
    return last.startswith(b"data:") and last[5:].strip() == b"[DONE]"


class EventFramer:
    """Cuts a relayed event stream at the ends of its events.

    `feed` returns the whole events come so far, byte for byte, and holds back an event still on its way
    (up to MAX_EVENT_BYTES: more is relayed as it comes). A stream that breaks then leaves the caller no
    half event, which would run into the error event that ends it and make it unreadable. `done` says
    that the last event relayed was `data: [DONE]`: the caller has the whole answer.
    """

    def __init__(self) -> None:
        self.done = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = last_event_end(data)
        if len(data) - end > MAX_EVENT_BYTES:  # not an event stream, or an event too large to hold
            end = len(data)
        self._pending = data[end:]
        if end:
            self.done = ends_with_done(data[:end])
        return data[:end]

    def finish(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line, or a body that is no stream)."""
        rest, self._pending = self._pending, b""
        return rest


class StreamMeter:
    """Reads a relayed event stream event by event: the usage it carries and the characters of its text.

    `feed` returns what to relay: whole events only (an event is held until its blank line has come),
    byte for byte, less the usage chunk when `drop_usage_chunk` (the dispatcher asked for it, not the
    caller). `finish` returns what is left at the end of the stream. `done`, as `EventFramer`'s, says
    that `data: [DONE]` has been read.
    """

    def __init__(self, drop_usage_chunk: bool) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.done = False
        self.usage: object = None  # the stream's `usage`, as sent (serving.dispatch.upstream_body.read_usage checks it)
        self.completion_chars = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        ends = list(_EVENT_END.finditer(data))
        self._pending = data[ends[-1].end():] if ends else data
        relayed = []
        start = 0
        for end in ends:
            event = data[start:end.end()]
            start = end.end()
            if self._read(event):
                relayed.append(event)
        if len(self._pending) > MAX_EVENT_BYTES:
            # Not an event stream, or an event too large to hold: relayed as it comes, counted by its size.
            relayed.append(self._pending)
            self.completion_chars += len(self._pending)
            self._pending = b""
        return b"".join(relayed)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest if rest and self._read(rest) else b""

    def _read(self, event: bytes) -> bool:
        """Take what the event says; False when it is the usage chunk to leave out."""
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        if payload == b"[DONE]":
            self.done = True
            return True
        if not payload:
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
