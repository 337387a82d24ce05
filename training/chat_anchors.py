"""Chat openers: how people start a conversation, from a human-written, multilingual corpus.

The generated anchors (training/anchors.py) come from templates and word lists; people open a chat
in more ways than any list holds ("When will you walk", "can you write a Fibonacci function?",
"Hi Mrs. Smith, how has your husband been?", in Persian or Ukrainian). The ChatterBot corpus
(`chatterbot-corpus` on PyPI, BSD licence, user-contributed) holds some 7,600 short conversations
(7,100 without trivia) in 28 languages on everyday topics. The first turn of each is a prompt every
tier answers: an easy anchor.

Its topics are split once, by a hash of the topic's name, into a `train` half, whose openers the
recipe trains on (`chat_anchors: true`), and a `check` half, which no recipe trains on: `promptier
eval` reports where the model sends those openers, a check on human-written chat that the probe
suite's few easy prompts cannot give. A topic is on one side in every language, because its files
are often translations of one another (Chinese in both scripts, nearly character for character), and
topic names that differ only by language or spelling are one topic (`TOPIC_ALIASES`). So the check
measures openers of topics the model never saw in any language. The `trivia` files are in neither
half: pub-quiz questions ("Which African country was formerly known as Abyssinia?") are not
obviously easy for a 7B model, and a larger one does know more of them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from classifier.artifact import MODES
from classifier.errors import PromptierError
from classifier.policy import RoutingRequest
from classifier.runtime import TierClassifier
from training.anchors import anchor_rows, normalise_prompt

ChatHalf = Literal["train", "check"]
CORPUS_PACKAGE = "chatterbot-corpus"
LEFT_OUT_TOPICS = frozenset({"trivia"})
# Topic file names that name the same topic in another language or spelling.
TOPIC_ALIASES = {"IA": "ai", "emociones": "emotion", "emotions": "emotion", "greeting": "greetings",
                 "computer": "computers", "coversations": "conversations", "dinero": "money",
                 "psicologia": "psychology", "perfilbot": "botprofile", "profile": "botprofile",
                 "origen": "botprofile", "sport": "sports", "history_brasil": "history"}


def corpus_files() -> list[Path]:
    """The corpus's conversation files, `data/<language>/<topic>.yml`, in name order.

    Raises:
        PromptierError: the corpus package is not installed, or holds no conversation file.
    """
    try:
        import chatterbot_corpus
    except ImportError as error:
        raise PromptierError(f"chat anchors need the {CORPUS_PACKAGE} package: pip install 'promptier[train]'"
                             ) from error
    data = Path(chatterbot_corpus.__file__).resolve().parent / "data"
    files = sorted(data.glob("*/*.yml"))
    if not files:
        raise PromptierError(f"the installed {CORPUS_PACKAGE} has no data/<language>/<topic>.yml files under {data}")
    return files


def corpus_version() -> str:
    """The installed corpus package's version, recorded beside every figure measured on it."""
    return metadata.version(CORPUS_PACKAGE)


def topic_of(path: Path) -> str:
    """A corpus file's topic, one name across languages."""
    return TOPIC_ALIASES.get(path.stem, path.stem)


def half_of(path: Path) -> ChatHalf:
    """The half a corpus file belongs to, fixed by a hash of its topic."""
    return "train" if int(hashlib.sha256(topic_of(path).encode()).hexdigest(), 16) % 2 == 0 else "check"


def chat_openers(half: ChatHalf, exclude: Iterable[str] = ()) -> list[str]:
    """The first turns of the conversations in `half`'s files, each once (compared after normalising
    case, punctuation and spacing), without trivia and without any of `exclude` (the probe suite). The
    `check` half also leaves out every opener of the `train` half ("Hello" opens topics on both sides).

    Raises:
        PromptierError: the corpus package is not installed, or one of its files cannot be read.
    """
    seen = {normalise_prompt(text) for text in exclude}
    if half == "check":
        seen |= {normalise_prompt(text) for text in _openers("train")}
    return [text for text in _openers(half) if normalise_prompt(text) not in seen]


@functools.cache
def _openers(half: ChatHalf) -> tuple[str, ...]:
    seen: set[str] = set()
    openers: list[str] = []
    for path in corpus_files():
        if topic_of(path) in LEFT_OUT_TOPICS or half_of(path) != half:
            continue
        for text in _first_turns(path):
            key = normalise_prompt(text)
            if key and key not in seen:
                seen.add(key)
                openers.append(text)
    return tuple(openers)


def _first_turns(path: Path) -> list[str]:
    """The first turn of each conversation in a corpus file; an entry that is not a list of turns (a
    few are a bare string) opens no conversation and is passed over."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PromptierError(f"cannot read the chat corpus file {path.parent.name}/{path.name}: {error}") from error
    conversations = document.get("conversations") if isinstance(document, dict) else None
    return [turns[0].strip() for turns in conversations or []
            if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip()]


def evaluate_chat_check(runtime: TierClassifier, probes: Sequence[str]) -> dict:
    """Where the runtime sends the `check` half's openers under each mode: the share on the cheapest
    and on the top tier, and the share the prior decided. All of them are easy.

    Openers among `probes` (the probe suite's prompts, reported on their own) are left out, and so are
    those the artifact was trained on: a few are also generated anchors ("Привет!") and any may be in
    its logs or unlabeled prompts (its `seen_prompts.txt`).
    """
    from training.config import TrainConfig
    from training.labels import prompt_hash, seen_prompts

    probes = list(probes)
    config = runtime.manifest.training.get("config")
    trained_anchors = []
    if isinstance(config, dict) and config.get("anchors"):
        seed = int(config.get("seed", TrainConfig.model_fields["seed"].default))
        trained_anchors = [row["prompt"] for row in anchor_rows(runtime.tier_names, int(config["anchors"]), seed,
                                                                exclude=probes)]
    seen = seen_prompts(runtime.directory)
    openers = [text for text in chat_openers("check", exclude=probes + trained_anchors)
               if prompt_hash(text) not in seen]
    tiers = runtime.tier_names
    modes: dict[str, dict[str, float]] = {}
    for mode in (m for m in MODES if m in runtime.manifest.policy.thresholds):
        decisions = runtime.classify_batch(openers, RoutingRequest(mode=mode))
        chosen = np.array([decision.tier for decision in decisions])
        modes[mode] = {"easy_on_cheapest": float(np.mean(chosen == tiers[0])),
                       "easy_on_top": float(np.mean(chosen == tiers[-1])),
                       "decided_by_prior": float(np.mean([d.decided_by == "prior" for d in decisions]))}
    return {"prompts": len(openers), "corpus": f"{CORPUS_PACKAGE} {corpus_version()}", "modes": modes}


def render_chat_check(report: dict, default_mode: str) -> str:
    """The chat check's figures as a Markdown table."""
    lines = [f"Chat check: the first turns of {report['prompts']} conversations on topics held out of training, "
             f"from a human-written, multilingual chat corpus ({report.get('corpus', CORPUS_PACKAGE)}; "
             "training/chat_anchors.py), all easy.", "",
             "| mode | easy -> cheapest | easy -> top | decided by the prior |", "|---|---|---|---|"]
    for mode, shares in report["modes"].items():
        marker = " (default)" if mode == default_mode else ""
        lines.append(f"| {mode}{marker} | {shares['easy_on_cheapest']:.1%} | {shares['easy_on_top']:.1%} | "
                     f"{shares['decided_by_prior']:.1%} |")
    return "\n".join(lines) + "\n"
