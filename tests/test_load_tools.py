"""The load tools: h2load and closed-loop generators count answered calls; the native echo floor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from tests.grpc_server import EASY, HARD


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_a_loadtest_of_several_workers_counts_every_workers_calls(trained_artifact: Path) -> None:
    """`serve --workers 2 --metrics-port P` serves metrics on P and P + 1: the load test reads both, each
    worker's answered calls among them, so the figures are of successful calls across the fleet."""
    from serving.bench.loadgen import run_loadtest

    [row] = run_loadtest(str(trained_artifact), [EASY, HARD], [(4, 1, 1)], 1.0, workers=2, generator="h2load")
    assert row["calls"] > 0 and row["errors"] == 0
    assert len(row["ok_calls_by_server_process"]) == 2
    assert sum(row["ok_calls_by_server_process"]) == row["server_counted_ok"] >= row["calls"]


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_generator_counts_only_calls_the_server_answered_ok(trained_artifact: Path) -> None:
    """The loadtest's h2load figures are of successful calls: the server's own counters must agree with
    what h2load sent, and a scenario whose calls the server refuses is reported as errors."""
    import subprocess
    import sys

    from serving.bench.h2load import h2load_scenario, require_all_ok
    from serving.bench.ports import free_port, wait_serving

    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact), "--port", str(port),
               "--metrics-port", str(metrics_port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        good = h2load_scenario(port, [EASY, HARD], 4, 1, 1.0, [metrics_port])
        assert good["calls"] > 0 and good["errors"] == 0
        assert good["server_counted_ok"] >= good["calls"]  # every timed call was answered OK
        assert good["ok_calls_by_server_process"] == [good["server_counted_ok"]]
        assert good["p99_ms"] >= good["p50_ms"] > 0
        # 300 items exceed the server's batch limit (256): HTTP 200 for h2load, INVALID_ARGUMENT for gRPC.
        refused = h2load_scenario(port, [EASY] * 300, 1, 300, 1.0, [metrics_port])
        assert refused["errors"] > 0 and refused["server_counted_ok"] == 0
        require_all_ok(good)
        with pytest.raises(RuntimeError, match="would not be of successful calls"):
            require_all_ok(refused)
    finally:
        server.terminate()
        server.wait(15)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_native_echo_floor_answers_and_counts_only_what_it_answered(tmp_path: Path) -> None:
    from serving.bench.h2load import h2load_scenario, require_all_ok
    from serving.bench.native_floor import (
        NativeBuildUnavailable,
        answered_calls,
        build_echo_server,
        launch_echo_server,
        wait_echo_server,
    )
    from serving.bench.ports import free_port

    try:
        binary = build_echo_server(tmp_path / "cache")
    except NativeBuildUnavailable as reason:
        pytest.skip(str(reason))
    assert build_echo_server(tmp_path / "cache") == binary  # cached by source hash: not rebuilt
    port = free_port()
    server = launch_echo_server(binary, port)
    try:
        wait_echo_server(server, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=5)
        assert reply.tier == "small" and answered_calls(port) == 1

        def counter(rpc: str) -> tuple[list[int], int]:
            return [answered_calls(port)], 0

        good = h2load_scenario(port, [EASY], 4, 1, 0.5, [], counter=counter)
        assert good["calls"] > 0
        require_all_ok(good)
        # The echo server has no ClassifyBatch: HTTP 200 for h2load, UNIMPLEMENTED in gRPC, and its count
        # of answered calls does not move, so the figure is refused.
        refused = h2load_scenario(port, [EASY, HARD], 1, 2, 0.5, [], counter=counter)
        assert refused["calls"] > 0 and refused["server_counted_ok"] == 0
        with pytest.raises(RuntimeError, match="would not be of successful calls"):
            require_all_ok(refused)
    finally:
        server.terminate()
        server.wait(15)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_an_h2load_that_fails_is_reported_with_what_it_said() -> None:
    """A bare "returned non-zero exit status 1" left the reader to rerun h2load by hand to learn why."""
    from serving.bench.h2load import h2load_scenario

    with pytest.raises(RuntimeError, match=r"h2load exited with status 1: invalid URI: http://127\.0\.0\.1:70000/"):
        h2load_scenario(70000, [EASY], 1, 1, 0.5, [], counter=lambda rpc: ([0], 0))


def test_an_h2load_run_that_finished_no_call_is_refused_not_a_traceback(tmp_path: Path) -> None:
    """h2load exits 0 and logs nothing when nothing answers (a server gone, a port with no listener)."""
    from serving.bench.h2load import h2load_log

    log = tmp_path / "calls.tsv"
    log.write_text("")
    with pytest.raises(RuntimeError, match="h2load finished no call"):
        h2load_log(log)
    log.write_text("1000000\t200\t2000\n1001000\t200\t4000\n1002000\t503\t1000\n")
    timings = h2load_log(log)
    # Span: the first start (1.000 s) to the last end (1.001 s + 4 ms); median duration 2 ms.
    assert timings["calls"] == 3 and timings["not_200"] == 1 and timings["p50_ms"] == 2.0
    assert timings["span_s"] == pytest.approx(0.005)


def test_native_build_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import serving.bench.native_floor as native_floor

    monkeypatch.setattr(native_floor.shutil, "which", lambda tool: None if tool == "grpc_cpp_plugin" else "/bin/x")
    with pytest.raises(native_floor.NativeBuildUnavailable, match=r"missing grpc_cpp_plugin.*protobuf-compiler-grpc"):
        native_floor.build_echo_server(tmp_path)


def test_closed_loop_counts_every_prompt_its_concurrent_callers_carried() -> None:
    from serving.bench.loadgen import _closed_loop

    seen: list[int] = []

    async def call(index: int) -> int:
        seen.append(index)
        await asyncio.sleep(0)  # callers interleave here, as they do around a real RPC
        return 3

    result = asyncio.run(_closed_loop(call, concurrency=8, seconds=0.2, offset=100))
    assert result["errors"] == 0 and len(result["latencies"]) > 8
    assert result["items"] == 3 * len(result["latencies"])  # no increment lost between callers
    assert {index % 8 for index in seen} == {(100 + k) % 8 for k in range(8)} and min(seen) == 100


@pytest.mark.parametrize("answered", [5, 0])
def test_a_scenario_with_failed_calls_is_refused_not_reported_from_the_calls_that_succeeded(answered: int) -> None:
    """Percentiles over the calls that succeeded would flatter a server that refused the rest; with none,
    there are no percentiles at all. Every generator's scenario is held to it, as h2load's is."""
    import grpc

    from serving.bench.loadgen import _closed_loop, _summary

    async def call(index: int) -> int:
        await asyncio.sleep(0)
        if index % 8 >= answered:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        return 1

    part = asyncio.run(_closed_loop(call, concurrency=8, seconds=0.1, offset=0))
    assert part["errors"] > 0
    with pytest.raises(RuntimeError, match=r"calls failed in the python scenario"):
        _summary([part], 8, 1, "python")



def _dispatch_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "classifier.cli", "dispatch-bench", "--requests", "3", "--no-load",
               "--out", str(tmp_path / "bench-dispatch.json"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def test_dispatch_bench_measures_both_classifier_configurations_from_classified_requests(tmp_path: Path) -> None:
    """Every figure comes from requests the dispatcher classified (the bench refuses fallbacks) and the
    classifier's share from the dispatcher's own decision log."""
    import math

    from serving.bench.dispatch_bench import SEQUENTIAL

    result = _dispatch_bench(tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench-dispatch.json").read_text())
    assert report["load_skipped"] == "--no-load" and report["load"] == {}
    for name in SEQUENTIAL:
        for measure in ("non_streaming", "time_to_first_byte"):
            figures = report[name][measure]
            assert all(math.isfinite(value) for value in figures.values())
            assert figures["direct_p50_ms"] > 0 and figures["dispatcher_p50_ms"] > 0
        assert report[name]["classifier_p99_ms"] >= report[name]["classifier_p50_ms"] > 0
        assert report[name]["classifier_samples"] == 2 * 3  # the timed requests of both measures, no warm-up
    assert not list(tmp_path.glob("decisions*"))  # its configs and decision logs went with the run


def test_dispatch_bench_says_why_a_dispatcher_it_started_refused_to_run(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("tenants: 5\n")
    result = _dispatch_bench(tmp_path, "--config-overlay", str(overlay))
    assert result.returncode == 2
    assert "the dispatcher (grpc) exited with status 2" in result.stderr and "tenants" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bench-dispatch.json").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_dispatch_bench_refuses_to_time_an_answer_that_is_not_a_2xx(stream: bool) -> None:
    """A config overlay whose tenants need keys gets 401s for the bench's keyless requests: httpx's
    traceback (non-streaming), or a 401 timed as a first byte (streaming), instead of a message."""
    import httpx

    from serving.bench.dispatch_bench import _timed_request

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "missing API key"}})

    with httpx.Client(transport=httpx.MockTransport(refuse)) as client, \
            pytest.raises(RuntimeError, match=r"answered 401: .*missing API key"):
        _timed_request(client, "http://dispatcher/v1/chat/completions", {"model": "promptier"}, stream)


@pytest.mark.parametrize("command", ["dispatch-bench", "loadtest", "litellm-bench"])
def test_benches_refuse_a_bad_artifact_before_starting_any_service(command: str, tmp_path: Path) -> None:
    """The services a bench starts would only show a bad artifact as never getting ready."""
    result = subprocess.run([sys.executable, "-m", "classifier.cli", command, "--model", "missing-model"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "artifact directory missing-model does not exist" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1, result.stderr  # said once, not followed by "error: 2"


@pytest.mark.parametrize("command", ["dispatch-bench", "loadtest", "litellm-bench", "soak"])
def test_benches_refuse_a_report_path_that_is_a_folder_before_measuring(command: str, tmp_path: Path) -> None:
    """Found at the end, it lost the whole run: the soak measured for its minutes, then could not write."""
    result = subprocess.run([sys.executable, "-m", "classifier.cli", command, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"--out {tmp_path} is a folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a folder no process can create files in")
@pytest.mark.parametrize("command", ["dispatch-bench", "loadtest", "litellm-bench", "soak"])
def test_benches_refuse_a_report_path_they_cannot_write_before_measuring(command: str, tmp_path: Path) -> None:
    """An existing folder is not enough: one the report cannot be created in (read-only, no permission)
    lost the whole run, with a traceback at its end."""
    out = Path("/proc/promptier-bench.json")  # /proc takes no new file, not even root's
    result = subprocess.run([sys.executable, "-m", "classifier.cli", command, "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"--out {out}: cannot write there" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("section", ["decision_log", "classifier", "tiers"])
def test_dispatch_bench_refuses_an_overlay_of_its_own_sections(tmp_path: Path, section: str) -> None:
    """A `decision_log` overlay wrote the log where the bench could not read it (a traceback after the
    services started); a `classifier` one measured one setup under both rows' names."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"{section}:\n  path: elsewhere.jsonl\n")
    result = _dispatch_bench(tmp_path, "--config-overlay", str(overlay))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{section} is set by the bench itself" in result.stderr
    assert not (tmp_path / "bench-dispatch.json").exists()


def test_dispatch_bench_refuses_no_requests_before_starting_any_service(tmp_path: Path) -> None:
    """No percentiles of zero samples: a usage error, not a traceback after the services started."""
    result = _dispatch_bench(tmp_path, "--requests", "0")
    assert result.returncode == 2 and "--requests" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bench-dispatch.json").exists()


def test_a_terminated_dispatch_bench_stops_the_services_it_started(tmp_path: Path) -> None:
    """They run in sessions of their own, which a signal to the bench's process group does not reach."""
    import signal

    import psutil

    from tests.server_probes import wait_until

    bench = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch-bench", "--requests", "3", "--no-load",
                              "--out", str(tmp_path / "bench.json")], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        started: list[psutil.Process] = []

        def services_running() -> bool:
            started[:] = psutil.Process(bench.pid).children(recursive=True)
            return len(started) >= 3  # the upstream and the classifier service's supervisor and workers

        wait_until(services_running, "the bench's services to start")
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(120) == 128 + signal.SIGTERM
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started),
                   "the services to stop")
    finally:
        if bench.poll() is None:
            bench.kill()


def _loadtest_with_its_server(tmp_path: Path) -> tuple[subprocess.Popen, psutil.Process]:
    """A `promptier loadtest` under way, and the `promptier serve` it started."""
    from tests.server_probes import wait_until

    loadtest = subprocess.Popen([sys.executable, "-m", "classifier.cli", "loadtest", "--generator", "python",
                                 "--seconds", "3", "--workers", "1", "--out", str(tmp_path / "bench.json")],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found: list[psutil.Process] = []

    def server_running() -> bool:
        for child in psutil.Process(loadtest.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "serve" in child.cmdline():
                    found.append(child)
                    return True
        return loadtest.poll() is not None

    wait_until(server_running, "the load test's server to start", bound_s=180)
    assert found, loadtest.communicate()[1]
    return loadtest, found[0]


def test_a_load_test_whose_server_dies_says_so(tmp_path: Path) -> None:
    loadtest, server = _loadtest_with_its_server(tmp_path)
    try:
        server.kill()
        _, stderr = loadtest.communicate(timeout=180)
        assert loadtest.returncode == 2 and "the server exited with status -9" in stderr, stderr
        assert "Traceback" not in stderr and not (tmp_path / "bench.json").exists()
    finally:
        if loadtest.poll() is None:
            loadtest.kill()


def test_waiting_for_a_server_that_exited_stops_at_once_and_says_so() -> None:
    from serving.bench.ports import free_port, wait_serving

    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    server.wait()
    with pytest.raises(RuntimeError, match="the server exited with status 3 before it served"):
        wait_serving(f"127.0.0.1:{free_port()}", timeout=600, process=server)


def test_a_terminated_load_test_stops_its_server(tmp_path: Path) -> None:
    import signal

    loadtest, server = _loadtest_with_its_server(tmp_path)
    try:
        loadtest.send_signal(signal.SIGTERM)
        assert loadtest.wait(120) == 128 + signal.SIGTERM
        psutil.wait_procs([server], timeout=60)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        if loadtest.poll() is None:
            loadtest.kill()


def test_a_load_test_whose_cpp_floor_fails_to_build_keeps_its_rows(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ floor is built last, after minutes of measuring: a compiler that fails (gRPC headers of
    another version than protoc's) skipped the row with a traceback and no report at all."""
    import classifier.bench
    from serving.bench import loadgen

    row = {"concurrency": 1, "batch": 1, "generator": "h2load", "calls": 10, "errors": 0, "server_counted_ok": 10,
           "prompts_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "generator_cpu_cores": 0.1, "server_cpu_cores": 1.0}

    def compiler_fails(prompts: list[str], seconds: float) -> list[dict]:
        raise subprocess.CalledProcessError(1, ["g++", "echo_server.cc"], stderr="router.pb.h: #error version mismatch")

    # Every measurement replaced by a stand-in: only what the load test does with their results is tested.
    monkeypatch.setattr(loadgen.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(classifier.bench, "throughput", lambda *args: 1000.0)
    monkeypatch.setattr(loadgen, "run_loadtest", lambda *args, **kwargs: [dict(row)])
    monkeypatch.setattr(loadgen, "transport_floor", lambda prompts, seconds: [dict(row)])
    monkeypatch.setattr(loadgen, "native_transport_floor", compiler_fails)
    out = tmp_path / "bench-serving.json"
    loadgen.main(None, out, 1.0, workers=1, generator="h2load")
    report = json.loads(out.read_text())
    assert report["servers"]["1"] == [row] and report["transport_floor"] == [row]
    assert report["settings"] == {"seconds": 1.0, "workers": 1}
    assert "native_transport_floor" not in report
    skipped = report["native_transport_floor_skipped"]
    assert "g++" in skipped and "version mismatch" in skipped


def test_stopping_a_server_that_ignores_sigterm_kills_it_even_outside_a_session_of_its_own() -> None:
    """The load test's server and echo floors share the bench's process group: killing "its group" reached
    nothing, and the bench raised TimeoutExpired with the server still holding its port."""
    import subprocess
    import sys

    from serving.bench.soak_processes import stop_process

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                                 "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ready"
        assert stop_process(stubborn, timeout=0.5) is None  # it did not end by itself
        assert stubborn.poll() is not None
    finally:
        stubborn.kill()
