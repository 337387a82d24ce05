"""The artifact layout: training writes exactly the files classifier/artifact_layout.py declares, a
whole artifact appears at once or not at all, and one file is replaced whole."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import classifier
from classifier.artifact_layout import (
    GENERALIZATION_FILES,
    MEMBER_FILES,
    REQUIRED_FILES,
    member,
    staged_artifact,
    write_member_text,
    writing_member,
)
from classifier.errors import ArtifactError


def test_a_trained_artifact_holds_exactly_the_declared_files(trained_artifact: Path) -> None:
    """Written by the real pipeline: a file under a name the layout does not declare fails here."""
    names = {path.name for path in trained_artifact.iterdir()}
    # Only `promptier eval --record --loso/--seeds` writes the generalization files.
    assert names == MEMBER_FILES - set(GENERALIZATION_FILES)
    # Nothing staged or set aside is left beside it: the artifact and its training work dir only.
    assert sorted(path.name for path in trained_artifact.parent.iterdir()) == [
        trained_artifact.name, f"{trained_artifact.name}.work"]
    classifier.load(trained_artifact)


def test_the_card_of_a_model_trained_from_python_gives_its_recipe(trained_artifact: Path) -> None:
    """No command is recorded for a model `training.pipeline.train` made: the card's Reproduce section
    gives the recipe it was trained with (which `promptier train --config` reads back), not `None`."""
    import json

    import yaml

    from classifier.artifact import load_manifest
    from training.config import TrainConfig

    card = (trained_artifact / "MODEL_CARD.md").read_text()
    reproduce = card.split("## Reproduce", 1)[1].split("## ", 1)[0]
    assert "```\nNone\n```" not in reproduce
    recipe = reproduce.split("```json\n", 1)[1].split("```", 1)[0]
    recorded = load_manifest(trained_artifact).training["config"]
    read_back, expected = TrainConfig.model_validate(yaml.safe_load(recipe)), TrainConfig.model_validate(recorded)
    # The fixture's backbone is an absolute path: the card gives it relative to the directory it was
    # written in (the test's), and read back from there it names the same folder.
    assert not Path(read_back.backbone).is_absolute()
    assert Path(read_back.backbone).resolve() == Path(expected.backbone).resolve()
    assert read_back.model_copy(update={"backbone": expected.backbone}) == expected
    assert json.loads(recipe) == {**json.loads(json.dumps(recorded)), "backbone": read_back.backbone}


def test_an_artifact_is_readable_by_whoever_the_umask_lets_read_files(trained_artifact: Path, tmp_path: Path) -> None:
    """Trained by one user, served by another: members get open()'s modes, not tempfile's private ones."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(trained_artifact.stat().st_mode) == 0o777 & ~umask
    for path in trained_artifact.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    write_member_text(tmp_path, "eval.md", "rewritten in place\n")
    assert stat.S_IMODE((tmp_path / "eval.md").stat().st_mode) == 0o666 & ~umask


def test_member_refuses_a_name_the_layout_does_not_declare(tmp_path: Path) -> None:
    assert member(tmp_path, "eval.json") == tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"'evaluation\.json' is not a file of the artifact layout"):
        member(tmp_path, "evaluation.json")
    with pytest.raises(ValueError):
        write_member_text(tmp_path, "notes.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_member_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    write_member_text(tmp_path, "eval.md", "old\n")
    with pytest.raises(RuntimeError), writing_member(tmp_path, "eval.md") as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("the writer died")
    assert (tmp_path / "eval.md").read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["eval.md"]  # no temporary file left
    write_member_text(tmp_path, "eval.md", "new\n")
    assert (tmp_path / "eval.md").read_text() == "new\n"
    assert [path.name for path in tmp_path.iterdir()] == ["eval.md"]


def _write_required(directory: Path, marker: str) -> None:
    for name in REQUIRED_FILES:
        (directory / name).write_text(marker)


def test_a_staged_artifact_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with staged_artifact(out) as staging:
        assert staging.parent == tmp_path and not out.exists()
        _write_required(staging, "v1")
        (staging / "eval.png").write_bytes(b"png")
    assert sorted(path.name for path in out.iterdir()) == sorted([*REQUIRED_FILES, "eval.png"])

    # A writer that fails half way: the previous artifact stays as it was, nothing is left beside it.
    with pytest.raises(RuntimeError), staged_artifact(out) as staging:
        _write_required(staging, "v2")
        raise RuntimeError("parity failed")
    assert (out / "manifest.json").read_text() == "v1"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]

    # A writer that used a name the layout does not declare: refused before anything is replaced.
    with pytest.raises(ArtifactError, match=r"does not declare: scratch\.onnx"), staged_artifact(out) as staging:
        _write_required(staging, "v3")
        (staging / "scratch.onnx").write_bytes(b"")
    assert (out / "manifest.json").read_text() == "v1"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]

    # A complete one replaces the old directory entirely: no file of v1 survives in it.
    with staged_artifact(out) as staging:
        _write_required(staging, "v4")
    assert sorted(path.name for path in out.iterdir()) == sorted(REQUIRED_FILES)
    assert (out / "manifest.json").read_text() == "v4"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]



def test_a_directory_that_is_not_an_artifact_is_never_replaced(tmp_path: Path) -> None:
    """`--out models` (the folder of every model) or a project folder was replaced whole, and all it held
    deleted; an artifact's own directory, its `eval/` reports included, and an empty one still are."""
    folder = tmp_path / "models"
    (folder / "current").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    refused = r"is not an artifact directory \(it holds current, notes\.txt\)"
    with pytest.raises(ArtifactError, match=refused), staged_artifact(folder) as staging:
        _write_required(staging, "v1")
    assert sorted(path.name for path in folder.iterdir()) == ["current", "notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models"]  # nothing staged is left

    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_artifact(empty) as staging:
        _write_required(staging, "v1")
    (empty / "eval").mkdir()  # what `promptier eval` writes into a model it does not record into
    (empty / "eval" / "eval.md").write_text("report")
    (empty / ".eval.json.k3j9x2.json").write_text("{")  # a member's temporary file, left by a killed `eval --record`
    with staged_artifact(empty) as staging:
        _write_required(staging, "v2")
    assert (empty / "manifest.json").read_text() == "v2"
    assert not (empty / ".eval.json.k3j9x2.json").exists()

# A writer that stages an artifact for argv[1] and stays in the block until it is killed.
STAGING_WRITER = """
import sys, time
from pathlib import Path
from classifier.artifact_layout import staged_artifact
with staged_artifact(Path(sys.argv[1])) as staging:
    (staging / "manifest.json").write_text("half written")
    print(staging.name, flush=True)
    time.sleep(600)
"""


def _staging_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    """A live writer in its staging block, and its staging directory."""
    import select

    writer = subprocess.Popen([sys.executable, "-c", STAGING_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    ready, _, _ = select.select([writer.stdout], [], [], 120)  # a writer stuck on a lock fails the test
    name = writer.stdout.readline().strip() if ready else ""
    writer.stdout.close()
    if not name:
        writer.kill()
        pytest.fail(f"the writer did not reach its staging block (exit status {writer.wait()})")
    return writer, out.parent / name


def test_a_killed_writers_staging_is_cleared_by_the_next_writer_and_a_live_ones_is_not(tmp_path: Path) -> None:
    out = tmp_path / "model"
    live, live_staging = _staging_writer(out)
    killed, killed_staging = _staging_writer(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        with staged_artifact(out) as staging:
            _write_required(staging, "v1")
        assert (out / "manifest.json").read_text() == "v1"
        assert not killed_staging.exists(), "a dead writer's half-written artifact was left beside the model"
        assert (live_staging / "manifest.json").read_text() == "half written"  # still being written: kept
    finally:
        live.kill()
        live.wait()
    with staged_artifact(out) as staging:
        _write_required(staging, "v2")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_writer_killed_while_swapping_directories_leaves_the_previous_artifact_where_it_was(
        tmp_path: Path) -> None:
    """Killed after moving the previous artifact aside and before putting its own in place, a writer
    leaves no artifact at all: the next writer puts the previous one back before anything else, so a
    failure of its own leaves the model as it was. Another output's directories are never taken, even
    where a glob of this output's name would match them."""
    from classifier.artifact_layout import _staging_prefix

    out = tmp_path / "model[1]"
    staging = tmp_path / (_staging_prefix(out) + "dead0001")
    aside = staging.with_name(staging.name + ".replaced")
    staging.mkdir()
    _write_required(staging, "v2")
    aside.mkdir()
    _write_required(aside, "v1")
    # Of the output "model1" (which `.model[1].staging-*` matches as a glob), and of another host.
    others = [tmp_path / (_staging_prefix(tmp_path / "model1") + "dead0003.replaced"),
              tmp_path / (".model[1].staging-0000beef-" + "dead0004.replaced")]
    for other in others:
        other.mkdir()
        _write_required(other, "not ours")
    with pytest.raises(RuntimeError), staged_artifact(out) as new:
        _write_required(new, "v3")
        raise RuntimeError("parity failed")
    assert (out / "manifest.json").read_text() == "v1"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model[1]", *(o.name for o in others)])

    # Killed after putting its own in place, before removing the previous one: the leftover goes.
    leftover = tmp_path / (_staging_prefix(out) + "dead0002.replaced")
    leftover.mkdir()
    _write_required(leftover, "v0")
    with staged_artifact(out) as new:
        _write_required(new, "v4")
    assert (out / "manifest.json").read_text() == "v4"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model[1]", *(o.name for o in others)])


# Run in a process of its own: it stops itself with SIGTERM inside `staged_artifact`, as a scheduler
# stopping `promptier train` or `promptier export` would. argv: the artifact directory, and "writing"
# (stopped while the new artifact is written) or "replacing" (between the two renames that swap it in).
_STOPPED_WRITER = """
import os, pathlib, signal, sys, time
from classifier import artifact_layout

out, when = pathlib.Path(sys.argv[1]), sys.argv[2]
real_rename = pathlib.Path.rename

def rename_then_stop(self, target):
    moved = real_rename(self, target)
    if self == out:  # the old artifact is aside and the new one not yet in its place
        os.kill(os.getpid(), signal.SIGTERM)
    return moved

if when == "replacing":
    pathlib.Path.rename = rename_then_stop
with artifact_layout.staged_artifact(out) as staging:
    for name in artifact_layout.REQUIRED_FILES:
        (staging / name).write_text("v2")
    if when == "writing":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
"""


@pytest.mark.parametrize(("when", "expected"), [("writing", "v1"), ("replacing", "v2")])
def test_a_sigterm_leaves_one_whole_artifact_and_nothing_staged(tmp_path: Path, when: str, expected: str) -> None:
    """Stopped while writing, the old artifact stays and the staged one is removed; stopped half way
    through the swap, the swap finishes first. Either way the process exits 128 + SIGTERM."""
    out = tmp_path / "model"
    with staged_artifact(out) as staging:
        _write_required(staging, "v1")
    result = subprocess.run([sys.executable, "-c", _STOPPED_WRITER, str(out), when], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert (out / "manifest.json").read_text() == expected
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
