"""Data-parallel training: two CPU processes under torchrun (gloo) train the model one process trains.

Both runs take the same global batches (each process half of each), so they differ only by float
rounding (sums in another order). With dropout off, the validation metrics agree within
VALIDATION_TOLERANCE; a checkpoint written by two processes resumes in one.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from typer.testing import CliRunner

import classifier
from classifier.artifact import load_manifest
from tests.conftest import synthetic_rows, tiny_config, write_jsonl

# Measured here: validation losses within 1e-8 (relative), APGR equal, temperatures within 3e-4 (their
# fit stops at a tolerance). A bug in sharding, loss scaling or gradient averaging moves the loss by
# 1e-2 or more (each process training on half of each batch, or at twice the step size).
VALIDATION_TOLERANCE = 1e-3

pytestmark = pytest.mark.slow


def _train(args: list[str]) -> None:
    from training.cli import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def test_two_processes_match_one_and_resume_across_modes(tmp_path: Path, tiny_backbone: Path,
                                                          pool_file: Path, capfd: pytest.CaptureFixture) -> None:
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(540, seed=3))
    # device cpu: the processes this test is about, which `auto` would put on GPUs where there are some.
    values = tiny_config(tiny_backbone, epochs=2, checkpoint_every=10, threads=2, device="cpu",
                         student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32, "pooling_heads": 2,
                                  "dropout": 0.0, "length_feature": True}).model_dump()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    common = ["--logs", str(logs), "--pool", str(pool_file), "--config", str(config)]

    _train([*common, "--out", str(tmp_path / "one")])
    _train([*common, "--out", str(tmp_path / "two"), "--processes", "2"])
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert one.training["fit"]["processes"] == 1 and two.training["fit"]["processes"] == 2  # type: ignore[index]
    assert one.training["fit"]["steps"] == two.training["fit"]["steps"]  # type: ignore[index]
    assert "--processes 2" in str(two.training["command"])
    _assert_same_validation(one.metrics["validation"], two.metrics["validation"])
    assert one.calibration.temperatures == pytest.approx(two.calibration.temperatures, rel=VALIDATION_TOLERANCE)
    assert two.metrics["export_parity"]["tier_agreement"] >= 0.995  # type: ignore[index]
    # Only the main process wrote: one report line (the processes print to the real stdout), one checkpoint.
    assert capfd.readouterr().out.count("wrote ") == 1
    assert sorted(p.name for p in (tmp_path / "two.work").iterdir()) == ["checkpoint.pt", "seen_prompts.txt",
                                                                         "trainset"]
    prompts = ["hello thanks say hi cat dog", "prove theorem derive integral eigenvalue lemma"]
    assert np.allclose(classifier.load(tmp_path / "one").probabilities(prompts)[0],
                       classifier.load(tmp_path / "two").probabilities(prompts)[0], atol=VALIDATION_TOLERANCE)

    # Two processes stop after 10 steps; one process resumes their checkpoint and finishes the run.
    capped = tmp_path / "capped.yaml"
    capped.write_text(yaml.safe_dump({**values, "max_steps": 10}))
    work = tmp_path / "resumed.work"
    _train(["--logs", str(logs), "--pool", str(pool_file), "--config", str(capped), "--out",
            str(tmp_path / "partial"), "--work-dir", str(work), "--processes", "2"])
    assert load_manifest(tmp_path / "partial").training["fit"]["steps"] == 10  # type: ignore[index]
    _train([*common, "--out", str(tmp_path / "resumed"), "--work-dir", str(work)])
    resumed = load_manifest(tmp_path / "resumed")
    assert resumed.training["fit"]["steps_this_run"] == one.training["fit"]["steps"] - 10  # type: ignore[index]
    _assert_same_validation(one.metrics["validation"], resumed.metrics["validation"])


def _assert_same_validation(a: object, b: object) -> None:
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["prompts"] == b["prompts"]
    assert b["loss"] == pytest.approx(a["loss"], rel=VALIDATION_TOLERANCE)
    for group, value in a["apgr"].items():
        assert b["apgr"][group] == pytest.approx(value, abs=VALIDATION_TOLERANCE), group


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_stops_every_process_of_the_run(tmp_path: Path, tiny_backbone: Path, pool_file: Path,
                                                              stop: signal.Signals) -> None:
    """`kill` of `promptier train --processes 2` (or its death) stops torchrun and its workers: none trains
    on, to write OUT behind the back of a user who saw the command end, or beside the rerun that resumes it."""
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(540, seed=3))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone, epochs=400, checkpoint_every=5,
                                                  device="cpu").model_dump()))
    out = tmp_path / "model"
    launcher = psutil.Popen([sys.executable, "-m", "classifier.cli", "train", "--logs", str(logs), "--pool",
                             str(pool_file), "--config", str(config), "--out", str(out), "--processes", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run: list[psutil.Process] = []
    try:
        checkpoint = tmp_path / "model.work" / "checkpoint.pt"
        while not checkpoint.exists():  # training has started in both workers
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.1)
        run = launcher.children(recursive=True)
        assert len(run) >= 3  # torchrun and its two workers
        launcher.send_signal(stop)
        launcher.wait(timeout=120)
        _, alive = psutil.wait_procs(run, timeout=120)
        assert not alive, [process.cmdline()[:4] for process in alive]
    finally:  # whatever the outcome, no process of the test outlives it
        for process in (launcher, *run):
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert not out.exists()
