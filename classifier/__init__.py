"""Promptier runtime: load an artifact and classify prompts into tiers. Imports no torch."""

from classifier.conversation import render_conversation
from classifier.errors import ArtifactError, InvalidInputError, ModelError, PromptierError
from classifier.policy import RoutingRequest
from classifier.runtime import DEFAULT_MODEL_DIR, ClassificationResult, TierClassifier, load

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ArtifactError",
    "ClassificationResult",
    "InvalidInputError",
    "ModelError",
    "PromptierError",
    "RoutingRequest",
    "TierClassifier",
    "load",
    "render_conversation",
]
