"""Tiny models and synthetic routing logs, built locally: for tests, notebooks and demos without data.

The logs make difficulty learnable from words: easy prompts are solved by every tier, medium ones from
the medium tier up, hard ones only by the large tier; source `beta` has no large model (unknown outcomes).
"""

from __future__ import annotations

import json
import random
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
    vocab_list = special + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters]
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
