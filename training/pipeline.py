"""`promptier train`: logs + pool -> a calibrated, evaluated, exported artifact directory."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier.artifact import (
    ArtifactManifest,
    CalibrationConfig,
    FamiliarityConfig,
    PolicyConfig,
    PriorConfig,
    TruncationConfig,
    save_manifest,
)
from classifier.artifact_layout import MODEL_CARD_FILE, SEEN_PROMPTS_FILE, staged_artifact, write_member_text
from classifier.errors import ArtifactError, PromptierError
from classifier.runtime import load as load_artifact
from classifier.tokenization import PromptEncoder
from training.config import TrainConfig
from training.errors import DataError
from training.inputs import (
    TRAINSET_DIR,
    TrainingInputs,
    in_memory_inputs,
    require_every_tier_known,
    streamed_inputs,
    vocab_size,
    with_previous_seen,
)
from training.labels import PromptTable
from training.memory import peak_rss_mb
from training.pool import Pool, load_pool

if TYPE_CHECKING:
    import torch

    from classifier.artifact import Rule
    from training.model import FeatureStatistics, WithUnfamiliarity
    from training.token_store import TokenStore

log = logging.getLogger(__name__)
HELDOUT_CHUNK = 4096  # prompts tokenized and scored at a time where all of them at once would cost memory


def _check_unlabeled(unlabeled: Sequence[str | Path], config: TrainConfig, teacher: Path | None) -> None:
    """Refuse unlabeled prompts the run could not learn from, before any log is read: ignoring them
    would train a model that silently lacks the traffic it was given."""
    if teacher is None and config.teacher is None:
        raise DataError(str(unlabeled[0]), "unlabeled prompts are learned from a teacher's labels: pass --teacher "
                        "or use a recipe with an embedding teacher (training/configs/default.yaml)")
    if config.streaming:
        raise DataError(str(unlabeled[0]), "unlabeled prompts are labelled by a teacher, which a streamed run cannot "
                        "use (it keeps no prompt text): set streaming: false, or leave out the unlabeled prompts")


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
    init_from: Path | None = None,
    compare_with: Path | None = None,
) -> ArtifactManifest | None:
    """Train, calibrate, choose thresholds, export with a parity check, evaluate on the test split.

    With `teacher`, the targets blend the teacher artifact's probabilities (weight `distill_weight`)
    with the logged outcomes, and unknown outcomes and `unlabeled` prompts take the teacher's alone.
    With `evaluation_backbone`, the test-split evaluation includes the embedding baseline (embeddings
    kept in `cache_dir`).

    With `init_from` (a training checkpoint), the model starts from its weights instead of the
    backbone's (a fresh optimizer and schedule); with `compare_with` (an artifact), the test split's
    prompts that artifact never saw are scored by both, in the manifest's `metrics.retrain`. The prompts
    that artifact saw (its ancestors' among them) count as seen by the new one: they are in its seen
    prompts and out of its test evaluation.

    Under `torchrun` (several processes), the main process reads the logs and writes the training
    set to the work dir; every process trains on its share of each batch; only the main one writes
    checkpoints and the artifact, and returns the manifest. The others return None.

    The main process holds the work dir's lock for the whole run (training.work_lock): a second run
    on the same work dir is refused, not let loose on the first one's checkpoints.

    Raises:
        ArtifactError: the work dir is inside `out_dir`.
        PromptierError: another run holds the work dir (and errors of the run itself).
    """
    from training.devices import torchrun_environment
    from training.work_lock import out_lock, work_dir_lock

    check_model_version(model_version)
    work_dir = work_dir or out_dir.with_name(out_dir.name + ".work")
    if Path(os.path.abspath(work_dir)).is_relative_to(os.path.abspath(out_dir)):
        # The new artifact replaces OUT whole: a work dir inside it would be refused (or lost) only once
        # the whole run was done, at every rerun.
        raise ArtifactError(f"the work dir {work_dir} is inside {out_dir}, which the new artifact replaces whole: "
                            "give --work-dir a folder beside it (the default is OUT.work)")
    # Only the main process writes the work dir and OUT: the others of a distributed run read what it wrote.
    main = torchrun_environment()[0] == 0
    with work_dir_lock(work_dir) if main else contextlib.nullcontext(), \
            out_lock(out_dir) if main else contextlib.nullcontext():
        import torch

        from training.devices import placed
        from training.model import backbone_directory, build_model, load_encoder
        from training.token_store import load_examples, write_training_set
        from training.trainer import fit

        if unlabeled:
            _check_unlabeled(unlabeled, config, teacher)
        started = time.time()
        pool = load_pool(pool_path)
        backbone_dir = backbone_directory(config.backbone)
        tokenizer_file = backbone_dir / "tokenizer.json"
        truncation = TruncationConfig(max_tokens=config.max_tokens, head_chars=config.resolved_head_chars,
                                      tail_chars=config.resolved_tail_chars, head_fraction=config.head_fraction)
        encoder = PromptEncoder.from_file(tokenizer_file, truncation)
        with placed(config.device, config.precision) as place:
            inputs = None
            if place.is_main:
                inputs = (streamed_inputs(logs, pool, config, encoder, tokenizer_file, work_dir, skip_invalid, teacher)
                          if config.streaming else
                          in_memory_inputs(logs, pool, config, encoder, backbone_dir, truncation, work_dir,
                                           skip_invalid, teacher, unlabeled, distill_weight, cache_dir))
                if init_from is None:  # a continued model keeps what it learned of a tier the new logs lack
                    require_every_tier_known(inputs.table, pool.tier_names)
                if compare_with is not None:
                    inputs = with_previous_seen(inputs, compare_with)
            stages = {"inputs": round(time.time() - started, 1)}
            peaks = {"inputs": peak_rss_mb()}
            torch.manual_seed(config.seed)
            model, architecture = build_model(config, load_encoder(backbone_dir), len(pool.tiers),
                                              pad_id=encoder.pad_id)
            starting_run = _load_weights(model, init_from) if init_from is not None else None
            tokens, targets = (inputs.tokens, inputs.targets) if inputs is not None else ([], np.zeros(0))
            if place.distributed:
                if inputs is not None and isinstance(inputs.tokens, list):
                    write_training_set(work_dir / TRAINSET_DIR, inputs.tokens, inputs.targets,
                                       vocab_size(tokenizer_file))
                place.wait_for_main()
                tokens, targets = load_examples(work_dir / TRAINSET_DIR)
            fit_report: dict = {}
            fit(model, tokens, targets, config, work_dir, description="student" if config.student else "train",
                placement=place, report=fit_report, starting_run=starting_run)
            stages["model_and_fit"] = round(time.time() - started - stages["inputs"], 1)
            peaks["model_and_fit"] = peak_rss_mb()
        if inputs is None:
            return None
        run = _Run(logs=logs, pool_path=pool_path, out_dir=out_dir, work_dir=work_dir, teacher=teacher,
                   distill_weight=distill_weight, model_version=model_version, command=command,
                   evaluation_backbone=evaluation_backbone, cache_dir=cache_dir, init_from=init_from,
                   compare_with=compare_with, started=started, stages=stages, peaks=peaks)
        return _finish(model, architecture, inputs, pool, config, encoder, tokenizer_file, fit_report, run)


# A version names directories (OUT.retrain-VERSION.work, OUT.previous-VERSION) and metric labels.
_MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_model_version(version: str | None) -> None:
    """Refuse a model version that cannot name a directory: continuing or promoting the model would
    fail only after a whole run.

    Raises:
        PromptierError: not letters, digits, `.`, `_`, `+` and `-` (first a letter or digit, 128 at most).
    """
    if version is not None and not _MODEL_VERSION.fullmatch(version):
        raise PromptierError(f"--model-version {version!r}: use letters, digits, '.', '_', '+' and '-' (starting "
                             "with a letter or digit, 128 at most); it names the directories a continuation writes")


def _load_weights(model: torch.nn.Module, checkpoint: Path) -> str:
    """Start from a training checkpoint's weights; returns what identifies them (the key of the run that
    wrote the checkpoint, else a digest of its file), which becomes part of the continuing run's key.

    Raises:
        ValueError: the checkpoint is of another architecture.
    """
    from training.trainer import load_checkpoint

    state = load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state.get("model", state))
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not fit this config's architecture: {str(exc)[:300]}") from exc
    key = state.get("run_key")
    return str(key) if key else hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:32]


@dataclass
class _Run:
    """One `train` call's arguments that the finishing stage needs, and what the run measured so far."""

    logs: Sequence[str | Path]
    pool_path: str | Path
    out_dir: Path
    work_dir: Path
    teacher: Path | None
    distill_weight: float
    model_version: str | None
    command: str | None
    evaluation_backbone: Path | None
    cache_dir: Path | None
    init_from: Path | None
    compare_with: Path | None
    started: float
    stages: dict[str, float]
    peaks: dict[str, float]


def _finish(model: torch.nn.Module, architecture: dict, inputs: TrainingInputs, pool: Pool, config: TrainConfig,
            encoder: PromptEncoder, tokenizer_file: Path, fit_report: dict, run: _Run) -> ArtifactManifest:
    """Calibrate, choose thresholds, fit familiarity, export with the parity check, evaluate (main process)."""
    from training.calibration import apply_temperatures, fit_temperatures
    from training.export import MIN_PARITY_PROMPTS, check_parity_set, export_into, library_versions
    from training.model_card import render_model_card
    from training.routing import always_top, curve_points, mode_thresholds, routing_curve
    from training.streaming import write_hashes
    from training.trainer import (
        CHECKPOINT_FILE,
        FAMILIARITY_STATISTICS,
        add_to_checkpoint,
        predict_logits,
        tokenize_all,
    )

    table, split, peaks, started, out_dir = inputs.table, inputs.split, run.peaks, run.started, run.out_dir
    val_index = np.flatnonzero(split == "val")
    val_texts = [table.prompts[i] for i in val_index]
    if inputs.streamed:
        val_logits = np.concatenate([predict_logits(model, tokenize_all(encoder, val_texts[i : i + HELDOUT_CHUNK]))
                                     for i in range(0, len(val_texts), HELDOUT_CHUNK)])
    else:
        val_logits = predict_logits(model, tokenize_all(encoder, val_texts), description="validate")
    peaks["validate"] = peak_rss_mb()
    temperatures = fit_temperatures(val_logits, table.targets[val_index])
    val_probs = apply_temperatures(val_logits, temperatures)
    val_targets, val_costs = table.targets[val_index], table.costs[val_index]
    curve = routing_curve(val_probs, val_targets, val_costs, rule=config.policy_rule)
    top_quality, _ = always_top(val_targets, val_costs)
    thresholds = mode_thresholds(curve, top_quality, config.quality_bands)

    manifest = ArtifactManifest(
        model_version=run.model_version or f"promptier-{time.strftime('%Y%m%d-%H%M%S')}",
        tiers=pool.tier_specs(),
        policy=PolicyConfig(default_mode=config.default_mode, rule=config.policy_rule, thresholds=thresholds,
                            quality_bands=dict(config.quality_bands), curve=curve_points(curve)),
        calibration=CalibrationConfig(temperatures=temperatures),
        truncation=encoder.truncation,
        architecture=architecture,
        training={"config": config.model_dump(), "teacher": str(run.teacher) if run.teacher else None,
                  "distill_weight": run.distill_weight if run.teacher else None,
                  "logs": [str(p) for p in run.logs], "pool": str(run.pool_path), "command": run.command,
                  **inputs.record, "fit": fit_report,
                  # As given, like the logs: resolved, it would name the machine that trained it.
                  "checkpoint": str(run.work_dir / CHECKPOINT_FILE),
                  **({"init_from": str(run.compare_with or run.init_from)} if run.init_from else {}),
                  "train_seconds": round(time.time() - started, 1)},
        data_fingerprint=inputs.fingerprint,
        versions=library_versions(),
        metrics={"validation": validation_metrics(val_logits, val_probs, table.subset(val_index), config.policy_rule)},
    )
    parity_index = np.flatnonzero(split != "train")
    parity_texts = [table.prompts[i] for i in parity_index[: max(MIN_PARITY_PROMPTS, 1000)]]
    # One prompt far beyond the model's limit, so parity covers the truncation path too.
    parity_texts.append(" ".join(table.prompts[i] for i in parity_index[:40]))
    if len(parity_texts) < MIN_PARITY_PROMPTS:
        parity_texts += inputs.parity_extra[: MIN_PARITY_PROMPTS - len(parity_texts)]

    def torch_logits(texts: Sequence[str]) -> np.ndarray:
        return predict_logits(model, tokenize_all(encoder, texts))

    seen_file = run.work_dir / SEEN_PROMPTS_FILE
    write_hashes(seen_file, inputs.seen_hashes)
    exported = model
    if config.familiarity is not None:
        exported, familiarity = _fit_familiarity(model, encoder, inputs, pool, config)
        manifest = manifest.model_copy(update={"familiarity": familiarity})
        checkpoint = run.work_dir / CHECKPOINT_FILE
        if checkpoint.is_file():  # `promptier export` rebuilds the unfamiliarity output from them
            add_to_checkpoint(checkpoint, **{FAMILIARITY_STATISTICS: exported.statistics.as_tensors()})
        peaks["familiarity"] = peak_rss_mb()
    check_parity_set(parity_texts)
    # Everything below lands in a staged directory that replaces OUT only once the card is written: a
    # run stopped during evaluation leaves OUT as it was, never a model without its evaluation.
    with staged_artifact(out_dir) as staging:
        manifest, _ = export_into(exported, manifest, tokenizer_file, parity_texts, torch_logits, staging,
                                  config.quantize, extra_paths={SEEN_PROMPTS_FILE: seen_file})
        peaks["export"] = peak_rss_mb()
        if config.cheap_floor_modes:
            manifest = _with_cheap_floors(manifest, staging, val_probs, val_targets, val_costs, config)
        manifest = _evaluated(manifest, staging, inputs, run)
        peaks["evaluate"] = peak_rss_mb()
        total = round(time.time() - started, 1)
        stages = {**run.stages, "finish": round(total - sum(run.stages.values()), 1)}
        manifest = manifest.model_copy(update={"training": {**manifest.training, "peak_rss_mb": peaks["evaluate"],
                                                            "stage_peak_rss_mb": peaks, "stage_seconds": stages,
                                                            "total_seconds": total}})
        save_manifest(manifest, staging)
        write_member_text(staging, MODEL_CARD_FILE, render_model_card(manifest, staging))
    return manifest


def _with_cheap_floors(manifest: ArtifactManifest, directory: Path, val_probabilities: np.ndarray,
                       val_targets: np.ndarray, val_costs: np.ndarray, config: TrainConfig) -> ArtifactManifest:
    """The manifest with cheap floors chosen on the probe suite's selection half (`training.cheap_floor`),
    saved into `directory` so that the evaluation after it routes as the shipped artifact will."""
    from training.cheap_floor import choose_cheap_floors

    policy, searched = choose_cheap_floors(load_artifact(directory), val_probabilities, val_targets, val_costs,
                                           manifest.policy, config.cheap_floor_modes)
    manifest = manifest.model_copy(update={"policy": policy,
                                           "training": {**manifest.training, "cheap_floor_search": searched}})
    save_manifest(manifest, directory)
    return manifest


def _evaluated(manifest: ArtifactManifest, directory: Path, inputs: TrainingInputs, run: _Run) -> ArtifactManifest:
    """The manifest with the probe suite's figures and, when there is a test split, the test split's (whose
    reports are written into `directory`) and the comparison with the model continued from."""
    from training.evaluate import compare_on_test, evaluate_split, sample_metrics
    from training.probes import evaluate_probes

    table, split = inputs.table, inputs.split
    probes = evaluate_probes(load_artifact(directory))
    metrics = {**manifest.metrics, "probes": probes}
    if np.any(split == "test"):
        report = evaluate_split(directory, table, split, backbone_dir=run.evaluation_backbone, out_dir=directory,
                                cache_dir=run.cache_dir, probes=probes)
        metrics.update({"test": report["summary"], "test_sample": sample_metrics(directory, table)})
        if run.compare_with is not None:
            metrics["retrain"] = compare_on_test(run.compare_with, directory, table, split)
    return manifest.model_copy(update={"metrics": metrics})


def validation_metrics(logits: np.ndarray, probabilities: np.ndarray, table: PromptTable, rule: Rule) -> dict:
    """The validation split's masked BCE (before calibration) and APGR per source (after): what a
    distributed run is compared with one process on."""
    from training.evaluate import routing_groups, score_group

    known = ~np.isnan(table.targets)
    targets = np.nan_to_num(table.targets)
    # log(1 + e^x) - y x, the BCE with logits, stable for large |x|.
    losses = np.logaddexp(0.0, logits) - targets * logits
    result: dict = {"prompts": len(table), "loss": float(losses[known].mean()), "apgr": {}}
    for name, rows in routing_groups(table.sources, table.targets).items():
        scored = score_group({"model": probabilities[rows]}, table.targets[rows], table.costs[rows], table.tier_names,
                             rule)
        result["apgr"][name] = round(float(scored["methods"]["model"]["apgr"]), 6)
    return result


def _fit_familiarity(model: torch.nn.Module, encoder: PromptEncoder, inputs: TrainingInputs, pool: Pool,
                     config: TrainConfig) -> tuple[WithUnfamiliarity, FamiliarityConfig]:
    """The model with its unfamiliarity output, and when the runtime should let the prior decide.

    The statistics come from the features of every prompt the model was trained on; the reference is
    prompts like them it never saw: the validation logs and anchors generated with another seed.
    """
    from training.anchors import anchor_rows
    from training.model import BagTierModel, WithUnfamiliarity
    from training.probes import load_probes
    from training.trainer import predict, tokenize_all

    spec = config.familiarity
    assert spec is not None and isinstance(model, BagTierModel)
    if inputs.familiarity_texts is not None:
        # A chunk at a time: a million prompts' features at once, and their covariance's float64 copies,
        # would take gigabytes the run has no other need for.
        texts = sorted(set(inputs.familiarity_texts))
        statistics = _chunked_feature_statistics(
            model, (tokenize_all(encoder, texts[i : i + HELDOUT_CHUNK]) for i in range(0, len(texts), HELDOUT_CHUNK)),
            spec.directions)
        trained_on = set(inputs.familiarity_texts)
    else:
        assert not isinstance(inputs.tokens, list)
        statistics = _store_feature_statistics(model, inputs.tokens.store, spec.directions)
        trained_on = set(inputs.anchor_texts)
    fresh: list[str] = []
    if config.anchors:  # anchors were trained on, so fresh ones are prompts like the training ones
        seen = trained_on | {p.prompt for p in load_probes()}
        fresh = [row["prompt"] for row in anchor_rows(pool.tier_names, config.anchors, config.seed + 1,
                                                      exclude=seen)]
    table, split = inputs.table, inputs.split
    reference_texts = [table.prompts[i] for i in np.flatnonzero(split == "val")] + fresh
    unfamiliarity = np.concatenate([  # features of a chunk at a time, never all of them
        statistics.unfamiliarity(predict(model, tokenize_all(encoder, reference_texts[i : i + HELDOUT_CHUNK]),
                                         method="features"))
        for i in range(0, len(reference_texts), HELDOUT_CHUNK)])
    familiarity = FamiliarityConfig(
        threshold=float(np.quantile(unfamiliarity, spec.quantile)),
        reference=np.quantile(unfamiliarity, np.linspace(0, 1, 101)).tolist(),
        prior=PriorConfig(short_chars=spec.short_chars, long_chars=spec.long_chars))
    return WithUnfamiliarity(model, statistics), familiarity


def _store_feature_statistics(model: torch.nn.Module, store: TokenStore, directions: int, chunk: int = HELDOUT_CHUNK
                              ) -> FeatureStatistics:
    """Feature statistics of every prompt in a token store, read a chunk at a time."""
    return _chunked_feature_statistics(
        model, (store.get(np.arange(start, min(start + chunk, len(store)))) for start in range(0, len(store), chunk)),
        directions)


def _chunked_feature_statistics(model: torch.nn.Module, chunks: Iterable[list[np.ndarray]],
                                directions: int) -> FeatureStatistics:
    """Feature statistics of every prompt in `chunks` (token ids), accumulated a chunk at a time (float64
    sums, shifted by the first chunk's mean so that the one-pass covariance keeps its precision)."""
    from training.model import statistics_from_moments
    from training.trainer import predict

    shift = None
    count, total, products = 0, None, None
    for tokens in chunks:
        features = predict(model, tokens, method="features").astype(np.float64)
        shift = features.mean(axis=0) if shift is None else shift
        centred = features - shift
        total = centred.sum(axis=0) if total is None else total + centred.sum(axis=0)
        products = centred.T @ centred if products is None else products + centred.T @ centred
        count += len(features)
    assert shift is not None and total is not None and products is not None and count > 1
    offset = total / count
    covariance = (products - count * np.outer(offset, offset)) / (count - 1)
    return statistics_from_moments(shift + offset, covariance, directions)


