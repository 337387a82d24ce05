"""Inbound connections on raw sockets: slow clients, callers leaving mid-body, the limit, graceful shutdown."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.dispatcher_harness import Dispatcher, dispatcher_config, read_log
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, ServerThread


def _until_closed(connection: socket.socket) -> bytes:
    """What the server sends until it closes the connection. The socket's timeout bounds the wait (a
    server that never closes fails the test); it measures nothing."""
    received = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def _slow_client(port: int, sent: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(sent)
    return connection


HEADERS = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           b"content-length: 400\r\n\r\n")


def test_slow_clients_are_cut_off_and_others_keep_being_served(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"header_timeout_s": 0.5, "body_timeout_s": 0.5}))
    try:
        slow = {"silent": _slow_client(running.port, b""),
                "half the headers": _slow_client(running.port, HEADERS[:40]),
                "half the body": _slow_client(running.port, HEADERS + b'{"model": "promptier", ' * 8)}
        client = running.client()
        for _ in range(3):  # meanwhile, callers that send their requests are served
            client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        answers = {}
        for what, connection in slow.items():
            answers[what] = _until_closed(connection)
            connection.close()
        assert answers.pop("silent") == b""  # closed quietly, like an idle keep-alive connection
        for what, answer in answers.items():
            assert answer.startswith(b"HTTP/1.1 408 "), (what, answer)
        # Trickling does not extend the deadline: a byte at a time, each within the timeout, still ends.
        trickler = _slow_client(running.port, b"")
        trickler.settimeout(0.05)
        answer = b""
        for byte in (HEADERS[:-4] + b"\r\nx-padding: " + b"a" * 2000)[:2000]:
            try:
                trickler.sendall(bytes([byte]))
                answer = trickler.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            break
        trickler.settimeout(30)
        answer += _until_closed(trickler)
        trickler.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        # A keep-alive connection between requests is not cut by the request deadlines.
        with httpx.Client(base_url=running.base_url) as keep_alive:
            for _ in range(2):
                assert keep_alive.get("/models").status_code == 200
                time.sleep(0.7)
            assert keep_alive.get("/models").status_code == 200
        assert len(read_log(tmp_path)) == 3  # the requests cut off never reached routing
    finally:
        running.stop()


def test_a_caller_that_leaves_mid_body_is_one_log_line_without_traceback(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    try:
        with caplog.at_level("INFO", logger="promptier.dispatcher"), caplog.at_level("INFO", logger="uvicorn"):
            for _ in range(2):
                _slow_client(running.port, HEADERS + b'{"model": "prom').close()

            def lines() -> list[logging.LogRecord]:
                return [record for record in caplog.records if "client_left" in record.getMessage()]

            deadline = time.monotonic() + 10
            while len(lines()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(lines()) == 2
            assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
        assert running.client().chat.completions.create(model="promptier",
                                                        messages=[{"role": "user", "content": EASY}]).choices
    finally:
        running.stop()


def test_request_headers_past_their_bound_are_refused_and_closed(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"max_header_bytes": 4096, "header_timeout_s": 2}))
    try:
        oversized = {"a header": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-padding: " + b"a" * 6000,
                     "the request line": b"GET /v1/models?" + b"a" * 6000}
        for what, sent in oversized.items():  # never ended: without the bound, only the deadline stops them
            connection = _slow_client(running.port, sent)
            answer = _until_closed(connection)
            connection.close()
            assert answer.startswith(b"HTTP/1.1 431 "), (what, answer)
            assert b"request_header_fields_too_large" in answer
        # Headers within the bound are served, on a connection that goes on to a second request.
        with httpx.Client(base_url=running.base_url) as client:
            for _ in range(2):
                assert client.get("/models", headers={"x-padding": "a" * 3000}).status_code == 200
    finally:
        running.stop()


def test_connections_past_the_limit_are_refused_at_once(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"max_connections": 3, "header_timeout_s": 60}))
    try:
        held = [_slow_client(running.port, b"") for _ in range(3)]
        refused = _slow_client(running.port, b"")
        answer = _until_closed(refused)  # answered without waiting for a request
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer, answer
        for connection in held:
            connection.close()
        status = None
        for _ in range(200):  # once the server has seen them go
            status = httpx.get(f"{running.base_url}/models").status_code
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        running.stop()


def test_one_clients_connections_past_its_cap_are_refused_while_others_connect(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> None:
    """With a cap per client address, one client holding its share of connections cannot take the rest:
    its next one is refused, another address still gets in, and the client's slot frees when one closes."""
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                                           inbound={"max_connections_per_client": 2, "header_timeout_s": 60}))

    def from_address(source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", running.port), timeout=30, source_address=(source, 0))

    try:
        held = [from_address("127.0.0.1") for _ in range(2)]
        refused = from_address("127.0.0.1")
        answer = _until_closed(refused)
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_client_connections" in answer, answer
        # Another client (all of 127.0.0.0/8 is this host's loopback) is not refused for the first one's flood.
        other = from_address("127.0.0.2")
        other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert _until_closed(other).startswith(b"HTTP/1.1 200 ")
        other.close()
        held.pop().close()
        status = None
        for _ in range(200):  # once the server has seen it go, the client may connect again
            retry = from_address("127.0.0.1")
            retry.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            status = _until_closed(retry)[:12]
            retry.close()
            if status == b"HTTP/1.1 200":
                break
            time.sleep(0.05)
        assert status == b"HTTP/1.1 200"
        for connection in held:
            connection.close()
    finally:
        running.stop()


def test_a_retiring_dispatcher_answers_the_connections_it_had_accepted(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker told to stop (SIGHUP's replacement, SIGTERM) still answers a request that reaches it on a
    connection it accepted before, then closes; a silent one is closed; and one whose request it has
    already answered (before reading all of its body) is closed at once instead of holding the
    shutdown open."""
    from serving.dispatch import inbound

    monkeypatch.setattr(inbound, "SHUTDOWN_GRACE_S", 10.0)  # the caller's request may come late on a busy machine
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    caller, silent = _slow_client(running.port, b""), _slow_client(running.port, b"")
    answered_early = _slow_client(running.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                 b"content-type: text/plain\r\ncontent-length: 20\r\n\r\n0123456789")
    assert answered_early.recv(65536).startswith(b"HTTP/1.1 415 ")  # answered without reading the rest
    connections = running.server.server_state.connections
    deadline = time.monotonic() + 30  # bounds the waits below; measures nothing
    while len(connections) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(connections) == 3
    running.stop()  # the graceful shutdown a retiring worker goes through
    while time.monotonic() < deadline:
        now = list(connections)
        if len(now) == 2 and all(getattr(c, "last_request", False) for c in now):
            break
        time.sleep(0.01)
    now = list(connections)
    assert len(now) == 2 and all(c.last_request for c in now)  # shutting down; the two waiting still open
    answered_early.sendall(b"0123456789")
    assert _until_closed(answered_early) == b""
    caller.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = _until_closed(caller)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer.lower(), answer
    assert _until_closed(silent) == b""
    while connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not connections  # nothing holds the shutdown open
    for connection in (caller, silent, answered_early):
        connection.close()
