"""Chat openers: how people start a conversation, from a human-written, multilingual corpus.

The generated anchors (training/anchors.py) come from templates and word lists; people open a chat
in more ways than any list holds ("When will you walk", "can you write a Fibonacci function?",
"Hi Mrs. Smith, how has your husband been?", in Persian or Ukrainian). The ChatterBot corpus
(`chatterbot-corpus` on PyPI, BSD licence, user-contributed) holds some 7,600 short conversations in
29 languages on everyday topics. The first turn of each is a prompt every tier answers: an easy
anchor.

Its files (one per language and topic) are split once, by a hash of `language/topic.yml`, into a
`train` half, whose openers the recipe trains on (`chat_anchors: true`), and a `check` half, which
no recipe trains on: `promptier eval` reports where the model sends those openers, a check on
human-written chat that the probe suite's few easy prompts cannot give. A file stays whole on one
side, so the near-duplicates inside a file ("When will you die" / "When do you die") never straddle
the split. The `trivia` files are in neither: pub-quiz questions ("Which African country was
formerly known as Abyssinia?") are not obviously easy for a 7B model, and a larger one does know
more of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from classifier.artifact import MODES
from classifier.errors import PromptierError
from classifier.policy import RoutingRequest
from classifier.runtime import TierClassifier
from training.anchors import normalise_prompt

ChatHalf = Literal["train", "check"]
CORPUS_PACKAGE = "chatterbot-corpus"
LEFT_OUT_TOPICS = frozenset({"trivia"})


def corpus_files() -> list[Path]:
    """The corpus's conversation files, `data/<language>/<topic>.yml`, in name order.

    Raises:
        PromptierError: the corpus package is not installed.
    """
    try:
        import chatterbot_corpus
    except ImportError as error:
        raise PromptierError(f"chat anchors need the {CORPUS_PACKAGE} package: pip install 'promptier[train]'"
                             ) from error
    data = Path(chatterbot_corpus.__file__).resolve().parent / "data"
    return sorted(data.glob("*/*.yml"))


def half_of(path: Path) -> ChatHalf:
    """The half a corpus file belongs to, fixed by a hash of `language/topic.yml`."""
    key = f"{path.parent.name}/{path.name}"
    return "train" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 0 else "check"


def chat_openers(half: ChatHalf, exclude: Iterable[str] = ()) -> list[str]:
    """The first turns of the conversations in `half`'s files, each once (compared after normalising
    case, punctuation and spacing), without trivia and without any of `exclude` (the probe suite). The
    `check` half also leaves out every opener of the `train` half ("Hello" opens files on both sides).

    Raises:
        PromptierError: the corpus package is not installed, or one of its files cannot be read.
    """
    seen = {normalise_prompt(text) for text in exclude}
    if half == "check":
        seen |= {normalise_prompt(text) for text in chat_openers("train")}
    openers: list[str] = []
    for path in corpus_files():
        if path.stem in LEFT_OUT_TOPICS or half_of(path) != half:
            continue
        for text in _first_turns(path):
            key = normalise_prompt(text)
            if key and key not in seen:
                seen.add(key)
                openers.append(text)
    return openers


def _first_turns(path: Path) -> list[str]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PromptierError(f"cannot read the chat corpus file {path.parent.name}/{path.name}: {error}") from error
    conversations = document.get("conversations") if isinstance(document, dict) else None
    return [turns[0].strip() for turns in conversations or []
            if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip()]


def evaluate_chat_check(runtime: TierClassifier) -> dict:
    """Where the runtime sends the `check` half's openers under each mode: the share on the cheapest
    and on the top tier, and the share the prior decided. All of them are easy."""
    from training.probes import load_probes

    openers = chat_openers("check", exclude=[probe.prompt for probe in load_probes()])
    tiers = runtime.tier_names
    modes: dict[str, dict[str, float]] = {}
    for mode in (m for m in MODES if m in runtime.manifest.policy.thresholds):
        decisions = runtime.classify_batch(openers, RoutingRequest(mode=mode))
        chosen = np.array([decision.tier for decision in decisions])
        modes[mode] = {"easy_on_cheapest": float(np.mean(chosen == tiers[0])),
                       "easy_on_top": float(np.mean(chosen == tiers[-1])),
                       "decided_by_prior": float(np.mean([d.decided_by == "prior" for d in decisions]))}
    return {"prompts": len(openers), "modes": modes}


def render_chat_check(report: dict, default_mode: str) -> str:
    """The chat check's figures as a Markdown table."""
    lines = [f"Chat check: the first turns of {report['prompts']} conversations from the held-out half of a "
             "human-written, multilingual chat corpus (training/chat_anchors.py), all easy.", "",
             "| mode | easy -> cheapest | easy -> top | decided by the prior |", "|---|---|---|---|"]
    for mode, shares in report["modes"].items():
        marker = " (default)" if mode == default_mode else ""
        lines.append(f"| {mode}{marker} | {shares['easy_on_cheapest']:.1%} | {shares['easy_on_top']:.1%} | "
                     f"{shares['decided_by_prior']:.1%} |")
    return "\n".join(lines) + "\n"
