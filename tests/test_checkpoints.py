"""Checkpoints are pickles: loading one must never run code that was put into it."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from classifier.errors import PromptierError
from tests.conftest import tiny_config
from tests.tiny_bag import TinyBag


class _RunsCode:
    """Unpickling this calls Path.touch on `marker`: what a crafted checkpoint could do with any callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    model = nn.Linear(2, 3)
    torch.save({"model": model.state_dict(), "step": 1, "extra": _RunsCode(marker)}, path)
    return path


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)


def test_resuming_from_a_crafted_checkpoint_is_refused_without_running_it(tmp_path: Path,
                                                                          tiny_backbone: Path) -> None:
    from training.trainer import CHECKPOINT_FILE, fit

    marker = tmp_path / "code-ran"
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    _crafted_checkpoint(work_dir / CHECKPOINT_FILE, marker)
    config = tiny_config(tiny_backbone, epochs=1)
    with pytest.raises(PromptierError, match="refused, since loading it could run code"):
        fit(_Tiny(), [np.array([1, 2, 3])], np.zeros((1, 3), dtype=np.float32), config, work_dir)
    assert not marker.exists()


def test_exporting_a_crafted_checkpoint_is_refused_without_running_it(tmp_path: Path,
                                                                      trained_artifact: Path) -> None:
    from training.export import export_checkpoint

    marker = tmp_path / "code-ran"
    checkpoint = _crafted_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(PromptierError, match="refused, since loading it could run code"):
        export_checkpoint(trained_artifact, checkpoint, ["a prompt"] * 600, tmp_path / "out", quantize=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_written_by_training_loads_whole(tmp_path: Path) -> None:
    from transformers import get_linear_schedule_with_warmup

    from training.trainer import _save_checkpoint, load_checkpoint

    model = _Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    model.linear(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    _save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, scheduler, 7)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 7 and torch.equal(state["torch_rng"], torch.get_rng_state())
    restored = _Tiny()
    restored.load_state_dict(state["model"])
    assert torch.equal(restored.linear.weight, model.linear.weight)
    torch.optim.AdamW(restored.parameters(), lr=1e-3).load_state_dict(state["optimizer"])
    # Cut short (a disk that filled, a copy that stopped) or emptied: an error naming the file and the
    # remedy, not a traceback from torch's zip reader or a bare "Aborted.".
    whole = (tmp_path / "checkpoint.pt").read_bytes()
    for damaged in (whole[: len(whole) // 2], b"", b"junk text, never a checkpoint"):
        (tmp_path / "checkpoint.pt").write_bytes(damaged)
        with pytest.raises(PromptierError, match=r"checkpoint\.pt cannot be read: it is cut short or damaged"):
            load_checkpoint(tmp_path / "checkpoint.pt")
    # A work dir given for its checkpoint: named as a directory, not as a damaged file to delete.
    with pytest.raises(PromptierError, match=r"is a directory: give the checkpoint file in it") as wrong:
        load_checkpoint(tmp_path)
    assert "Delete" not in str(wrong.value)


def test_a_rerun_resumes_only_its_own_run(tmp_path: Path, tiny_backbone: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint left by a run on other examples or settings is refused, not resumed: resumed, it
    would train nothing more (its steps are done) and keep the other run's weights."""
    from training.trainer import fit

    tokens = [np.array([1 + i % 7, 2, 3 + i % 5]) for i in range(40)]
    targets = np.tile(np.array([[0.0, 1.0, 1.0]], dtype=np.float32), (40, 1))
    config = tiny_config(tiny_backbone, epochs=1, batch_size=8, checkpoint_every=2)
    work_dir = tmp_path / "work"
    report: dict = {}
    fit(TinyBag(), tokens, targets, config, work_dir, report=report)
    assert report["steps_this_run"] == 5
    assert "resuming" not in caplog.text
    again: dict = {}
    with caplog.at_level("INFO", logger="training.trainer"):
        fit(TinyBag(), tokens, targets, config.model_copy(update={"threads": 1}), work_dir, report=again)
    assert again["steps_this_run"] == 0 and again["run_key"] == report["run_key"]  # the same run: resumed
    assert f"resuming from {work_dir / 'checkpoint.pt'} at step 5 of 5" in caplog.text  # and says so
    edited = [ids + 1 for ids in tokens]  # other prompts of the same token counts
    others = ((tokens, 1.0 - targets, config), (edited, targets, config),
              (tokens, targets, config.model_copy(update={"seed": config.seed + 1})),
              (tokens, targets, config.model_copy(update={"learning_rate": 3.0})))
    for other_tokens, other_targets, other_config in others:
        with pytest.raises(PromptierError, match="checkpoint of another run"):
            fit(TinyBag(), other_tokens, other_targets, other_config, work_dir)


def test_a_re_export_records_the_libraries_that_wrote_it(tmp_path: Path, trained_artifact: Path) -> None:
    """Re-exporting after an ONNX Runtime upgrade is what `promptier export` is for: the manifest and card
    then name the libraries that exported and checked the new file, and keep those it was trained with."""
    import shutil

    import onnxruntime

    from classifier.artifact import load_manifest
    from training.export import export_checkpoint
    from training.synthetic import synthetic_rows

    artifact = Path(shutil.copytree(trained_artifact, tmp_path / "model"))
    manifest = json.loads((artifact / "manifest.json").read_text())
    trained_with = {**manifest["versions"], "onnxruntime": "1.0.0-before-the-upgrade"}
    manifest["versions"] = trained_with
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    trained = trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"
    checkpoint = tmp_path / "model.work" / "checkpoint.pt"  # the work dir moved with the artifact
    checkpoint.parent.mkdir()
    shutil.copyfile(trained, checkpoint)
    prompts = [row["prompt"] for row in synthetic_rows(600, 3)]
    export_checkpoint(artifact, checkpoint, prompts, tmp_path / "again", quantize=False)

    exported = load_manifest(tmp_path / "again")
    # It records the checkpoint it was exported from, which a continuation of it then finds.
    assert Path(str(exported.training["checkpoint"])).resolve() == checkpoint.resolve()
    assert exported.versions["onnxruntime"] == onnxruntime.__version__
    assert exported.training["versions"] == trained_with
    card = (tmp_path / "again" / "MODEL_CARD.md").read_text()
    assert f"s on {trained_with}" in card and f"(`promptier export`) on {exported.versions}" in card


def test_a_model_with_familiarity_re_exports_from_its_own_checkpoint_only(tmp_path: Path, tiny_backbone: Path,
                                                                          synthetic_logs: Path, pool_file: Path
                                                                          ) -> None:
    """`promptier export` rebuilds the unfamiliarity output (the shipped recipe has one) from the statistics
    its run wrote into the checkpoint, and refuses a checkpoint another run wrote."""
    import classifier
    from training.export import export_checkpoint
    from training.pipeline import train
    from training.synthetic import synthetic_rows

    def familiar(seed: int):  # type: ignore[no-untyped-def]
        return tiny_config(tiny_backbone, student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32,
                                                   "pooling_heads": 2, "length_feature": True},
                           epochs=4, learning_rate=1e-2, seed=seed,
                           familiarity={"directions": 8, "quantile": 0.99, "short_chars": 60, "long_chars": 400})

    original = tmp_path / "model"
    train([synthetic_logs], pool_file, original, familiar(7), model_version="familiar")
    prompts = [row["prompt"] for row in synthetic_rows(600, 3)]
    checkpoint = tmp_path / "model.work" / "checkpoint.pt"
    export_checkpoint(original, checkpoint, prompts, tmp_path / "again", quantize=False)
    before, after = classifier.load(original), classifier.load(tmp_path / "again")
    probes = ["prove theorem derive integral eigenvalue lemma", "hello thanks say hi", "ζζζ ωωω ψψψ"]
    for old, new in zip(before.classify_batch(probes), after.classify_batch(probes), strict=True):
        assert (new.tier, new.decided_by) == (old.tier, old.decided_by)
        assert new.familiarity == pytest.approx(old.familiarity, abs=1e-4)
    assert {before.classify("ζζζ ωωω ψψψ").decided_by} == {"prior"}  # the prior's path is covered too

    other = tmp_path / "other"
    train([synthetic_logs], pool_file, other, familiar(8), model_version="other")
    with pytest.raises(PromptierError, match="another run's checkpoint"):
        export_checkpoint(original, tmp_path / "other.work" / "checkpoint.pt", prompts, tmp_path / "wrong",
                          quantize=False)
    assert not (tmp_path / "wrong").exists()
    # The same run's key, trained further (a rerun with a larger max_steps): other weights, refused too.
    further = torch.load(checkpoint, weights_only=True)
    further["step"] += 10
    torch.save(further, tmp_path / "further.pt")
    with pytest.raises(PromptierError, match="trained to step"):
        export_checkpoint(original, tmp_path / "further.pt", prompts, tmp_path / "wrong", quantize=False)


def test_a_second_run_on_the_same_work_dir_is_refused_while_the_first_runs(
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs on one OUT share OUT.work: let loose together, each overwrites the other's checkpoint
    (and they collide on its temporary file). The second is refused, and the first finishes unharmed."""
    from training import trainer
    from training.pipeline import train

    config = tiny_config(tiny_backbone, epochs=1)
    out = tmp_path / "model"
    save = trainer._save_checkpoint
    second: list[BaseException | None] = []

    def save_then_start_another(*args, **kwargs):  # type: ignore[no-untyped-def]
        save(*args, **kwargs)
        if not second:  # the first checkpoint of the first run: a second command starts now
            try:
                train([synthetic_logs], pool_file, out, config, model_version="second")
                second.append(None)
            except PromptierError as error:
                second.append(error)

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_start_another)
    manifest = train([synthetic_logs], pool_file, out, config, model_version="first")
    assert second and isinstance(second[0], PromptierError)
    assert "in use by another training run" in str(second[0]) and str(out.with_name("model.work")) in str(second[0])
    assert manifest is not None and manifest.training["fit"]["steps_this_run"] == manifest.training["fit"]["steps"]
    assert json.loads((out / "manifest.json").read_text())["model_version"] == "first"
    assert not (tmp_path / "model.work" / "train.lock").exists()  # released with the run
