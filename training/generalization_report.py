"""Leave-one-source-out and seed figures as Markdown, as an image and as files of the artifact.

Apart from training/generalization.py, which measures them by retraining: the model card and the
evaluation that records them need only this, not the training pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from classifier.artifact_layout import (
    GENERALIZATION_JSON_FILE,
    GENERALIZATION_MD_FILE,
    GENERALIZATION_PNG_FILE,
    write_member_text,
    writing_member,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

BASELINES = ("length", "embedding-lr")
# The report's sections, as the manifest's metrics name them.
_SECTIONS = ("leave_one_source_out", "loso_seeds", "seeds")
MODEL = "promptier"
WITHOUT_TRAFFIC = "without-traffic"  # the plain leave-one-source-out fold, beside the one given the traffic


def recorded(metrics: dict) -> dict:
    """The generalization figures an artifact's manifest metrics hold (the report's sections it has)."""
    return {section: metrics[section] for section in _SECTIONS if section in metrics}


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
    if report.get("loso_seeds"):
        lines += _loso_seed_lines(report["loso_seeds"])
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


def _loso_seed_lines(over_seeds: dict) -> list[str]:
    """Each held-out source's APGR averaged over the seeds (the model's lowest and highest beside it)."""
    wins = sum(over_seeds["beats_baselines"].values())
    lines = [f"Leave-one-source-out APGR over seeds {over_seeds['seeds']}, each fold retrained per seed: the mean "
             f"beats both baselines' means on {wins} of {len(over_seeds['sources'])} sources.", "",
             "| held-out source | promptier mean | promptier min - max | length | embedding-lr | beats both "
             "| per seed |", "|---|---|---|---|---|---|---|"]
    for source, methods in over_seeds["sources"].items():
        model = methods[MODEL]
        cells = [f"{model['mean']:.4f}", f"{model['min']:.4f} - {model['max']:.4f}"]
        cells += [f"{methods[b]['mean']:.4f}" if b in methods else "-" for b in BASELINES]
        cells.append("yes" if over_seeds["beats_baselines"][source] else "no")
        cells.append(", ".join(f"{run[source][MODEL]:.4f}" for run in over_seeds["runs"].values()))
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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


def plot(report: dict, path: Path) -> None:
    """The figures as one image (see `figure`), written to `path`."""
    figure(report).savefig(path, dpi=100)


def figure(report: dict) -> Figure:
    """The figures as one matplotlib figure, a panel for each that was measured: leave-one-source-out
    APGR per held-out source beside the baselines; each lead with its 95% interval (a tie is an
    interval across zero), the held-out source's traffic included; leave-one-source-out APGR over seeds,
    each mean with the lowest and highest seed's; in-distribution APGR per seed; and
    where the probe suite's report half sends easy and hard prompts, per seed.

    Raises:
        ValueError: the report holds neither leave-one-source-out nor seed figures.
    """
    # A Figure of its own, not pyplot's: drawing must not switch the backend of a notebook that calls it.
    from matplotlib.figure import Figure

    loso, seeds = report.get("leave_one_source_out"), report.get("seeds")
    panels = ([_plot_loso, _plot_leads] if loso else []) + ([_plot_loso_seeds] if report.get("loso_seeds") else [])
    panels += [_plot_seeds] if seeds else []
    panels += [_plot_probes] if seeds and seeds.get("probes") else []
    if not panels:
        raise ValueError("no leave-one-source-out or seed figures to plot")
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    drawn = Figure(figsize=(7 * columns, 4.8 * rows))
    axes = drawn.subplots(rows, columns, squeeze=False)
    for draw, axis in zip(panels, axes.flat, strict=False):
        draw(report, axis)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    drawn.tight_layout()
    return drawn


def _plot_loso(report: dict, axis: Axes) -> None:
    loso = report["leave_one_source_out"]
    sources = list(loso["sources"])
    width = 0.8 / (1 + len(BASELINES))
    lowest = 0.5
    for k, method in enumerate((MODEL, *BASELINES)):
        values = [loso["sources"][s][method]["apgr"] if method in loso["sources"][s] else float("nan")
                  for s in sources]
        lowest = min([lowest, *(v for v in values if v == v)])
        axis.bar([i + (k - 1) * width for i in range(len(sources))], values, width, label=method)
    axis.axhline(0.5, color="black", linestyle="--", linewidth=1, label="random")
    wins = sum(loso["beats_baselines"].values())
    axis.set(title=f"Leave-one-source-out APGR (beats both baselines on {wins} of {len(sources)})",
             ylabel="APGR on the held-out source")
    axis.set_xticks(range(len(sources)), sources, rotation=20)
    axis.set_ylim(bottom=max(0.0, lowest - 0.1))  # the differences, not the distance from zero
    axis.legend(fontsize=8)


def _plot_leads(report: dict, axis: Axes) -> None:
    loso = report["leave_one_source_out"]
    sources = list(loso["sources"])
    rows: list[tuple[str, list[dict | None]]] = [
        (f"over {b}", [loso["sources"][s][MODEL].get("apgr_vs", {}).get(b) for s in sources]) for b in BASELINES]
    traffic = loso.get("with_traffic") or {}
    if traffic:
        rows.append(("with its traffic over without",
                     [traffic.get(s, {}).get("lead_over_without_traffic") for s in sources]))
    for k, (label, leads) in enumerate(rows):
        ys = [i + (k - 1) * 0.22 for i, lead in enumerate(leads) if lead]
        shown = [lead for lead in leads if lead]
        axis.errorbar([lead["difference"] for lead in shown], ys, fmt="o", capsize=3, label=label,
                      xerr=[[lead["difference"] - lead["ci95"][0] for lead in shown],
                            [lead["ci95"][1] - lead["difference"] for lead in shown]])
    axis.axvline(0.0, color="black", linewidth=1)
    axis.set_yticks(range(len(sources)), sources)
    axis.invert_yaxis()
    axis.set(title="promptier's APGR lead, 95% interval", xlabel="APGR difference (an interval across 0 is a tie)")
    axis.legend(fontsize=8)


def _plot_loso_seeds(report: dict, axis: Axes) -> None:
    over_seeds = report["loso_seeds"]
    sources = list(over_seeds["sources"])
    for k, method in enumerate((MODEL, *BASELINES)):
        xs = [i + (k - 1) * 0.22 for i in range(len(sources))]
        figures = [over_seeds["sources"][s].get(method) for s in sources]
        means = [f["mean"] if f else float("nan") for f in figures]
        # Clamped at zero: the mean of equal figures can land a rounding error outside them.
        spans = [[max(0.0, f["mean"] - f["min"]) if f else 0.0 for f in figures],
                 [max(0.0, f["max"] - f["mean"]) if f else 0.0 for f in figures]]
        axis.errorbar(xs, means, yerr=spans, fmt="o", capsize=3, label=f"{method} (mean, min - max)")
    axis.axhline(0.5, color="black", linestyle="--", linewidth=1, label="random")
    wins = sum(over_seeds["beats_baselines"].values())
    axis.set(title=f"Leave-one-source-out over seeds {over_seeds['seeds']} (mean beats both on {wins} of "
                   f"{len(sources)})", ylabel="APGR on the held-out source")
    axis.set_xticks(range(len(sources)), sources, rotation=20)
    axis.legend(fontsize=8)


def _plot_seeds(report: dict, axis: Axes) -> None:
    seeds = report["seeds"]
    groups = list(seeds["apgr"])
    for seed, run in seeds["runs"].items():
        axis.scatter(range(len(groups)), [run.get(g, float("nan")) for g in groups], label=f"seed {seed}", alpha=0.8)
    axis.scatter(range(len(groups)), [seeds["apgr"][g]["mean"] for g in groups], marker="_", s=600,
                 color="black", label="mean")
    axis.set_xticks(range(len(groups)), groups, rotation=20)
    axis.set(title="In-distribution APGR per seed (each its own split)", ylabel="APGR on the test split")
    axis.legend(fontsize=8)


def _plot_probes(report: dict, axis: Axes) -> None:
    probes = report["seeds"]["probes"]
    runs = probes["runs"]
    width = 0.8 / max(len(runs), 1)
    for k, (seed, figures) in enumerate(runs.items()):
        auc = figures.get("auc")
        axis.bar([i + (k - (len(runs) - 1) / 2) * width for i in range(len(PROBE_SHARES))],
                 [figures.get(key) if figures.get(key) is not None else float("nan") for key in PROBE_SHARES],
                 width, label=f"seed {seed}" + (f" (AUC {auc:.3f})" if auc is not None else ""))
    axis.set_xticks(range(len(PROBE_SHARES)), [key.replace("_on_", " -> ") for key in PROBE_SHARES])
    axis.set(title=f"Probe suite, report half (mode {probes['mode']})", ylabel="share of the probes", ylim=(0, 1))
    axis.legend(fontsize=8)


def write_report(report: dict, directory: Path) -> None:
    """The figures as the artifact's generalization files (JSON, Markdown, PNG), each replaced whole.

    Everything is rendered before any file is replaced: should rendering or drawing fail, the files
    recorded before are left as they were."""
    as_json = json.dumps(report, indent=1) + "\n"
    as_markdown = render_markdown(report)
    with writing_member(directory, GENERALIZATION_PNG_FILE) as path:
        plot(report, path)
    write_member_text(directory, GENERALIZATION_JSON_FILE, as_json)
    write_member_text(directory, GENERALIZATION_MD_FILE, as_markdown)
