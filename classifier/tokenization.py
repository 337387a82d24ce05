"""Bounded-cost tokenization: cut characters, tokenize, keep head and tail tokens.

Training and the runtime both encode through `PromptEncoder`, so the model is trained on exactly
the token windows it will see in production.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tokenizers import Tokenizer

from classifier.artifact import TruncationConfig
from classifier.errors import ArtifactError

# Joins the head and tail character windows so that the last head word and the first tail word
# are not glued into one token.
_CHAR_CUT_SEPARATOR = " \n "
# What BERT's `clean_text` deletes from ASCII text: control characters other than tab, LF and CR.
_ASCII_CONTROLS = {code: None for code in [*range(0, 9), 11, 12, *range(14, 32), 127]}


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
        self._fast_path = _WordPieceFastPath.for_tokenizer(tokenizer)

    @classmethod
    def from_file(cls, path: Path, truncation: TruncationConfig) -> PromptEncoder:
        """Load a `tokenizer.json`.

        Raises:
            ArtifactError: the file is not a valid tokenizer.
        """
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            # Its text may quote the file ("invalid type: string ..."): only the position is repeated.
            where = re.search(r"line \d+ column \d+", str(exc))
            raise ArtifactError(f"{path} is not a valid tokenizer file"
                                + (f" (at {where.group(0)})" if where else "")) from exc
        return cls(tokenizer, truncation)

    @property
    def pad_id(self) -> int:
        return self._pad_id

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

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids (no special tokens) of each text, exactly as the tokenizer file says.

        Text of ASCII, Latin-1 and General Punctuation is tokenized in Python with a word cache (see
        `_WordPieceFastPath`), several times faster than the `tokenizers` call for a typical prompt;
        the result is the same ids.
        """
        fast_path = self._fast_path
        ids: list[list[int]] = [[] for _ in texts]
        fast = [fast_path is not None and fast_path.applies(text) for text in texts]
        fast_rows = [row for row, is_fast in enumerate(fast) if is_fast]
        slow_rows = [row for row, is_fast in enumerate(fast) if not is_fast]
        if fast_path is not None and fast_rows:
            for row, encoded in zip(fast_rows, fast_path.encode([texts[r] for r in fast_rows]), strict=True):
                ids[row] = encoded
        if slow_rows:
            for row, encoding in zip(slow_rows, _encode(self._tokenizer, [texts[r] for r in slow_rows]), strict=True):
                ids[row] = encoding.ids
        return ids

    def _window(self, ids: list[int]) -> tuple[list[int], bool]:
        if len(ids) <= self._content_budget:
            return self._prefix + ids + self._suffix, False
        tail = ids[len(ids) - self._tail_tokens :] if self._tail_tokens else []
        return self._prefix + ids[: self._head_tokens] + tail + self._suffix, True

    def encode_batch(self, texts: Sequence[str]) -> EncodedBatch:
        """Encode texts into one padded batch (padded to the longest item, not to max_tokens)."""
        cut = [self.cut_characters(text) for text in texts]
        windows = [self._window(ids) for ids in self.token_ids([text for text, _ in cut])]
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


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list:
    # encode_batch_fast skips character offsets, which we never use (tokenizers >= 0.21).
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is not None:
        return list(fast(texts, add_special_tokens=False))
    return list(tokenizer.encode_batch(texts, add_special_tokens=False))


class _WordPieceFastPath:
    """BERT tokenization in Python, with a cache of word pieces per word, for text made of ASCII and
    the common non-ASCII characters of Latin-1 and General Punctuation (curly quotes, dashes,
    no-break spaces, accented letters).

    For such text BERT's pipeline is simple: the normalizer deletes control characters, lowercases
    and strips accents one character at a time, the pre-tokenizer splits on whitespace and makes each
    punctuation mark its own word, and WordPiece splits each word greedily, longest vocabulary piece
    first. What the normalizer and pre-tokenizer do to each of those characters is asked of the
    tokenizer itself when the path is built, so `str.translate` and one regex reproduce them.
    Prompts repeat the same few thousand words, so with a word -> ids cache this costs a regex pass and
    a dict lookup per word: several times less than the `tokenizers` call it replaces, which is most
    of a prompt's classification time. Anything else (other scripts, combining marks, text
    containing an added token such as "[CLS]", a tokenizer that is not BERT's) goes to `tokenizers`.
    Tests compare both paths on random text, control characters included.
    """

    _CACHE_LIMIT = 50_000  # words (~8 MB); bounded memory whatever the traffic
    # Non-ASCII characters the path may take, if the tokenizer's own answers for them are simple.
    _CANDIDATES: ClassVar[list[str]] = [chr(code) for code in [*range(0xA0, 0x100), *range(0x2000, 0x2070),
                                                              0x20AC, 0x2122]]

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_word_chars: int, lowercase: bool,
                 added: list[str], table: dict[int, str | None], word_chars: str, punctuation: str) -> None:
        self._vocab = vocab
        self._unk = [unk_id]
        self._prefix = prefix
        self._max_word_chars = max_word_chars
        self._lowercase = lowercase
        self._added = added
        self._replacements = {chr(code): replacement or "" for code, replacement in table.items()}
        # One regex pass finds the few characters to replace: str.translate with a dict walks every
        # character of a non-ASCII string in Python-level lookups, 4x slower.
        self._to_replace = re.compile("[" + "".join(re.escape(char) for char in self._replacements) + "]")
        self._allowed = frozenset(chr(code) for code in range(128)) | frozenset(self._replacements)
        word_class = "A-Za-z0-9" + "".join(re.escape(c) for c in word_chars)
        punctuation_class = r"!-/:-@\[-`{-~" + "".join(re.escape(c) for c in punctuation)
        self._words = re.compile(f"[{word_class}]+|[{punctuation_class}]")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> _WordPieceFastPath | None:
        spec = json.loads(tokenizer.to_str())
        normalizer, pre_tokenizer = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
        model, added = spec.get("model") or {}, spec.get("added_tokens") or []
        if (normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", True)
                or pre_tokenizer.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece"):
            return None
        if any(token.get("normalized", True) for token in added):
            return None  # such tokens are matched after normalization; leave them to the tokenizer
        vocab = model["vocab"]
        if model.get("unk_token") not in vocab:
            return None
        table, word_chars, punctuation = cls._character_table(tokenizer)
        return cls(vocab, vocab[model["unk_token"]], model.get("continuing_subword_prefix", "##"),
                   int(model.get("max_input_chars_per_word", 100)), bool(normalizer.get("lowercase", True)),
                   [token["content"] for token in added], table, word_chars, punctuation)

    @classmethod
    def _character_table(cls, tokenizer: Tokenizer) -> tuple[dict[int, str | None], str, str]:
        """Ask the tokenizer what it does to each candidate character.

        Returns the translate table (ASCII controls deleted, each accepted candidate replaced by its
        normalized form) and the non-ASCII characters that end up inside words or as punctuation.
        """
        normalize, split = tokenizer.normalizer.normalize_str, tokenizer.pre_tokenizer.pre_tokenize_str
        table: dict[int, str | None] = dict(_ASCII_CONTROLS)
        classes: dict[str, str] = {}

        def kind(char: str) -> str:
            if char not in classes:
                pieces = [piece for piece, _ in split(f"a{char}a")]
                classes[char] = ("space" if pieces == ["a", "a"] else "punctuation" if pieces == ["a", char, "a"]
                                 else "word" if pieces == [f"a{char}a"] else "other")
            return classes[char]

        for candidate in cls._CANDIDATES:
            normalized = normalize(candidate)
            kinds = {kind(char) for char in normalized if not char.isascii()}
            if "other" in kinds:
                continue  # not simple: leave texts with this character to the tokenizer
            table[ord(candidate)] = "".join(" " if not c.isascii() and kind(c) == "space" else c for c in normalized)
        word_chars = "".join(sorted(c for c, k in classes.items() if k == "word"))
        punctuation = "".join(sorted(c for c, k in classes.items() if k == "punctuation"))
        return table, word_chars, punctuation

    def applies(self, text: str) -> bool:
        simple = text.isascii() or self._allowed.issuperset(text)
        return simple and not any(token in text for token in self._added)

    def encode(self, texts: list[str]) -> list[list[int]]:
        cache = self._cache
        out = []
        replacements = self._replacements
        for text in texts:
            if text.isascii():
                text = text.translate(_ASCII_CONTROLS)
            else:
                text = self._to_replace.sub(lambda match: replacements[match.group()], text)
            ids: list[int] = []
            for word in self._words.findall(text.lower() if self._lowercase else text):
                pieces = cache.get(word)
                if pieces is None:
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    pieces = cache[word] = self._word_pieces(word)
                ids += pieces
            out.append(ids)
        return out

    def _word_pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece, as `tokenizers` does it."""
        if len(word) > self._max_word_chars:
            return self._unk
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self._prefix + word[start:end]
                found = self._vocab.get(piece)
                if found is not None:
                    pieces.append(found)
                    break
                end -= 1
            else:
                return self._unk  # no piece matches: the whole word is unknown
            start = end
        return pieces


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Find the special tokens the tokenizer's template puts before and after the content."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ArtifactError("cannot locate the content inside the tokenizer's special-token template")
