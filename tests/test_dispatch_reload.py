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
