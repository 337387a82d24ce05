"""`promptier train --init-from`: continue a deployed model on new logs; promote only if not worse."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import classifier
from classifier.artifact import load_manifest
from tests.conftest import synthetic_rows, tiny_config, write_jsonl

pytestmark = pytest.mark.slow


def _train(args: list[str]):  # type: ignore[no-untyped-def]
    from training.cli import app

    return CliRunner().invoke(app, ["train", *args])


def _config(tmp_path: Path, name: str, backbone: Path, **overrides: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(backbone, **overrides).model_dump()))
    return path


def test_a_better_retrain_is_promoted_and_the_previous_model_kept(tmp_path: Path, tiny_backbone: Path,
                                                                   pool_file: Path) -> None:
    old_logs = write_jsonl(tmp_path / "old.jsonl", synthetic_rows(540, seed=3))
    new_logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    deployed = tmp_path / "deployed"
    # The deployed model stopped after 4 steps: continuing it on the new logs must beat it there.
    weak = _config(tmp_path, "weak", tiny_backbone, max_steps=4)
    result = _train(["--logs", str(old_logs), "--pool", str(pool_file), "--out", str(deployed), "--config", str(weak),
                     "--model-version", "v1"])
    assert result.exit_code == 0, result.output
    assert Path(str(load_manifest(deployed).training["checkpoint"])).is_file()

    result = _train(["--logs", str(new_logs), "--pool", str(pool_file), "--out", str(deployed),
                     "--init-from", str(deployed), "--model-version", "v2", "--config",
                     str(_config(tmp_path, "continue", tiny_backbone))])
    assert result.exit_code == 0, result.output
    assert "promoted v2" in result.output and "deployed.previous-v1" in result.output
    new = load_manifest(deployed)
    # The model it started from is no longer at OUT: the records name where it went.
    assert new.model_version == "v2" and new.training["init_from"] == str(tmp_path / "deployed.previous-v1")
    comparison = new.metrics["retrain"]
    assert isinstance(comparison, dict) and comparison["previous_model_version"] == "v1"
    assert comparison["apgr"]["all"]["new"] > comparison["apgr"]["all"]["previous"] and not comparison["worse"]
    assert comparison["prompts"] > 0
    lead = comparison["lead"]
    assert lead["difference"] == pytest.approx(comparison["apgr"]["all"]["new"] - comparison["apgr"]["all"]["previous"],
                                               abs=1e-3)
    assert lead["ci95"][0] <= lead["difference"] <= lead["ci95"][1]
    assert "lead of the new model: +" in result.output
    # The previous artifact is intact beside it, ready to roll back to.
    assert load_manifest(tmp_path / "deployed.previous-v1").model_version == "v1"
    classifier.load(tmp_path / "deployed.previous-v1")
    assert "## Continued from a deployed model" in (deployed / "MODEL_CARD.md").read_text()


def test_a_worse_retrain_is_not_promoted_unless_forced(tmp_path: Path, tiny_backbone: Path, pool_file: Path,
                                                       trained_artifact: Path) -> None:
    deployed = tmp_path / "deployed"
    shutil.copytree(trained_artifact, deployed)
    new_logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    # One step at learning rate 1 wrecks the weights (each moves by about 1): a retrain that is worse.
    wrecking = _config(tmp_path, "wreck", tiny_backbone, learning_rate=1.0, warmup_ratio=0.0, max_steps=1)
    args = ["--logs", str(new_logs), "--pool", str(pool_file), "--out", str(deployed), "--init-from", str(deployed),
            "--config", str(wrecking), "--model-version", "wrecked"]
    result = _train(args)
    assert result.exit_code == 3, result.output
    assert "not promoted: wrecked is worse than tiny-test-1" in result.output
    assert load_manifest(deployed).model_version == "tiny-test-1"  # untouched
    candidate = load_manifest(tmp_path / "deployed.candidate")
    assert candidate.metrics["retrain"]["worse"]  # type: ignore[index]
    assert candidate.training["init_from"] == str(deployed)  # not promoted: that model is still there

    result = _train([*args, "--force"])
    assert result.exit_code == 0, result.output
    assert load_manifest(deployed).model_version == "wrecked"
    assert load_manifest(tmp_path / "deployed.previous-tiny-test-1").model_version == "tiny-test-1"


def test_a_decision_the_held_out_prompts_cannot_make_is_called_a_coin_toss(tmp_path: Path, tiny_backbone: Path,
                                                                          pool_file: Path,
                                                                          trained_artifact: Path) -> None:
    """A continuation that barely moved the weights is "not worse" by a hair, or by nothing: promoted on
    that, it used to be announced like any other promotion."""
    deployed = Path(shutil.copytree(trained_artifact, tmp_path / "deployed"))
    new_logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    nudge = _config(tmp_path, "nudge", tiny_backbone, learning_rate=1e-7, warmup_ratio=0.0, max_steps=1)
    result = _train(["--logs", str(new_logs), "--pool", str(pool_file), "--out", str(deployed), "--init-from",
                     str(deployed), "--config", str(nudge), "--model-version", "nudged"])
    assert result.exit_code in (0, 3), result.output
    assert "cannot tell the two models apart (the interval spans zero)" in result.output
    where = deployed if result.exit_code == 0 else tmp_path / "deployed.candidate"
    lead = load_manifest(where).metrics["retrain"]["lead"]  # type: ignore[index]
    assert lead["ci95"][0] <= 0 <= lead["ci95"][1]
    assert "prompts known on two tiers cannot tell the two apart." in (where / "MODEL_CARD.md").read_text()


def test_init_from_refuses_other_tiers_and_a_missing_checkpoint(tmp_path: Path, artifact_copy: Path) -> None:
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    two_tiers = tmp_path / "pool.yaml"
    two_tiers.write_text(yaml.safe_dump({
        "tiers": [{"name": "small", "usd_per_mtok": {"input": 0.2, "output": 0.2}},
                  {"name": "large", "usd_per_mtok": {"input": 1.0, "output": 5.0}}],
        "sources": {"alpha": {"small": "a-7b", "large": "a-frontier"}}}))
    result = _train(["--logs", str(logs), "--pool", str(two_tiers), "--out", str(tmp_path / "o"),
                     "--init-from", str(artifact_copy)])
    assert result.exit_code == 2 and "differ from" in result.output and "same tiers" in result.output

    from classifier.artifact import save_manifest

    manifest = load_manifest(artifact_copy)
    save_manifest(manifest.model_copy(update={"training": {**manifest.training, "checkpoint": "/nowhere.pt"}}),
                  artifact_copy)
    pool = tmp_path / "pool3.yaml"
    from training.synthetic import POOL_YAML

    pool.write_text(POOL_YAML)
    result = _train(["--logs", str(logs), "--pool", str(pool), "--out", str(tmp_path / "o"),
                     "--init-from", str(artifact_copy)])
    assert result.exit_code == 2 and "checkpoint" in result.output and "not on this machine" in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.candidate").exists()
    # A continued model learns the new logs alone: unlabeled prompts would be ignored, so they are refused.
    traffic = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": "hello there"}])
    result = _train(["--logs", str(logs), "--pool", str(pool), "--out", str(tmp_path / "o"),
                     "--init-from", str(artifact_copy), "--unlabeled", str(traffic)])
    assert result.exit_code == 2 and "--unlabeled" in result.output and not (tmp_path / "o").exists()


def test_init_from_continues_the_artifacts_own_checkpoint_only(tmp_path: Path, trained_artifact: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from another directory, the recorded (relative) checkpoint is found beside the artifact; a
    checkpoint of another run in its place (an older model's, say) is refused, never continued."""
    import torch

    from classifier.artifact import save_manifest
    from training.retrain import checkpoint_of

    own = Path(str(load_manifest(trained_artifact).training["checkpoint"]))
    deployed = Path(shutil.copytree(trained_artifact, tmp_path / "models" / "current"))
    work = tmp_path / "models" / "current.retrain-v1.work"
    work.mkdir()
    shutil.copyfile(own, work / own.name)
    manifest = load_manifest(deployed)
    save_manifest(manifest.model_copy(update={"training": {**manifest.training,
                                                           "checkpoint": f"models/{work.name}/{own.name}"}}),
                  deployed)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert checkpoint_of(deployed) == work / own.name
    older = tmp_path / "models" / "current.work"  # the default work dir, holding the first model's checkpoint
    older.mkdir()
    state = torch.load(own, weights_only=True)
    torch.save({**state, "run_key": "another run"}, older / own.name)
    shutil.copyfile(older / own.name, work / own.name)
    with pytest.raises(classifier.PromptierError, match="belongs to another run"):
        checkpoint_of(deployed)


def test_a_continued_model_counts_every_ancestors_prompts_as_seen(tmp_path: Path, tiny_backbone: Path,
                                                                  pool_file: Path, trained_artifact: Path,
                                                                  synthetic_logs: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Continued twice (the second time streamed), on logs that hold the first model's prompts again: each
    continuation's seen prompts include every ancestor's, and its test evaluation scores none of them."""
    import numpy as np

    from training import evaluate
    from training.labels import prompt_hash, seen_prompts
    from training.retrain import retrain

    evaluated: list[set[str]] = []
    real_evaluate_split = evaluate.evaluate_split

    def recording(artifact, table, split, *args, **kwargs):  # type: ignore[no-untyped-def]
        evaluated.append({prompt_hash(table.prompts[i]) for i in np.flatnonzero(split == "test")})
        return real_evaluate_split(artifact, table, split, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_split", recording)
    first = Path(shutil.copytree(trained_artifact, tmp_path / "v1"))
    first_seen = seen_prompts(first)
    second_logs = write_jsonl(tmp_path / "second.jsonl", synthetic_rows(300, seed=11))
    second = retrain(first, [synthetic_logs, second_logs], pool_file, tmp_path / "v2",
                     tiny_config(tiny_backbone, max_steps=4), force=True, model_version="v2")
    assert second is not None
    assert first_seen < seen_prompts(second.location)
    assert evaluated[-1] and not evaluated[-1] & first_seen
    left_out = second.manifest.training["test_prompts_seen_before"]
    assert isinstance(left_out, int) and left_out > 0
    assert f"{left_out} test prompts of the logs above are in no evaluation" in (
        second.location / "MODEL_CARD.md").read_text()

    third_logs = write_jsonl(tmp_path / "third.jsonl", synthetic_rows(300, seed=12))
    third = retrain(second.location, [synthetic_logs, third_logs], pool_file, tmp_path / "v3",
                    tiny_config(tiny_backbone, max_steps=4, streaming=True), force=True, model_version="v3")
    assert third is not None
    assert seen_prompts(second.location) < seen_prompts(third.location)
    # The first model's prompts, two generations back, are neither tested nor compared on.
    assert evaluated[-1] and not evaluated[-1] & first_seen
    assert third.manifest.training["test_prompts_seen_before"]


def test_a_promoted_continuation_names_where_the_model_it_started_from_went(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, trained_artifact: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Continued in place (`--init-from models/cur --out models/cur`), the previous model moves aside:
    the manifest, the card and the recorded command name it there, as relative as it was given, so that
    the command rebuilds this model instead of continuing it; the card still agrees with the manifest."""
    from training.model_card import render_model_card
    from training.retrain import retrain

    shutil.copytree(trained_artifact, tmp_path / "models" / "cur")
    write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    (tmp_path / "pool.yaml").write_text(pool_file.read_text())
    monkeypatch.chdir(tmp_path)
    cur = Path("models/cur")
    command = "promptier train --logs new.jsonl --pool pool.yaml --init-from models/cur --out models/cur --force"
    result = retrain(cur, ["new.jsonl"], Path("pool.yaml"), cur, tiny_config(tiny_backbone, max_steps=4),
                     force=True, model_version="v2", command=command)
    assert result is not None and result.promoted
    assert result.rollback == Path("models/cur.previous-tiny-test-1")
    manifest = load_manifest(cur)
    assert manifest == result.manifest
    assert manifest.training["init_from"] == "models/cur.previous-tiny-test-1"
    assert manifest.training["command"] == command.replace("--init-from models/cur",
                                                           "--init-from models/cur.previous-tiny-test-1")
    card = (cur / "MODEL_CARD.md").read_text()
    assert card == render_model_card(manifest, cur)
    assert "Initialised from models/cur.previous-tiny-test-1 (tiny-test-1)" in card
    assert str(tmp_path) not in card
    classifier.load(cur)  # the model and tokenizer still match the digests the rewritten manifest records


def test_a_continuation_does_not_inherit_the_earlier_runs_held_out_sources(tmp_path: Path, tiny_backbone: Path,
                                                                           pool_file: Path) -> None:
    """A source held out to measure the earlier run need not be in the new logs: without --holdout-source
    the continuation holds out nothing, rather than being refused for a name its logs lack."""
    old_logs = write_jsonl(tmp_path / "old.jsonl", synthetic_rows(540, seed=3))
    alpha_only = write_jsonl(tmp_path / "new.jsonl", [row for row in synthetic_rows(900, seed=11)
                                                      if row["source"] == "alpha"])
    deployed = tmp_path / "deployed"
    result = _train(["--logs", str(old_logs), "--pool", str(pool_file), "--out", str(deployed), "--config",
                     str(_config(tmp_path, "held", tiny_backbone, holdout_sources=["beta"])), "--model-version", "v1"])
    assert result.exit_code == 0, result.output
    result = _train(["--logs", str(alpha_only), "--pool", str(pool_file), "--out", str(deployed),
                     "--init-from", str(deployed), "--model-version", "v2", "--force"])
    assert result.exit_code == 0, result.output
    assert load_manifest(deployed).training["config"]["holdout_sources"] == []


def test_a_retrain_with_no_comparable_unseen_test_prompt_is_not_promoted_unless_forced(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, trained_artifact: Path, synthetic_logs: Path) -> None:
    """The continuing loop's usual logs: the same judged sample again, which the deployed model has
    seen, and fresh served requests, known on one tier each. No prompt of the test split is then both
    unseen and known on two tiers: APGR is 0 for both models there, which must not read as "not worse"."""
    import json

    from training.labels import prompt_hash, seen_prompts

    deployed = tmp_path / "deployed"
    shutil.copytree(trained_artifact, deployed)
    seen = seen_prompts(deployed)
    judged = [row for row in map(json.loads, synthetic_logs.read_text().splitlines())
              if prompt_hash(row["prompt"]) in seen]
    served: dict[str, dict] = {}
    for row in synthetic_rows(300, seed=21):  # one tier per prompt, as a decision log's requests
        served.setdefault(row["prompt"] + " served", {**row, "prompt": row["prompt"] + " served"})
    logs = write_jsonl(tmp_path / "new.jsonl", judged + list(served.values()))
    args = ["--logs", str(logs), "--pool", str(pool_file), "--out", str(deployed), "--init-from", str(deployed),
            "--config", str(_config(tmp_path, "continue", tiny_backbone)), "--model-version", "v2"]
    result = _train(args)
    assert result.exit_code == 3, result.output
    assert "cannot be compared" in result.output and "two tiers" in result.output, result.output
    assert load_manifest(deployed).model_version == "tiny-test-1"  # untouched
    comparison = load_manifest(tmp_path / "deployed.candidate").metrics["retrain"]
    assert isinstance(comparison, dict) and comparison["comparable_prompts"] == 0 and comparison["worse"] is None

    result = _train([*args, "--force"])
    assert result.exit_code == 0, result.output
    assert load_manifest(deployed).model_version == "v2"


def test_the_probe_suite_tells_a_model_that_lost_its_common_sense(shipped_artifact: Path,
                                                                  trained_artifact: Path) -> None:
    """The tiny model, trained on synthetic words only, ranks the suite's obvious prompts near chance: far
    below the shipped model, with an interval clear of zero. A model against itself has lost nothing."""
    from training.probes import COMMON_SENSE_TOLERANCE, common_sense_check

    shipped, tiny = classifier.load(shipped_artifact), classifier.load(trained_artifact)
    lost = common_sense_check(shipped, tiny)
    assert lost["previous_auc"] - lost["new_auc"] > COMMON_SENSE_TOLERANCE and lost["ci95"][1] < 0, lost
    assert lost["lost"] and lost["half"] == "select" and lost["probes"] > 100
    same = common_sense_check(shipped, shipped)
    assert not same["lost"] and same["difference"] == 0.0


def test_a_retrain_that_lost_its_common_sense_is_not_promoted_unless_forced(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, shipped_artifact: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs scored backwards teach the model their own inversion, and its APGR on their held-out prompts
    (scored the same way) says it is no worse. Here the continued tiny model is checked against the shipped
    model's sense of the probes in place of the tiny one's, which it cannot lose: it is far below that."""
    import training.evaluate

    real_check = training.evaluate.common_sense_check
    monkeypatch.setattr(training.evaluate, "common_sense_check",
                        lambda previous, new: real_check(classifier.load(shipped_artifact), new))
    deployed = tmp_path / "deployed"
    # As in the promoted retrain above: a model stopped after 4 steps, which continuing on new logs beats there.
    weak = _config(tmp_path, "weak", tiny_backbone, max_steps=4)
    old_logs = write_jsonl(tmp_path / "old.jsonl", synthetic_rows(540, seed=3))
    trained = _train(["--logs", str(old_logs), "--pool", str(pool_file), "--out", str(deployed), "--config", str(weak),
                      "--model-version", "v1"])
    assert trained.exit_code == 0, trained.output
    new_logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    args = ["--logs", str(new_logs), "--pool", str(pool_file), "--out", str(deployed), "--init-from", str(deployed),
            "--config", str(_config(tmp_path, "continue", tiny_backbone)), "--model-version", "senseless"]
    result = _train(args)
    assert result.exit_code == 3, result.output
    comparison = load_manifest(tmp_path / "deployed.candidate").metrics["retrain"]
    assert isinstance(comparison, dict) and comparison["worse"] is False and comparison["common_sense"]["lost"]
    assert "ranks the probe suite's prompts of obvious difficulty far worse than v1" in result.output
    assert "on the probe suite's 170 select-half prompts" in result.output
    assert load_manifest(deployed).model_version == "v1"
    assert "this model has lost the common sense the suite checks" in \
        (tmp_path / "deployed.candidate" / "MODEL_CARD.md").read_text()
    forced = _train([*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_manifest(deployed).model_version == "senseless"


def test_a_continuation_of_another_starting_model_is_never_resumed_in_its_place(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    """Two starting models of one version name share the continuation's work dir (OUT.retrain-v1.work):
    the second continuation used to 'resume' the first one's finished checkpoint and promote its model."""
    old_logs = write_jsonl(tmp_path / "old.jsonl", synthetic_rows(540, seed=3))
    other_logs = write_jsonl(tmp_path / "other.jsonl", synthetic_rows(540, seed=5))
    new_logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    config = str(_config(tmp_path, "tiny", tiny_backbone, max_steps=6))
    out = tmp_path / "deployed"
    continue_it = ["--logs", str(new_logs), "--pool", str(pool_file), "--out", str(out), "--init-from", str(out),
                   "--model-version", "v2", "--config", config, "--force"]
    for first_logs in (old_logs, other_logs):
        result = _train(["--logs", str(first_logs), "--pool", str(pool_file), "--out", str(out), "--config", config,
                         "--model-version", "v1"])
        assert result.exit_code == 0, result.output
        result = _train(continue_it)
        if first_logs == old_logs:
            assert result.exit_code == 0 and "promoted v2" in result.output, result.output
            shutil.rmtree(out)  # the team starts over with another v1, keeping the continuation's work dir
            shutil.rmtree(tmp_path / "deployed.previous-v1")
            shutil.rmtree(tmp_path / "deployed.work")
    assert result.exit_code == 2 and "is the checkpoint of another run" in result.output, result.output
    assert "resuming" not in result.output and load_manifest(out).model_version == "v1"


def test_two_runs_that_would_write_one_artifact_are_refused(tmp_path: Path, artifact_copy: Path, pool_file: Path,
                                                            tiny_backbone: Path) -> None:
    """A continuation (`--init-from`) and a fresh run on one OUT have different work dirs, so the work dir's
    lock let both run: the one that finished last replaced the other's artifact without a word."""
    from training.work_lock import out_lock

    logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    with out_lock(artifact_copy):
        for extra in (["--init-from", str(artifact_copy)], []):
            result = _train(["--logs", str(logs), "--pool", str(pool_file), "--out", str(artifact_copy),
                             "--config", str(_config(tmp_path, "tiny", tiny_backbone)), *extra])
            assert result.exit_code == 2, result.output
            assert f"{artifact_copy.resolve()} is being written by another training run (pid {os.getpid()})" in (
                " ".join(result.output.split()))
    assert not artifact_copy.with_name(artifact_copy.name + ".train.lock").exists()


def test_a_candidate_folder_holding_other_files_is_refused_before_any_training(
        tmp_path: Path, artifact_copy: Path, pool_file: Path, tiny_backbone: Path) -> None:
    """Found only once the whole run was done, it was named as --out's fault, which was not."""
    candidate = artifact_copy.with_name(artifact_copy.name + ".candidate")
    candidate.mkdir()
    (candidate / "notes.txt").write_text("mine")
    logs = write_jsonl(tmp_path / "new.jsonl", synthetic_rows(540, seed=11))
    result = _train(["--logs", str(logs), "--pool", str(pool_file), "--out", str(artifact_copy), "--init-from",
                     str(artifact_copy), "--config", str(_config(tmp_path, "tiny", tiny_backbone))])
    assert result.exit_code == 2 and "holds files that are not an artifact's" in " ".join(result.output.split())
    assert "step" not in result.output and (candidate / "notes.txt").read_text() == "mine"
