"""Capability-aware routing: what each tier can serve, what a request needs, and where it may go.

A tier declares what its model serves under `serves:` in the dispatcher config. Every key defaults to
"served", so a tier that declares nothing is sent anything, as before capabilities existed; a tier
that cannot take images, tool calls or structured output, or has a small context window, says so:

    tiers:
      small:
        base_url: http://127.0.0.1:8000/v1
        model: mistralai/Mistral-7B-Instruct-v0.3
        serves: {images: false, audio: false, tools: false, json_output: false, context_window: 32768}

What a request needs is read from its body (`request_needs`): `images` (an `image_url` content part),
`audio` (an `input_audio` part), `tools` (`tools`, `functions`, `tool_choice` or `function_call`, or
a conversation that already carries tool calls or tool results), `json_output` (`response_format` of
type `json_object` or `json_schema`), and an estimate of its tokens, checked against `context_window`
(`estimate_tokens`). The dispatcher then routes only among the tiers that can serve it
(`CapabilityRouter`): a tier chosen by the classifier, the fallback or the no-text policy that cannot
serve the request is replaced by the nearest tier that can (more capable tiers first, as an
escalation would; a cheaper one only when no dearer one can), and an upstream failure escalates only
to capable tiers. A request no tier can serve, or one pinned to a tier that cannot serve it, is
refused (400) with a message that names what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, StrictBool

# The capabilities, in the order they are listed in headers, logs and errors. Also the only values of
# the `capability` label of the metrics below (bounded).
FEATURES = ("images", "audio", "tools", "json_output")
CONTEXT = "context_window"
CAPABILITIES = (*FEATURES, CONTEXT)
DESCRIBED = {
    "images": "images (image_url content parts)",
    "audio": "audio input (input_audio content parts)",
    "tools": "tool calls (tools, functions or tool_choice, or tool messages)",
    "json_output": "structured output (response_format json_object or json_schema)",
}
# Tokens counted per text character: the usual rule of thumb for English with BPE tokenizers (OpenAI
# quotes ~4 characters a token). Code and most other scripts take more tokens per character, so give
# a tier a context_window with some margin below the model's real one.
CHARS_PER_TOKEN = 4
# Tokens counted per image part: what OpenAI charges for a 1024x1024 image in high detail (85 + 4 tiles
# of 170). The real count depends on the model and the image; reading the image to know is not cheap.
IMAGE_TOKENS = 765
# The reason of a route that a capability, not the classifier or a policy, chose.
STEERED = "capability"


class Serves(BaseModel):
    """What one tier's model can take. Every key defaults to served; `context_window` to no limit."""

    model_config = ConfigDict(extra="forbid")

    images: StrictBool = Field(default=True, description="image_url content parts (vision)")
    audio: StrictBool = Field(default=True, description="input_audio content parts")
    tools: StrictBool = Field(default=True, description="tools/functions/tool_choice, tool messages")
    json_output: StrictBool = Field(default=True, description="response_format json_object / json_schema")
    context_window: int | None = Field(default=None, gt=0, le=100_000_000, strict=True,
                                       description="tokens the model takes, prompt and completion together "
                                       "(checked against the dispatcher's estimate); default: no limit")


@dataclass(frozen=True, slots=True)
class Needs:
    """What a request needs of the tier that serves it."""

    features: tuple[str, ...]  # of FEATURES, in that order
    tokens: int  # estimate_tokens: prompt estimate plus the completion limit the caller set
    has_text: bool  # whether a user turn has text the classifier can read


NO_NEEDS = Needs((), 0, True)


@dataclass(frozen=True, slots=True)
class Steered:
    """A route a capability moved: where the classifier or policy had sent it, and why it could not go."""

    from_tier: str
    from_reason: str
    by: tuple[str, ...]  # of CAPABILITIES

    def as_dict(self) -> dict:
        return {"from_tier": self.from_tier, "from_reason": self.from_reason, "by": list(self.by)}


class CapabilityRefusal(Exception):
    """The request cannot be served as asked: no tier can, or the pinned tier cannot."""

    def __init__(self, message: str, code: str, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.message, self.code, self.missing = message, code, missing


def _positive_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def request_needs(body: dict, messages: Sequence[tuple[str, str]]) -> Needs:
    """What the chat-completions `body` needs; `messages` are its (role, text) pairs, as the
    dispatcher read them for the classifier (text parts joined).

    The token estimate (`Needs.tokens`) is cheap on purpose, as it runs on every request: the
    characters of all the messages' text divided by CHARS_PER_TOKEN, plus the same for the JSON of
    the tool definitions and of tool calls already in the conversation, plus IMAGE_TOKENS per image
    part (audio parts are not counted), plus the completion limit the caller set
    (`max_completion_tokens`, else `max_tokens`; nothing when neither is set).
    """
    images = audio = tools = False
    chars = sum(len(text) for _, text in messages)
    image_parts = 0
    for message in body["messages"]:  # _parse_chat has checked: a list of objects with a role
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    images = True
                    image_parts += 1
                elif kind == "input_audio":
                    audio = True
        if message["role"] in ("tool", "function"):
            tools = True
        for field in ("tool_calls", "function_call"):
            if message.get(field):
                tools = True
                chars += _json_length(message[field])
    for field in ("tools", "functions"):
        if body.get(field):
            tools = True
            chars += _json_length(body[field])
    if body.get("tool_choice") is not None or body.get("function_call") is not None:
        tools = True
    response_format = body.get("response_format")
    json_output = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
    completion = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    tokens = -(-chars // CHARS_PER_TOKEN) + image_parts * IMAGE_TOKENS + completion
    features = tuple(name for name, needed in zip(FEATURES, (images, audio, tools, json_output), strict=True)
                     if needed)
    has_text = any(role == "user" and text and not text.isspace() for role, text in messages)
    return Needs(features, tokens, has_text)


def _json_length(value: object) -> int:
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return 0


class CapabilityMetrics:
    """Requests a capability routed or refused, by capability (a bounded label: CAPABILITIES)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.steered = Counter("promptier_dispatch_capability_steered", "requests sent to another tier than the "
                               "classifier's or policy's because that tier lacked a capability, by capability",
                               ["capability"], registry=registry)
        self.refused = Counter("promptier_dispatch_capability_refused", "requests refused (400) for a capability "
                               "no eligible tier has, by capability and whether the request was pinned",
                               ["capability", "pinned"], registry=registry)


class CapabilityRouter:
    """Which tiers can serve a request, and where a route goes when its tier cannot.

    Args:
        tiers: tier names, cheapest first.
        serves: each tier's declared capabilities.
        metrics: where steering and refusals are counted.
    """

    def __init__(self, tiers: Sequence[str], serves: dict[str, Serves], metrics: CapabilityMetrics) -> None:
        self.tiers = list(tiers)
        self.serves = {tier: serves[tier] for tier in self.tiers}
        self.metrics = metrics
        # With no tier restricted (the default), every check below is skipped: nothing per request.
        self.restricted = any(declared != Serves() for declared in self.serves.values())
        self._above = {tier: self.tiers[index:] for index, tier in enumerate(self.tiers)}

    def missing(self, tier: str, needs: Needs) -> tuple[str, ...]:
        """The capabilities `needs` asks for that `tier` lacks, in CAPABILITIES order."""
        if not self.restricted:
            return ()
        declared = self.serves[tier]
        lacking = tuple(feature for feature in needs.features if not getattr(declared, feature))
        if declared.context_window is not None and needs.tokens > declared.context_window:
            lacking += (CONTEXT,)
        return lacking

    def check(self, needs: Needs, pinned: str | None) -> None:
        """Refuse a request that the pinned tier, or (unpinned) every tier, cannot serve.

        Raises:
            CapabilityRefusal: with a message naming the missing capabilities and the tiers that have them.
        """
        if not self.restricted:
            return
        if pinned is not None:
            lacking = self.missing(pinned, needs)
            if lacking:
                self._count_refusal(lacking, pinned=True)
                capable = [tier for tier in self.tiers if not self.missing(tier, needs)]
                elsewhere = (f"tiers that can: {', '.join(capable)} (or use model promptier to have it routed)"
                             if capable else "no configured tier can")
                raise CapabilityRefusal(f"tier {pinned} cannot serve this request: it needs "
                                        f"{self._describe(lacking, needs, [pinned])}; {elsewhere}",
                                        "tier_cannot_serve", lacking)
            return
        lacks = {tier: self.missing(tier, needs) for tier in self.tiers}
        if not all(lacks.values()):
            return
        # What no tier has at all; if each capability exists somewhere, it is their combination.
        relevant = tuple(name for name in CAPABILITIES if any(name in lacking for lacking in lacks.values()))
        alone = tuple(name for name in relevant if all(name in lacking for lacking in lacks.values()))
        if alone:
            self._count_refusal(alone, pinned=False)
            raise CapabilityRefusal(f"no configured tier serves this request: it needs "
                                    f"{self._describe(alone, needs, self.tiers)}", "no_capable_tier", alone)
        self._count_refusal(relevant, pinned=False)
        having = "; ".join(f"{name}: {', '.join(tier for tier in self.tiers if name not in lacks[tier])}"
                           for name in relevant)
        raise CapabilityRefusal(f"no configured tier serves this request: it needs "
                                f"{self._describe(relevant, needs, self.tiers)}, and no tier has all of them "
                                f"(tiers with each: {having})", "no_capable_tier", relevant)

    def _count_refusal(self, lacking: tuple[str, ...], pinned: bool) -> None:
        for name in lacking:
            self.metrics.refused.labels(name, "true" if pinned else "false").inc()

    def _describe(self, lacking: tuple[str, ...], needs: Needs, tiers: Sequence[str]) -> str:
        parts = [DESCRIBED[name] for name in lacking if name != CONTEXT]
        if CONTEXT in lacking:
            windows = {tier: self.serves[tier].context_window for tier in tiers}
            largest = max(((window, tier) for tier, window in windows.items() if window is not None), default=None)
            window_text = f"; the context_window of {largest[1]} is {largest[0]:,}" if largest else ""
            parts.append(f"a context window of about {needs.tokens:,} tokens (estimated: text characters / "
                         f"{CHARS_PER_TOKEN}, {IMAGE_TOKENS} per image, plus max_tokens{window_text})")
        return " and ".join(parts)

    def steer(self, tier: str, reason: str, needs: Needs, allowed: Collection[str] | None = None
              ) -> tuple[str, str, Steered | None]:
        """(tier, reason, how it was steered) for a request routed to `tier` for `reason`: the same when
        the tier can serve it; else the nearest capable tier, reason STEERED. The nearest: the next more
        capable tiers first (as an escalation goes), then the cheaper ones from the nearest down; among
        the tenant's `allowed` tiers first, so that a request one of them can serve is never refused for
        the tier steering chose (only when none of them can is a tier outside them returned, which the
        tenant's check then refuses). `check` has passed, so some tier can serve it."""
        lacking = self.missing(tier, needs)
        if not lacking:
            return tier, reason, None
        index = self.tiers.index(tier)
        nearest = [*self.tiers[index + 1:], *reversed(self.tiers[:index])]
        if allowed is not None:
            nearest = sorted(nearest, key=lambda candidate: candidate not in allowed)  # stable: nearest first
        for candidate in nearest:
            if not self.missing(candidate, needs):
                for name in lacking:
                    self.metrics.steered.labels(name).inc()
                return candidate, STEERED, Steered(tier, reason, lacking)
        raise AssertionError("steer() called for a request no tier can serve; check() refuses those")

    def cheapest(self, needs: Needs) -> str:
        """The cheapest tier that can serve `needs` (`check` has passed, so there is one)."""
        return next(tier for tier in self.tiers if not self.missing(tier, needs))

    def escalation(self, tier: str, needs: Needs) -> list[str]:
        """The tiers an upstream failure may escalate through, starting at `tier`: it and the more
        capable tiers that can serve the request (never a cheaper one)."""
        above = self._above[tier]
        if not self.restricted:
            return above
        return [candidate for candidate in above if candidate == tier or not self.missing(candidate, needs)]


def describe_serves(serves: dict[str, Serves]) -> str:
    """What each tier cannot serve, in one line (for `promptier dispatch --check`)."""
    lines = []
    for tier, declared in serves.items():
        limits = [f"no {name}" for name in FEATURES if not getattr(declared, name)]
        if declared.context_window is not None:
            limits.append(f"context_window {declared.context_window:,}")
        if limits:
            lines.append(f"{tier}: {', '.join(limits)}")
    return "; ".join(lines) if lines else "every tier serves every capability (none declared)"
