"""The probe suite, anchor prompts and leave-one-source-out: the measures of generalization."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import classifier
from tests.conftest import tiny_config
from training.anchors import ANCHOR_SOURCE, _normalise, anchor_rows
from training.generalization import leave_one_source_out, render_markdown
from training.probes import PROBES_FILE, evaluate_probes, load_probes


def test_probe_suite_is_balanced_split_in_fixed_halves_and_not_separable_by_length() -> None:
    probes = load_probes()
    assert len(probes) >= 200
    counts = Counter((p.half, p.difficulty) for p in probes)
    for half in ("select", "report"):
        for difficulty in ("easy", "hard"):
            assert counts[(half, difficulty)] >= 60, counts
    assert len({p.kind for p in probes}) >= 8 and len({p.language for p in probes}) >= 5
    short_hard = [p for p in probes if p.difficulty == "hard" and len(p.prompt) < 90]
    long_easy = [p for p in probes if p.difficulty == "easy" and len(p.prompt) > 600]
    assert len(short_hard) >= 20 and len(long_easy) >= 20
    # The halves depend on each probe's own text only: the same file gives the same halves.
    assert [p.half for p in load_probes()] == [p.half for p in probes]
    lines = PROBES_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(probes) == len({json.loads(line)["prompt"] for line in lines})


def test_anchors_cover_both_ends_and_never_repeat_a_probe() -> None:
    probes = [p.prompt for p in load_probes()]
    rows = anchor_rows(["small", "medium", "large"], per_kind=60, exclude=probes)
    tiers = Counter(row["tier"] for row in rows)
    assert tiers["small"] >= 300 and tiers["large"] >= 100 and set(tiers) == {"small", "large"}
    assert {row["source"] for row in rows} == {ANCHOR_SOURCE}
    assert not {_normalise(row["prompt"]) for row in rows} & {_normalise(p) for p in probes}
    # Excluding an anchor's text removes it: what the probe check relies on.
    first = rows[0]["prompt"]
    again = anchor_rows(["small", "medium", "large"], per_kind=60, exclude=[*probes, first])
    assert first not in {row["prompt"] for row in again}


def test_probe_report_measures_what_the_runtime_decides(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    report = evaluate_probes(runtime)
    for half in ("select", "report"):
        h = report["halves"][half]
        assert h["easy"] + h["hard"] == h["probes"] and 0.0 <= h["auc"] <= 1.0
        for shares in h["modes"].values():
            assert all(0.0 <= value <= 1.0 for value in shares.values())
    # Recompute one share from the runtime's own decisions.
    probes = [p for p in load_probes() if p.half == "report" and p.difficulty == "easy"]
    decisions = runtime.classify_batch([p.prompt for p in probes])
    cheapest = sum(d.tier == runtime.tier_names[0] for d in decisions) / len(decisions)
    assert report["halves"]["report"]["modes"]["balanced"]["easy_on_cheapest"] == cheapest


def test_leave_one_source_out_trains_without_each_source(tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path,
                                                         pool_file: Path) -> None:
    config = tiny_config(tiny_backbone, epochs=3)
    result = leave_one_source_out([synthetic_logs], pool_file, config, tmp_path, backbone_dir=tiny_backbone,
                                  cache_dir=tmp_path / "cache")
    assert set(result["sources"]) == {"alpha", "beta"}
    for source, methods in result["sources"].items():
        assert {"promptier", "length", "embedding-lr"} <= set(methods)
        assert isinstance(result["beats_baselines"][source], bool)
        # The fold never saw its held-out source: its test split is exactly that source.
        manifest = json.loads((tmp_path / f"without-{source}" / "manifest.json").read_text())
        assert manifest["training"]["config"]["holdout_sources"] == [source]
        report = json.loads((tmp_path / f"without-{source}" / "eval.json").read_text())
        assert set(report["groups"]) == {"all", source}
    assert "| alpha |" in render_markdown({"leave_one_source_out": result})
    assert any((tmp_path / "cache").iterdir())  # embeddings kept for the next fold
