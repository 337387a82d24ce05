"""Turning a chat conversation into the one text the classifier reads."""

from __future__ import annotations

from collections.abc import Sequence

from classifier.errors import InvalidInputError

ROLES = ("system", "user", "assistant", "tool", "developer")


def content_text(content: object) -> str:
    """An OpenAI chat message's content as text: a string, or the text parts of a multi-part content list
    (images and other parts are not read)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and
                         isinstance(part.get("text"), str))
    return ""


def render_conversation(messages: Sequence[tuple[str, str]]) -> str:
    """The latest user turn first, then the earlier turns from newest to oldest.

    The encoder keeps the head of a text in full and only the tail of the rest, so the turn that
    decides the request is always read whole, and the context just before it is read next. A short
    "yes, do it" after a long plan is therefore classified with that plan, not as a trivial prompt.

    Raises:
        InvalidInputError: no messages, an unknown role, or no user turn with content.
    """
    if not messages:
        raise InvalidInputError("conversation has no messages")
    for index, (role, _) in enumerate(messages):
        if role not in ROLES:
            raise InvalidInputError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
    user_turns = [i for i, (role, content) in enumerate(messages) if role == "user" and content.strip()]
    if not user_turns:
        raise InvalidInputError("conversation has no user message with content")
    latest = user_turns[-1]
    earlier = [f"{role}: {content}" for role, content in reversed(messages[:latest]) if content.strip()]
    return "\n\n".join([messages[latest][1], *earlier])
