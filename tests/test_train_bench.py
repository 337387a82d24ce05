"""`promptier train-bench`: real training runs in child processes, figures printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def test_train_bench_measures_each_mode_and_writes_json(tmp_path: Path) -> None:
    from training.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["train-bench", "--rows", "1800", "--processes", "1", "--devices", "cpu",
                                      "--max-steps", "5", "--backbone", "tiny", "--prompt-chars", "120",
                                      "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["cpus"] >= 1 and report["prompt_chars"] == 120
    (run,) = report["runs"]
    assert run["status"] == 0, run.get("error")
    assert run["rows"] == 1800 and run["mode"] == "cpu x1 streamed" and run["steps"] == 5
    assert run["train_prompts_per_second"] > 0 and run["prompts"] < 1800
    # The tree's sampled peak and the kernel's high-water mark of the main process: same process, same order.
    assert 50 < run["peak_rss_main_mb"] < 4096 and run["peak_rss_tree_mb"] <= run["peak_rss_main_mb"] * 1.5
    assert set(run["stage_seconds"]) == {"inputs", "model_and_fit", "finish"}
    assert run["streaming_state_mb"]["hash_index"] >= 0
    assert "cpu x1 streamed" in result.output and f"wrote {out}" in result.output


def test_train_bench_rejects_an_unknown_reading(tmp_path: Path) -> None:
    from training.cli import app

    result = CliRunner().invoke(app, ["train-bench", "--reading", "mmap", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--reading takes streamed and/or memory" in result.output
