"""Leave-one-source-out and seed figures as Markdown and as files of the artifact.

Apart from training/generalization.py, which measures them by retraining: the model card and the
evaluation that records them need only this, not the training pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from classifier.artifact_layout import GENERALIZATION_JSON_FILE, GENERALIZATION_MD_FILE, write_member_text

BASELINES = ("length", "embedding-lr")
MODEL = "promptier"
WITHOUT_TRAFFIC = "without-traffic"  # the plain leave-one-source-out fold, beside the one given the traffic


def format_lead(lead: dict) -> str:
    """An APGR lead and its interval, e.g. `+0.012 [-0.008, +0.031]`."""
    low, high = lead["ci95"]
    return f"{lead['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def render_markdown(report: dict) -> str:
    """Leave-one-source-out and seed figures as Markdown tables (what the model card shows)."""
    lines: list[str] = []
    loso = report.get("leave_one_source_out")
    if loso:
        wins = sum(loso["beats_baselines"].values())
        lines += [f"Leave-one-source-out APGR (trained on every other source; beats both baselines on "
                  f"{wins} of {len(loso['sources'])} sources). Each lead over a baseline comes with its 95% "
                  "paired-bootstrap interval over the held-out prompts: one that spans zero is a tie.", "",
                  "| held-out source | promptier | length | embedding-lr | beats both | lead over length "
                  "| lead over embedding-lr |", "|---|---|---|---|---|---|---|"]
        for source, methods in loso["sources"].items():
            cells = [f"{methods[m]['apgr']:.4f}" if m in methods else "-" for m in (MODEL, *BASELINES)]
            beats = "yes" if loso["beats_baselines"][source] else "no"
            leads = methods[MODEL].get("apgr_vs", {})
            cells += [beats] + [format_lead(leads[b]) if b in leads else "-" for b in BASELINES]
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        lines.append("")
        if loso.get("with_traffic"):
            lines += _traffic_lines(loso["with_traffic"])
    seeds = report.get("seeds")
    if seeds:
        lines += [f"In-distribution APGR over seeds {seeds['seeds']} (each seed its own random split):", "",
                  "| group | mean | spread (max - min) | runs |", "|---|---|---|---|"]
        for group, values in seeds["apgr"].items():
            runs = ", ".join(f"{seeds['runs'][s][group]:.4f}" for s in seeds["runs"])
            lines.append(f"| {group} | {values['mean']:.4f} | {values['spread']:.4f} | {runs} |")
        lines.append("")
        if seeds.get("probes"):
            lines += _probe_lines(seeds)
    return "\n".join(lines)


def _traffic_lines(with_traffic: dict) -> list[str]:
    """Each held-out source scored on half its prompts, the fold retrained with the other half unlabeled."""
    lines = ["The same folds when the held-out source's traffic is known without outcomes: the texts of half "
             "its prompts given to training as unlabeled prompts (labelled by the recipe's teacher), every "
             "method scored on the other half.", "",
             "| held-out source | scored prompts | without its traffic | with its traffic | lead [95% interval] "
             "| length | embedding-lr |", "|---|---|---|---|---|---|---|"]
    for source, figures in with_traffic.items():
        if "skipped" in figures:
            lines.append(f"| {source} | {figures['skipped']} | - | - | - | - | - |")
            continue
        apgr = figures["apgr"]
        cells = [str(figures["scored_prompts"]), f"{apgr[WITHOUT_TRAFFIC]:.4f}", f"{apgr[MODEL]:.4f}",
                 format_lead(figures["lead_over_without_traffic"])]
        cells += [f"{apgr[b]:.4f}" if b in apgr else "-" for b in BASELINES]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return [*lines, ""]


PROBE_SHARES = ("easy_on_cheapest", "easy_on_top", "hard_on_top", "hard_on_cheapest")


def _probe_lines(seeds: dict) -> list[str]:
    """One row per seed (a dash where a run recorded no probe figures) and the mean of those that did."""
    probes = seeds["probes"]
    runs = probes["runs"]
    lines = [f"The probe suite's report half, per seed (mode `{probes['mode']}`):", "",
             "| seed | AUC | easy -> cheapest | easy -> top | hard -> top | hard -> cheapest |",
             "|---|---|---|---|---|---|"]
    lines += [_probe_row(seed, runs.get(seed, {})) for seed in seeds["runs"]]
    if len(runs) > 1:
        means = {}
        for key in ("auc", *PROBE_SHARES):
            values = [figures[key] for figures in runs.values() if figures.get(key) is not None]
            means[key] = sum(values) / len(values) if values else None
        label = "mean" if len(runs) == len(seeds["runs"]) else f"mean of {len(runs)}"
        lines.append(_probe_row(label, means))
    return [*lines, ""]


def _probe_row(label: str, figures: dict) -> str:
    auc = figures.get("auc")
    cells = [f"{auc:.3f}" if auc is not None else "-"]
    cells += [f"{figures[key]:.1%}" if figures.get(key) is not None else "-" for key in PROBE_SHARES]
    return f"| {label} | " + " | ".join(cells) + " |"


def write_report(report: dict, directory: Path) -> None:
    """The figures as the artifact's generalization files (JSON and Markdown), each replaced whole."""
    write_member_text(directory, GENERALIZATION_JSON_FILE, json.dumps(report, indent=1) + "\n")
    write_member_text(directory, GENERALIZATION_MD_FILE, render_markdown(report))
