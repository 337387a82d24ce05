"""Training configuration: validated, stored in the artifact, loadable from YAML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from classifier.artifact import MAX_CUT_CHARS
from classifier.yaml_files import load_yaml

DEFAULT_BACKBONE = "minilm-l6"
RECIPES_DIR = Path(__file__).parent / "configs"  # the recipes, installed with the package
SHIPPED_RECIPE = RECIPES_DIR / "default.yaml"
DeviceName = Literal["auto", "cpu", "cuda"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]


class StudentConfig(BaseModel):
    """A narrow encoder built from a teacher: its token embeddings projected to `hidden` by PCA."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["transformer"] = "transformer"
    hidden: int = Field(default=128, ge=16)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=2, ge=1)
    intermediate: int = Field(default=512, ge=16)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> StudentConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return self


class BagStudentConfig(BaseModel):
    """An attention-free student: the teacher's token embeddings (PCA to `embedding_dim`), pooled
    by their mean and by `pooling_heads` learned per-token weightings, read by a small MLP.

    Its cost per token is one table lookup, so a prompt costs about as much to classify as to
    tokenize; the transformer student pays a dense layer stack per token.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bag"]
    embedding_dim: int = Field(default=256, ge=8)
    pooling_heads: int = Field(default=3, ge=1, description="learned attention-pooling heads beside the mean")
    mlp_hidden: int = Field(default=512, ge=8)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    length_feature: bool = Field(default=False, description="give the MLP the log of the prompt's token count: "
                                 "pooling averages it away, and length is a strong difficulty signal")
    edge_tokens: int = Field(default=0, ge=0, le=64, description="also pool the first and the last this many "
                             "tokens by their mean (0: not): what a prompt asks is mostly at one end, and a "
                             "whole-prompt mean lets a long pasted text drown it")


class EmbeddingTeacherConfig(BaseModel):
    """An MLP on the backbone's frozen sentence embeddings, trained first; its probabilities are the
    student's targets (training/embedding_teacher.py)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["embedding-mlp"] = "embedding-mlp"
    hidden: int = Field(default=256, ge=8)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    distill_weight: float = Field(default=1.0, ge=0, le=1, description="weight of the teacher's probabilities in "
                                  "the student's targets, against the logged outcomes (1 = pure distillation)")


class FamiliarityTrainConfig(BaseModel):
    """Measure how unlike the training prompts a prompt is, and let the prior route the most unlike
    (classifier.artifact.FamiliarityConfig, classifier/prior.py). Bag students only."""

    model_config = ConfigDict(extra="forbid")
    directions: int = Field(default=64, ge=1, description="principal directions of the training features used")
    quantile: float = Field(default=0.99, gt=0, lt=1, description="share of held-out training-like prompts "
                            "(validation logs and fresh anchors) the model still decides; beyond it, the prior")
    short_chars: int = Field(default=200, ge=1, description="the prior's cheapest tier: this short and not technical")
    long_chars: int = Field(default=2000, ge=1, description="the prior's top tier: this long, or technical")

    @model_validator(mode="after")
    def _short_below_long(self) -> FamiliarityTrainConfig:
        if self.short_chars >= self.long_chars:  # found here, not when the trained model is exported
            raise ValueError("short_chars must be less than long_chars (a prompt cannot be both)")
        return self


class TrainConfig(BaseModel):
    """Everything that decides a training run. Two runs with equal configs and data give equal models."""

    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(default=DEFAULT_BACKBONE, description="'minilm-l6' or a Hugging Face model directory")
    student: StudentConfig | BagStudentConfig | None = Field(default=None, discriminator="kind")
    max_tokens: int = Field(default=128, ge=8, le=512)
    head_fraction: float = Field(default=0.5, gt=0, le=1)
    # Characters kept before tokenizing: enough for the head and tail token windows with margin
    # (English runs ~4.2 characters a token), and no more, since tokenizing is most of the runtime.
    head_chars: int | None = Field(default=None, ge=16, le=MAX_CUT_CHARS,
                                   description="default: 8 x the head's share of max_tokens")
    tail_chars: int | None = Field(default=None, ge=0, le=MAX_CUT_CHARS,
                                   description="default: 6 x the tail's share of max_tokens")
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=8e-5, gt=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    freeze_embeddings: bool = Field(default=True, description="the vocabulary table dominates parameters and "
                                    "optimizer time; the encoder layers adapt instead")
    anchors: int = Field(default=0, ge=0, description="anchor prompts of obvious difficulty (training/anchors.py) "
                         "added to the training split, up to this many of each kind; 0 = none")
    anchor_weight: int = Field(default=1, ge=1, description="how many times each anchor counts in training")
    chat_anchors: bool = Field(default=False, description="add the opening turns of the conversations on the "
                               "training half of the topics of a human-written chat corpus "
                               "(training/chat_anchors.py) to the anchors, as easy prompts")
    chat_anchor_weight: int | None = Field(default=None, ge=1, description="how many times each chat opener counts "
                                           "in training; unset, as many times as a generated anchor (anchor_weight)")
    teacher: EmbeddingTeacherConfig | None = Field(default=None, description="train an embedding teacher first and "
                                                   "fit the model to its probabilities")
    familiarity: FamiliarityTrainConfig | None = None
    seed: int = 13
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    holdout_sources: list[str] = Field(default_factory=list)
    holdout_categories: list[str] = Field(default_factory=list)
    quality_bands: dict[str, float] = Field(
        default_factory=lambda: {"quality": 0.005, "balanced": 0.02, "cost": 0.06},
        description="how far below the top tier's validation quality each mode may go",
    )
    default_mode: str = "balanced"
    outcome_rows: Literal["all", "explored"] = Field(
        default="all", description="which answered requests of a dispatcher's decision log train: all, or only "
        "those whose tier exploration drew at random (unbiased; serving/dispatch/exploration.py)")
    cheap_floor_modes: list[str] = Field(
        default_factory=list, description="modes given a cheap floor (classifier.policy), chosen on the probe "
        "suite's selection half; none by default")
    policy_rule: Literal["ratio", "difference"] = Field(
        default="difference", description="how a tier's probability is compared with the top tier's "
        "(classifier.policy.relative_scores)")
    checkpoint_every: int = Field(default=50, ge=1)
    threads: int = Field(default=2, ge=1)
    device: DeviceName = Field(default="auto", description="where to train: 'auto' takes a GPU when torch sees one "
                               "(training/devices.py)")
    precision: PrecisionName = Field(default="auto", description="arithmetic on a GPU: 'auto' is bf16 where the "
                                     "GPU has it, else fp16 (autocast); always fp32 on a CPU")
    fused_optimizer: bool | None = Field(default=None, description="AdamW's fused kernel: several times faster "
                                         "steps on a CPU for a large vocabulary table, equal up to float rounding; "
                                         "default: on for GPUs, off on a CPU (so that recipes rebuild bit for bit)")
    streaming: bool = Field(default=False, description="read the logs as a stream (training/streaming.py): memory "
                            "bounded by the prompts held out, not the rows; the split is decided by each prompt's "
                            "hash, so it differs from the in-memory split")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps (for "
                                  "benchmarks); the learning-rate schedule still spans `epochs`")
    quantize: bool = True

    @field_validator("student", mode="before")
    @classmethod
    def _transformer_is_the_default_kind(cls, value: object) -> object:
        # Configs written before there were two kinds of student have no `kind`.
        if isinstance(value, dict) and "kind" not in value:
            return {**value, "kind": "transformer"}
        return value

    @model_validator(mode="after")
    def _familiarity_needs_a_bag_student(self) -> TrainConfig:
        if self.familiarity is not None and not isinstance(self.student, BagStudentConfig):
            raise ValueError("familiarity is measured on a bag student's features; set student.kind: bag")
        return self

    @model_validator(mode="after")
    def _chat_weight_needs_chat_anchors(self) -> TrainConfig:
        if self.chat_anchor_weight is not None and not self.chat_anchors:
            raise ValueError("chat_anchor_weight counts chat openers, which this config leaves out: set "
                             "chat_anchors: true, or drop chat_anchor_weight")
        return self

    @property
    def resolved_head_chars(self) -> int:
        return self.head_chars if self.head_chars is not None else math.ceil(8 * self.max_tokens * self.head_fraction)

    @property
    def resolved_tail_chars(self) -> int:
        return self.tail_chars if self.tail_chars is not None else math.ceil(
            6 * self.max_tokens * (1 - self.head_fraction))


def recipe_path(path: str | Path) -> Path:
    """`path` if it exists; else the recipe of the package it names, by name (`default`, `default.yaml`) or by
    its path in a checkout (`training/configs/default.yaml`), so that the commands the READMEs and model
    cards give work where the package is installed without a checkout.

    Raises:
        FileNotFoundError: neither, naming the recipes there are.
    """
    given = Path(path)
    if given.exists():
        return given
    name = given.name if given.suffix else given.name + ".yaml"
    if given.parent in (Path("."), Path("training/configs")) and (RECIPES_DIR / name).is_file():
        return RECIPES_DIR / name
    recipes = ", ".join(sorted(recipe.stem for recipe in RECIPES_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file {str(given)!r}; the package's recipes, by name: {recipes}")


def load_config(path: str | Path | None, **overrides: object) -> TrainConfig:
    """Read a YAML config (a file, or a recipe of the package by name: `recipe_path`) or the defaults,
    then apply non-None overrides.

    Raises:
        ValueError: invalid YAML (a key written twice included), a file that is not a mapping, or an
            invalid field; FileNotFoundError: no such file or recipe.
    """
    raw: dict = {}
    if path is not None:
        file = recipe_path(path)
        try:
            loaded = load_yaml(file.read_text(encoding="utf-8"), str(file)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{file}: cannot read config: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: a training config is a mapping of settings, got {type(loaded).__name__}")
        raw = loaded
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return TrainConfig.model_validate(raw)
