"""`promptier train`'s options reach the recipe they name, or are refused before any work starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import POOL_YAML, synthetic_rows, tiny_config, write_jsonl


def _train(args: list[str]):  # type: ignore[no-untyped-def]
    from training.cli import app

    return CliRunner().invoke(app, ["train", *args])


def _files(tmp_path: Path, tiny_backbone: Path, **overrides: object) -> list[str]:
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone, **overrides).model_dump()))
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL_YAML)
    logs = tmp_path / "logs.jsonl"
    logs.write_text("")
    return ["--logs", str(logs), "--pool", str(pool), "--config", str(config), "--out", str(tmp_path / "out")]


def test_distill_weight_sets_the_recipes_embedding_teacher(tmp_path: Path, tiny_backbone: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --teacher, the weight is the embedding teacher's: the config the run gets (and the artifact
    stores) carries it, so the recorded command and config rebuild the same model."""
    import training.pipeline

    received = []
    monkeypatch.setattr(training.pipeline, "train", lambda *args, **kwargs: received.append(args[3]))
    files = _files(tmp_path, tiny_backbone, teacher={"kind": "embedding-mlp", "distill_weight": 0.5})
    result = _train([*files, "--distill-weight", "0.2"])
    assert result.exit_code == 0, result.output
    assert received[0].teacher.distill_weight == 0.2
    result = _train(files)
    assert result.exit_code == 0, result.output
    assert received[1].teacher.distill_weight == 0.5


def test_distill_weight_without_a_teacher_is_refused(tmp_path: Path, tiny_backbone: Path) -> None:
    """A weight for a teacher that does not exist would change nothing while the command said it had."""
    files = _files(tmp_path, tiny_backbone)
    result = _train([*files, "--distill-weight", "0.2"])
    assert result.exit_code == 2 and "--distill-weight weights a teacher" in result.output
    result = _train([*files, "--distill-weight", "1.5"])
    assert result.exit_code == 2 and "Invalid value for '--distill-weight'" in result.output
    result = _train([*files, "--distill-weight", "0.2", "--init-from", str(tmp_path)])
    assert result.exit_code == 2 and "--distill-weight need a fresh run" in result.output
    # Refused by the launcher of several processes, once, before torchrun starts any.
    result = _train([*files, "--distill-weight", "0.2", "--processes", "2"])
    assert result.exit_code == 2 and "--distill-weight weights a teacher" in result.output
    assert "starting 2 processes" not in result.output
    assert not (tmp_path / "out").exists()


def test_ctrl_c_says_the_run_resumes_when_rerun(tmp_path: Path, tiny_backbone: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped with Ctrl-C, `train` exited with status 130 and not a word, where `label` says how to go on."""
    import training.pipeline
    import training.retrain

    def stopped(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(training.pipeline, "train", stopped)
    monkeypatch.setattr(training.retrain, "retrain", stopped)
    files = _files(tmp_path, tiny_backbone)
    for extra in ([], ["--init-from", str(tmp_path / "current")]):
        result = _train([*files, *extra])
        assert result.exit_code == 130, result.output
        assert (f"interrupted: {tmp_path / 'out'} is as it was; rerun the same command to resume from the last "
                "checkpoint") in result.output


def test_logs_too_small_to_check_the_export_are_refused_before_training(tmp_path: Path, tiny_backbone: Path) -> None:
    """The export's parity check needs 500 prompts: logs with fewer stop at once with how many they
    give, not after a whole fit."""
    files = _files(tmp_path, tiny_backbone)
    write_jsonl(Path(files[1]), synthetic_rows(60, seed=3))
    result = _train(files)
    assert result.exit_code == 2, result.output
    assert "too few prompts" in result.output and "at least 500 distinct prompts" in result.output
    # Nothing of the run is left, not even the empty work dir it locked while reading the logs.
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_the_launcher_of_several_processes_forwards_the_weight(tmp_path: Path, tiny_backbone: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process torchrun starts gets the options as given: a weight of 0 is a weight, not a default."""
    import subprocess

    started: list[list[str]] = []

    class Started:
        def __init__(self, command: list[str], **_options: object) -> None:
            started.append(command)

        def wait(self) -> int:
            return 0

    from training import cli

    monkeypatch.setattr(subprocess, "Popen", Started)
    monkeypatch.setattr(cli, "visible_gpus", lambda: 0)  # asked of a child process, which Started is not
    files = _files(tmp_path, tiny_backbone, teacher={"kind": "embedding-mlp"})
    result = _train([*files, "--distill-weight", "0", "--processes", "2"])
    assert result.exit_code == 0, result.output
    (command,) = started
    assert "torch.distributed.run" in command and "--nproc-per-node=2" in command
    assert command[command.index("--distill-weight") + 1] == "0.0"


def test_a_recipe_is_found_by_name_or_by_its_checkout_path_wherever_the_command_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The READMEs' and model cards' `--config training/configs/default.yaml` also works where the package
    is installed without a checkout; a file that exists is read as given."""
    from training.config import SHIPPED_RECIPE, load_config

    monkeypatch.chdir(tmp_path)
    shipped = load_config(SHIPPED_RECIPE)
    assert load_config("training/configs/default.yaml") == shipped == load_config("default")
    assert load_config("teacher").student is None and shipped.student is not None
    (tmp_path / "training" / "configs").mkdir(parents=True)
    (tmp_path / "training" / "configs" / "default.yaml").write_text("epochs: 2\n")
    assert load_config("training/configs/default.yaml").epochs == 2
    with pytest.raises(FileNotFoundError, match=r"no config file 'elsewhere/default\.yaml'.*default, student"):
        load_config("elsewhere/default.yaml")


@pytest.mark.parametrize(("text", "reason"), [
    ("epochs: 2\nepochs: 3\n", r"key 'epochs' is written twice \(first on line 1\)"),
    ("epochs: [\n", "cannot read config"),
    ("- epochs\n", "a training config is a mapping of settings, got list"),
])
def test_a_config_yaml_cannot_read_is_a_clear_error(tmp_path: Path, text: str, reason: str) -> None:
    from training.cli import app

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL_YAML)
    result = CliRunner().invoke(app, ["train", "--logs", str(logs), "--pool", str(pool), "--out",
                                      str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert re.search(reason, " ".join(result.output.split()))


def test_a_config_with_bad_fields_is_refused_naming_each_field_without_pydantics_links(tmp_path: Path) -> None:
    """pydantic's own message spreads each problem over lines with the input's repr and a link to its
    documentation; whoever wrote the recipe needs the field and what is wrong with it."""
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: lots\nteacher: {distill_weight: 7}\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL_YAML)
    result = _train(["--logs", str(tmp_path / "logs.jsonl"), "--pool", str(pool), "--config", str(config),
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "\n  epochs: Input should be a valid number" in result.output
    assert "\n  teacher.distill_weight: Input should be less than or equal to 1" in result.output
    assert "errors.pydantic.dev" not in result.output and "input_value" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", ["team/v1", "../v1", "v 1", "", "-v1"])
def test_a_model_version_that_cannot_name_a_directory_is_refused_before_training(
        tmp_path: Path, tiny_backbone: Path, version: str) -> None:
    """It names OUT.retrain-VERSION.work and OUT.previous-VERSION: `team/v1` trained, and then could never
    be continued or promoted, each failing only after a whole run."""
    result = _train([*_files(tmp_path, tiny_backbone), "--model-version", version])
    assert result.exit_code == 2 and "use letters, digits" in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
