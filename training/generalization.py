"""How a training recipe generalizes: leave-one-source-out and seed-to-seed spread.

A random split of the same sources flatters a router: its test prompts look like its training
prompts. Leaving a whole source out (train on every other source, test on it) measures what a new
customer's traffic, unlike any of the logs, would get. Retraining with other seeds measures how much
of a difference between two recipes is noise.

Both retrain the recipe: an artifact's recorded training config, run again on the same logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.config import TrainConfig
from training.errors import DataError
from training.generalization_report import BASELINES, MODEL, WITHOUT_TRAFFIC, render_markdown, write_report
from training.inputs import prepare_data
from training.labels import PromptTable
from training.pipeline import train

__all__ = ["apgr_per_method", "leave_one_source_out", "loso_seed_spread", "render_markdown", "report_probes",
           "seed_spread", "write_report"]
log = logging.getLogger(__name__)


def leave_one_source_out(logs: Sequence[str | Path], pool: str | Path, config: TrainConfig, work_root: Path,
                         backbone_dir: Path | None, cache_dir: Path | None = None,
                         skip_invalid: bool = False, traffic: bool = False) -> dict:
    """Train once per source with that source held out entirely; score each on the source it never saw.

    Returns {"sources": {source: {method: {"apgr", "savings_vs_top"}}}, "beats_baselines": {source: bool}},
    comparing the recipe with the length and embedding baselines fitted on the same training sources.

    With `traffic`, each source is also held out a second way, as a customer whose logs have no
    outcomes would have it: the texts of half its prompts (`traffic_half`) are given to training as
    unlabeled prompts, and both models are scored on the other half (the result's "with_traffic").
    """
    table = prepare_data(logs, pool, config, skip_invalid).table
    sources = _held_out_sources(table)
    if traffic and config.teacher is None:
        raise DataError("config", "--loso-traffic needs a recipe whose embedding teacher labels the unlabeled half")
    result: dict = {"sources": {}, "beats_baselines": {}}
    for source in sources:
        log.info("leave-one-source-out: training without %s", source)
        fold = _fold_config(config, source)
        out = work_root / f"without-{source}"
        methods = _train_fold(logs, pool, fold, source, out, backbone_dir, cache_dir, skip_invalid)
        result["sources"][source] = methods
        result["beats_baselines"][source] = _beats_baselines(apgr_per_method(methods))
        if traffic:
            result.setdefault("with_traffic", {})[source] = _with_traffic(
                logs, pool, fold, table, source, out, work_root, backbone_dir, cache_dir, skip_invalid)
    return result


def loso_seed_spread(logs: Sequence[str | Path], pool: str | Path, config: TrainConfig, seeds: Sequence[int],
                     work_root: Path, backbone_dir: Path | None, cache_dir: Path | None = None,
                     skip_invalid: bool = False, known: dict[int, dict[str, dict[str, float]]] | None = None
                     ) -> dict:
    """Leave-one-source-out once per seed: each held-out source's APGR, the model's and the baselines', per
    seed and averaged over the seeds; whether the model's mean beats each baseline's mean.

    One seed's fold can differ from the next by more than two recipes differ (a fold's validation split,
    initialisation and batch order all follow the seed), so a recipe is judged on the mean. `known` gives
    folds already trained on the same logs, per seed (APGR per source and method), e.g. by
    `leave_one_source_out` in the same evaluation: those seeds are not trained again.

    Returns {"seeds", "runs": {seed: {source: {method: apgr}}},
    "sources": {source: {method: {"mean", "min", "max"}}}, "beats_baselines": {source: bool}}.
    """
    sources = _held_out_sources(prepare_data(logs, pool, config, skip_invalid).table)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        if known and seed in known:
            log.info("leave-one-source-out over seeds: seed %d's folds are already trained", seed)
            runs[str(seed)] = known[seed]
            continue
        runs[str(seed)] = {}
        for source in sources:
            log.info("leave-one-source-out over seeds: seed %d, training without %s", seed, source)
            fold = _fold_config(config.model_copy(update={"seed": seed}), source)
            methods = _train_fold(logs, pool, fold, source, work_root / f"seed-{seed}" / f"without-{source}",
                                  backbone_dir, cache_dir, skip_invalid)
            runs[str(seed)][source] = apgr_per_method(methods)
    per_source: dict[str, dict[str, dict[str, float]]] = {}
    beats: dict[str, bool] = {}
    for source in sources:
        measured = set.intersection(*(set(run[source]) for run in runs.values()))
        values = {method: np.array([run[source][method] for run in runs.values()]) for method in sorted(measured)}
        per_source[source] = {method: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
                              for method, v in values.items()}
        beats[source] = _beats_baselines({method: v["mean"] for method, v in per_source[source].items()})
    return {"seeds": [int(seed) for seed in seeds], "runs": runs, "sources": per_source, "beats_baselines": beats}


def apgr_per_method(methods: dict) -> dict[str, float]:
    """A fold's APGR per method, out of its figures per method (as `leave_one_source_out` gives them)."""
    return {method: figures["apgr"] for method, figures in methods.items()}


def _held_out_sources(table: PromptTable) -> list[str]:
    """The sources to hold out, one per fold; at least two, so that every fold has one to train on."""
    sources = sorted(set(table.sources))
    if len(sources) < 2:
        raise DataError("logs", f"leave-one-source-out needs at least two sources, got {sources}")
    return sources


def _fold_config(config: TrainConfig, source: str) -> TrainConfig:
    """The recipe with `source` held out: every other source's prompts go to training and validation, and
    the test split is the held-out source."""
    return config.model_copy(update={"holdout_sources": [source], "holdout_categories": [], "test_fraction": 0.0})


def _train_fold(logs: Sequence[str | Path], pool: str | Path, fold: TrainConfig, source: str, out: Path,
                backbone_dir: Path | None, cache_dir: Path | None, skip_invalid: bool) -> dict:
    """Train one fold into `out`; the model's and the baselines' figures on the held-out `source`."""
    manifest = train(logs, pool, out, fold, work_dir=out.with_name(out.name + ".work"), skip_invalid=skip_invalid,
                     model_version=f"loso-{source}", evaluation_backbone=backbone_dir, cache_dir=cache_dir)
    assert manifest is not None  # one process: it is the main one
    summary = manifest.metrics["test"]
    assert isinstance(summary, dict)
    return {method: summary[source][method] for method in (MODEL, *BASELINES) if method in summary[source]}


def _beats_baselines(apgr: dict[str, float]) -> bool:
    """Whether the model's APGR is above every baseline's that was measured."""
    return all(apgr[MODEL] > apgr[b] for b in BASELINES if b in apgr)


MIN_TRAFFIC_HALF = 20  # prompts in each half of a source, below which its traffic figures would be noise


def traffic_half(prompt_ids: Sequence[str]) -> np.ndarray:
    """Which prompts of a held-out source stand for its unlabeled traffic (True) and which are scored:
    half each, by a hash of the prompt id, so every run and recipe splits a source the same way."""
    return np.array([hashlib.sha256(pid.encode("utf-8")).digest()[0] % 2 == 0 for pid in prompt_ids], dtype=bool)


def _with_traffic(logs: Sequence[str | Path], pool: str | Path, fold: TrainConfig, table: PromptTable,
                  source: str, without: Path, work_root: Path, backbone_dir: Path | None, cache_dir: Path | None,
                  skip_invalid: bool) -> dict:
    """Retrain the fold with half the held-out source's texts unlabeled; score both folds on the other half.

    The traffic fold's own artifact also scores itself on the whole source, the half it learned included:
    only the figures returned here are held out.
    """
    from training.evaluate import evaluate_table, in_canonical_order, model_probabilities, score_group

    held = np.flatnonzero(table.sources == source)
    in_traffic = traffic_half([table.prompt_ids[i] for i in held])
    traffic_rows, scored_rows = held[in_traffic], held[~in_traffic]
    if min(len(traffic_rows), len(scored_rows)) < MIN_TRAFFIC_HALF:
        log.warning("leave-one-source-out: %s is too small to split into traffic and scored halves", source)
        return {"skipped": f"too few prompts to halve ({len(held)})"}
    traffic_file = work_root / f"traffic-{source}.jsonl"
    traffic_file.parent.mkdir(parents=True, exist_ok=True)
    traffic_file.write_text("".join(json.dumps({"prompt": table.prompts[i]}) + "\n" for i in traffic_rows),
                            encoding="utf-8")
    log.info("leave-one-source-out: training without %s's outcomes, with %d of its prompts unlabeled",
             source, len(traffic_rows))
    out = work_root / f"traffic-{source}"
    manifest = train(logs, pool, out, fold, work_dir=work_root / f"traffic-{source}.work", skip_invalid=skip_invalid,
                     unlabeled=[traffic_file], model_version=f"loso-traffic-{source}", cache_dir=cache_dir)
    assert manifest is not None  # one process: it is the main one
    # In hash order, as evaluate_table scores them: the lead's bootstrap resamples row positions, and
    # must not depend on the order of the logs.
    scored = in_canonical_order(table.subset(scored_rows))
    report = evaluate_table(out, scored, table.subset(np.flatnonzero(table.sources != source)), backbone_dir,
                            cache_dir)
    probabilities = {MODEL: model_probabilities(out, scored.prompts),
                     WITHOUT_TRAFFIC: model_probabilities(without, scored.prompts)}
    lead = score_group(probabilities, scored.targets, scored.costs, scored.tier_names, manifest.policy.rule,
                       rivals=[WITHOUT_TRAFFIC])
    methods = report["groups"][source]["methods"]
    return {"traffic_prompts": len(traffic_rows), "scored_prompts": len(scored_rows),
            "apgr": {method: round(methods[method]["apgr"], 4) for method in (MODEL, *BASELINES) if method in methods}
            | {WITHOUT_TRAFFIC: round(lead["methods"][WITHOUT_TRAFFIC]["apgr"], 4)},
            "lead_over_without_traffic": lead["methods"][MODEL]["apgr_vs"][WITHOUT_TRAFFIC]}


def seed_spread(logs: Sequence[str | Path], pool: str | Path, config: TrainConfig, seeds: Sequence[int],
                work_root: Path, skip_invalid: bool = False, known: dict[int, dict[str, float]] | None = None,
                cache_dir: Path | None = None,
                known_probes: dict[int, dict[str, float | None] | None] | None = None) -> dict:
    """Train the recipe once per seed (each with its own split); APGR per source: each run, mean and spread;
    and each run's figures on the probe suite's report half (`report_probes`), under the default mode.

    `known` gives runs already made, per seed (APGR per group): the evaluated artifact is the run of the
    seed it was trained with, when the logs are the ones it was trained on (see `own_run`);
    `known_probes` gives those runs' probe figures. With `cache_dir`, a recipe with an embedding teacher
    embeds only the prompts no earlier run embedded.
    """
    runs: dict[str, dict[str, float]] = {str(seed): dict(known[seed]) for seed in seeds if known and seed in known}
    probes: dict[str, dict[str, float | None]] = {
        str(seed): figures for seed, figures in (known_probes or {}).items() if figures and str(seed) in runs}
    for seed in seeds:
        if str(seed) in runs:
            log.info("seed spread: seed %d is the evaluated model itself", seed)
            continue
        log.info("seed spread: training with seed %d", seed)
        manifest = train(logs, pool, work_root / f"seed-{seed}", config.model_copy(update={"seed": seed}),
                         work_dir=work_root / f"seed-{seed}.work", skip_invalid=skip_invalid,
                         model_version=f"seed-{seed}", cache_dir=cache_dir)
        assert manifest is not None  # one process: it is the main one
        summary = manifest.metrics["test"]
        assert isinstance(summary, dict)
        runs[str(seed)] = {group: methods[MODEL]["apgr"] for group, methods in summary.items()}
        figures = report_probes(manifest.metrics, config.default_mode)
        if figures:
            probes[str(seed)] = figures
    groups = sorted(set.intersection(*(set(r) for r in runs.values())))
    per_group = {}
    for group in groups:
        values = np.array([runs[seed][group] for seed in runs])
        per_group[group] = {"mean": float(values.mean()), "spread": float(values.max() - values.min()),
                            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    result = {"seeds": [int(s) for s in seeds], "runs": runs, "apgr": per_group}
    if probes:
        result["probes"] = {"mode": config.default_mode, "runs": probes}
    return result


def report_probes(metrics: dict, mode: str) -> dict[str, float | None] | None:
    """A run's figures on the probe suite's report half, as its manifest records them: the AUC and, under
    `mode`, the shares of easy and hard probes on the cheapest and the top tier (None where a figure is
    undefined: an AUC without both classes). None if the run recorded no probe figures."""
    probes = metrics.get("probes")
    half = probes.get("halves", {}).get("report") if isinstance(probes, dict) else None
    if not isinstance(half, dict) or mode not in half.get("modes", {}):
        return None
    figures = {"auc": half.get("auc"), **half["modes"][mode]}
    return {key: None if value is None or math.isnan(value) else float(value) for key, value in figures.items()}


def own_run(manifest_metrics: dict, manifest_fingerprint: str, logs: Sequence[str | Path], pool: str | Path,
            config: TrainConfig, skip_invalid: bool = False) -> dict[int, dict[str, float]]:
    """The evaluated artifact as the run of its own seed, if `logs` hold exactly the data it was trained on
    (same prompts and targets); else nothing. Training is deterministic on a CPU, so retraining that seed
    would only rebuild the same model."""
    test = manifest_metrics.get("test")
    if not isinstance(test, dict):
        return {}
    if prepare_data(logs, pool, config, skip_invalid).table.fingerprint() != manifest_fingerprint:
        return {}
    return {config.seed: {group: methods[MODEL]["apgr"] for group, methods in test.items() if MODEL in methods}}
