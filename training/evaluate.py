"""`promptier eval`: the model against baselines on prompts it never saw. JSON, Markdown and a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from classifier import load as load_artifact
from classifier.artifact import Rule
from classifier.artifact_layout import (
    EVAL_JSON_FILE,
    EVAL_MD_FILE,
    EVAL_PNG_FILE,
    MODEL_CARD_FILE,
    write_member_text,
    writing_member,
)
from classifier.policy import relative_scores
from training.baselines import (
    length_features,
    oracle_scores,
    per_tier_logistic,
    random_scores,
    sentence_embeddings,
)
from training.errors import DataError
from training.generalization_report import BASELINES, MODEL, format_lead
from training.labels import PromptTable, prompt_hash, seen_prompts
from training.metrics import apgr, apgr_difference_interval, binary_curve, cpt, tier_metrics
from training.probes import common_sense_check
from training.routing import RoutingPoint, always_top, cheapest_point_within, routing_curve, top_known_tier

CPT_LEVELS = (0.5, 0.8, 0.95)
SAVING_LEVELS = (0.95, 0.98, 0.99)


def model_probabilities(artifact: Path, prompts: Sequence[str], batch: int = 64) -> np.ndarray:
    from tqdm.auto import tqdm

    runtime = load_artifact(artifact, threads=2)
    parts = [runtime.probabilities(prompts[i : i + batch])[0]
             for i in tqdm(range(0, len(prompts), batch), desc="model", unit="batch")]
    return np.concatenate(parts) if parts else np.zeros((0, len(runtime.tier_names)))


def comparable_rows(targets: np.ndarray) -> np.ndarray:
    """Which prompts have an outcome on the cheapest tier and on a more capable one: those on which
    routing between them can gain or lose anything. A served request, known on its one tier, is not."""
    known = ~np.isnan(targets)
    return known[:, 0] & known[:, 1:].any(axis=1)


def routing_groups(sources: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the groups a report scores: "all", then each source with a comparable prompt (one
    without, such as a decision log's, has no APGR: 0 would read as a model that ranks nothing)."""
    comparable = comparable_rows(targets)
    groups = {"all": np.ones(len(sources), dtype=bool)}
    for source in sorted(set(sources)):
        mask = sources == source
        if comparable[mask].any():
            groups[str(source)] = mask
    return groups


def binary_outcomes(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary routing's prompts, those known on the cheapest tier and a more capable one, with their
    outcome on the cheapest tier (`weak`) and on their most capable known tier (`strong`)."""
    rows = np.flatnonzero(comparable_rows(targets))
    strong_index = top_known_tier(~np.isnan(targets))[rows]
    return rows, targets[rows, 0], targets[rows, strong_index]


def router_hardness(probabilities: np.ndarray, known: np.ndarray, rule: Rule) -> np.ndarray:
    """How much of the strong tier's expected quality the cheapest tier would lose, by a router's
    probabilities (its relative score): what binary routing ranks the prompts by."""
    return 1.0 - relative_scores(probabilities, known, rule)[:, 0]


def score_group(methods: Mapping[str, np.ndarray], targets: np.ndarray, costs: np.ndarray,
                tier_names: list[str], rule: Rule = "ratio", rivals: Sequence[str] = BASELINES) -> dict:
    """Every metric for every method on one group of prompts, each routed by the same `rule`.

    The model's entry also holds, per baseline (or per method named in `rivals`), its APGR lead and a
    95% paired-bootstrap interval of that lead (`apgr_vs`): whether the group's prompts can tell the two
    apart at all.
    """
    known = ~np.isnan(targets)
    top_quality, top_cost = always_top(targets, costs)
    single = {}
    for k, name in enumerate(tier_names):
        if known[:, k].any():
            single[name] = {"quality": float(np.mean(targets[known[:, k], k])),
                            "cost_usd": float(np.mean(costs[known[:, k], k])), "n": int(known[:, k].sum())}
    rows, weak, strong = binary_outcomes(targets)
    result: dict = {"n": len(targets), "top_quality": top_quality, "top_cost_usd": top_cost,
                    "single_tiers": single, "methods": {}}
    hardness_of: dict[str, np.ndarray] = {}
    for method, probabilities in methods.items():
        # The oracle knows each prompt's gain from the strong tier.
        hardness = (strong - weak) if method == "oracle" else router_hardness(probabilities[rows], known[rows], rule)
        hardness_of[method] = hardness
        curve = binary_curve(hardness, weak, strong)
        routing = routing_curve(probabilities, targets, costs, rule=rule)
        savings = {f"{round(level * 100)}": saving(routing, level * top_quality, top_cost) for level in SAVING_LEVELS}
        result["methods"][method] = {
            "apgr": apgr(curve),
            "cpt": {f"{round(level * 100)}": cpt(curve, level) for level in CPT_LEVELS},
            "savings_vs_top": savings,
            "tiers": tier_metrics(probabilities, targets, tier_names),
            "binary_curve": {"strong_share": curve.strong_share[:: max(1, len(rows) // 100)].tolist(),
                             "pgr": curve.pgr[:: max(1, len(rows) // 100)].tolist()},
            "routing_curve": [{"quality": p.quality, "cost_usd": p.cost_usd, "top_share": p.top_share,
                               "threshold": p.threshold} for p in routing],
        }
    if MODEL in methods and len(rows) > 1:
        result["methods"][MODEL]["apgr_vs"] = {
            baseline: {"difference": result["methods"][MODEL]["apgr"] - result["methods"][baseline]["apgr"],
                       "ci95": list(apgr_difference_interval(hardness_of[MODEL], hardness_of[baseline], weak, strong))}
            for baseline in rivals if baseline in methods}
    return result


def saving(routing: Sequence[RoutingPoint], min_quality: float, top_cost: float) -> float | None:
    """The share of `top_cost` (always calling the top known tier) that the cheapest point of `routing`
    reaching `min_quality` saves; None when no point reaches it, or when the top tier costs nothing
    (free or self-hosted at no logged cost): there is then no spend to save a share of."""
    point = cheapest_point_within(list(routing), min_quality)
    if point is None or top_cost <= 0.0:
        return None
    return 1.0 - point.cost_usd / top_cost


# Fewer prompts the model saw than this, and the learned baselines are cross-fitted on the evaluated ones.
MIN_FIT_ROWS = 50


def evaluate_table(artifact: Path, eval_table: PromptTable, fit_table: PromptTable | None,
                   backbone_dir: Path | None, cache_dir: Path | None = None, seed: int = 0,
                   probabilities: np.ndarray | None = None) -> dict:
    """Score the artifact and the baselines on `eval_table`, overall and per source (`probabilities`:
    the artifact's for `eval_table`'s prompts, in its order, when the caller has them already).

    Baselines that learn (length, embedding) are fitted on `fit_table`, the prompts the model was
    trained on, so that every method sees the same data; without it they are cross-fitted on the
    evaluation rows in 5 folds.

    Both tables are first put in the order of their prompts' hashes: the random baseline's scores, the
    cross-fitting folds and the bootstrap's resamples are drawn per row position, a logistic regression
    stops (within its tolerance) at a point that depends on the order of its rows, and the same prompts
    must give the same figures whatever the order in which the logs were given.
    """
    from classifier.artifact import load_manifest

    order = canonical_order(eval_table)
    eval_table = eval_table.subset(order)
    fit_table = None if fit_table is None else in_canonical_order(fit_table)
    manifest = load_manifest(artifact)
    tier_names = manifest.tier_names
    methods: dict[str, np.ndarray] = {
        MODEL: model_probabilities(artifact, eval_table.prompts) if probabilities is None else probabilities[order]}
    methods["random"] = random_scores(len(eval_table), len(tier_names), seed)
    methods["length"] = _learned(length_features, eval_table, fit_table, seed)
    if backbone_dir is not None:
        def embed(prompts: Sequence[str]) -> np.ndarray:
            return sentence_embeddings(prompts, backbone_dir, manifest.truncation, cache_dir)
        methods["embedding-lr"] = _learned(embed, eval_table, fit_table, seed)
    methods["oracle"] = oracle_scores(eval_table.targets)
    groups = routing_groups(eval_table.sources, eval_table.targets)
    report = {
        "model_version": manifest.model_version,
        "tiers": tier_names,
        "rows": len(eval_table),
        # 0: too few prompts the model saw to fit them on, so they were cross-fitted on the evaluated ones
        "fit_rows": len(fit_table) if fit_table is not None and len(fit_table) >= MIN_FIT_ROWS else 0,
        "rule": manifest.policy.rule,
        "groups": {name: score_group({m: p[mask] for m, p in methods.items()}, eval_table.targets[mask],
                                     eval_table.costs[mask], tier_names, manifest.policy.rule)
                   for name, mask in groups.items()},
    }
    report["summary"] = summarize(report)
    return report


def canonical_order(table: PromptTable) -> np.ndarray:
    """The rows of `table` sorted by prompt hash (prompts are distinct, so the order is unique)."""
    return np.argsort([prompt_hash(prompt) for prompt in table.prompts], kind="stable")


def in_canonical_order(table: PromptTable) -> PromptTable:
    """`table` with its rows in `canonical_order`."""
    return table.subset(canonical_order(table))


def _learned(featurize, eval_table: PromptTable, fit_table: PromptTable | None, seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    if fit_table is not None and len(fit_table) >= MIN_FIT_ROWS:
        features = featurize(fit_table.prompts + eval_table.prompts)
        return per_tier_logistic(features[: len(fit_table)], fit_table.targets, features[len(fit_table):])
    features = featurize(eval_table.prompts)
    folds = np.random.default_rng(seed).integers(0, 5, len(eval_table))
    scores = np.zeros_like(eval_table.targets)
    for fold in range(5):
        held = folds == fold
        if held.any():
            scores[held] = per_tier_logistic(features[~held], eval_table.targets[~held], features[held])
    return scores


def summarize(report: dict) -> dict:
    """The headline numbers: APGR, CPT and savings per group and method, and the model's APGR leads."""
    return {group: {method: _headline(m) for method, m in g["methods"].items()}
            for group, g in report["groups"].items()}


def _headline(metrics: dict) -> dict:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    headline = {"apgr": round(metrics["apgr"], 4),
                "cpt": {k: rounded(v) for k, v in metrics["cpt"].items()},
                "savings_vs_top": {k: rounded(v) for k, v in metrics["savings_vs_top"].items()}}
    if "apgr_vs" in metrics:
        headline["apgr_vs"] = {baseline: {"difference": round(lead["difference"], 4),
                                          "ci95": [round(x, 4) for x in lead["ci95"]]}
                               for baseline, lead in metrics["apgr_vs"].items()}
    return headline


def _baselines_fit(fit_rows: int) -> str:
    if fit_rows:
        return f"learned baselines fitted on {fit_rows} prompts"
    return "learned baselines cross-fitted on these prompts (5 folds: too few prompts the model saw to fit them on)"


def render_markdown(report: dict) -> str:
    lines = [f"# Evaluation of {report['model_version']}", "",
             f"{report['rows']} held-out prompts; {_baselines_fit(report['fit_rows'])}. "
             "APGR and CPT: cheapest tier vs the most capable known tier (RouteLLM). Savings: cost saved "
             "versus always calling the most capable tier, at 95/98/99% of its quality (all tiers).", ""]
    for group, g in report["groups"].items():
        lines += [f"## {group} ({g['n']} prompts; top-tier quality {g['top_quality']:.4f}, "
                  f"cost ${g['top_cost_usd'] * 1000:.4f} per 1k prompts)", "",
                  "| method | APGR | CPT(50%) | CPT(80%) | CPT(95%) | saving @95% | saving @98% | saving @99% "
                  "| AUC (cheapest tier) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, m in g["methods"].items():
            auc = m["tiers"][report["tiers"][0]]["roc_auc"]
            cells = [f"{m['apgr']:.4f}"] + [_pct(m["cpt"][k]) for k in ("50", "80", "95")] + \
                    [_pct(m["savings_vs_top"][k]) for k in ("95", "98", "99")] + \
                    ["-" if auc is None else f"{auc:.4f}"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        singles = ", ".join(f"{name}: quality {s['quality']:.4f}, ${s['cost_usd'] * 1000:.4f}/1k"
                            for name, s in g["single_tiers"].items())
        lines += ["", f"Single tiers: {singles}", ""]
        leads = g["methods"].get(MODEL, {}).get("apgr_vs")
        if leads:
            lines += [f"{MODEL}'s APGR lead, with its 95% paired-bootstrap interval over these prompts: "
                      + "; ".join(f"over {b} {format_lead(lead)}" for b, lead in leads.items()), ""]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot(report: dict, path: Path) -> None:
    """Quality against cost and PGR against the strong tier's share, per group, as a PNG at `path`."""
    # A Figure of its own, not pyplot's: drawing must not switch the backend of a notebook that calls it.
    from matplotlib.figure import Figure

    groups = list(report["groups"].items())
    figure = Figure(figsize=(5.5 * len(groups), 9))
    axes = figure.subplots(2, len(groups), squeeze=False)
    for column, (group, g) in enumerate(groups):
        top, bottom = axes[0][column], axes[1][column]
        for method, m in g["methods"].items():
            points = sorted(m["routing_curve"], key=lambda p: p["cost_usd"])
            top.plot([p["cost_usd"] * 1000 for p in points], [p["quality"] for p in points], label=method,
                     linewidth=2.2 if method == MODEL else 1.2)
            bottom.plot(m["binary_curve"]["strong_share"], m["binary_curve"]["pgr"],
                        label=f"{method} (APGR {m['apgr']:.3f})", linewidth=2.2 if method == MODEL else 1.2)
        for name, s in g["single_tiers"].items():
            top.scatter([s["cost_usd"] * 1000], [s["quality"]], marker="s", color="black", zorder=5)
            top.annotate(name, (s["cost_usd"] * 1000, s["quality"]), textcoords="offset points", xytext=(5, -10))
        top.set(title=f"{group}: quality vs cost", xlabel="USD per 1k prompts", ylabel="mean quality")
        bottom.set(title=f"{group}: PGR vs strong-tier share", xlabel="share of calls to the strong tier",
                   ylabel="performance gap recovered")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _nan_as_null(value: object) -> object:
    """`value` with each NaN or infinite float as None: a figure with nothing to measure it on (no prompt
    known on two tiers) is `null` in the JSON, which strict readers (jq, a browser's JSON.parse) take,
    where Python's `NaN` stops them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _nan_as_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_as_null(item) for item in value]
    return value


def write_report(report: dict, out_dir: Path, probes: dict | None = None) -> None:
    """The evaluation as the artifact's eval files (JSON, Markdown, PNG), each replaced whole; `probes` (the
    probe suite's figures, `training.probes.evaluate_probes`), when given, go into the JSON beside the
    logs' figures, so that it holds everything the evaluation measured.

    Everything is rendered before any file is replaced: should rendering or drawing fail, the files
    recorded before are left as they were."""
    whole = report if probes is None else {**report, "probes": probes}
    as_json = json.dumps(_nan_as_null(whole), indent=1, allow_nan=False) + "\n"
    as_markdown = render_markdown(report)
    with writing_member(out_dir, EVAL_PNG_FILE) as path:
        plot(report, path)
    write_member_text(out_dir, EVAL_JSON_FILE, as_json)
    write_member_text(out_dir, EVAL_MD_FILE, as_markdown)


def compare_on_test(previous: Path, new: Path, table: PromptTable, split: np.ndarray) -> dict:
    """APGR of both artifacts on the test prompts neither saw (the previous one may have trained on
    some of the new logs' prompts, which would flatter it).

    APGR is measured on the prompts among them known on the cheapest tier and a more capable one
    (`comparable_prompts`). When there is none (served requests alone, one tier each, beside a judged
    sample the previous model trained on), both APGRs are 0 and say nothing: `worse` is then None,
    undecided, rather than False.

    Raises:
        DataError: the previous artifact saw every test prompt.
    """
    from classifier.artifact import load_manifest

    seen = seen_prompts(previous)
    test = [i for i in np.flatnonzero(split == "test") if prompt_hash(table.prompts[i]) not in seen]
    if not test:
        raise DataError("logs", f"every test prompt of the new logs was seen by {previous}: nothing to compare on")
    subset = in_canonical_order(table.subset(np.array(test)))  # the order evaluate_table ranks ties in
    scores = {path: model_probabilities(path, subset.prompts) for path in (previous, new)}
    before = evaluate_table(previous, subset, None, None, probabilities=scores[previous])["summary"]
    after = evaluate_table(new, subset, None, None, probabilities=scores[new])["summary"]
    apgr = {group: {"previous": before[group][MODEL]["apgr"], "new": after[group][MODEL]["apgr"]}
            for group in after}
    comparable = int(np.count_nonzero(comparable_rows(subset.targets)))
    worse = apgr["all"]["new"] < apgr["all"]["previous"] if comparable else None
    return {"previous_model_version": load_manifest(previous).model_version, "prompts": len(test),
            "comparable_prompts": comparable, "apgr": apgr, "worse": worse,
            # The new logs judge the new model by their own scores: logs scored backwards would pass it.
            # The probe suite's obvious prompts do not depend on them.
            "common_sense": common_sense_check(load_artifact(previous), load_artifact(new)),
            "lead": apgr_lead(subset.targets, scores[new], load_manifest(new).policy.rule, scores[previous],
                              load_manifest(previous).policy.rule) if comparable > 1 else None}


def apgr_lead(targets: np.ndarray, ours: np.ndarray, our_rule: Rule, theirs: np.ndarray, their_rule: Rule) -> dict:
    """APGR(ours) - APGR(theirs), two routers' probabilities for the same prompts each ranked by its own
    rule, on the prompts known on the cheapest tier and a more capable one, with the 95% paired-bootstrap
    interval of that lead: an interval that spans zero says these prompts cannot tell the two apart."""
    rows, weak, strong = binary_outcomes(targets)
    known = ~np.isnan(targets[rows])
    our_hardness = router_hardness(ours[rows], known, our_rule)
    their_hardness = router_hardness(theirs[rows], known, their_rule)
    return {"difference": apgr(binary_curve(our_hardness, weak, strong))
            - apgr(binary_curve(their_hardness, weak, strong)),
            "ci95": list(apgr_difference_interval(our_hardness, their_hardness, weak, strong))}


def evaluate_split(artifact: Path, table: PromptTable, split: np.ndarray, backbone_dir: Path | None,
                   out_dir: Path, cache_dir: Path | None = None, probes: dict | None = None) -> dict:
    """Evaluate on the test split, fitting learned baselines on train+val (what the model saw); `probes`
    as in `write_report`."""
    test = np.flatnonzero(split == "test")
    fit = np.flatnonzero(split != "test")
    report = evaluate_table(artifact, table.subset(test), table.subset(fit), backbone_dir, cache_dir)
    write_report(report, out_dir, probes)
    return report


def evaluate_logs(artifact: Path, table: PromptTable, backbone_dir: Path | None, out_dir: Path,
                  cache_dir: Path | None = None, probes: dict | None = None) -> dict:
    """Evaluate on every prompt of `table` the model never saw; baselines fit on the ones it saw; `probes`
    as in `write_report`."""
    seen = seen_prompts(artifact)
    was_seen = np.array([prompt_hash(p) in seen for p in table.prompts], dtype=bool)
    if was_seen.all():
        raise ValueError("every prompt in these logs was used to train or calibrate the model")
    if not comparable_rows(table.targets[~was_seen]).any():
        # Every APGR would be 0, the oracle's too: a table that reads as routers that rank nothing.
        raise ValueError("no prompt the model never saw has outcomes on the cheapest tier and a more capable "
                         "one, so routing cannot be scored on these logs (a decision log alone has one tier per "
                         "prompt: give logs that score several tiers per prompt)")
    fit_table = table.subset(np.flatnonzero(was_seen)) if was_seen.any() else None
    report = evaluate_table(artifact, table.subset(np.flatnonzero(~was_seen)), fit_table, backbone_dir, cache_dir)
    write_report(report, out_dir, probes)
    return report


SAMPLE_SIZE = 300


def fixed_sample(table: PromptTable, seen: set[str], size: int = SAMPLE_SIZE) -> np.ndarray:
    """The `size` unseen prompts with the smallest hashes: a sample anyone can rebuild from the logs."""
    hashes = np.array([prompt_hash(p) for p in table.prompts])
    unseen = np.flatnonzero(~np.isin(hashes, list(seen)))
    return unseen[np.argsort(hashes[unseen], kind="stable")[:size]]


def sample_metrics(artifact: Path, table: PromptTable) -> dict:
    """Metrics on the fixed sample, recorded in the manifest so a test can recompute and compare them."""
    index = fixed_sample(table, seen_prompts(artifact))
    report = evaluate_table(artifact, table.subset(index), None, None)
    return {"prompts": len(index), "summary": report["summary"]}


def record_in_artifact(artifact: Path, report: dict, table: PromptTable, probes: dict | None = None,
                       generalization: dict | None = None) -> None:
    """Store an evaluation in the artifact: manifest metrics, the fixed-sample check, the probe suite,
    leave-one-source-out and seed figures when given, the model card."""
    from classifier.artifact import load_manifest, save_manifest
    from training.generalization_report import recorded as recorded_generalization
    from training.generalization_report import write_report as write_generalization_report
    from training.model_card import render_model_card

    manifest = load_manifest(artifact)
    metrics = {**manifest.metrics, "test": report["summary"], "test_sample": sample_metrics(artifact, table)}
    if probes is not None:
        metrics["probes"] = probes
    if generalization:
        metrics.update(generalization)
        # Every figure the artifact holds, not only those just measured: a `--seeds` run keeps the
        # recorded leave-one-source-out figures, in the files as in the manifest and the card.
        write_generalization_report(recorded_generalization(metrics), artifact)
    manifest = manifest.model_copy(update={"metrics": metrics})
    save_manifest(manifest, artifact)
    write_member_text(artifact, MODEL_CARD_FILE, render_model_card(manifest, artifact))
