"""`dispatch --workers`: the supervisor's workers share the port, metrics and log; dead ones are replaced."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from serving.dispatch.dispatch_supervisor import WORKER_START_TIMEOUT_S
from tests.dispatcher_harness import wait_for_health
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, spawned_workers, stop_supervisor, worker_serving


def _post_on_new_connection(port: int, body: dict, owner: Callable[[int], int] = lambda _: -1
                             ) -> tuple[int, str | None, int]:
    """(status, reason header, owner(the client's local port)) for one request on a connection of its
    own; `owner` is asked while the connection is still open."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"content-type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        assert connection.sock is not None
        return reply.status, reply.getheader("x-promptier-reason"), owner(connection.sock.getsockname()[1])
    finally:
        connection.close()


def test_dispatcher_workers_spread_connections_add_up_metrics_and_share_the_log(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    from collections import Counter

    from serving.bench.ports import free_port

    log_path = tmp_path / "decisions.jsonl"
    config = tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in fresh.items()},
        "fallback_tier": "large", "decision_log": {"path": str(log_path), "max_bytes": 4096, "backups": 1000}}))
    port = free_port()
    metrics_dir = tmp_path / "metrics"  # given, so the test can look inside (otherwise a temporary one)
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")  # must not be counted
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    parent = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                               "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = {"model": "promptier", "messages": [{"role": "user", "content": EASY}]}

    def owner(client_port: int) -> int:
        return worker_serving(parent.pid, port, client_port)

    def requests_total() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics/", headers={"connection": "close"}).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("promptier_dispatch_requests_total{"))

    try:
        wait_for_health(port, parent)
        served: Counter[int] = Counter()
        sent = 0
        deadline = time.monotonic() + 60
        # A lookup that cannot place a connection (-1: psutil raced the process) places nothing.
        while len(set(served) - {-1}) < 2 and time.monotonic() < deadline:
            status, reason, worker = _post_on_new_connection(port, body, owner)
            assert (status, reason) == (200, "classified")
            sent += 1
            served[worker] += 1
        assert len(set(served) - {-1}) == 2, served  # both workers answered requests
        # Whichever worker answers the scrape, /metrics counts every worker's requests.
        assert [requests_total() for _ in range(6)] == [sent] * 6
        lines = [line for file in [log_path, *tmp_path.glob("decisions.jsonl.*")]
                 for line in file.read_text().splitlines()]
        assert len(lines) == sent and {json.loads(line)["reason"] for line in lines} == {"classified"}

        # A worker that hangs and is then killed is replaced well within the supervisor's health-check
        # wait (which the hang makes it start); its counts stay in the sums; the port keeps answering.
        victim = spawned_workers(parent.pid)[0]
        victim.suspend()
        time.sleep(2)  # the supervisor pings every 0.5 s: it is now waiting on the frozen worker
        victim.kill()
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S / 2
        while time.monotonic() < deadline:
            pids = {worker.pid for worker in spawned_workers(parent.pid)}
            if len(pids) == 2 and victim.pid not in pids:
                break
            time.sleep(0.2)
        assert len(pids) == 2 and victim.pid not in pids
        wait_for_health(port, parent)
        assert _post_on_new_connection(port, body)[:2] == (200, "classified")
        assert requests_total() == sent + 1
        # The replacement, once up, drops the dead worker's live gauge (queue depth), not its counters.
        deadline = time.monotonic() + 30
        while list(metrics_dir.glob(f"gauge_live*_{victim.pid}.db")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(metrics_dir.glob(f"gauge_live*_{victim.pid}.db"))
        assert list(metrics_dir.glob(f"counter_{victim.pid}.db"))

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
    finally:
        stop_supervisor(parent)


def test_dispatcher_workers_that_cannot_start_stop_with_a_failure_code(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port

    config = tmp_path / "dispatcher.yaml"
    tiers = {"small": "small", "mid": "medium", "large": "large"}  # the model serves small/medium/large
    config.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact)},
        "tiers": {name: {"base_url": fresh[upstream].url, "model": name} for name, upstream in tiers.items()},
        "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
    result = subprocess.run([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                             "--port", str(free_port()), "--workers", "2"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3  # uvicorn's start-up failure code, as with one process
    assert "serves tiers ['small', 'medium', 'large'], but the dispatcher config maps ['small', 'mid'" in result.stderr


def test_dispatch_on_a_port_in_use_names_it_and_exits_2(fresh: dict[str, Upstream], trained_artifact: Path,
                                                         tmp_path: Path) -> None:
    """As `serve` does: uvicorn alone said "[Errno 98] Address already in use", without the address, and exited 3
    as if a worker could not start."""
    import socket
    import subprocess
    import sys

    config = tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact)},
        "tiers": {name: {"base_url": u.url, "model": name} for name, u in fresh.items()},
        "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
