"""The probe suite, anchor prompts and leave-one-source-out: the measures of generalization."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

import classifier
from tests.conftest import count_embedded_prompts, tiny_config
from training.anchors import ANCHOR_SOURCE, anchor_rows, normalise_prompt
from training.anchors_native import NATIVE_EASY_MORE, NATIVE_HARD_KINDS, native_values
from training.errors import DataError
from training.generalization import (
    leave_one_source_out,
    loso_seed_spread,
    own_run,
    render_markdown,
    report_probes,
    seed_spread,
    traffic_half,
)
from training.probes import PROBES_FILE, evaluate_probes, load_probes
from training.synthetic import write_jsonl


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
    assert not {normalise_prompt(row["prompt"]) for row in rows} & {normalise_prompt(p) for p in probes}
    # Excluding an anchor's text removes it: what the probe check relies on.
    first = rows[0]["prompt"]
    again = anchor_rows(["small", "medium", "large"], per_kind=60, exclude=[*probes, first])
    assert first not in {row["prompt"] for row in again}


SCRIPTS = {"cyrillic": ("\u0400", "\u04ff"), "kana": ("\u3040", "\u30ff"), "hangul": ("\uac00", "\ud7a3"),
           "arabic": ("\u0600", "\u06ff"), "devanagari": ("\u0900", "\u097f")}


def test_other_scripts_appear_at_both_ends_so_no_language_reads_as_easy() -> None:
    rows = anchor_rows(["small", "medium", "large"], per_kind=150)
    for script, (low, high) in SCRIPTS.items():
        tiers = Counter(row["tier"] for row in rows if any(low <= ch <= high for ch in row["prompt"]))
        assert tiers["small"] >= 3 and tiers["large"] >= 3, (script, tiers)
    # Every native template fills from the slots it is given.
    values = native_values(random.Random(0))
    for template in [*NATIVE_EASY_MORE, *(t for kinds in NATIVE_HARD_KINDS.values() for t in kinds)]:
        assert "{" not in template.format(**values)


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
        leads = methods["promptier"]["apgr_vs"]
        assert set(leads) == {"length", "embedding-lr"}
        for baseline, lead in leads.items():
            assert lead["difference"] == pytest.approx(methods["promptier"]["apgr"] - methods[baseline]["apgr"],
                                                       abs=2e-4)
            assert lead["ci95"][0] <= lead["ci95"][1]
    table = render_markdown({"leave_one_source_out": result})
    alpha = next(line for line in table.splitlines() if line.startswith("| alpha |"))
    lead = result["sources"]["alpha"]["promptier"]["apgr_vs"]["length"]
    assert f"{lead['difference']:+.3f} [{lead['ci95'][0]:+.3f}, {lead['ci95'][1]:+.3f}]" in alpha
    assert any((tmp_path / "cache").iterdir())  # embeddings kept for the next fold


def test_leave_one_source_out_over_seeds_judges_each_source_on_the_mean(
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path) -> None:
    config = tiny_config(tiny_backbone, epochs=2)
    seeds = [config.seed, config.seed + 1]
    result = loso_seed_spread([synthetic_logs], pool_file, config, seeds, tmp_path, backbone_dir=tiny_backbone,
                              cache_dir=tmp_path / "cache")
    assert result["seeds"] == seeds and set(result["runs"]) == {str(seed) for seed in seeds}
    for seed in seeds:
        for source in ("alpha", "beta"):
            # Each fold is the recipe with this seed and the source held out, scored on that source.
            manifest = json.loads((tmp_path / f"seed-{seed}" / f"without-{source}" / "manifest.json").read_text())
            assert manifest["training"]["config"]["seed"] == seed
            assert manifest["training"]["config"]["holdout_sources"] == [source]
            report = json.loads((tmp_path / f"seed-{seed}" / f"without-{source}" / "eval.json").read_text())
            assert result["runs"][str(seed)][source]["promptier"] == pytest.approx(
                report["groups"][source]["methods"]["promptier"]["apgr"], abs=1e-4)
    for source, methods in result["sources"].items():
        assert {"promptier", "length", "embedding-lr"} <= set(methods)
        for method, figures in methods.items():
            values = [result["runs"][str(seed)][source][method] for seed in seeds]
            assert figures["mean"] == pytest.approx(sum(values) / len(values))
            assert figures["min"] == min(values) and figures["max"] == max(values)
        assert result["beats_baselines"][source] == all(
            methods["promptier"]["mean"] > methods[b]["mean"] for b in ("length", "embedding-lr"))
    # Two seeds of one fold are two different models, not one model scored twice.
    assert any(result["runs"][str(seeds[0])][s]["promptier"] != result["runs"][str(seeds[1])][s]["promptier"]
               for s in ("alpha", "beta"))
    # Folds already trained for a seed (by --loso in the same evaluation) are counted, not trained again.
    reused = loso_seed_spread([synthetic_logs], pool_file, config, seeds, tmp_path / "reused",
                              backbone_dir=tiny_backbone, cache_dir=tmp_path / "cache",
                              known={seeds[0]: result["runs"][str(seeds[0])]})
    assert reused == result
    assert not (tmp_path / "reused" / f"seed-{seeds[0]}").exists()
    assert (tmp_path / "reused" / f"seed-{seeds[1]}").exists()
    table = render_markdown({"loso_seeds": result})
    alpha = next(line for line in table.splitlines() if line.startswith("| alpha |"))
    model = result["sources"]["alpha"]["promptier"]
    assert alpha.startswith(f"| alpha | {model['mean']:.4f} | {model['min']:.4f} - {model['max']:.4f} |")
    assert f"over seeds {seeds}" in table


def test_leave_one_source_out_with_traffic_scores_both_folds_on_the_unseen_half(
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path) -> None:
    without_teacher = tiny_config(tiny_backbone, epochs=2)
    with pytest.raises(DataError, match="teacher"):
        leave_one_source_out([synthetic_logs], pool_file, without_teacher, tmp_path, None, traffic=True)
    config = tiny_config(tiny_backbone, student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32,
                                                 "pooling_heads": 2}, epochs=2, learning_rate=1e-2,
                         teacher={"kind": "embedding-mlp", "hidden": 32, "epochs": 5})
    result = leave_one_source_out([synthetic_logs], pool_file, config, tmp_path, backbone_dir=tiny_backbone,
                                  cache_dir=tmp_path / "cache", traffic=True)
    sizes = Counter(json.loads(line)["source"] for line in synthetic_logs.read_text().splitlines())
    prompts = {source: len({json.loads(line)["prompt_id"] for line in synthetic_logs.read_text().splitlines()
                            if json.loads(line)["source"] == source}) for source in sizes}
    for source, figures in result["with_traffic"].items():
        # Half the source's prompts are traffic, the other half scored; none is both.
        assert figures["traffic_prompts"] + figures["scored_prompts"] == prompts[source]
        assert 0.3 < figures["traffic_prompts"] / prompts[source] < 0.7
        traffic = [json.loads(line)["prompt"] for line in (tmp_path / f"traffic-{source}.jsonl").open()]
        # The traffic is exactly the source's prompts whose id falls in the traffic half.
        logged = [json.loads(line) for line in synthetic_logs.read_text().splitlines()]
        rows = {row["prompt_id"]: row["prompt"] for row in logged if row["source"] == source}
        ids = sorted(rows)
        assert sorted(traffic) == sorted(rows[i] for i, t in zip(ids, traffic_half(ids), strict=True) if t)
        manifest = json.loads((tmp_path / f"traffic-{source}" / "manifest.json").read_text())
        assert manifest["training"]["unlabeled_prompts"] == len(traffic) == figures["traffic_prompts"]
        assert manifest["training"]["config"]["holdout_sources"] == [source]
        apgr, lead = figures["apgr"], figures["lead_over_without_traffic"]
        assert {"promptier", "without-traffic", "length", "embedding-lr"} <= set(apgr)
        assert lead["difference"] == pytest.approx(apgr["promptier"] - apgr["without-traffic"], abs=2e-4)
    # The halves depend on the prompt ids alone: pinned, so a change of split is a visible change.
    assert traffic_half(["alpha:0", "alpha:1", "beta:7", "beta:8"]).tolist() == [False, False, True, False]
    assert 60 < traffic_half([f"alpha:{i}" for i in range(200)]).sum() < 140
    table = render_markdown({"leave_one_source_out": result})
    assert "with its traffic" in table and any(line.startswith("| beta | ") for line in table.splitlines()[-4:])

def test_prior_reads_length_and_structure() -> None:
    from classifier.artifact import PriorConfig
    from classifier.prior import is_technical, prior_tier

    config = PriorConfig(short_chars=200, long_chars=2000)
    assert prior_tier("Bonjour, comment ça va ?", 3, config) == 0
    assert prior_tier("x" * 500, 3, config) == 1
    assert prior_tier("word " * 500, 3, config) == 2
    assert prior_tier("```python\nprint(1)\n```", 3, config) == 2
    assert is_technical("Solve \\int_0^1 x^2 dx") and is_technical("int main() {\n  return 0;\n}")
    assert is_technical("if a = b and b ≤ c then a ≤ c") and not is_technical("Thanks, see you at 5!")
    assert prior_tier("hi", 2, config) == 0 and prior_tier("x" * 500, 2, config) == 1
    # Length is what a reader sees: padding a greeting with white space, which the model never reads, does
    # not make it long.
    for padded in ("Bonjour !" + " " * 3000, "\n" * 2500 + "Bonjour !", "Bonjour" + " \t\n " * 700 + "!"):
        assert prior_tier(padded, 3, config) == 0
    # A short request to design a system is as demanding as a proof; everyday plans and designs are not.
    for design in ("Architect a real-time fraud detection pipeline for card payments under 50 ms.",
                   "Entwirf ein verteiltes Zahlungssystem.", "分散決済システムを設計してください",
                   "Diseña un sistema de reservas distribuido."):
        assert prior_tier(design, 3, config) == 2, design
    for plain in ("Plan a birthday party for my son.", "Design a logo for a bakery.",
                  "Design a poster for the school fair. Which printing system is cheapest?"):
        assert prior_tier(plain, 3, config) == 0, plain
    # So is a short piece of writing under a formal constraint; a form named in a question, a program
    # about it, or writing without a named constraint is not.
    for constrained in ("Write a villanelle about rain whose first letters spell AUTUMN.",
                        "Write a paragraph about cats without using the letter a.",
                        "Compose a palindrome about a canoe.", "Напиши акростих о зиме.",
                        "Render this ballad into German, keeping its metre and rhyme.",
                        "Переведи это стихотворение, сохранив ямб и рифму."):
        assert prior_tier(constrained, 3, config) == 2, constrained
    for plain in ("Is racecar a palindrome?", "can you write a palindrome checker in Python?",
                  "Write a Python function that checks whether a word is a palindrome.",
                  "Write a palindrome-checking function", "Generate a list of 10 palindromes",
                  "Write a blog post about the history of palindromes.", "What is iambic pentameter?",
                  "Capitalize the first letter of each word and fix spelling.", "What rhymes with meter?",
                  "Make sure every word starts with a capital letter", "Write a short poem for my mum's birthday."):
        assert prior_tier(plain, 3, config) == 0, plain


def test_unfamiliar_prompts_are_routed_by_the_prior_visibly(tmp_path: Path, tiny_backbone: Path,
                                                            synthetic_logs: Path, pool_file: Path) -> None:
    from training.pipeline import train

    config = tiny_config(tiny_backbone, student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32,
                                                 "pooling_heads": 2, "length_feature": True},
                         epochs=8, learning_rate=1e-2,
                         familiarity={"directions": 8, "quantile": 0.99, "short_chars": 60, "long_chars": 400})
    manifest = train([synthetic_logs], pool_file, tmp_path / "model", config, model_version="familiar")
    assert manifest.familiarity is not None and manifest.familiarity.threshold > 0
    runtime = classifier.load(tmp_path / "model")
    known = runtime.classify("prove theorem derive integral eigenvalue lemma")
    assert known.decided_by == "model" and known.familiarity is not None and known.familiarity > 0.01
    # Every token unknown to the vocabulary: nothing like it was trained on.
    short = runtime.classify("ζζζ ωωω ψψψ")
    long_technical = runtime.classify("ζζζ ωωω ψψψ; {" + " ζζζ" * 150)
    for result in (short, long_technical):
        assert result.decided_by == "prior" and result.familiarity is not None and result.familiarity < 0.01
    assert short.tier == "small" and long_technical.tier == "large"
    # The prior respects allowed tiers: its choice, else the next more capable allowed tier.
    pinned = runtime.classify("ζζζ ωωω ψψψ", classifier.RoutingRequest(allowed_tiers=("medium", "large")))
    assert pinned.tier == "medium" and pinned.decided_by == "prior"


def test_embedding_teacher_and_anchors_in_one_recipe(tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path,
                                                     pool_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped recipe's shape on the tiny backbone: anchors, an embedding teacher, a bag student."""
    from training.pipeline import train

    embedded = count_embedded_prompts(monkeypatch)
    config = tiny_config(tiny_backbone, student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32,
                                                 "pooling_heads": 2, "length_feature": True},
                         epochs=8, learning_rate=1e-2, anchors=10, anchor_weight=2,
                         teacher={"kind": "embedding-mlp", "hidden": 32, "epochs": 20},
                         familiarity={"directions": 8, "quantile": 0.99, "short_chars": 60, "long_chars": 400})
    # Traffic unlike the logs and anchors, without outcomes: trained without it, the model leaves such a
    # prompt to the prior (familiarity 0).
    unfamiliar = ". , . , . , . , . ,"
    unlabeled = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": unfamiliar + " ." * (i % 7) + " ," * (i // 7)}
                                                         for i in range(60)])
    manifest = train([synthetic_logs], pool_file, tmp_path / "model", config, model_version="recipe",
                     cache_dir=tmp_path / "cache", unlabeled=[unlabeled])
    training = manifest.training
    assert isinstance(training["embedding_teacher"], dict)
    assert set(training["embedding_teacher"]["validation_apgr"]) == {"alpha", "beta"}
    assert training["anchor_prompts"] > 0 and training["unlabeled_prompts"] == 60
    # The tiny backbone is untrained, so its sentence embeddings teach little: this checks the recipe's
    # mechanics (cached embeddings, the teacher's report, an artifact that serves), not its quality.
    assert any((tmp_path / "cache").iterdir())
    runtime = classifier.load(tmp_path / "model")
    result = runtime.classify("prove theorem derive integral eigenvalue lemma")
    assert result.tier in manifest.tier_names and "probes" in manifest.metrics
    # The unlabeled traffic was trained on (with the teacher's labels), so prompts like it are familiar:
    # the model decides them, not the prior that routes what no training prompt resembles.
    assert runtime.classify(unfamiliar).decided_by == "model"
    # Retraining with another seed (`eval --seeds`) reads the same cache: it embeds only the prompts that
    # no earlier run did (those the first run held out for its test split).
    cold = sum(embedded)
    seed_spread([synthetic_logs], pool_file, config, [config.seed + 1], tmp_path / "seeds",
                cache_dir=tmp_path / "cache")
    assert 0 < sum(embedded) - cold < cold / 2


def test_seed_spread_counts_the_evaluated_model_as_its_own_seeds_run(tmp_path: Path, trained_artifact: Path,
                                                                    synthetic_logs: Path, pool_file: Path) -> None:
    from training.config import TrainConfig

    manifest = classifier.load(trained_artifact).manifest
    config = TrainConfig.model_validate(manifest.training["config"])
    known = own_run(manifest.metrics, manifest.data_fingerprint, [synthetic_logs], pool_file, config)
    assert set(known) == {config.seed} and known[config.seed]
    # Retraining that seed rebuilds the same model: reusing the artifact saves a run, not a measurement.
    again = seed_spread([synthetic_logs], pool_file, config, [config.seed], tmp_path / "again")
    assert again["runs"][str(config.seed)] == known[config.seed]
    # Each run's probe figures come along: the report half under the default mode, as the run recorded them.
    own_probes = report_probes(manifest.metrics, manifest.policy.default_mode)
    assert own_probes is not None and 0.0 <= own_probes["auc"] <= 1.0
    assert again["probes"] == {"mode": manifest.policy.default_mode, "runs": {str(config.seed): own_probes}}
    reused = seed_spread([synthetic_logs], pool_file, config, [config.seed], tmp_path / "reused", known=known,
                         known_probes={config.seed: own_probes})
    assert reused["runs"] == again["runs"] and not (tmp_path / "reused").exists()
    assert reused["probes"] == again["probes"]
    table = render_markdown({"seeds": reused})
    assert f"| {config.seed} | {own_probes['auc']:.3f} | {own_probes['easy_on_cheapest']:.1%} |" in table
    # Other logs than the artifact's: nothing is reused.
    lines = synthetic_logs.read_text(encoding="utf-8").splitlines()
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(lines[: len(lines) * 3 // 4]) + "\n", encoding="utf-8")
    assert own_run(manifest.metrics, manifest.data_fingerprint, [fewer], pool_file, config) == {}


def test_seed_table_gives_each_runs_probe_figures_and_their_mean() -> None:
    shares = {"easy_on_cheapest": 0.9, "easy_on_top": 0.04, "hard_on_top": 0.8, "hard_on_cheapest": 0.1}
    seeds = {"seeds": [1, 2], "runs": {"1": {"all": 0.6}, "2": {"all": 0.7}},
             "apgr": {"all": {"mean": 0.65, "spread": 0.1, "std": 0.07}},
             "probes": {"mode": "balanced", "runs": {"1": {"auc": 0.94, **shares},
                                                     "2": {"auc": 0.96, **shares, "easy_on_top": 0.08}}}}
    table = render_markdown({"seeds": seeds})
    assert "per seed (mode `balanced`)" in table
    assert "| 2 | 0.960 | 90.0% | 8.0% | 80.0% | 10.0% |" in table
    assert "| mean | 0.950 | 90.0% | 6.0% | 80.0% | 10.0% |" in table


def test_seed_table_marks_runs_without_probe_figures_and_undefined_ones() -> None:
    shares = {"easy_on_cheapest": 0.9, "easy_on_top": 0.04, "hard_on_top": 0.8, "hard_on_cheapest": 0.1}
    seeds = {"seeds": [1, 2, 3], "runs": {"1": {"all": 0.6}, "2": {"all": 0.7}, "3": {"all": 0.5}},
             "apgr": {"all": {"mean": 0.6, "spread": 0.2, "std": 0.1}},
             "probes": {"mode": "balanced", "runs": {"1": {"auc": 0.94, **shares}, "2": {"auc": None, **shares}}}}
    table = render_markdown({"seeds": seeds})
    assert "| 2 | - | 90.0% |" in table and "| 3 | - | - | - | - | - |" in table
    assert "| mean of 2 | 0.940 | 90.0% |" in table
    metrics = {"probes": {"halves": {"report": {"auc": None, "modes": {"balanced": {**shares, "easy_on_top":
                                                                                  float("nan")}}}}}}
    assert report_probes(metrics, "balanced") == {"auc": None, **shares, "easy_on_top": None}
    assert report_probes({}, "balanced") is None and report_probes(metrics, "cost") is None



def test_generalization_files_draw_a_panel_for_each_figure_measured(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.image import imread

    from classifier.artifact_layout import GENERALIZATION_FILES
    from training.generalization_report import PROBE_SHARES, figure, write_report

    shares = {"easy_on_cheapest": 0.9, "easy_on_top": 0.04, "hard_on_top": 0.8, "hard_on_cheapest": 0.1}
    seeds = {"seeds": [1, 2], "runs": {"1": {"all": 0.6}, "2": {"all": 0.7}},
             "apgr": {"all": {"mean": 0.65, "spread": 0.1, "std": 0.07}},
             "probes": {"mode": "balanced", "runs": {"1": {"auc": None, **shares}}}}
    lead = {"difference": 0.02, "ci95": [-0.01, 0.05]}
    loso = {"sources": {"alpha": {"promptier": {"apgr": 0.6, "apgr_vs": {"length": lead}}, "length": {"apgr": 0.58}},
                        "beta": {"promptier": {"apgr": 0.5, "apgr_vs": {"length": lead, "embedding-lr": lead}},
                                 "length": {"apgr": 0.48}, "embedding-lr": {"apgr": 0.48}}},
            "beats_baselines": {"alpha": True, "beta": True},
            "with_traffic": {"alpha": {"skipped": "too few prompts to halve (30)"},
                             "beta": {"traffic_prompts": 40, "scored_prompts": 41, "lead_over_without_traffic": lead,
                                      "apgr": {"promptier": 0.52, "without-traffic": 0.5, "length": 0.47}}}}
    write_report({"leave_one_source_out": loso, "seeds": seeds}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENERALIZATION_FILES)
    assert imread(tmp_path / "generalization.png").shape[0] > 0
    # A report that cannot be drawn replaces none of the files recorded before.
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError):
        write_report({"seeds": None}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    drawn = figure({"leave_one_source_out": loso, "seeds": seeds})
    bars, leads, per_seed, probes = [axis for axis in drawn.axes if axis.get_visible()]
    # APGR bars by method, then source; a method a source lacks is a gap, not a zero.
    heights = [patch.get_height() for patch in bars.patches]
    assert heights[:4] == [0.6, 0.5, 0.58, 0.48] and np.isnan(heights[4]) and heights[5] == 0.48
    # One point per lead that exists: over length for both sources, the rest only where measured.
    points = [list(container.lines[0].get_xdata()) for container in leads.containers]
    assert points == [[0.02, 0.02], [0.02], [0.02]]
    whiskers = leads.containers[0].lines[2][0].get_segments()  # each lead's interval, drawn as its x extent
    assert [list(segment[:, 0]) for segment in whiskers] == [pytest.approx([-0.01, 0.05])] * 2
    assert [list(collection.get_offsets()[:, 1]) for collection in per_seed.collections] == [[0.6], [0.7], [0.65]]
    assert [patch.get_height() for patch in probes.patches] == [shares[key] for key in PROBE_SHARES]
    # The length baseline's three equal figures: their float mean lands just below them.
    over_seeds = {"seeds": [1, 2, 3], "runs": {"1": {"alpha": {"promptier": 0.55, "length": 0.7}},
                                                "2": {"alpha": {"promptier": 0.65, "length": 0.7}},
                                                "3": {"alpha": {"promptier": 0.6, "length": 0.7}}},
                  "sources": {"alpha": {"promptier": {"mean": 0.6, "min": 0.55, "max": 0.65},
                                        "length": {"mean": float(np.mean([0.7] * 3)), "min": 0.7, "max": 0.7}}},
                  "beats_baselines": {"alpha": False}}
    assert np.mean([0.7] * 3) < 0.7  # the rounding that drawing must survive
    drawn = figure({"loso_seeds": over_seeds})
    (panel,) = [axis for axis in drawn.axes if axis.get_visible()]
    # One point per method that was measured, each mean with the lowest and highest seed's figure.
    assert [list(container.lines[0].get_ydata()) for container in panel.containers][:2] == [
        [0.6], [np.mean([0.7] * 3)]]
    spans = panel.containers[0].lines[2][0].get_segments()
    assert list(spans[0][:, 1]) == pytest.approx([0.55, 0.65])
    for report, panels in (({"seeds": {**seeds, "probes": None}}, 1), ({"leave_one_source_out": loso}, 2),
                           ({"leave_one_source_out": loso, "loso_seeds": over_seeds}, 3)):
        drawn = figure(report)
        assert sum(axis.get_visible() for axis in drawn.axes) == panels
    with pytest.raises(ValueError, match="no leave-one-source-out or seed figures"):
        figure({})
    assert not plt.get_fignums()  # figures of their own: neither pyplot nor a notebook's backend was touched


def test_recording_seeds_keeps_the_recorded_leave_one_source_out_figures(
        artifact_copy: Path, synthetic_logs: Path, pool_file: Path) -> None:
    """`eval --record --seeds` measures only the seeds; the artifact's generalization files, manifest and
    card keep the leave-one-source-out figures recorded before, beside the new seed figures."""
    from typer.testing import CliRunner

    from classifier.artifact import load_manifest, save_manifest
    from training.cli import app

    lead = {"difference": 0.02, "ci95": [-0.01, 0.05]}
    loso = {"sources": {"alpha": {"promptier": {"apgr": 0.6, "apgr_vs": {"length": lead}}, "length": {"apgr": 0.58}}},
            "beats_baselines": {"alpha": True}}
    manifest = load_manifest(artifact_copy)
    # Probe figures recorded before a change of the runtime: the artifact's own seed row must not reuse them.
    stale = json.loads(json.dumps(manifest.metrics["probes"]))
    stale["halves"]["report"]["auc"] = 0.123
    save_manifest(manifest.model_copy(update={"metrics": {**manifest.metrics, "leave_one_source_out": loso,
                                                          "probes": stale}}), artifact_copy)
    seed = str(manifest.training["config"]["seed"])
    result = CliRunner().invoke(app, ["eval", "--model", str(artifact_copy), "--logs", str(synthetic_logs),
                                      "--pool", str(pool_file), "--record", "--seeds", seed])
    assert result.exit_code == 0, result.output
    recorded = json.loads((artifact_copy / "generalization.json").read_text())
    assert recorded["leave_one_source_out"] == loso and set(recorded["seeds"]["runs"]) == {seed}
    assert load_manifest(artifact_copy).metrics["leave_one_source_out"] == loso
    mode = manifest.policy.default_mode
    assert recorded["seeds"]["probes"]["runs"][seed] == report_probes(load_manifest(artifact_copy).metrics, mode)
    assert recorded["seeds"]["probes"]["runs"][seed]["auc"] != 0.123
    # ... and they were measured on the artifact itself, not on a retrained copy of its seed.
    assert not (artifact_copy.with_name(artifact_copy.name + ".generalization") / "seeds" / f"seed-{seed}").exists()
    assert "| alpha | 0.6000 |" in (artifact_copy / "generalization.md").read_text()
    card = (artifact_copy / "MODEL_CARD.md").read_text()
    assert "| alpha | 0.6000 |" in card and "](generalization.png)" in card


def test_eval_with_loso_and_loso_seeds_trains_the_recipes_own_seed_once(
        artifact_copy: Path, synthetic_logs: Path, pool_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from classifier.artifact import load_manifest
    from training.cli import app

    seed = load_manifest(artifact_copy).training["config"]["seed"]
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["eval", "--model", str(artifact_copy), "--logs", str(synthetic_logs),
                                      "--pool", str(pool_file), "--no-embedding-baseline", "--record", "--loso",
                                      "--loso-seeds", f"{seed},{seed + 1}", "--work-dir", str(runs)])
    assert result.exit_code == 0, result.output
    recorded = load_manifest(artifact_copy).metrics
    loso, over_seeds = recorded["leave_one_source_out"], recorded["loso_seeds"]
    assert over_seeds["runs"][str(seed)] == {source: {method: figures["apgr"] for method, figures in methods.items()}
                                             for source, methods in loso["sources"].items()}
    assert not (runs / "loso-seeds" / f"seed-{seed}").exists() and (runs / "loso-seeds" / f"seed-{seed + 1}").exists()
    assert "over seeds" in (artifact_copy / "MODEL_CARD.md").read_text()
