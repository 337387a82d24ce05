"""Bounded-cost tokenization: cut characters, tokenize, keep head and tail tokens.

Training and the runtime both encode through `PromptEncoder`, so the model is trained on exactly
the token windows it will see in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from classifier.artifact import TruncationConfig
from classifier.errors import ArtifactError

# Joins the head and tail character windows so that the last head word and the first tail word
# are not glued into one token.
_CHAR_CUT_SEPARATOR = " \n "


@dataclass(frozen=True)
class EncodedBatch:
    """Padded model inputs plus what the caller needs to report per item."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_counts: list[int]  # tokens fed to the model, special tokens included
    truncated: list[bool]


class PromptEncoder:
    """Turns prompt texts into model inputs with a hard bound on work per prompt."""

    def __init__(self, tokenizer: Tokenizer, truncation: TruncationConfig) -> None:
        self._tokenizer = tokenizer
        # The tokenizer file may carry its own truncation/padding; ours replaces them.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._truncation = truncation
        self._prefix, self._suffix = _special_tokens(tokenizer)
        pad_id = tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id
        self._content_budget = truncation.max_tokens - len(self._prefix) - len(self._suffix)
        if self._content_budget < 2:
            raise ArtifactError(f"max_tokens={truncation.max_tokens} leaves no room for content tokens")
        self._head_tokens = max(1, round(self._content_budget * truncation.head_fraction))
        self._tail_tokens = self._content_budget - self._head_tokens

    @classmethod
    def from_file(cls, path: Path, truncation: TruncationConfig) -> PromptEncoder:
        """Load a `tokenizer.json`.

        Raises:
            ArtifactError: the file is not a valid tokenizer.
        """
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{path} is not a valid tokenizer file: {exc}") from exc
        return cls(tokenizer, truncation)

    @property
    def truncation(self) -> TruncationConfig:
        return self._truncation

    def cut_characters(self, text: str) -> tuple[str, bool]:
        """Keep the head and tail character windows of `text`; say whether anything was cut."""
        head, tail = self._truncation.head_chars, self._truncation.tail_chars
        if len(text) <= head + tail:
            return text, False
        tail_text = text[len(text) - tail :] if tail else ""
        return text[:head] + _CHAR_CUT_SEPARATOR + tail_text, True

    def _window(self, ids: list[int]) -> tuple[list[int], bool]:
        if len(ids) <= self._content_budget:
            return self._prefix + ids + self._suffix, False
        tail = ids[len(ids) - self._tail_tokens :] if self._tail_tokens else []
        return self._prefix + ids[: self._head_tokens] + tail + self._suffix, True

    def encode_batch(self, texts: Sequence[str]) -> EncodedBatch:
        """Encode texts into one padded batch (padded to the longest item, not to max_tokens)."""
        cut = [self.cut_characters(text) for text in texts]
        if len(cut) == 1:
            encodings = [self._tokenizer.encode(cut[0][0], add_special_tokens=False)]
        else:
            encodings = self._tokenizer.encode_batch([text for text, _ in cut], add_special_tokens=False)
        windows = [self._window(encoding.ids) for encoding in encodings]
        width = max(len(ids) for ids, _ in windows)
        input_ids = np.full((len(windows), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(windows), width), dtype=np.int64)
        for row, (ids, _) in enumerate(windows):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_counts=[len(ids) for ids, _ in windows],
            truncated=[char_cut or token_cut for (_, char_cut), (_, token_cut) in zip(cut, windows, strict=True)],
        )


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Find the special tokens the tokenizer's template puts before and after the content."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ArtifactError("cannot locate the content inside the tokenizer's special-token template")
