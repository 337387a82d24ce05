"""What one labeling process runs, in either engine: its model, and labeling a chunk of parsed rows.

Each process (a local pool worker or a Ray actor) loads the model once, with one ONNX Runtime
thread: the engines label in parallel by running more processes.
"""

from __future__ import annotations

import json

from classifier.labeling_options import LabelOptions
from classifier.labeling_rows import ParsedRow
from classifier.policy import RoutingRequest
from classifier.runtime import ClassificationResult, TierClassifier

_worker_model: TierClassifier | None = None


def load_worker_model(model: str | None) -> None:
    """Load the model this process labels with (a pool worker, or a Ray actor)."""
    global _worker_model
    import classifier

    _worker_model = classifier.load(model, threads=1)


def label_chunk(rows: list[ParsedRow], options: LabelOptions) -> list[dict]:
    """Label one chunk; a bad row gets an error and null decision fields, the rest are unaffected."""
    assert _worker_model is not None, "worker not initialised"
    request = RoutingRequest(mode=options.mode, threshold=options.threshold)
    valid = [index for index, row in enumerate(rows) if row.error is None]
    results = _worker_model.classify_items([(rows[index].prompt, request) for index in valid])
    outcomes = dict(zip(valid, results, strict=True))
    # The policy the rows were routed by: a job that names neither a mode nor a threshold gets the
    # model's default mode, and says which (a later reader cannot know what the default was).
    mode = options.mode
    if mode is None and options.threshold is None:
        mode = _worker_model.manifest.policy.default_mode
    policy = json.dumps({"mode": mode, "threshold": options.threshold}, sort_keys=True)
    out = []
    for index, parsed in enumerate(rows):
        row: dict = {options.id_column: parsed.row_id}
        outcome = outcomes.get(index)
        if isinstance(outcome, ClassificationResult):
            row.update(tier=outcome.tier, scores=outcome.scores, threshold=outcome.threshold,
                       cheap_floor=outcome.cheap_floor, truncated=outcome.truncated, tokens=outcome.tokens,
                       decided_by=outcome.decided_by, familiarity=outcome.familiarity, error=None)
        else:
            problem = parsed.error or str(outcome)
            row.update(tier=None, scores=None, threshold=None, cheap_floor=None, truncated=None, tokens=None,
                       decided_by=None, familiarity=None, error=problem)
        row.update(model_version=_worker_model.model_version, policy=policy, **parsed.kept)
        out.append(row)
    return out
