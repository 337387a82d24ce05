"""End to end on a tiny backbone: train, export, load, predict, evaluate, resume, reproduce."""

import json
from pathlib import Path

import numpy as np
import pytest

import classifier
from classifier.artifact import load_manifest
from tests.conftest import synthetic_rows, tiny_config, write_jsonl
from training.errors import DataError
from training.pipeline import SEEN_PROMPTS_FILE, train


def test_trained_artifact_is_complete_and_learned_the_task(trained_artifact: Path) -> None:
    manifest = load_manifest(trained_artifact)
    assert manifest.tier_names == ["small", "medium", "large"]
    assert set(manifest.policy.thresholds) == {"quality", "balanced", "cost"}
    # The cost mode may only trade more quality than the quality mode, so its threshold is not higher.
    assert manifest.policy.thresholds["cost"] <= manifest.policy.thresholds["quality"]
    assert manifest.metrics["export_parity"]["tier_agreement"] >= 0.995
    assert manifest.data_fingerprint and manifest.training["prompts"]["test"] > 0
    for name in ("MODEL_CARD.md", "eval.json", "eval.md", "eval.png", SEEN_PROMPTS_FILE):
        assert (trained_artifact / name).is_file(), name
    summary = manifest.metrics["test"]["all"]
    assert summary["promptier"]["apgr"] > summary["random"]["apgr"] + 0.1
    assert summary["oracle"]["apgr"] >= summary["promptier"]["apgr"]

    runtime = classifier.load(trained_artifact)
    easy = runtime.classify("hello thanks say hi cat dog", classifier.RoutingRequest(mode="balanced"))
    hard = runtime.classify("prove theorem derive integral eigenvalue lemma")
    assert easy.tier == "small"
    assert hard.tier == "large"
    assert hard.scores["small"] < easy.scores["small"]
    assert easy.model_version == "tiny-test-1"


def test_eval_report_lists_every_method_per_source(trained_artifact: Path) -> None:
    report = json.loads((trained_artifact / "eval.json").read_text())
    assert set(report["groups"]) == {"all", "alpha", "beta"}
    methods = report["groups"]["alpha"]["methods"]
    assert {"promptier", "random", "length", "oracle"} <= set(methods)
    assert set(methods["promptier"]["cpt"]) == {"50", "80", "95"}
    assert set(methods["promptier"]["savings_vs_top"]) == {"95", "98", "99"}
    # beta has no large model: its large-tier metrics are over zero prompts, never counted as failures.
    assert report["groups"]["beta"]["methods"]["promptier"]["tiers"]["large"]["n"] == 0


def test_same_seed_same_model_and_resume_matches(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(540, seed=3))
    config = tiny_config(tiny_backbone, epochs=2, checkpoint_every=10)
    first = train([logs], pool_file, tmp_path / "a", config, model_version="a")
    second = train([logs], pool_file, tmp_path / "b", config, model_version="b")
    assert first.calibration.temperatures == pytest.approx(second.calibration.temperatures)
    assert first.policy.thresholds == pytest.approx(second.policy.thresholds)

    # Interrupt right after the first checkpoint (step 10), then rerun: it resumes and lands on the same model.
    from training import trainer

    save = trainer._save_checkpoint

    def save_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        save(*args, **kwargs)
        raise KeyboardInterrupt

    trainer._save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train([logs], pool_file, tmp_path / "c", config, model_version="c")
    finally:
        trainer._save_checkpoint = save
    assert (tmp_path / "c.work" / "checkpoint.pt").exists() and not (tmp_path / "c").exists()
    third = train([logs], pool_file, tmp_path / "c", config, model_version="c")
    assert third.calibration.temperatures == pytest.approx(first.calibration.temperatures, rel=1e-4)
    assert third.policy.thresholds == pytest.approx(first.policy.thresholds, rel=1e-4)
    a = classifier.load(tmp_path / "a").probabilities(["prove lemma", "hello cat"])[0]
    c = classifier.load(tmp_path / "c").probabilities(["prove lemma", "hello cat"])[0]
    assert np.allclose(a, c, atol=1e-4)


def test_train_rejects_bad_logs_with_location(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    rows = synthetic_rows(60)
    rows[5]["score"] = 7
    logs = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl, row 6, column 'score': score 7.0 is outside"):
        train([logs], pool_file, tmp_path / "out", tiny_config(tiny_backbone))
    assert not (tmp_path / "out").exists()
