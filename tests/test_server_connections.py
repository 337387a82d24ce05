"""Slow, idle and surplus connections are closed while calls go on; serve's connection options."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.client import RouterClient
from serving.service.limits import ServerLimits
from tests.grpc_server import EASY, HARD, ServerThread
from tests.server_probes import code_of, wait_until

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` by now (reading and dropping whatever it sent before)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:  # reset by the server
        return True
    return True


def test_slow_and_idle_connections_are_closed_while_real_calls_go_on(trained_artifact: Path) -> None:
    """A connection that sends nothing, or half an HTTP/2 preface, is closed after the handshake
    timeout; one that completed its preface and carries no call, after the idle timeout. Both are
    configured short here; the bound on each wait is generous."""
    running = ServerThread(model_dir=trained_artifact,
                           limits=ServerLimits(handshake_timeout_s=1.0, idle_timeout_s=2.0))
    assert running.running is not None
    port = running.running.port
    sockets: dict[str, list[socket.socket]] = {"silent": [], "half preface": [], "idle": []}
    try:
        for _ in range(5):
            sockets["silent"].append(socket.create_connection(("127.0.0.1", port)))
            half = socket.create_connection(("127.0.0.1", port))
            half.sendall(HTTP2_PREFACE[:10])
            sockets["half preface"].append(half)
            idle = socket.create_connection(("127.0.0.1", port))
            idle.sendall(HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)
            sockets["idle"].append(idle)
        everything = [sock for socks in sockets.values() for sock in socks]
        with RouterClient(running.target, timeout=10) as client:
            assert [client.classify(EASY).tier for _ in range(5)] == ["small"] * 5
            wait_until(lambda: all(_closed_now(sock) for sock in everything), "the server to close them all",
                        bound_s=60)
            assert client.classify(HARD).tier == "large"
    finally:
        for sock in (sock for socks in sockets.values() for sock in socks):
            sock.close()
        running.stop()


def test_connections_past_the_limit_are_refused_and_existing_ones_keep_serving(trained_artifact: Path) -> None:
    running = ServerThread(model_dir=trained_artifact,
                           limits=ServerLimits(max_connections=4, handshake_timeout_s=300.0))
    assert running.running is not None
    port = running.running.port
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    hogs: list[socket.socket] = []
    try:
        with grpc.insecure_channel(running.target, options=own_connection) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            assert router.Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=10).tier == "small"
            hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # 3 fit beside ours
            wait_until(lambda: sum(_closed_now(sock) for sock in hogs) >= 3, "connections past the limit to close")
            assert sum(_closed_now(sock) for sock in hogs) == 3  # the other three wait in their long handshake
            assert router.Classify(router_pb2.ClassifyRequest(prompt=HARD), timeout=10).tier == "large"
            with grpc.insecure_channel(running.target, options=own_connection) as newcomer:
                code = code_of(router_pb2_grpc.RouterStub(newcomer).Classify,
                             router_pb2.ClassifyRequest(prompt=EASY), timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE
            for sock in hogs:
                sock.close()

            def newcomer_served() -> bool:
                with grpc.insecure_channel(running.target, options=own_connection) as fresh:
                    try:
                        return router_pb2_grpc.RouterStub(fresh).Classify(
                            router_pb2.ClassifyRequest(prompt=EASY), timeout=5).tier == "small"
                    except grpc.RpcError:
                        return False

            wait_until(newcomer_served, "a new connection to be accepted once the others closed")
    finally:
        for sock in hogs:
            sock.close()
        running.stop()


def test_serve_applies_its_connection_options(trained_artifact: Path) -> None:
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                               "--port", str(port), "--handshake-timeout", "1", "--idle-timeout", "2",
                               "--max-connections", "50", "--max-streams", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        silent = socket.create_connection(("127.0.0.1", port))
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)
        wait_until(lambda: _closed_now(silent) and _closed_now(idle), "serve to close both", bound_s=60)
        with RouterClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.classify(EASY).tier == "small"
    finally:
        server.terminate()
        server.wait(30)

