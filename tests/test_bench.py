"""`promptier bench`: every bucket measured, the CPU named, the figures written; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from classifier.bench import BUCKETS, cpu_description
from classifier.cli import app


def test_cpu_description_reads_the_model_name_and_vnni_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 avx512_vnni\n\n"
                       "processor\t: 1\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 avx512_vnni\n")
    assert cpu_description(cpuinfo) == {"model": "Example CPU @ 2.0GHz", "avx512_vnni": True, "avx_vnni": False}
    cpuinfo.write_text("model name\t: Other CPU\nflags\t\t: fpu avx2 avx_vnni\n")
    assert cpu_description(cpuinfo) == {"model": "Other CPU", "avx512_vnni": False, "avx_vnni": True}
    # Without /proc/cpuinfo (another OS) the flags are unknown, not absent.
    described = cpu_description(tmp_path / "missing")
    assert described["avx512_vnni"] is None and described["avx_vnni"] is None


def test_bench_measures_every_bucket_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "new" / "bench.json"  # a folder that does not exist yet: created, as `label` does
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "bench", "--out", str(out), "--iterations", "40",
                             "--seconds", "0.3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    latency = written["latency_batch1_1thread"]
    assert [name for name, _, _ in BUCKETS] == list(latency)[: len(BUCKETS)]
    assert len(latency) == len(BUCKETS) + 3  # plus 128 tokens with a CJK character, an accent, a rare ideograph
    for stats in latency.values():
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert latency["128 tokens"]["n"] == 40 and written["settings"] == {"iterations": 40, "seconds": 0.3}
    assert all(rate > 0 for rate in written["throughput"].values())
    assert written["loaded_process_peak_rss_mb"] > 0
    assert written["cpu"]["model"] and written["cpu"]["model"] in result.stdout
    assert "| 128 tokens |" in result.stdout


@pytest.mark.parametrize(("option", "value"), [("--iterations", "0"), ("--iterations", "-3"), ("--seconds", "0"),
                                               ("--seconds", "-1"), ("--seconds", "nan"), ("--seconds", "inf")])
def test_bench_refuses_no_samples_or_no_time_before_measuring(tmp_path: Path, option: str, value: str) -> None:
    # No percentiles of zero samples, no rate over zero (or negative) seconds: a usage error, not a traceback.
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--out", str(out), option, value])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_bench_checks_its_output_can_be_written_before_measuring(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "bench.json"  # its folder cannot be created: a file is in the way
    # Tiny figures, so that a regression (measure first, fail to write after) stays short.
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--iterations", "1", "--seconds", "0.01"])
    assert result.exit_code == 2, result.output
    assert f"cannot write {out}" in result.output and "Traceback" not in result.output
    # Refused before measuring: no table was printed.
    assert "| prompt length |" not in result.output


@pytest.mark.parametrize("command", [["loadtest", "--seconds", "inf"], ["train-bench", "--timeout", "nan"],
                                     ["budget-sim", "decisions.jsonl", "--budget-usd", "inf"],
                                     ["serve", "--keepalive", "inf"]])
def test_float_options_of_every_product_refuse_nan_and_infinity(command: list[str], tmp_path: Path) -> None:
    """`nan` and `inf` parse as floats: a run of infinite seconds never ends, and NaN figures are no JSON."""
    result = subprocess.run([sys.executable, "-m", "classifier.cli", *command], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "must be a finite number" in result.stderr, result.stderr


class _Clock:
    """A stand-in for the `time` module whose clock moves only when the fake model runs a batch."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


def test_throughput_is_over_the_time_the_batches_took_not_the_window_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that ends past the window's end adds its prompts: the rate must be over the time they took."""
    import classifier
    import classifier.bench as bench

    clock = _Clock()

    class Runtime:
        def classify_batch(self, prompts: list[str]) -> list[str]:
            clock.now += 0.4  # each batch of the fake model takes 0.4 s on the fake clock
            return prompts

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(classifier, "load", lambda model, threads=1: Runtime())
    # A window of 1 s holds three batches of 0.4 s: 12 prompts in 1.2 s, not in 1 s.
    assert bench.throughput(None, ["a prompt"] * 16, 1, 1, 4, 1.0) == pytest.approx(12 / 1.2)
    # A window shorter than one batch still times one, rather than reporting no throughput at all.
    assert bench.throughput(None, ["a prompt"] * 16, 1, 1, 4, 0.01) == pytest.approx(4 / 0.4)
    # Workers whose windows overlap only in part: all prompts over the span from the first start to the last end.
    assert bench._rate([(100, 0.0, 1.0), (100, 0.5, 1.5)]) == pytest.approx(200 / 1.5)


def test_a_report_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while writing its JSON left half a report (train-bench rewrites its file after every
    run, so the runs before were lost too). It is written beside the report and renamed over it."""
    import os

    from classifier.bench import write_report

    out = tmp_path / "bench.json"
    write_report(out, {"runs": [1]})

    def killed(source: object, target: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(out, {"runs": [1, 2]})
    assert json.loads(out.read_text()) == {"runs": [1]}  # the previous report, whole
    assert [path.name for path in tmp_path.iterdir()] == ["bench.json"]  # nothing half-written left beside it
