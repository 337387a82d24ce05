"""`promptier soak` for half a minute: the report's shape and the invariants that hold whatever the
machine's speed (the share of well-behaved calls served within 50 ms depends on the CPU, so it is
reported, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_short_soak_keeps_answers_rows_and_processes_whole(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "classifier.cli", "soak", "--minutes", "0.5", "--chaos-every", "15",
               "--label-rows", "3000", "--label-every", "15", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: a bar did not hold (the CPU-bound one may not)
    report = json.loads(out.read_text())
    assert "| well-behaved Classify calls" in result.stdout
    print(result.stdout)  # the table and the scratch directory kept, should an assertion below fail
    print(json.dumps({key: value for key, value in report.items() if key != "details"}, indent=1))
    print(json.dumps(report["details"]["chaos_events"]))

    assert set(report) >= {"passed", "bars", "well_behaved", "flood", "dispatcher", "labeling", "chaos", "crashes",
                           "details"}
    assert report["passed"] == all(report["bars"].values())
    assert result.returncode == (0 if report["passed"] else 1)
    assert report["traffic_errors"] == {}

    well = report["well_behaved"]
    assert well["calls"] > 0 and 0 <= well["served"] <= well["calls"] and well["deadline_ms"] == 50
    flood = report["flood"]
    assert flood["calls"] > 0 and flood["refused_resource_exhausted"] > 0  # 2x capacity cannot all be queued
    assert set(flood["by_status"]) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}

    dispatcher = report["dispatcher"]
    assert dispatcher["paid_answers"] > 0
    assert dispatcher["paid_delivered_intact"] == dispatcher["paid_answers"]
    assert dispatcher["paid_delivered_pct"] == 100.0 and dispatcher["paid_twice"] == 0
    assert dispatcher["by_outcome"].get("mangled", 0) == 0
    # A caller may see its connection closed with no answer (reusing a keep-alive connection as the
    # dispatcher closes it), or a 5xx on a loaded machine: never for an answer the upstream was paid for.
    assert all(f["outcome"].startswith(("transport_error", "failed_5xx")) for f in dispatcher["failures"])
    answers = dispatcher["upstream_answers"]
    assert answers["cut"] == dispatcher["by_outcome"]["interrupted"]  # every cut stream told its caller so
    assert answers["500"] > 0 and dispatcher["by_outcome"]["returned_5xx"] > 0
    assert any("usage" in note for note in report["details"]["logs"]["decision_log_notes"])

    labeling = report["labeling"]
    assert labeling["rounds"] >= 1
    assert labeling["rows_lost"] == 0 and labeling["rows_duplicated"] == 0
    assert labeling["rounds_exactly_one_ran"] == labeling["rounds"]
    # The other job of each pair is refused, by the lock or by the output the first has just finished
    # (which, on a loaded machine, may come first).
    refused = labeling["second_job_refused_by_lock"] + labeling["second_job_refused_by_finished_output"]
    assert refused == labeling["rounds"]
    assert labeling["files_left_behind"] == 0

    chaos = report["chaos"]
    assert chaos["worker_kills"] >= 1 and chaos["worker_kills_replaced"] == chaos["worker_kills"]
    assert chaos["serve_reloads"] >= 1 and chaos["serve_reloads_confirmed"] == chaos["serve_reloads"]
    assert chaos["dispatcher_reloads"] >= 1  # its new worker may take long to start on a loaded machine

    assert report["crashes"]["total"] == 0, report["crashes"]
    slow = report["details"]["slow_connections"]
    assert slow["most_open_at_once"] == {"grpc": 200, "http": 200}


def test_soak_refuses_what_it_cannot_run_before_starting_anything(tmp_path: Path) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    for args, says in ((["--model", str(tmp_path / "nowhere")], "does not exist"),
                       (["--model", str(broken)], "missing"),
                       (["--out", str(tmp_path / "no-such-folder" / "soak.json")], "does not exist")):
        result = subprocess.run([sys.executable, "-m", "classifier.cli", "soak", "--minutes", "0.5", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_sigterm_stops_every_service_the_soak_started(tmp_path: Path) -> None:
    """The services run in sessions of their own (so that a signal to the soak's group does not reach
    them): a SIGTERM to the soak must stop them itself, as Ctrl-C does."""
    import contextlib
    import signal
    import time

    import psutil

    soak = subprocess.Popen([sys.executable, "-m", "classifier.cli", "soak", "--minutes", "2", "--out",
                             str(tmp_path / "soak.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert soak.stdout is not None
        scratch = Path(soak.stdout.readline().rsplit("scratch ", 1)[1].strip())
        started: list[psutil.Process] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and soak.poll() is None:
            started = psutil.Process(soak.pid).children(recursive=True)
            commands = []
            for child in started:
                with contextlib.suppress(psutil.Error):  # one may end between the listing and this
                    commands.append(" ".join(child.cmdline()))
            if any(" serve " in c for c in commands) and any(" dispatch " in c for c in commands) and \
                    (scratch / "dispatch.err").exists():
                break
            time.sleep(0.5)
        assert soak.poll() is None and started, "the soak did not start its services"
        soak.send_signal(signal.SIGTERM)
        soak.wait(120)
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, alive
    finally:
        if soak.poll() is None:
            soak.kill()


def test_a_sigterm_during_the_soaks_own_shutdown_still_stops_the_service(tmp_path: Path) -> None:
    """The soak ends by stopping its processes one by one, the dispatcher taking up to half a minute: a
    first SIGTERM then, acted on at once, stopped the cleanup before the gRPC service, which runs in a
    session of its own and was left running for good."""
    import contextlib
    import signal
    import time

    import psutil

    soak = subprocess.Popen([sys.executable, "-m", "classifier.cli", "soak", "--minutes", "0.2",
                             "--slow-connections", "5", "--label-rows", "300", "--label-every", "30",
                             "--chaos-every", "30", "--out", str(tmp_path / "soak.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        assert soak.stdout is not None
        scratch = Path(soak.stdout.readline().rsplit("scratch ", 1)[1].strip())
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and soak.poll() is None:
            for child in psutil.Process(soak.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child not in started and " serve " in " ".join(child.cmdline()):
                        started.append(child)
            err = scratch / "dispatch.err"
            if err.exists() and "Shutting down" in err.read_text(errors="replace"):
                break  # the soak's cleanup has begun: it stops the dispatcher before the service
            time.sleep(0.05)
        assert started, "the soak did not start its service"
        soak.send_signal(signal.SIGTERM)
        soak.wait(180)
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, alive
    finally:
        if soak.poll() is None:
            soak.kill()
        for child in started:
            with contextlib.suppress(psutil.Error):
                child.kill()


def test_stopping_the_label_jobs_ends_a_round_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A soak ended early (SIGTERM) runs no `finally` in the daemon thread of its label rounds: the jobs
    of the round under way must be ended from outside it, or they label on after the soak exited."""
    import threading
    import time

    import psutil

    from serving.bench import soak_labeling

    # A job that would outlive the soak: it never finishes by itself within the test.
    monkeypatch.setattr(soak_labeling, "cli_command", lambda *args: [sys.executable, "-c", "import time; "
                                                                     "time.sleep(600)"])
    jobs = soak_labeling.LabelJobs()
    rounds: list[dict] = []
    stop = threading.Event()
    thread = threading.Thread(target=soak_labeling.label_rounds, daemon=True,
                              args=(tmp_path / "input.jsonl", 10, tmp_path, None,
                                    time.monotonic() - soak_labeling.LABEL_FIRST_AT_S, 600.0, 600.0, stop, rounds,
                                    jobs))
    thread.start()
    me = psutil.Process()
    started: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while len(started) < 2 and time.monotonic() < deadline:
        started = [child for child in me.children() if "time.sleep(600)" in " ".join(child.cmdline())]
        time.sleep(0.1)
    assert len(started) == 2, "the round did not start its two jobs"

    stop.set()  # what the soak's `finally` does: no new round, then the jobs under way ended
    jobs.stop_all()
    thread.join(60)
    assert not thread.is_alive()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, alive
    assert [job["exit_code"] for job in rounds[0]["jobs"]] != [0, 0]
    with (tmp_path / "late.err").open("wb") as err:  # a job the round would start after the stop
        assert jobs.start([sys.executable, "-c", "pass"], tmp_path, err) is None


def test_the_soak_percentiles_are_the_samples_nearest_rank() -> None:
    """Of 100 samples the p99 is the 99th, not the largest, and of 240 the p50 is the 120th: the index
    int(q * n) was one rank high whenever q * n is whole, so a single slow call became the p99."""
    from serving.bench.soak_clients import _percentiles

    assert _percentiles([float(value) for value in range(100, 0, -1)]) == {"p50_ms": 50.0, "p99_ms": 99.0,
                                                                           "max_ms": 100.0}
    assert _percentiles([float(value) for value in range(1, 241)])["p50_ms"] == 120.0
    assert _percentiles([float(value) for value in range(1, 241)])["p99_ms"] == 238.0  # ceil(237.6)
    assert _percentiles([7.0]) == {"p50_ms": 7.0, "p99_ms": 7.0, "max_ms": 7.0}
    assert _percentiles([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None}
