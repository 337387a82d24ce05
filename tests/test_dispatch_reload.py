"""SIGHUP rereads the dispatcher config, with one worker and with two: no failed request, a bad edit refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from serving.dispatch.dispatch_config import load_dispatcher_config
from tests.dispatcher_harness import wait_for_health
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, spawned_workers, stop_supervisor


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rereads_the_config_without_a_failed_request_and_refuses_a_bad_one(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path, workers: int) -> None:
    import http.client
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port

    config = tmp_path / "dispatcher.yaml"

    def write_config(small_model: str, tier_names: tuple[str, str, str] = ("small", "medium", "large")) -> None:
        upstreams = list(fresh.values())
        config.write_text(json.dumps({
            "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
            "tiers": {name: {"base_url": upstream.url, "model": small_model if name == "small" else name}
                      for name, upstream in zip(tier_names, upstreams, strict=True)},
            "fallback_tier": tier_names[-1], "decision_log": {"path": str(tmp_path / "d.jsonl")}}))

    def small_upstream_model() -> str:
        """The upstream model a request pinned to the small tier went to (one connection per request, so
        that every worker alive gets requests), or what went wrong."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a bound, not a measurement
        try:
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}),
                headers={"content-type": "application/json"})
            reply = connection.getresponse()
            reply.read()
            if reply.status != 200:
                return f"failed: HTTP {reply.status}"
            return reply.getheader("x-promptier-upstream-model") or "failed: no upstream model header"
        except OSError as error:
            return f"failed: {error!r}"
        finally:
            connection.close()

    write_config("small-v1")
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                                    "--port", str(port), "--workers", str(workers)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_health(port, process)
        assert small_upstream_model() == "small-v1"
        first_fingerprint = httpx.get(f"http://127.0.0.1:{port}/health").json()["config_fingerprint"]
        assert first_fingerprint == load_dispatcher_config(config).fingerprint

        first_workers = {worker.pid for worker in spawned_workers(process.pid)}
        assert len(first_workers) == workers
        write_config("small-v2")
        process.send_signal(signal.SIGHUP)
        answers: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            answers.append(small_upstream_model())  # requests keep coming while the workers are replaced
            current = {worker.pid for worker in spawned_workers(process.pid)}
            if len(current) == workers and not current & first_workers:
                break
        assert not current & first_workers and len(current) == workers  # every worker was replaced
        failed = [answer for answer in answers if answer.startswith("failed")]
        assert not failed, failed  # not one request failed or was refused during the reload
        assert [small_upstream_model() for _ in range(2 * workers)] == ["small-v2"] * (2 * workers)
        # /health says which config is live: the fingerprint `promptier dispatch --check` prints for the file.
        live = httpx.get(f"http://127.0.0.1:{port}/health", headers={"connection": "close"}).json()
        assert live["config_fingerprint"] == load_dispatcher_config(config).fingerprint != first_fingerprint

        # A bad edit: the replacement cannot start, the running workers keep serving the last good
        # config, and the dispatcher says so.
        config.write_text("tiers: [not yaml")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while "aborting the restart" not in stderr_path.read_text() and time.monotonic() < deadline:
            assert small_upstream_model() == "small-v2"
            time.sleep(0.2)
        assert "aborting the restart" in stderr_path.read_text()
        assert '"event": "worker_cannot_start"' in stderr_path.read_text()
        assert process.poll() is None
        assert [small_upstream_model() for _ in range(2 * workers)] == ["small-v2"] * (2 * workers)

        # A worker that dies now cannot be replaced from that file: the dispatcher stops with the
        # start-up failure code instead of restarting the worker forever.
        spawned_workers(process.pid)[0].kill()
        assert process.wait(90) == 3
    finally:
        stop_supervisor(process)


def test_a_reload_replaces_every_worker_while_the_retired_ones_finish_their_requests(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    """An LLM answer can take minutes: a retired worker finishes it, and meanwhile the next worker is
    replaced too, rather than the workers serving two configs (and nothing supervising them) that long."""
    import signal
    import subprocess
    import sys
    import threading

    import psutil

    from serving.bench.ports import free_port

    fresh["medium"].behaviour, fresh["medium"].generation_s = "generating", 600.0  # until `finish` is set
    config = tmp_path / "dispatcher.yaml"

    def write_config(small_model: str) -> None:
        config.write_text(json.dumps({
            "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 500},
            # No escalation of the held requests, however slowly the workers start on a busy machine.
            "tiers": {name: {"base_url": upstream.url, "model": small_model if name == "small" else name,
                             "first_byte_timeout_s": 600} for name, upstream in fresh.items()},
            "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}}))

    write_config("small-v1")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                                "--port", str(port), "--workers", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers: list[int] = []
    held: list[threading.Thread] = []

    def hold() -> None:  # a request the upstream answers only once `finish` is set
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
            "model": "promptier/tier/medium", "messages": [{"role": "user", "content": EASY}]})
        answers.append(reply.status_code)

    def holders() -> set[int]:
        """The workers holding a connection from this test's process (each held request has its own)."""
        ours = {connection.laddr.port for connection in psutil.Process().net_connections("tcp")
                if connection.raddr and connection.raddr.port == port}
        return {worker.pid for worker in spawned_workers(process.pid)
                if any(c.raddr and c.raddr.port in ours for c in worker.net_connections("tcp"))}

    try:
        wait_for_health(port, process)
        first = {worker.pid for worker in spawned_workers(process.pid)}
        deadline = time.monotonic() + 60
        while holders() != first and time.monotonic() < deadline:  # a held request on each worker
            held.append(threading.Thread(target=hold, daemon=True))
            held[-1].start()
            time.sleep(0.3)
        assert holders() == first, "could not hold a request on each worker"
        write_config("small-v2")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        replaced: set[int] = set()
        while len(replaced) < 2 and time.monotonic() < deadline:
            replaced = {worker.pid for worker in spawned_workers(process.pid)} - first
            time.sleep(0.2)
        # Both replaced while every held request is still open on the retired workers.
        assert len(replaced) == 2 and not answers, (replaced, answers)
        assert {worker.pid for worker in spawned_workers(process.pid)} >= first  # still finishing
        fresh["medium"].finish.set()
        for thread in held:
            thread.join(120)
        assert answers == [200] * len(held)  # every held request was answered in full
        deadline = time.monotonic() + 60
        while {worker.pid for worker in spawned_workers(process.pid)} & first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not {worker.pid for worker in spawned_workers(process.pid)} & first  # the retired ones exited
    finally:
        fresh["medium"].finish.set()
        stop_supervisor(process)
