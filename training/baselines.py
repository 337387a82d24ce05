"""Baseline routers scored on the same rows as the model: random, prompt length, oracle, and a
logistic regression on the backbone's mean-pooled sentence embeddings (as in RouterBench)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from classifier.artifact import TruncationConfig
from classifier.tokenization import PromptEncoder

log = logging.getLogger(__name__)


def random_scores(n: int, n_tiers: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, n_tiers))


def oracle_scores(targets: np.ndarray) -> np.ndarray:
    """The logged outcomes themselves (unknown -> 0, never chosen anyway)."""
    return np.nan_to_num(targets, nan=0.0)


def _fit_soft_logistic(features: np.ndarray, targets: np.ndarray) -> LogisticRegression | float:
    """Logistic regression on soft targets: each row once as a success weighted y, once as a failure
    weighted 1 - y. Returns a constant when the targets leave nothing to fit."""
    if len(targets) == 0:
        return 0.5
    weights = np.concatenate([targets, 1.0 - targets])
    labels = np.concatenate([np.ones(len(targets)), np.zeros(len(targets))])
    if weights[labels == 1].sum() == 0 or weights[labels == 0].sum() == 0:
        return float(targets.mean())
    model = LogisticRegression(C=1.0, max_iter=2000)
    model.fit(np.concatenate([features, features]), labels, sample_weight=weights)
    return model


def per_tier_logistic(train_features: np.ndarray, train_targets: np.ndarray, eval_features: np.ndarray
                      ) -> np.ndarray:
    """One soft logistic regression per tier, each fitted on prompts whose outcome is known."""
    scores = np.zeros((len(eval_features), train_targets.shape[1]))
    for k in range(train_targets.shape[1]):
        known = ~np.isnan(train_targets[:, k])
        model = _fit_soft_logistic(train_features[known], train_targets[known, k])
        scores[:, k] = model if isinstance(model, float) else model.predict_proba(eval_features)[:, 1]
    return scores


def length_features(prompts: Sequence[str]) -> np.ndarray:
    return np.log1p(np.array([[len(p)] for p in prompts], dtype=np.float64))


def sentence_embeddings(prompts: Sequence[str], backbone_dir: Path, truncation: TruncationConfig,
                        cache_dir: Path | None = None, batch_size: int = 64, save_every: int = 50) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings from the pretrained backbone (not fine-tuned).

    With `cache_dir`, vectors are kept per prompt (one file per backbone and truncation), so evaluations
    that share prompts in other combinations, such as the folds of leave-one-source-out, embed each once.
    The cache is also written every `save_every` batches, so an interrupted run resumes where it stopped.
    """
    from training.labels import prompt_hash

    digest = hashlib.sha256()
    digest.update(str(backbone_dir.resolve()).encode())
    digest.update(truncation.model_dump_json().encode())
    cache_file = cache_dir / f"embeddings-{digest.hexdigest()[:20]}.npz" if cache_dir else None
    cached: dict[str, np.ndarray] = {}
    if cache_file is not None and cache_file.exists():
        cached = _read_cache(cache_file)
    keys = [prompt_hash(prompt) for prompt in prompts]
    missing = sorted({key: i for i, key in enumerate(keys) if key not in cached}.values())
    if missing:
        unsaved = 0
        for positions, vectors in embedded_batches([prompts[i] for i in missing], backbone_dir, truncation,
                                                   batch_size):
            cached.update(zip((keys[missing[i]] for i in positions), vectors, strict=True))
            unsaved += 1
            if cache_file is not None and unsaved >= save_every:
                _save_cache(cache_file, cached)
                unsaved = 0
        if cache_file is not None and unsaved:
            _save_cache(cache_file, cached)
    return np.stack([cached[key] for key in keys]) if keys else np.zeros((0, 0), dtype=np.float32)


def _read_cache(cache_file: Path) -> dict[str, np.ndarray]:
    """The cached embeddings; none (with a warning) from a file that cannot be read: a cache only saves
    time, and a damaged one (cut short by a full disk, say) must not stop the run that would rebuild it."""
    try:
        with np.load(cache_file) as stored:
            return dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        log.warning("embedding cache %s cannot be read (%s: %s); embedding again, and it is rewritten",
                    cache_file, type(error).__name__, error)
        return {}


def _save_cache(cache_file: Path, cached: dict[str, np.ndarray]) -> None:
    """Replace the cache file whole, so a reader never sees half of one. The temporary file is this
    writer's own: two runs sharing the cache (seeds side by side) must not write into one."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.stem}.", suffix=".npz")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, keys=np.array(list(cached)), vectors=np.stack(list(cached.values())))
        temporary.replace(cache_file)
    finally:
        temporary.unlink(missing_ok=True)


def embedded_batches(prompts: Sequence[str], backbone_dir: Path, truncation: TruncationConfig,
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each batch's positions in `prompts` and their sentence embeddings, shortest prompts first."""
    import torch
    from tqdm.auto import tqdm

    from training.model import load_encoder
    from training.trainer import _pad, tokenize_all

    encoder = PromptEncoder.from_file(backbone_dir / "tokenizer.json", truncation)
    token_ids = tokenize_all(encoder, prompts)
    model = load_encoder(backbone_dir).eval()
    order = np.argsort([len(x) for x in token_ids], kind="stable")
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="MiniLM sentence embeddings", unit="batch"):
            batch = order[start : start + batch_size]
            ids, mask = _pad([token_ids[i] for i in batch])
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            yield batch, torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
