"""`promptier train-bench`: real training runs in child processes, figures printed and written as JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

# A launcher like torchrun: it starts its worker in a session of its own (which a signal to the launcher's
# group does not reach), writes the worker's pid to argv[1] and sleeps; with argv[2] == "sigterm" it then
# sends SIGTERM to its parent, as a user stopping `train-bench` would.
LAUNCHER = """
import os, signal, subprocess, sys, time
from pathlib import Path
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
Path(sys.argv[1] + ".tmp").write_text(str(worker.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "sigterm":
    os.kill(os.getppid(), signal.SIGTERM)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, killed and waiting for init to reap it, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
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


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--rows", "0", "--rows takes whole numbers above 0"),
    ("--rows", "-5", "--rows takes whole numbers above 0"),
    ("--rows", "1e5", "--rows takes whole numbers above 0"),
    ("--rows", "1400,300", "--rows [300]: training needs at least 500 distinct prompts"),
    ("--processes", "0", "--processes takes whole numbers above 0"),
    ("--devices", "foo", "--devices takes available, cpu and/or cuda, not ['foo']"),
    ("--backbone", "{tmp}/nonexistent", "--backbone takes 'minilm-l6', 'tiny' or a model directory"),
    ("--recipe", "{tmp}/nonexistent.yaml", "no config file"),
    ("--recipe", "{tmp}/bad.yaml", "batch_size"),
    ("--recipe", "{tmp}/list.yaml", "is not a training config"),
    ("--timeout", "0", "--timeout must be greater than 0"),
    ("--out", "{tmp}/a-file/bench.json", "cannot write"),
])
def test_train_bench_checks_every_option_before_writing_any_log(tmp_path: Path, option: str, value: str,
                                                                 message: str) -> None:
    from training.cli import app

    (tmp_path / "bad.yaml").write_text("batch_size: many\n")  # YAML, not a valid config
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "a-file").write_text("not a folder\n")
    options = {"--rows": "1400", "--processes": "1", "--devices": "cpu", "--backbone": "tiny",
               "--work-dir": str(tmp_path / "work"), "--out": str(tmp_path / "bench.json")}
    options[option] = value.format(tmp=tmp_path)
    result = CliRunner().invoke(app, ["train-bench", "--prompt-chars", "20",
                                      *[item for pair in options.items() for item in pair]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    # Refused before the synthetic logs are written or a run starts, not reported as a failed run.
    assert not list(tmp_path.glob("work/logs-*")) and "failed" not in result.output


def test_train_bench_exits_1_naming_the_runs_that_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.bench
    from training.cli import app

    def run_one(root: Path, logs: Path, pool: Path, backbone: str, mode: training.bench.Mode, max_steps: int,
                rows: int, timeout: float, recipe: Path) -> dict:
        """No training: the x1 run succeeds, the x2 run fails as a real one that exits with status 2."""
        result = {"rows": rows, "mode": mode.name, "status": 0, "log": str(root / f"{mode.processes}.log"),
                  "timed_out": False, "load_average": [0.0, 0.0], "wall_seconds": 1.0, "peak_rss_tree_mb": 1.0}
        if mode.processes == 2:
            return {**result, "status": 2, "error": "error: something went wrong"}
        return {**result, "train_prompts_per_second": 1.0, "steps": 1, "peak_rss_main_mb": 1.0}

    monkeypatch.setattr(training.bench, "run_one", run_one)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["train-bench", "--rows", "1400", "--processes", "1,2", "--devices", "cpu",
                                      "--backbone", "tiny", "--prompt-chars", "20", "--work-dir",
                                      str(tmp_path / "work"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 of 2 runs failed" in result.output and "1400 rows, cpu x2 streamed: status 2" in result.output
    assert "cpu x1 streamed: status" not in result.output
    assert [run["status"] for run in json.loads(out.read_text())["runs"]] == [0, 2]  # both recorded


def test_a_run_that_times_out_is_killed_with_the_workers_it_started(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from training.bench import run_child

    pid_file = tmp_path / "worker.pid"
    wait = subprocess.Popen.wait

    def wait_then_time_out(self: subprocess.Popen, timeout: float | None = None) -> int:
        """The timeout expires once the worker runs (not after a wall-clock time, which a test cannot rely on)."""
        if timeout is None:
            return wait(self)
        while not pid_file.exists():
            try:
                return wait(self, 0.05)  # the launcher ended before starting its worker: the test fails below
            except subprocess.TimeoutExpired:
                continue
        raise subprocess.TimeoutExpired(self.args, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait_then_time_out)
    run = run_child([sys.executable, "-c", LAUNCHER, str(pid_file), "sleep"], tmp_path / "run.log", timeout=600)
    monkeypatch.undo()
    worker = int(pid_file.read_text())
    assert run.timed_out and run.status == -signal.SIGKILL
    assert not _running(worker), "the launcher's worker (in a session of its own) survived the timeout"


def test_sigterm_to_the_bench_kills_the_run_in_progress_with_its_workers(tmp_path: Path) -> None:
    from classifier.signals import sigterm_as_exit
    from training.bench import run_child

    pid_file = tmp_path / "worker.pid"
    with pytest.raises(SystemExit) as stopped, sigterm_as_exit():
        run_child([sys.executable, "-c", LAUNCHER, str(pid_file), "sigterm"], tmp_path / "run.log", timeout=600)
    assert stopped.value.code == 128 + signal.SIGTERM
    worker = int(pid_file.read_text())
    assert not _running(worker), "the launcher's worker (in a session of its own) survived the bench's SIGTERM"
