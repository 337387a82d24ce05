"""The in-recipe teacher: an MLP on the backbone's frozen sentence embeddings.

The shipped student reads a bag of token vectors; it cannot afford a transformer per prompt. A
frozen sentence encoder reads whole sentences, and an MLP on its embeddings learns the routing
targets in seconds once the embeddings are computed (they are cached per prompt). Its probabilities
become the student's targets: the student learns what the encoder's representation knows, on every
prompt it is trained on, instead of each prompt's single noisy outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from classifier.artifact import TruncationConfig
from training.config import EmbeddingTeacherConfig


def teacher_features(prompts: Sequence[str], backbone_dir: Path, truncation: TruncationConfig,
                     cache_dir: Path | None) -> np.ndarray:
    """Sentence embeddings plus the log of the prompt's length in characters (what truncation hides)."""
    from training.baselines import sentence_embeddings

    embeddings = sentence_embeddings(prompts, backbone_dir, truncation, cache_dir)
    log_chars = (np.log1p(np.array([[len(p)] for p in prompts], dtype=np.float32)) - 6.0) / 2.0
    return np.concatenate([embeddings, log_chars], axis=1).astype(np.float32)


def fit_teacher(features: np.ndarray, targets: np.ndarray, config: EmbeddingTeacherConfig, seed: int) -> nn.Module:
    """An MLP with one logit per tier, fitted with masked soft-target BCE (NaN targets are unknown)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(features.shape[1], config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                            nn.Linear(config.hidden, targets.shape[1]))
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    x = torch.from_numpy(features)
    y = torch.tensor(targets, dtype=torch.float32)
    network.train()
    for _ in tqdm(range(config.epochs), desc="embedding teacher", unit="epoch"):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            known = ~torch.isnan(y[batch])
            loss = nn.functional.binary_cross_entropy_with_logits(network(x[batch])[known], y[batch][known])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    network.eval()
    return network


@torch.no_grad()
def teacher_probabilities(network: nn.Module, features: np.ndarray) -> np.ndarray:
    return torch.sigmoid(network(torch.from_numpy(features))).numpy().astype(np.float64)
