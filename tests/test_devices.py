"""Device and precision selection, and the mixed-precision training loop.

This machine has no GPU: `cuda` itself is untested here. What is tested: `auto` and `cpu` resolve to
the CPU, asking for `cuda` fails with a clear message, precision is fp32 on a CPU whatever is asked,
and the autocast + loss-scaling loop (the code a GPU runs) trains and resumes on the CPU, where torch
also implements bf16/fp16 autocast and a GradScaler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from classifier.errors import PromptierError
from tests.conftest import dies_after_first_checkpoint, synthetic_rows, tiny_config, write_jsonl
from tests.tiny_bag import TinyBag
from training.devices import DeviceError, Placement, resolve_device, resolve_precision

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about a machine without a GPU")


def _examples(n: int = 96) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 50, size=rng.integers(2, 12)) for _ in range(n)]
    targets = np.array([[float(t.mean() > 25), 1.0, np.nan if i % 4 == 0 else 1.0] for i, t in enumerate(tokens)])
    return tokens, targets


@no_gpu
def test_auto_and_cpu_resolve_to_the_cpu_and_cuda_says_why_not() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"sees no CUDA device.*use --device cpu or auto"):
        resolve_device("cuda")


def test_precision_is_fp32_on_a_cpu_whatever_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "fp32"
    assert "precision bf16 is for GPUs" in caplog.text
    placement = Placement(cpu, "fp32")
    assert placement.grad_scaler() is None and not placement.distributed and placement.is_main


def test_a_recipe_asking_for_bf16_trains_bit_for_bit_as_fp32_on_a_cpu(tmp_path: Path, tiny_backbone: Path) -> None:
    from training.trainer import fit

    tokens, targets = _examples()
    models = []
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        torch.manual_seed(0)
        model = TinyBag()
        config = tiny_config(tiny_backbone, epochs=2, device="cpu", precision=precision)
        models.append(fit(model, tokens, targets, config, tmp_path / name))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_fused_optimizer_trains_the_same_weights_up_to_rounding(tmp_path: Path, tiny_backbone: Path) -> None:
    from training.trainer import fit

    tokens, targets = _examples(200)
    models = []
    for fused in (None, True):
        torch.manual_seed(0)
        config = tiny_config(tiny_backbone, epochs=5, learning_rate=1e-2, device="cpu", fused_optimizer=fused)
        models.append(fit(TinyBag(), tokens, targets, config, tmp_path / str(fused)))
    difference = max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters(),
                                                                 strict=True))
    assert difference < 1e-5  # measured 5e-7 after 65 steps


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_mixed_precision_loop_trains_and_resumes(tmp_path: Path, tiny_backbone: Path, precision: str) -> None:
    """What a GPU runs (autocast, and for fp16 loss scaling), run on the CPU, which has both."""
    from training import trainer
    from training.trainer import CHECKPOINT_FILE, fit, load_checkpoint, masked_bce

    tokens, targets = _examples()
    placement = Placement(torch.device("cpu"), precision)  # type: ignore[arg-type]
    config = tiny_config(tiny_backbone, epochs=4, batch_size=16, learning_rate=3e-2, checkpoint_every=7)
    torch.manual_seed(0)
    untrained = TinyBag()
    ids, mask = trainer._pad(tokens)
    before = masked_bce(untrained(ids, mask), torch.tensor(targets, dtype=torch.float32)).item()
    report: dict = {}
    model = fit(untrained, tokens, targets, config, tmp_path / "whole", placement=placement, report=report)
    after = masked_bce(model(ids, mask), torch.tensor(targets, dtype=torch.float32)).item()
    assert after < before - 0.05
    assert report["precision"] == precision and report["steps"] == 24 and report["examples_per_second"] > 0
    state = load_checkpoint(tmp_path / "whole" / CHECKPOINT_FILE)
    assert ("scaler" in state) == (precision == "fp16")

    # Stop after the first checkpoint (step 7), resume: the same weights as the uninterrupted run.
    torch.manual_seed(0)
    with dies_after_first_checkpoint():
        fit(TinyBag(), tokens, targets, config, tmp_path / "resumed", placement=placement)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["step"] == 7
    torch.manual_seed(1)  # resuming must not depend on the fresh model's initialisation
    resumed = fit(TinyBag(), tokens, targets, config, tmp_path / "resumed", placement=placement)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_records_where_it_ran(trained_artifact: Path) -> None:
    from classifier.artifact import load_manifest

    fit_report = load_manifest(trained_artifact).training["fit"]
    assert isinstance(fit_report, dict)
    assert fit_report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert fit_report["processes"] == 1 and fit_report["steps"] > 0 and fit_report["train_loss"] > 0


@no_gpu
def test_train_command_refuses_cuda_without_a_gpu(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from training.cli import app

    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone).model_dump()))
    result = CliRunner().invoke(app, ["train", "--logs", str(logs), "--pool", str(pool_file), "--out",
                                      str(tmp_path / "out"), "--config", str(config), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "sees no CUDA device" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["train", "--logs", str(logs), "--pool", str(pool_file), "--out",
                                      str(tmp_path / "out"), "--config", str(config), "--device", "tpu"])
    assert result.exit_code == 2 and "device" in result.output


def test_device_errors_are_promptier_errors() -> None:
    assert issubclass(DeviceError, PromptierError)


def test_the_gpu_count_the_launcher_asks_for_is_torchs() -> None:
    from training.cli import visible_gpus

    assert visible_gpus() == torch.cuda.device_count()


@pytest.mark.parametrize(("device", "gpus", "refusal"), [
    ("auto", 1, "--processes 2 with device 'auto' trains one process per GPU, and torch sees 1 GPU here: use "
                "--processes 1, or --device cpu for 2 CPU processes"),
    ("cuda", 0, "device 'cuda' was asked for, but torch sees no CUDA device"),
    ("auto", 0, None),  # CPU processes
    ("cpu", 1, None),
    ("cuda", 2, None),
])
def test_processes_that_cannot_each_have_a_gpu_are_refused_before_torchrun_starts(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, monkeypatch: pytest.MonkeyPatch, device: str,
        gpus: int, refusal: str | None) -> None:
    """On a one-GPU machine under `auto`, the second process of `--processes 2` would fail only once the
    first had started, its reason buried in torchrun's traceback."""
    import yaml
    from typer.testing import CliRunner

    from training import cli

    launched: list[int] = []
    monkeypatch.setattr(cli, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(cli, "_launch", lambda processes, _options: launched.append(processes))
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone, device=device).model_dump()))
    result = CliRunner().invoke(cli.app, ["train", "--logs", str(logs), "--pool", str(pool_file), "--out",
                                          str(tmp_path / "out"), "--config", str(config), "--processes", "2"])
    if refusal is None:
        assert result.exit_code == 0 and launched == [2], result.output
    else:
        assert result.exit_code == 2 and not launched, result.output
        assert refusal in " ".join(result.output.split()) and "Traceback" not in result.output


def test_the_device_option_overrides_the_recipes_for_the_gpu_check(
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from typer.testing import CliRunner

    from training import cli

    launched: list[int] = []
    monkeypatch.setattr(cli, "visible_gpus", lambda: 1)
    monkeypatch.setattr(cli, "_launch", lambda processes, _options: launched.append(processes))
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone, device="auto").model_dump()))
    arguments = ["train", "--logs", str(logs), "--pool", str(pool_file), "--out", str(tmp_path / "out"),
                 "--config", str(config), "--processes", "2"]
    assert CliRunner().invoke(cli.app, [*arguments, "--device", "cpu"]).exit_code == 0 and launched == [2]
    result = CliRunner().invoke(cli.app, [*arguments, "--device", "tpu"])
    assert result.exit_code == 2 and "device" in result.output and launched == [2]
