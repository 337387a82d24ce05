"""`promptier train --init-from ARTIFACT`: continue a deployed model on new logs, promote it only if
it is not worse there.

The artifact's manifest records its training checkpoint (`training.checkpoint`; older artifacts: the
default work dir, `ARTIFACT.work/checkpoint.pt`) and the run key the checkpoint carries, so a
checkpoint of another run is never continued in its place. The new run starts from those weights with the
artifact's recipe (its recorded config, unless another is given), trains on the new logs with a
fresh optimizer and schedule, and calibrates and chooses thresholds on the new logs' validation
split. Both models are then scored on the new logs' test prompts that neither saw, and on the probe
suite's selection half; the new one is promoted (moved to OUT) unless its APGR there is below the
previous model's or it ranks the probes far worse (`training.probes.COMMON_SENSE_TOLERANCE`), or with
`force`. The
artifact OUT held before is moved aside to `OUT.previous-VERSION`, to roll back to; when that is the
model continued from, the new artifact's manifest and card name it there, so that its recorded command
rebuilds the new model rather than continuing it.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from classifier.artifact import ArtifactManifest, load_manifest, save_manifest
from classifier.artifact_layout import check_destination
from classifier.errors import ArtifactError, PromptierError
from classifier.signals import exit_deferred
from training.config import TrainConfig
from training.devices import torchrun_environment
from training.errors import DataError
from training.pool import load_pool
from training.work_lock import out_lock

log = logging.getLogger(__name__)
CANDIDATE_SUFFIX = ".candidate"


@dataclass(frozen=True)
class RetrainResult:
    manifest: ArtifactManifest
    comparison: dict
    promoted: bool
    location: Path  # where the new artifact is: OUT when promoted, else OUT.candidate
    rollback: Path | None  # where the artifact OUT held before now is


def checkpoint_of(artifact: Path) -> Path:
    """The training checkpoint behind an artifact.

    The manifest records it as training was given it, relative to the directory training ran in; from
    elsewhere it is looked for under the same work dir's name beside the artifact, where training puts it
    by default. A checkpoint is only taken if it is the artifact's own: the run key it carries must be
    the one the manifest records (artifacts recorded before run keys: any checkpoint found). The default
    work dir `ARTIFACT.work` is looked in only when the manifest records no checkpoint at all.

    Raises:
        PromptierError: none of the places holds the artifact's own checkpoint.
    """
    from training.trainer import load_checkpoint

    manifest = load_manifest(artifact)
    recorded = manifest.training.get("checkpoint")
    if recorded:
        path = Path(str(recorded))
        candidates = [path, artifact.parent / path.parent.name / path.name]
    else:
        candidates = [artifact.with_name(artifact.name + ".work") / "checkpoint.pt"]
    fit = manifest.training.get("fit")
    expected = fit.get("run_key") if isinstance(fit, dict) else None
    others = []
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        if expected is None or load_checkpoint(path).get("run_key") == expected:
            return path
        others.append(str(path))
    found = f"; {', '.join(others)} belongs to another run (trained after it, or on other logs)" if others else ""
    raise PromptierError(f"the training checkpoint of {artifact} is not on this machine (looked for "
                         f"{', '.join(map(str, dict.fromkeys(candidates)))}{found}); --init-from needs the work "
                         "dir of the run that trained it")


def rollback_location(out: Path) -> Path | None:
    """Where promotion moves the artifact `out` holds: `OUT.previous-VERSION`, numbered when that name is
    taken; None when `out` holds none."""
    if not out.exists():
        return None
    version = load_manifest(out).model_version
    rollback = out.with_name(f"{out.name}.previous-{version}")
    suffix = 1
    while rollback.exists():
        suffix += 1
        rollback = out.with_name(f"{out.name}.previous-{version}-{suffix}")
    return rollback


def promote(candidate: Path, out: Path, rollback: Path | None) -> None:
    """Move `candidate` to `out`; the artifact `out` holds moves to `rollback` first. A SIGTERM waits for
    both renames: stopped between them, OUT would be gone, the models beside it under other names."""
    with exit_deferred():
        if rollback is not None:
            out.rename(rollback)
        candidate.rename(out)


def same_directory(first: Path, second: Path) -> bool:
    """Whether two paths name one existing directory, however each is spelt."""
    try:
        return first.samefile(second)
    except OSError:
        return False


def with_init_from(command: str, start: str) -> str:
    """A recorded `promptier train` command with its `--init-from` argument replaced by `start`."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--init-from" and i + 1 < len(words):
            words[i + 1] = start
        elif word.startswith("--init-from="):
            words[i] = f"--init-from={start}"
    return shlex.join(words)


def record_start_moved(candidate: Path, manifest: ArtifactManifest, start: Path) -> ArtifactManifest:
    """The candidate's manifest and model card, rewritten to name `start` as the model it was initialised
    from (in `training.init_from` and in the recorded command); returns the manifest.

    Promoting a model continued from OUT into OUT moves the model it started from aside: left as they
    were, the records would name OUT, so the recorded command would continue this model instead of
    rebuilding it. Only the manifest's provenance changes (the digests it records are of the model and
    tokenizer), and the card is rendered anew from it, so the two agree.
    """
    from classifier.artifact_layout import MODEL_CARD_FILE, write_member_text
    from training.model_card import render_model_card

    training = {**manifest.training, "init_from": str(start)}
    command = training.get("command")
    if isinstance(command, str):
        training["command"] = with_init_from(command, str(start))
    manifest = manifest.model_copy(update={"training": training})
    save_manifest(manifest, candidate)
    write_member_text(candidate, MODEL_CARD_FILE, render_model_card(manifest, candidate))
    return manifest


def retrain(previous: Path, logs: Sequence[str | Path], pool_path: Path, out: Path, config: TrainConfig | None,
            *, force: bool = False, work_dir: Path | None = None, skip_invalid: bool = False,
            model_version: str | None = None, command: str | None = None, cache_dir: Path | None = None,
            overrides: dict | None = None) -> RetrainResult | None:
    """Continue `previous` on `logs`; promote to `out` unless worse there (or with `force`).

    Returns None in the processes of a distributed run other than the main one.

    The new model is promoted when its APGR on the new logs' held-out prompts is not below the previous
    model's and it has not lost the common sense the probe suite checks (`training.probes.
    common_sense_check`: logs scored backwards would otherwise promote the model they taught); when none of
    those prompts is known on two tiers (so neither APGR measures anything), only with `force`.

    Raises:
        PromptierError: other tiers than the previous model's, no checkpoint, a model distilled from
            a teacher artifact (its targets are not in the recipe), or logs whose test prompts it all saw.
    """
    from training.pipeline import train

    manifest = load_manifest(previous)
    pool = load_pool(pool_path)
    if pool.tier_names != manifest.tier_names:
        raise DataError(str(pool_path), f"tiers {pool.tier_names} differ from {previous}'s {manifest.tier_names}: "
                        "--init-from continues a model with the same tiers")
    if manifest.training.get("teacher"):
        raise PromptierError(f"{previous} was distilled from a teacher artifact, which its recipe does not rebuild")
    if config is None:
        # Held-out sources and categories measured the earlier run's transfer; the new logs may not hold
        # them, and a continuation trains on all it is given unless told otherwise (--holdout-*).
        config = TrainConfig.model_validate({**manifest.training["config"],  # type: ignore[dict-item]
                                             "holdout_sources": [], "holdout_categories": [],
                                             **{k: v for k, v in (overrides or {}).items() if v is not None}})
    checkpoint = checkpoint_of(previous)
    candidate = out.with_name(out.name + CANDIDATE_SUFFIX)
    try:  # before the run: the continued model is written there whatever the comparison says
        check_destination(candidate)
    except ArtifactError:
        raise ArtifactError(f"{candidate} holds files that are not an artifact's, and the continued model is "
                            "written there before it is compared, replacing the whole directory: move them "
                            "away and rerun") from None
    # A work dir of its own per model continued from: a rerun resumes it, a later retrain does not.
    work_dir = work_dir or out.with_name(f"{out.name}.retrain-{manifest.model_version}.work")
    main = torchrun_environment()[0] == 0
    with out_lock(out) if main else contextlib.nullcontext():  # the fresh run on OUT, or another continuation
        new = train(logs, pool_path, candidate, config, work_dir=work_dir, skip_invalid=skip_invalid,
                    model_version=model_version, command=command, cache_dir=cache_dir, init_from=checkpoint,
                    compare_with=previous)
        if new is None:
            return None
        return _promote_if_not_worse(new, previous, candidate, out, force)


def _promote_if_not_worse(new: ArtifactManifest, previous: Path, candidate: Path, out: Path,
                          force: bool) -> RetrainResult:
    """Move the candidate to OUT unless the comparison says it is worse (or with `force`)."""
    comparison = new.metrics.get("retrain")
    if not isinstance(comparison, dict):
        raise DataError("logs", "the new logs have no test split to compare the models on (test_fraction is 0)")
    # `worse` is None when no held-out prompt could tell the models apart: promoted only with `force`. Nor
    # is a model that ranks the probe suite's obvious prompts far worse, however the new logs score it.
    lost_sense = bool(comparison.get("common_sense", {}).get("lost"))
    promoted = force or (comparison["worse"] is False and not lost_sense)
    rollback = rollback_location(out) if promoted else None
    if promoted:
        if rollback is not None and same_directory(previous, out):
            # Named as the user named the artifact continued from, so that a relative path stays relative.
            start = previous.with_name(rollback.name) if previous.name else rollback
            new = record_start_moved(candidate, new, start)
        promote(candidate, out, rollback)
    log.info("retrain: APGR %.4f -> %.4f on %d new held-out prompts; %s", comparison["apgr"]["all"]["previous"],
             comparison["apgr"]["all"]["new"], comparison["prompts"], "promoted" if promoted else "not promoted")
    return RetrainResult(new, comparison, promoted, out if promoted else candidate, rollback)
