"""`promptier train`: logs + pool -> a calibrated, evaluated, exported artifact directory."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier.artifact import (
    MODEL_CARD_FILE,
    ArtifactManifest,
    CalibrationConfig,
    FamiliarityConfig,
    PolicyConfig,
    PriorConfig,
    TruncationConfig,
    save_manifest,
)
from classifier.runtime import TierClassifier
from classifier.runtime import load as load_artifact
from classifier.tokenization import PromptEncoder
from training.config import TrainConfig
from training.data import SkipReport, read_logs
from training.errors import DataError
from training.labels import PromptTable, build_table, prompt_hash, split_table
from training.pool import Pool, load_pool

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
SEEN_PROMPTS_FILE = "seen_prompts.txt"


@dataclass
class PreparedData:
    table: PromptTable
    split: np.ndarray
    pool: Pool
    skipped: SkipReport
    unused_models: dict[str, int]


def prepare_data(logs: Sequence[str | Path], pool_path: str | Path, config: TrainConfig,
                 skip_invalid: bool = False) -> PreparedData:
    pool = load_pool(pool_path)
    rows, skipped = read_logs(logs, skip_invalid=skip_invalid)
    table, unused = build_table(rows, pool)
    split = split_table(table, config.seed, config.val_fraction, config.test_fraction,
                        config.holdout_sources, config.holdout_categories)
    if not (split == "train").any() or not (split == "val").any():
        raise DataError("logs", f"too few prompts ({len(table)}) for a train and a validation split")
    return PreparedData(table, split, pool, skipped, unused)


def anchor_table(pool: Pool, config: TrainConfig) -> PromptTable | None:
    """The config's anchor prompts (none of them in the probe suite) as a table, or None."""
    if not config.anchors:
        return None
    from training.anchors import anchor_rows, assumed_outcomes
    from training.probes import load_probes

    rows = anchor_rows(pool.tier_names, config.anchors, config.seed, exclude=[p.prompt for p in load_probes()])
    n_tiers = len(pool.tier_names)
    prompts = [row["prompt"] for row in rows]
    return PromptTable(
        prompts=prompts, prompt_ids=[row["prompt_id"] for row in rows],
        sources=np.array([row["source"] for row in rows], dtype=object),
        categories=np.array([row["category"] for row in rows], dtype=object),
        targets=np.array([assumed_outcomes(row["category"], n_tiers) for row in rows]),
        costs=np.array([[pool.estimated_cost(k, len(text)) for k in range(n_tiers)] for text in prompts]),
        tier_names=pool.tier_names)


def read_unlabeled(paths: Sequence[str | Path]) -> list[str]:
    """Prompts without outcomes (JSONL or Parquet with a `prompt` column), for distillation."""
    from training.data import _records, expand_paths

    prompts = []
    for path in expand_paths(paths):
        for number, record in _records(path):
            if isinstance(record, DataError):
                raise record
            text = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(str(path), "missing or empty prompt", number, "prompt")
            prompts.append(text)
    return prompts


def _versions() -> dict[str, str]:
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "tokenizers": tokenizers.__version__}


def train(
    logs: Sequence[str | Path],
    pool_path: str | Path,
    out_dir: Path,
    config: TrainConfig,
    work_dir: Path | None = None,
    skip_invalid: bool = False,
    teacher: Path | None = None,
    unlabeled: Sequence[str | Path] = (),
    distill_weight: float = 0.5,
    model_version: str | None = None,
    command: str | None = None,
    evaluation_backbone: Path | None = None,
    cache_dir: Path | None = None,
) -> ArtifactManifest:
    """Train, calibrate, choose thresholds, export with a parity check, evaluate on the test split.

    With `teacher`, the targets blend the teacher artifact's probabilities (weight `distill_weight`)
    with the logged outcomes, and unknown outcomes and `unlabeled` prompts take the teacher's alone.
    With `evaluation_backbone`, the test-split evaluation includes the embedding baseline (embeddings
    kept in `cache_dir`).
    """
    import torch

    from training.calibration import apply_temperatures, fit_temperatures
    from training.evaluate import evaluate_split, sample_metrics
    from training.export import MIN_PARITY_PROMPTS, write_artifact
    from training.model import backbone_directory, build_model, load_encoder
    from training.model_card import render_model_card
    from training.probes import evaluate_probes
    from training.routing import always_top, curve_points, mode_thresholds, routing_curve
    from training.trainer import fit, predict_logits, tokenize_all

    started = time.time()
    work_dir = work_dir or out_dir.with_name(out_dir.name + ".work")
    data = prepare_data(logs, pool_path, config, skip_invalid)
    table, split = data.table, data.split
    log.info("%d prompts (%s); %s", len(table), {s: int((split == s).sum()) for s in ("train", "val", "test")},
             data.skipped.summary())
    backbone_dir = backbone_directory(config.backbone)
    tokenizer_file = backbone_dir / "tokenizer.json"
    truncation = TruncationConfig(max_tokens=config.max_tokens, head_chars=config.resolved_head_chars,
                                  tail_chars=config.resolved_tail_chars, head_fraction=config.head_fraction)
    encoder = PromptEncoder.from_file(tokenizer_file, truncation)

    torch.manual_seed(config.seed)
    model, architecture = build_model(config, load_encoder(backbone_dir), len(data.pool.tiers),
                                      pad_id=encoder.pad_id)

    train_index = np.flatnonzero(split == "train")
    train_texts = [table.prompts[i] for i in train_index]
    targets = table.targets[train_index]
    if teacher is not None:
        teacher_runtime = load_artifact(teacher, threads=config.threads)
        if teacher_runtime.tier_names != data.pool.tier_names:
            raise DataError(str(teacher), f"teacher tiers {teacher_runtime.tier_names} differ from the pool's "
                            f"{data.pool.tier_names}")
        extra = read_unlabeled(unlabeled) if unlabeled else []
        teacher_probs = _cached_teacher_probabilities(teacher_runtime, train_texts + extra, work_dir)
        targets = np.concatenate([blend(teacher_probs[: len(train_texts)], targets, distill_weight),
                                  teacher_probs[len(train_texts):]])
        train_texts = train_texts + extra
    anchors = anchor_table(data.pool, config)
    anchor_rows = len(anchors) * config.anchor_weight if anchors is not None else 0
    if anchors is not None:
        train_texts = train_texts + anchors.prompts * config.anchor_weight
        targets = np.concatenate([targets, *[anchors.targets] * config.anchor_weight])
    teacher_report = None
    if config.teacher is not None:
        distilled, teacher_report = _embedding_teacher_targets(config, backbone_dir, truncation, cache_dir,
                                                               train_texts, targets, table, split)
        # Anchors keep the outcomes they stand for: the teacher's softer guesses for them would blur
        # the very ends they are there to mark.
        logged = len(train_texts) - anchor_rows
        targets = np.concatenate([distilled[:logged], targets[logged:]])
    token_ids = tokenize_all(encoder, train_texts)
    fit(model, token_ids, targets, config, work_dir, description="student" if config.student else "train")

    val_index = np.flatnonzero(split == "val")
    val_texts = [table.prompts[i] for i in val_index]
    val_logits = predict_logits(model, tokenize_all(encoder, val_texts), description="validate")
    temperatures = fit_temperatures(val_logits, table.targets[val_index])
    val_probs = apply_temperatures(val_logits, temperatures)
    val_targets, val_costs = table.targets[val_index], table.costs[val_index]
    curve = routing_curve(val_probs, val_targets, val_costs, rule=config.policy_rule)
    top_quality, _ = always_top(val_targets, val_costs)
    thresholds = mode_thresholds(curve, top_quality, config.quality_bands)

    manifest = ArtifactManifest(
        model_version=model_version or f"promptier-{time.strftime('%Y%m%d-%H%M%S')}",
        tiers=data.pool.tier_specs(),
        policy=PolicyConfig(default_mode=config.default_mode, rule=config.policy_rule, thresholds=thresholds,
                            quality_bands=dict(config.quality_bands), curve=curve_points(curve)),
        calibration=CalibrationConfig(temperatures=temperatures),
        truncation=truncation,
        architecture=architecture,
        training={"config": config.model_dump(), "teacher": str(teacher) if teacher else None,
                  "distill_weight": distill_weight if teacher else None,
                  "logs": [str(p) for p in logs], "pool": str(pool_path), "command": command,
                  "prompts": {s: int((split == s).sum()) for s in ("train", "val", "test")},
                  "unlabeled_prompts": len(train_texts) - len(train_index) - anchor_rows,
                  "anchor_prompts": len(anchors) if anchors else 0,
                  "embedding_teacher": teacher_report,
                  "skipped_rows": dict(data.skipped.counts), "unused_models": data.unused_models,
                  "train_seconds": round(time.time() - started, 1)},
        data_fingerprint=table.fingerprint(),
        versions=_versions(),
    )
    parity_index = np.flatnonzero(split != "train")
    parity_texts = [table.prompts[i] for i in parity_index[: max(MIN_PARITY_PROMPTS, 1000)]]
    # One prompt far beyond the model's limit, so parity covers the truncation path too.
    parity_texts.append(" ".join(table.prompts[i] for i in parity_index[:40]))
    if len(parity_texts) < MIN_PARITY_PROMPTS:
        parity_texts += [table.prompts[i] for i in train_index[: MIN_PARITY_PROMPTS - len(parity_texts)]]

    def torch_logits(texts: Sequence[str]) -> np.ndarray:
        return predict_logits(model, tokenize_all(encoder, texts))

    seen = sorted({prompt_hash(table.prompts[i]) for i in np.flatnonzero(split != "test")})
    exported = model
    if config.familiarity is not None:
        exported, familiarity = _fit_familiarity(model, encoder, train_texts, table, split, data.pool, config)
        manifest = manifest.model_copy(update={"familiarity": familiarity})
    manifest, _ = write_artifact(exported, manifest, tokenizer_file, parity_texts, torch_logits, out_dir,
                                 config.quantize, extra_files={SEEN_PROMPTS_FILE: "\n".join(seen) + "\n"})
    test_index = np.flatnonzero(split == "test")
    metrics = {**manifest.metrics, "probes": evaluate_probes(load_artifact(out_dir))}
    if test_index.size:
        report = evaluate_split(out_dir, table, split, backbone_dir=evaluation_backbone, out_dir=out_dir,
                                cache_dir=cache_dir)
        metrics.update({"test": report["summary"], "test_sample": sample_metrics(out_dir, table)})
    manifest = manifest.model_copy(update={"metrics": metrics})
    manifest = manifest.model_copy(update={"training": {**manifest.training,
                                                        "total_seconds": round(time.time() - started, 1)}})
    save_manifest(manifest, out_dir)
    (out_dir / MODEL_CARD_FILE).write_text(render_model_card(manifest, out_dir), encoding="utf-8")
    return manifest


def _fit_familiarity(model: torch.nn.Module, encoder: PromptEncoder, train_texts: Sequence[str],
                     table: PromptTable, split: np.ndarray, pool: Pool, config: TrainConfig
                     ) -> tuple[torch.nn.Module, FamiliarityConfig]:
    """The model with its unfamiliarity output, and when the runtime should let the prior decide.

    The statistics come from the features of every prompt the model was trained on; the reference is
    prompts like them it never saw: the validation logs and anchors generated with another seed.
    """
    from training.anchors import anchor_rows
    from training.model import BagTierModel, WithUnfamiliarity, fit_feature_statistics
    from training.probes import load_probes
    from training.trainer import predict, tokenize_all

    spec = config.familiarity
    assert spec is not None and isinstance(model, BagTierModel)
    features = predict(model, tokenize_all(encoder, sorted(set(train_texts))), method="features")
    statistics = fit_feature_statistics(features, spec.directions)
    fresh: list[str] = []
    if config.anchors:  # anchors were trained on, so fresh ones are prompts like the training ones
        seen = set(train_texts) | {p.prompt for p in load_probes()}
        fresh = [row["prompt"] for row in anchor_rows(pool.tier_names, config.anchors, config.seed + 1,
                                                      exclude=seen)]
    reference_texts = [table.prompts[i] for i in np.flatnonzero(split == "val")] + fresh
    reference = predict(model, tokenize_all(encoder, reference_texts), method="features")
    unfamiliarity = statistics.unfamiliarity(reference)
    familiarity = FamiliarityConfig(
        threshold=float(np.quantile(unfamiliarity, spec.quantile)),
        reference=np.quantile(unfamiliarity, np.linspace(0, 1, 101)).tolist(),
        prior=PriorConfig(short_chars=spec.short_chars, long_chars=spec.long_chars))
    return WithUnfamiliarity(model, statistics), familiarity


def _embedding_teacher_targets(config: TrainConfig, backbone_dir: Path, truncation: TruncationConfig,
                               cache_dir: Path | None, texts: list[str], targets: np.ndarray, table: PromptTable,
                               split: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fit the embedding teacher on (texts, targets) and return the student's targets: its probabilities,
    blended with the known targets by `distill_weight`; and its validation APGR per source."""
    from training.embedding_teacher import fit_teacher, teacher_features, teacher_probabilities
    from training.evaluate import score_group

    spec = config.teacher
    assert spec is not None
    log.info("embedding teacher: features for %d prompts", len(texts))
    features = teacher_features(texts, backbone_dir, truncation, cache_dir)
    network = fit_teacher(features, targets, spec, config.seed)
    blended = blend(teacher_probabilities(network, features), targets, spec.distill_weight)
    val = np.flatnonzero(split == "val")
    val_probabilities = teacher_probabilities(
        network, teacher_features([table.prompts[i] for i in val], backbone_dir, truncation, cache_dir))
    report = {}
    for source in sorted(set(table.sources[val])):
        rows = table.sources[val] == source
        group = score_group({"teacher": val_probabilities[rows]}, table.targets[val][rows], table.costs[val][rows],
                            table.tier_names, config.policy_rule)
        report[source] = round(group["methods"]["teacher"]["apgr"], 4)
    log.info("embedding teacher: validation APGR %s", report)
    return blended, {"validation_apgr": report}


def blend(teacher: np.ndarray, targets: np.ndarray, weight: float) -> np.ndarray:
    """Distillation targets: `weight` x the teacher's probabilities + the rest from the logged outcomes;
    the teacher's alone where the outcome is unknown (NaN)."""
    return np.where(np.isnan(targets), teacher, weight * teacher + (1 - weight) * np.nan_to_num(targets))


def _cached_teacher_probabilities(runtime: TierClassifier, texts: Sequence[str], work_dir: Path,
                                  batch: int = 64) -> np.ndarray:
    """The teacher's probabilities for `texts`, kept in the work dir so that a resumed run skips them."""
    import hashlib

    from tqdm.auto import tqdm

    key = hashlib.sha256(runtime.model_version.encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    cache = work_dir / f"teacher-{key.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    parts = [runtime.probabilities(texts[i : i + batch])[0]
             for i in tqdm(range(0, len(texts), batch), desc="teacher", unit="batch")]
    probabilities = np.concatenate(parts)
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, probabilities)
    return probabilities
