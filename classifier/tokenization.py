"""Bounded-cost tokenization: cut characters, tokenize, keep head and tail tokens.

Training and the runtime both encode through `PromptEncoder`, so the model is trained on exactly
the token windows it will see in production.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    content_tokens: list[int]  # of token_counts, those that come from the text
    unknown_tokens: list[int]  # of content_tokens, those the vocabulary does not know ([UNK])


def concatenate(batches: Sequence[EncodedBatch], pad_id: int) -> EncodedBatch:
    """One batch of the rows of `batches`, in order, padded to the widest of them."""
    width = max(batch.input_ids.shape[1] for batch in batches)
    rows = sum(batch.input_ids.shape[0] for batch in batches)
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    start = 0
    for batch in batches:
        count, columns = batch.input_ids.shape
        input_ids[start : start + count, :columns] = batch.input_ids
        attention_mask[start : start + count, :columns] = batch.attention_mask
        start += count
    return EncodedBatch(input_ids, attention_mask, [n for b in batches for n in b.token_counts],
                        [t for b in batches for t in b.truncated], [n for b in batches for n in b.content_tokens],
                        [n for b in batches for n in b.unknown_tokens])


class PromptEncoder:
    """Turns prompt texts into model inputs with a hard bound on work per prompt."""

    def __init__(self, tokenizer: Tokenizer, truncation: TruncationConfig) -> None:
        self._tokenizer = tokenizer
        # The tokenizer file may carry its own truncation/padding; ours replaces them.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # What a user writes is text: "[CLS]" or "[PAD]" in a prompt (code that quotes BERT's tokens, say)
        # is those characters, not the markers the template adds. Matched as special tokens they would
        # change routing at the writer's will.
        self._tokenizer.encode_special_tokens = True
        self._truncation = truncation
        self._prefix, self._suffix = _special_tokens(tokenizer)
        pad_id = tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id
        spec = json.loads(tokenizer.to_str())  # the file's settings, read once for both uses below
        unknown = (spec.get("model") or {}).get("unk_token")
        self._unk_id = None if unknown is None else tokenizer.token_to_id(unknown)  # None: it knows every token
        self._content_budget = truncation.max_tokens - len(self._prefix) - len(self._suffix)
        if self._content_budget < 2:
            raise ArtifactError(f"max_tokens={truncation.max_tokens} leaves no room for content tokens")
        self._head_tokens = max(1, round(self._content_budget * truncation.head_fraction))
        self._tail_tokens = self._content_budget - self._head_tokens
        self._fast_path = _WordPieceFastPath.for_tokenizer(tokenizer, spec)

    @classmethod
    def from_file(cls, path: Path, truncation: TruncationConfig) -> PromptEncoder:
        """Load a `tokenizer.json`.

        Raises:
            ArtifactError: the file cannot be read or is not a valid tokenizer.
        """
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror or 'unreadable'}") from exc
        return cls.from_bytes(content, truncation, path)

    @classmethod
    def from_bytes(cls, content: bytes, truncation: TruncationConfig, path: Path) -> PromptEncoder:
        """Load a `tokenizer.json` already read from `path` (which only names it in errors).

        Raises:
            ArtifactError: the content is not a valid tokenizer.
        """
        try:
            tokenizer = Tokenizer.from_str(content.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{path} is not a valid tokenizer file (not UTF-8)") from exc
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
    def highest_id(self) -> int:
        """The highest token id this tokenizer can produce (ids need not be contiguous)."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values())

    @property
    def truncation(self) -> TruncationConfig:
        return self._truncation

    def cut_characters(self, text: str) -> tuple[str, bool]:
        """Keep the head and tail character windows of `text`; say whether anything was cut.

        Whitespace at either end goes first: the tokenizer drops it anyway, and a padded prompt's
        windows would otherwise hold nothing else.
        """
        text = text.strip()
        head, tail = self._truncation.head_chars, self._truncation.tail_chars
        if len(text) <= head + tail:
            return text, False
        tail_text = text[len(text) - tail :] if tail else ""
        return text[:head] + _CHAR_CUT_SEPARATOR + tail_text, True

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids (no special tokens) of each text, exactly as the tokenizer file says.

        Text whose characters the tokenizer treats one at a time (ASCII and most characters of most
        scripts) is tokenized in Python with a cache of ids per whitespace-separated chunk (see
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
        lengths = [len(ids) for ids, _ in windows]
        width = max(lengths)
        if min(lengths) == width:  # one prompt (the serving case) or equal lengths: nothing to pad
            input_ids = np.array([ids for ids, _ in windows], dtype=np.int64)
            attention_mask = np.ones_like(input_ids)
        else:
            input_ids = np.full((len(windows), width), self._pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(windows), width), dtype=np.int64)
            for row, (ids, _) in enumerate(windows):
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
        specials = len(self._prefix) + len(self._suffix)
        unk = self._unk_id
        return EncodedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_counts=lengths,
            truncated=[char_cut or token_cut for (_, char_cut), (_, token_cut) in zip(cut, windows, strict=True)],
            content_tokens=[length - specials for length in lengths],
            unknown_tokens=[0 if unk is None else ids.count(unk) for ids, _ in windows],
        )


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list:
    # encode_batch_fast skips character offsets, which we never use (tokenizers >= 0.21).
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is not None:
        return list(fast(texts, add_special_tokens=False))
    return list(tokenizer.encode_batch(texts, add_special_tokens=False))


class _WordPieceFastPath:
    """BERT tokenization in Python, with a cache of word pieces per word, for text whose characters
    BERT's pipeline treats one at a time: ASCII, and the characters of any script (accented Latin,
    curly quotes, Greek, Cyrillic, CJK, kana, Hangul, Arabic, emoji, ...) for which the tokenizer itself
    answers simply.

    For such text BERT's pipeline is simple: the normalizer deletes control characters, lowercases
    and strips accents one character at a time (and puts spaces around each CJK ideograph), the
    pre-tokenizer splits on whitespace and makes each punctuation mark its own word, and WordPiece
    splits each word greedily, longest vocabulary piece first. What the normalizer and pre-tokenizer
    do to a character is asked of the tokenizer itself, a Unicode block (256 code points of the Basic
    Multilingual Plane, or of emoji) at a time, the first time a text holds a character of that block;
    one regex substitution and one regex split then reproduce it. A character is kept out (its text
    goes to `tokenizers`) where the answer is not simple: it splits a word in some other way, it is a
    combining mark the normalizer keeps (which canonical reordering would move), or Python's
    lowercasing would change what the normalizer gives.
    Prompts repeat the same few thousand words, so with a cache of ids per whitespace-separated chunk
    this costs a split and a dict lookup per chunk (the regex runs only on chunks not seen yet):
    several times less than the `tokenizers` call it replaces, which would be most of a prompt's
    classification time. Text containing an added token that is not special (special ones, such as
    "[CLS]", are read as text), and any tokenizer that is not BERT's, go to `tokenizers`. Tests compare
    both paths on random text of many scripts, control characters included.
    """

    # Chunks of at most `max_input_chars_per_word` characters: a few MB for ordinary text; 39 MB measured
    # for 50,000 random 100-letter Cyrillic chunks of 50 pieces each, whatever the traffic.
    _CACHE_LIMIT = 50_000
    _BLOCK_BITS = 8  # a block is 256 code points: examining one costs ~2 ms, once per process
    # At most this many new blocks are examined for one text (the rest on later texts; until then the
    # text goes to `tokenizers`), so no single request stalls the others for long.
    _BLOCKS_PER_TEXT = 4

    def __init__(self, tokenizer: Tokenizer, vocab: dict[str, int], unk_id: int, prefix: str,
                 max_word_chars: int, lowercase: bool, added: list[str]) -> None:
        self._vocab = vocab
        self._unk = [unk_id]
        self._prefix = prefix
        self._max_word_chars = max_word_chars
        self._lowercase = lowercase
        self._added = added
        self._normalize = tokenizer.normalizer.normalize_str
        self._split = tokenizer.pre_tokenizer.pre_tokenize_str
        self._kinds: dict[str, str] = {}
        # Character -> what the normalizer makes of it, for every accepted character that changes.
        self._replacements: dict[str, str] = {chr(code): "" for code in _ASCII_CONTROLS}
        # Regex character-class fragments, one per examined block: joined, never re-sorted, so a
        # block costs the same to add however many came before it.
        self._classes: dict[str, list[str]] = {
            "replace": [_character_class(chr(code) for code in _ASCII_CONTROLS)], "word": [], "punctuation": []}
        self._examined: set[int] = set()
        self._learning = threading.Lock()
        self._to_replace, self._words = self._patterns()
        self._allowed = {chr(code) for code in range(128)}  # only grows, in place, under `_learning`
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, spec: dict) -> _WordPieceFastPath | None:
        """The fast path for `tokenizer` (`spec`: its JSON settings), or None where it cannot apply."""
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
        # Special tokens are encoded as text (PromptEncoder); other added tokens still split a text.
        return cls(tokenizer, vocab, vocab[model["unk_token"]], model.get("continuing_subword_prefix", "##"),
                   int(model.get("max_input_chars_per_word", 100)), bool(normalizer.get("lowercase", True)),
                   [token["content"] for token in added if not token.get("special", False)])

    def _kind(self, char: str) -> str:
        """How the pre-tokenizer treats `char` between two letters: space, punctuation, word or other."""
        kind = self._kinds.get(char)
        if kind is None:
            pieces = [piece for piece, _ in self._split(f"a{char}a")]
            kind = self._kinds[char] = ("space" if pieces == ["a", "a"] else "punctuation" if pieces == ["a", char, "a"]
                                        else "word" if pieces == [f"a{char}a"] else "other")
        return kind

    @staticmethod
    def _learnable(block: int) -> bool:
        """The blocks that may be examined: the Basic Multilingual Plane bar surrogates and private use,
        and the emoji blocks. A fixed set of 234 blocks, so whatever the traffic, learning ends and its
        memory is bounded (~60,000 characters); other planes go to `tokenizers`."""
        return block < 0xD8 or 0xF9 <= block < 0x100 or 0x1F0 <= block < 0x1FB

    def _examine_block(self, block: int) -> set[str]:
        """Ask the tokenizer about each non-ASCII character of `block`; return those accepted."""
        accepted: set[str] = set()
        replaced: set[str] = set()
        word_chars: set[str] = set()
        punctuation: set[str] = set()
        for code in range(max(128, block << self._BLOCK_BITS), min((block + 1) << self._BLOCK_BITS, 0x110000)):
            char = chr(code)
            if 0xD800 <= code < 0xE000:
                continue  # surrogates cannot be encoded
            normalized = self._normalize(char)
            if unicodedata.combining(char) and normalized:
                # A combining mark the normalizer keeps: canonical reordering could move it past another.
                # One it deletes (an accent, a virama, a tone mark, when the tokenizer strips accents)
                # is safe: reordering only permutes combining marks, and every one that stays is refused.
                continue
            if any(unicodedata.combining(c) for c in normalized):
                continue
            if self._lowercase and normalized.lower() != normalized:
                continue  # the whole text is lowercased after the substitution: it must not change this
            kinds = {self._kind(c) for c in normalized if not c.isascii()}
            if "other" in kinds:
                continue
            replacement = "".join(" " if not c.isascii() and self._kind(c) == "space" else c for c in normalized)
            if any(c.isspace() and self._kind(c) != "space" for c in replacement):
                continue  # `str.split` would end a word here where BERT does not
            if replacement != char:
                self._replacements[char] = replacement
                replaced.add(char)
            word_chars.update(c for c in replacement if not c.isascii() and self._kind(c) == "word")
            punctuation.update(c for c in replacement if not c.isascii() and self._kind(c) == "punctuation")
            accepted.add(char)
        for name, chars in (("replace", replaced), ("word", word_chars), ("punctuation", punctuation)):
            if chars:
                self._classes[name].append(_character_class(chars))
        return accepted

    def _patterns(self) -> tuple[re.Pattern[str], re.Pattern[str]]:
        """The substitution that applies the normalizer, and the split into words and punctuation.

        One regex pass finds the few characters to replace: `str.translate` with a dict walks every
        character of a non-ASCII string in Python-level lookups, 4x slower.
        """
        to_replace = re.compile("[" + "".join(self._classes["replace"]) + "]")
        word_class = "A-Za-z0-9" + "".join(self._classes["word"])
        punctuation_class = r"!-/:-@\[-`{-~" + "".join(self._classes["punctuation"])
        return to_replace, re.compile(f"[{word_class}]+|[{punctuation_class}]")

    def _learn(self, text: str) -> None:
        """Examine up to `_BLOCKS_PER_TEXT` learnable blocks of `text`'s characters not examined yet."""
        blocks = {ord(char) >> self._BLOCK_BITS for char in set(text).difference(self._allowed)}
        pending = {block for block in blocks.difference(self._examined) if self._learnable(block)}
        if not pending:
            return
        with self._learning:
            # Another thread may have examined some of them while this one waited for the lock.
            new = sorted(pending.difference(self._examined))[: self._BLOCKS_PER_TEXT]
            if not new:
                return
            accepted = set().union(*(self._examine_block(block) for block in new))
            # Patterns first, the allowed set last: a text allowed by the new set finds its characters in them.
            self._to_replace, self._words = self._patterns()
            self._examined.update(new)
            self._allowed.update(accepted)

    def applies(self, text: str) -> bool:
        if not (text.isascii() or self._allowed.issuperset(text)):
            self._learn(text)
            if not self._allowed.issuperset(text):
                return False
        return not any(token in text for token in self._added)

    def encode(self, texts: list[str]) -> list[list[int]]:
        out = []
        cache, replacements = self._cache, self._replacements
        for text in texts:
            if text.isascii():
                text = text.translate(_ASCII_CONTROLS)
            else:
                text = self._to_replace.sub(lambda match: replacements[match.group()], text)
            if self._lowercase:
                text = text.lower()
            # Whitespace ends a word for BERT's pre-tokenizer as for `str.split` (characters that would
            # split differently are never accepted, see `_examine_block`), so each whitespace-separated
            # chunk is looked up whole: one dict lookup for "function," rather than a regex match
            # and two lookups.
            ids: list[int] = []
            for chunk in text.split():
                pieces = cache.get(chunk)
                ids += self._chunk_pieces(chunk) if pieces is None else pieces
            out.append(ids)
        return out

    def _chunk_pieces(self, chunk: str) -> list[int]:
        """Ids of a whitespace-free chunk, cached unless it is longer than any word WordPiece splits
        (such a chunk holds several words, each cached, or is one unknown word, found at once)."""
        cache = self._cache
        words = self._words.findall(chunk)
        if words == [chunk]:
            pieces = self._word_pieces(chunk)
        else:
            pieces = []
            for word in words:
                cached = cache.get(word)
                pieces += self._chunk_pieces(word) if cached is None else cached
        if len(chunk) <= self._max_word_chars:
            if len(cache) >= self._CACHE_LIMIT:
                cache.clear()
            cache[chunk] = pieces
        return pieces

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


def _character_class(chars: Iterable[str]) -> str:
    """A regex character class body for `chars`, runs of consecutive code points as ranges."""
    codes = sorted({ord(char) for char in chars})
    parts, start = [], 0
    while start < len(codes):
        end = start
        while end + 1 < len(codes) and codes[end + 1] == codes[end] + 1:
            end += 1
        first, last = re.escape(chr(codes[start])), re.escape(chr(codes[end]))
        parts.append(first if start == end else f"{first}-{last}")
        start = end + 1
    return "".join(parts)


def _special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Find the special tokens the tokenizer's template puts before and after the content."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ArtifactError("cannot locate the content inside the tokenizer's special-token template")
