"""serve --workers: processes share one port, reload, restart, drain, and refuse a bad artifact."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import psutil
import pytest

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from tests.grpc_server import spawned_workers, stop_supervisor, tagged_copy
from tests.server_probes import non_loopback_address


def _metric(port: int, name: str) -> float:
    """Sum of a Prometheus counter's samples scraped from a worker's metrics endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _metric_or_zero(port: int, name: str) -> float:
    """`_metric`, or 0 while the worker's metrics endpoint is not listening yet."""
    try:
        return _metric(port, name)
    except OSError:
        return 0.0


def test_workers_share_one_port_reload_restart_and_drain(trained_artifact: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, listen_ports, wait_serving

    def workers() -> list[psutil.Process]:
        return spawned_workers(parent.pid)

    # Worker i serves metrics on metrics_port + i: the whole run must be free, not only its first port.
    port, metrics_port = free_port(), listen_ports(2)[0]
    command = [sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact), "--port", str(port),
               "--workers", "2", "--metrics-port", str(metrics_port)]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"

    def classify_over_new_connections(count: int) -> None:
        for _ in range(count):  # one TCP connection each: the kernel spreads connections, not calls
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = router_pb2_grpc.RouterStub(channel).Classify(
                    router_pb2.ClassifyRequest(prompt="prove the theorem"), timeout=60, wait_for_ready=True)
                assert reply.tier in {"small", "medium", "large"}

    try:
        wait_serving(target)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # every worker serves once the kernel has spread connections
            classify_over_new_connections(8)
            # A worker may serve calls before its metrics endpoint listens: not up yet counts as none.
            served = [_metric_or_zero(metrics_port + i, "promptier_requests_total") for i in (0, 1)]
            if all(count > 0 for count in served):
                break
        assert all(count > 0 for count in served), served
        outside = non_loopback_address()
        if outside is not None:  # metrics are on --host (127.0.0.1 here), not published to the network
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, metrics_port), timeout=5).close()

        os.kill(parent.pid, signal.SIGHUP)  # reload reaches every worker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                _metric(metrics_port + i, "promptier_model_reloads_total") >= 1 for i in (0, 1)):
            time.sleep(0.2)
        assert all(_metric(metrics_port + i, "promptier_model_reloads_total") == 1 for i in (0, 1))

        # A killed worker is replaced; the port keeps answering meanwhile.
        victim = workers()[0]
        victim.kill()
        classify_over_new_connections(4)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            children = workers()
            if len(children) == 2 and victim.pid not in {child.pid for child in children}:
                break
            time.sleep(0.2)
        assert len(children) == 2 and victim.pid not in {child.pid for child in children}

        parent.send_signal(signal.SIGTERM)  # drains every worker, then the parent exits cleanly
        assert parent.wait(120) == 0
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        stop_supervisor(parent)


def test_the_fleet_file_names_a_new_generation_for_every_reload(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import os

    from serving.service.fleet import FleetModel

    fleet = FleetModel(tmp_path / "fleet" / "model_dir", os.getpid())
    assert fleet.read().generation is None and fleet.read().directory is None  # no reload yet
    first = fleet.write(tmp_path)
    second = fleet.write(tmp_path)  # the same directory again (new files in it): a new generation
    assert first != second and fleet.read().generation == second and fleet.read().directory == tmp_path.resolve()
    fleet.write(None)
    assert fleet.read().directory is None and fleet.read().generation not in (first, second)
    (tmp_path / "fleet" / "model_dir").write_text("{not json")
    assert fleet.read().generation is None
    blocked = FleetModel(tmp_path / "a-file" / "model_dir", os.getpid())
    (tmp_path / "a-file").write_text("")  # its folder cannot be made: the reload stays this worker's
    assert blocked.announce(tmp_path) is None and "fleet_announce_failed" in caplog.text


def _served_version(port: int) -> str | None:
    """The model version a worker's metrics endpoint says it serves (None: not listening yet)."""
    import re
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    found = re.search(r'^promptier_model_info\{model_version="([^"]*)"\} 1\.0$', text, re.MULTILINE)
    return found.group(1) if found else None


def test_an_admin_reload_reaches_every_worker_and_a_replacement_starts_on_it(trained_artifact: Path,
                                                                            tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, listen_ports, wait_serving

    start = tagged_copy(trained_artifact, tmp_path / "start", "start-1")
    other = tagged_copy(trained_artifact, tmp_path / "other", "other-1")
    port, metrics_port = free_port(), listen_ports(2)[0]
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(start), "--port",
                               str(port), "--workers", "2", "--metrics-port", str(metrics_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"

    def every_worker_serves(version: str) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(_served_version(metrics_port + i) == version for i in (0, 1)):
                return True
            time.sleep(0.2)
        return False

    try:
        wait_serving(target)
        assert every_worker_serves("start-1")
        with grpc.insecure_channel(target) as channel:  # one connection: one worker gets the call
            reply = router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(model_dir=str(other)),
                                                             timeout=60)
        assert (reply.model_version, reply.previous_model_version) == ("other-1", "start-1")
        assert every_worker_serves("other-1"), [_served_version(metrics_port + i) for i in (0, 1)]
        # A worker that dies is replaced on the model the others serve, not on the start directory.
        victim = spawned_workers(parent.pid)[0]
        victim.kill()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
                len(spawned_workers(parent.pid)) < 2 or victim.pid in {w.pid for w in spawned_workers(parent.pid)}):
            time.sleep(0.2)
        assert every_worker_serves("other-1"), [_served_version(metrics_port + i) for i in (0, 1)]
        with grpc.insecure_channel(target) as channel:
            for _ in range(4):
                assert router_pb2_grpc.RouterStub(channel).Info(router_pb2.InfoRequest(), timeout=30,
                                                                wait_for_ready=True).model_version == "other-1"
        parent.send_signal(signal.SIGHUP)  # the operator's reload: every worker back to the start directory
        assert every_worker_serves("start-1"), [_served_version(metrics_port + i) for i in (0, 1)]
        # New files deployed into the same directory, then an empty reload: every worker loads them.
        manifest = start / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"start-1"', '"start-2"'))
        with grpc.insecure_channel(target) as channel:
            reply = router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(), timeout=60)
        assert reply.model_version == "start-2"
        assert every_worker_serves("start-2"), [_served_version(metrics_port + i) for i in (0, 1)]
        # Two reloads asked at once, of whichever workers: all end on one model.
        from concurrent.futures import ThreadPoolExecutor

        def reload_over_a_new_connection(directory: Path) -> str:
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                return router_pb2_grpc.AdminStub(channel).Reload(
                    router_pb2.ReloadRequest(model_dir=str(directory)), timeout=60).model_version

        with ThreadPoolExecutor(2) as pool:
            assert sorted(pool.map(reload_over_a_new_connection, (start, other))) == ["other-1", "start-2"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len({_served_version(metrics_port + i) for i in (0, 1)}) != 1:
            time.sleep(0.2)
        time.sleep(2.0)  # a follow still under way would show as a split now
        assert len({_served_version(metrics_port + i) for i in (0, 1)}) == 1
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(120) == 0
    finally:
        stop_supervisor(parent)


def test_workers_drain_when_the_supervisor_is_killed(trained_artifact: Path) -> None:
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                               "--port", str(port), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        wait_serving(f"127.0.0.1:{port}")
        children = psutil.Process(parent.pid).children()
        parent.send_signal(signal.SIGKILL)  # no chance to forward anything
        parent.wait(10)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "workers outlived their supervisor and kept the port"
    finally:
        parent.kill()
        for child in children:
            if child.is_running():
                child.kill()


# A supervisor whose back-off before restarting a dead worker is where SIGTERM arrives: every death
# counts as a failed start (so a back-off follows it), and the back-off itself sends the SIGTERM.
_SIGTERM_IN_BACKOFF = """
import os, signal, sys
from pathlib import Path
from serving.service import workers

workers.MIN_HEALTHY_SECONDS = float("inf")
error = workers.log.error

def died(message, *args):  # a worker's death is logged just before its restart is scheduled
    error(message, *args)
    if '"worker_died"' in str(message):
        os.kill(os.getpid(), signal.SIGTERM)

workers.log.error = died
sys.exit(workers.serve_workers(2, Path(sys.argv[1]), f"127.0.0.1:{sys.argv[2]}", 1, None))
"""


def test_a_sigterm_while_a_dead_worker_waits_for_its_restart_stops_everything(trained_artifact: Path) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", _SIGTERM_IN_BACKOFF, str(trained_artifact), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", process=parent)
        deadline = time.monotonic() + 120
        while len(spawned_workers(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        victim, survivor = spawned_workers(parent.pid)[:2]
        victim.kill()
        # The drain was forwarded to the live worker only: a replacement started after it would serve on.
        assert parent.wait(60) == 0, "the supervisor did not exit after SIGTERM"
        assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    finally:
        stop_supervisor(parent)


def test_a_reload_asked_while_a_worker_starts_reaches_it_once_it_serves(trained_artifact: Path,
                                                                       tmp_path: Path) -> None:
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, listen_ports, wait_serving

    # Worker i serves metrics on metrics_port + i: the whole run must be free, not only its first port.
    port, metrics_port = free_port(), listen_ports(2)[0]
    log = tmp_path / "serve.err"
    artifact = Path(shutil.copytree(trained_artifact, tmp_path / "model"))
    with log.open("wb") as err:
        parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(artifact),
                                   "--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port)],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_serving(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(spawned_workers(parent.pid)) < 2:
            time.sleep(0.1)
        victim = spawned_workers(parent.pid)[0]
        victim.kill()
        replacement = None
        deadline = time.monotonic() + 30
        while replacement is None and time.monotonic() < deadline:
            fresh = [w for w in spawned_workers(parent.pid) if w.pid != victim.pid and w.create_time() >
                     victim.create_time() + 0.5]
            replacement = fresh[0] if fresh else None
            time.sleep(0.02)
        assert replacement is not None
        manifest = artifact / "manifest.json"  # new files in the start directory, then the reload
        manifest.write_text(manifest.read_text().replace('"tiny-test-1"', '"tiny-test-2"'))
        os.kill(parent.pid, signal.SIGHUP)  # the replacement is still importing and loading its model

        # Both end on the new files: the survivor by reloading, the replacement by reloading once it
        # serves, or by having read the start directory after the reload was asked for.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                _served_version(metrics_port + i) == "tiny-test-2" for i in (0, 1)):
            time.sleep(0.2)
        assert [_served_version(metrics_port + i) for i in (0, 1)] == ["tiny-test-2"] * 2
        assert replacement.is_running()
        deaths = [json.loads(line) for line in log.read_text().splitlines() if '"worker_died"' in line]
        assert [death["exitcode"] for death in deaths] == [-signal.SIGKILL]  # only the one killed here
    finally:
        parent.terminate()
        try:
            parent.wait(60)
        except subprocess.TimeoutExpired:
            for child in spawned_workers(parent.pid):
                child.kill()
            parent.kill()


def test_a_worker_that_cannot_start_again_costs_capacity_not_the_port(trained_artifact: Path,
                                                                     tmp_path: Path) -> None:
    """A worker dies, and its replacement cannot load the start directory (a deploy half done meanwhile):
    after three failed starts the supervisor drained the worker still serving and exited, and every call
    got UNAVAILABLE. With a worker serving it keeps trying the slot, and gives up only when none serves."""
    import json
    import shutil
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving
    from serving.client import RouterClient

    port = free_port()
    log = tmp_path / "serve.err"
    artifact = Path(shutil.copytree(trained_artifact, tmp_path / "model"))
    with log.open("wb") as err:
        parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(artifact),
                                   "--port", str(port), "--workers", "2"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_serving(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(spawned_workers(parent.pid)) < 2:
            time.sleep(0.1)
        (artifact / "manifest.json").write_text("{")  # a bad deploy, which a reload would refuse
        spawned_workers(parent.pid)[0].kill()

        def deaths() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines() if '"worker_died"' in line]

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(deaths()) < 4:  # the kill, then three failed starts
            time.sleep(0.2)
        # (the kill counts as a failed start too when it comes within MIN_HEALTHY_SECONDS of the start)
        assert deaths()[3]["failed_starts_in_a_row"] >= 3, deaths()
        assert all(death["other_workers_serving"] for death in deaths())
        assert parent.poll() is None, "the supervisor gave up while a worker served"
        with RouterClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.classify("hi").tier
    finally:
        stop_supervisor(parent)


def test_workers_refuse_a_bad_artifact_before_starting(artifact_copy: Path) -> None:
    import subprocess
    import sys

    (artifact_copy / "model.onnx").write_bytes(b"not onnx")
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "serve", "--model", str(artifact_copy),
                             "--port", "50999", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not a loadable ONNX model" in result.stderr

