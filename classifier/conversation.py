"""Turning a chat conversation into the one text the classifier reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from itertools import islice

from classifier.errors import InvalidInputError

# OpenAI's chat roles; `function` is the older form of `tool` that its API and SDKs still accept.
ROLES = ("system", "user", "assistant", "tool", "developer", "function")
# Far above a real conversation; it bounds the work a caller can ask for before any check of length.
MAX_MESSAGES = 10_000
# A latest turn longer than this is split around the other turns, so that its end is read too. About
# 40 tokens of English, well inside the 63 tokens the shipped truncation reads from a text's head, so
# that a turn that would overflow that window is always split; a split short turn is still read whole.
LATEST_TURN_SPLIT_CHARS = 160


def content_text(content: object) -> str:
    """An OpenAI chat message's content as text: a string, or the text parts of a multi-part content list
    (images and other parts are not read)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and
                         isinstance(part.get("text"), str))
    return ""


# A message as callers hold one: a (role, content) pair, or an OpenAI chat message object.
Message = tuple[str, object] | Mapping[str, object]


def message_pairs(messages: Iterable[Message]) -> list[tuple[str, str]]:
    """(role, text) per message: a pair's or an object's content read as `content_text` reads it (a string,
    the text parts of a list, nothing for null), its role checked.

    Raises:
        InvalidInputError: a single message or a string in place of a list, more than `MAX_MESSAGES`, a
            message of another shape, an unknown role, or a content that is not a string, a list of parts
            or null.
    """
    if isinstance(messages, Mapping | str | bytes):
        # Iterating one message object would read its keys as messages ("message 0 ... got str").
        raise InvalidInputError(f"messages must be a list of messages, got one {type(messages).__name__}; "
                                "wrap a single message in a list")
    taken = list(islice(messages, MAX_MESSAGES + 1))  # any iterable, bounded before anything else is done
    if len(taken) > MAX_MESSAGES:
        count = len(messages) if isinstance(messages, Sized) else f"more than {MAX_MESSAGES}"
        raise InvalidInputError(f"conversation has {count} messages; the limit is {MAX_MESSAGES}")
    pairs = []
    for index, message in enumerate(taken):
        # The serving path's shape first, read as it is: a (role, text) tuple.
        if type(message) is tuple and len(message) == 2 and type(message[1]) is str and message[0] in ROLES:
            pairs.append((message[0], message[1]))
            continue
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif isinstance(message, tuple | list) and len(message) == 2:
            role, content = message
        else:
            raise InvalidInputError(f"message {index} must be a (role, content) pair or an object with a role and "
                                    f"a content, got {type(message).__name__}")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidInputError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
        if content is not None and not isinstance(content, str | list):
            raise InvalidInputError(f"message {index} content must be a string, a list of parts or null, got "
                                    f"{type(content).__name__}")
        pairs.append((role, content_text(content)))
    return pairs


def render_conversation(messages: Iterable[Message]) -> str:
    """The one text the classifier reads for a conversation: the latest user turn first, then every
    other turn from newest to oldest (those after it too: an agent's tool results and the assistant's
    last step are what the next call continues).

    The encoder reads a text's head and its tail (classifier/tokenization.py), so the turn that decides
    the request is read first and the context nearest it next, and a short "yes, do it" after a plan is
    classified with that plan, not as a trivial prompt. A latest turn longer than a sentence or two
    (`LATEST_TURN_SPLIT_CHARS`) is split at a space near its middle and the other turns go between its
    halves: its end, where a long paste usually puts the question, is then what the tail window reads,
    not the oldest turn (often a system prompt).

    `messages` are (role, content) pairs or OpenAI chat message objects (`{"role", "content"}`); a
    content is a string, a list of parts (its text parts are read) or null (a tool-calling turn).

    Raises:
        InvalidInputError: no messages, more than `MAX_MESSAGES`, a message of another shape, an unknown
            role, or no user turn with content.
    """
    messages = message_pairs(messages)
    if not messages:
        raise InvalidInputError("conversation has no messages")
    user_turns = [i for i, (role, content) in enumerate(messages) if role == "user" and content.strip()]
    if not user_turns:
        raise InvalidInputError("conversation has no user message with content")
    latest = user_turns[-1]
    turn = messages[latest][1]
    others = [f"{role}: {content}" for index, (role, content) in reversed(list(enumerate(messages)))
              if index != latest and content.strip()]
    if len(turn) <= LATEST_TURN_SPLIT_CHARS or not others:
        return "\n\n".join([turn, *others])
    middle = turn.find(" ", len(turn) // 2)
    middle = len(turn) // 2 if middle < 0 else middle
    return "\n\n".join([turn[:middle], *others, turn[middle:].lstrip(" ")])
