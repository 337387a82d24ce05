"""The checks that keep a model's failure from becoming a routing decision: its outputs on every
call, and a probe of the whole artifact before anything is served."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from classifier.errors import ArtifactError, ModelError
from classifier.tokenization import PromptEncoder

# A loaded model's run on some texts: logits, unfamiliarity (None without it), and what else it returns.
ModelRun = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray | None, object]]


def require_finite(logits: np.ndarray, unfamiliarity: np.ndarray | None, count: int) -> None:
    """A NaN score passes or fails every threshold comparison alike and so routes with full confidence:
    such a batch is a model failure, never a decision.

    Raises:
        ModelError: the outputs have the wrong shape or a non-finite value.
    """
    if logits.ndim != 2 or logits.shape[0] != count or (unfamiliarity is not None and unfamiliarity.shape != (count,)):
        raise ModelError(f"the model's outputs have shapes {logits.shape}"
                         + (f" and {unfamiliarity.shape}" if unfamiliarity is not None else "")
                         + f" for {count} prompt(s)")
    bad = ~np.isfinite(logits).all(axis=1)
    if unfamiliarity is not None:
        bad |= ~np.isfinite(unfamiliarity)
    if bad.any():
        raise ModelError(f"the model gave non-finite scores for {int(bad.sum())} of {count} prompt(s)")


def probe(run: ModelRun, tiers: int, session: ort.InferenceSession, encoder: PromptEncoder) -> None:
    """Run the model as serving will before anything is served: a batch of two prompts of different
    lengths, one filling the token window, and the tokenizer's highest id (a vocabulary larger than the
    model's embedding table fails only on the prompts that use its last tokens).

    Raises:
        ArtifactError: the model failed, or its outputs have the wrong shape or a non-finite value.
    """
    texts = ["Is this artifact able to classify a prompt?", " ".join(["probe"] * 2 * encoder.truncation.max_tokens)]
    try:
        logits, unfamiliarity, _ = run(texts)
    except ModelError as exc:
        raise ArtifactError(f"the model failed on probe prompts: {exc}") from exc
    if logits.ndim == 2 and logits.shape[0] == len(texts) and logits.shape[1] != tiers:
        raise ArtifactError(f"the model outputs {logits.shape[1]} scores per prompt but the manifest has {tiers} tiers")
    highest = np.array([[encoder.highest_id] * 3], dtype=np.int64)
    try:
        require_finite(logits, unfamiliarity, len(texts))
        session.run(None, {"input_ids": highest, "attention_mask": np.ones_like(highest)})
    except Exception as exc:  # ModelError, or ONNX Runtime's own error for an id beyond the table
        raise ArtifactError(f"the model failed on probe prompts: {exc}") from exc
