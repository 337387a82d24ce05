"""Checkpoints are pickles: loading one must never run code that was put into it."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from classifier.errors import PromptierError
from tests.conftest import tiny_config


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
