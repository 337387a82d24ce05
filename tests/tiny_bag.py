"""The smallest model the training loop can train, for tests of the loop's mechanics (needs torch)."""

from __future__ import annotations

import torch
from torch import nn


class TinyBag(nn.Module):
    """Mean of token embeddings -> one logit per tier: enough model for the loop's mechanics."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embeddings(input_ids) * mask).sum(1) / mask.sum(1))
