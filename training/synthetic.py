"""Tiny models and synthetic routing logs, built locally: for tests, notebooks and demos without data.

The logs make difficulty learnable from words: easy prompts are solved by every tier, medium ones from
the medium tier up, hard ones only by the large tier; source `beta` has no large model (unknown outcomes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS = (
    "hello thanks please what is the capital of france name a color "
    "say hi translate cat dog prove theorem derive integral optimize algorithm complexity "
    "quantum entropy eigenvalue lemma explain why how code python function list sort "
    "reverse string number answer question "
).split()
EASY = ["hello", "thanks", "capital", "france", "color", "hi", "cat", "dog", "say"]
HARD = ["prove", "theorem", "derive", "integral", "eigenvalue", "lemma", "quantum", "entropy"]
MEDIUM = ["code", "python", "function", "sort", "algorithm", "complexity", "optimize"]

POOL_YAML = """
tiers:
  - name: small
    usd_per_mtok: {input: 0.2, output: 0.2}
  - name: medium
    usd_per_mtok: {input: 0.9, output: 0.9}
  - name: large
    usd_per_mtok: {input: 1.25, output: 5.0}
sources:
  alpha: {small: a-7b, medium: a-70b, large: a-frontier}
  beta: {small: b-8b, medium: b-51b}
"""


def build_tiny_backbone(directory: Path) -> Path:
    """A 2-layer, hidden-32 BERT with a word-level WordPiece vocabulary, saved like a HF model dir."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!")
    # Once each: a word that is also a letter would leave a hole in the ids, which the model's
    # embedding table (one row per token) does not have.
    vocab_list = list(dict.fromkeys(special + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters]))
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.decoder = decoders.WordPiece()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def synthetic_rows(n_prompts: int = 600, seed: int = 0) -> list[dict]:
    """Outcome rows where difficulty is learnable from words: easy prompts are solved by every tier,
    medium ones from the medium tier up, hard ones only by the large tier. Source beta has no large model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        level = i % 3
        vocabulary = (EASY, MEDIUM, HARD)[level]
        words = [rng.choice(vocabulary) for _ in range(rng.randint(3, 12))]
        words += [rng.choice(WORDS) for _ in range(rng.randint(0, 4))]
        prompt = " ".join(words) + f" {i}"
        source = "alpha" if i % 4 else "beta"
        models = {"alpha": ["a-7b", "a-70b", "a-frontier"], "beta": ["b-8b", "b-51b"]}[source]
        for tier, model in enumerate(models):
            noisy = rng.random() < 0.05
            score = float((tier >= level) != noisy)
            rows.append({"prompt_id": f"{source}:{i}", "prompt": prompt, "model": model, "score": score,
                         "cost_usd": None, "source": source, "category": ("easy", "medium", "hard")[level]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


_MODELS = {"alpha": ["a-7b", "a-70b", "a-frontier"], "beta": ["b-8b", "b-51b"]}
_LEVELS = ("easy", "medium", "hard")
# Every 50th prompt is logged again later (another request with the same text): the reader must merge them.
_REPEAT_EVERY, _REPEAT_LAG = 50, 24
_WORD_ARRAYS = [__import__("numpy").array(words, dtype=object) for words in (EASY, MEDIUM, HARD, WORDS)]


def _long_prompt(seed: int, index: int, chars: int) -> tuple[str, int, str]:
    """Prompt `index` of a long-prompt log: (text, difficulty level, source), a function of (seed, index)."""
    import numpy as np

    if index % _REPEAT_EVERY == _REPEAT_EVERY - 1:
        index -= _REPEAT_LAG
    rng = np.random.default_rng([seed, index])
    level = index % 3
    vocabulary = _WORD_ARRAYS[level]
    # One word in four carries the difficulty; the rest is filler from the whole vocabulary. Shortest
    # words are 2 characters and a space: chars // 3 words always reach `chars`.
    count = chars // 3 + 1
    words = np.where(rng.random(count) < 0.25, vocabulary[rng.integers(len(vocabulary), size=count)],
                     _WORD_ARRAYS[3][rng.integers(len(WORDS), size=count)])
    ends = np.cumsum(np.char.str_len(words.astype(str)) + 1)
    words = words[: int(np.searchsorted(ends, chars)) + 1]
    return " ".join(words.tolist()) + f" {index}", level, "alpha" if index % 4 else "beta"


def rows_for_distinct_prompts(prompts: int) -> int:
    """The fewest rows of `iter_long_rows` that hold `prompts` distinct prompts: each prompt has a row per
    tier of its source, and the repeats count once (no text is generated)."""
    emitted = distinct = index = 0
    while True:
        repeat = index % _REPEAT_EVERY == _REPEAT_EVERY - 1
        if not repeat:
            distinct += 1
            if distinct >= prompts:
                return emitted + 1  # its first row
        emitted += len(_MODELS["alpha" if (index - _REPEAT_LAG * repeat) % 4 else "beta"])
        index += 1


def iter_long_rows(n_rows: int, prompt_chars: int = 1000, seed: int = 0) -> Iterator[dict]:
    """`n_rows` outcome rows of `prompt_chars`-character prompts, one at a time (nothing accumulates).

    The difficulty rule of `synthetic_rows`, with prompts long enough to stand for real traffic
    (1 KB by default) and every 50th prompt repeated later in the log.
    """
    rng = random.Random(seed)
    emitted = 0
    index = 0
    while emitted < n_rows:
        prompt, level, source = _long_prompt(seed, index, prompt_chars)
        for tier, model in enumerate(_MODELS[source]):
            if emitted == n_rows:
                break
            noisy = rng.random() < 0.05
            yield {"prompt_id": f"{source}:{index}", "prompt": prompt, "model": model,
                   "score": float((tier >= level) != noisy), "cost_usd": None, "source": source,
                   "category": _LEVELS[level]}
            emitted += 1
        index += 1


def write_parquet_shards(directory: Path, n_rows: int, prompt_chars: int = 1000, seed: int = 0,
                         shard_rows: int = 250_000, row_group_rows: int = 50_000) -> list[Path]:
    """Write `iter_long_rows` to Parquet shards of `shard_rows` rows, a row group at a time: memory
    stays at one row group however many rows are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("model", pa.string()),
                        ("score", pa.float64()), ("cost_usd", pa.float64()), ("source", pa.string()),
                        ("category", pa.string())])
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    group: list[dict] = []
    in_shard = 0

    def flush() -> None:
        if group:
            assert writer is not None
            writer.write_batch(pa.RecordBatch.from_pylist(group, schema=schema))
            group.clear()

    for row in iter_long_rows(n_rows, prompt_chars, seed):
        if writer is None or in_shard == shard_rows:
            flush()
            if writer is not None:
                writer.close()
            paths.append(directory / f"part-{len(paths):05d}.parquet")
            writer = pq.ParquetWriter(paths[-1], schema)
            in_shard = 0
        group.append(row)
        in_shard += 1
        if len(group) == row_group_rows:
            flush()
    flush()
    if writer is not None:
        writer.close()
    return paths
