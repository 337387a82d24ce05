"""Model reloads (Admin.Reload, SIGHUP), the admin token and local peers, and serve on a busy port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.service.admin import is_local_peer
from tests.grpc_server import EASY, ServerThread, tagged_copy
from tests.server_probes import non_loopback_address, sample, wait_until


def test_reload_errors_are_clear_codes_and_never_echo_files(trained_artifact: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    shutil.copytree(trained_artifact, secret)
    (secret / "manifest.json").write_text('{"api_key": "SECRET-TOKEN-1", "nested": {"password": "SECRET-2"}}')
    running = ServerThread(model_dir=trained_artifact)
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            raw = channel.unary_unary("/promptier.v1.Admin/Reload", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\x0a\x03\xff\xfe\xfd", timeout=30)  # model_dir that is not UTF-8
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed request" in info.value.details() and "class" not in info.value.details()
            for model_dir, says in (("a\0b", "NUL"), ("/" + "a" * 5_000, "longer than 4096 bytes")):
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(model_dir=model_dir), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in info.value.details()
            for model_dir, says in (("/" + "a" * 300, "File name too long"), (str(secret), "manifest.json is invalid")):
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(model_dir=model_dir), timeout=30)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
                assert says in info.value.details() and "SECRET" not in info.value.details()
                assert "old model still serving" in info.value.details()
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=10).model_version == "tiny-test-1"
    finally:
        running.stop()
    assert running.running is not None
    assert sample(running.running, "promptier_model_reloads", outcome="invalid") == 3
    assert sample(running.running, "promptier_model_reloads", outcome="refused") == 2


def test_empty_reload_reloads_the_start_directory(trained_artifact: Path, tmp_path: Path) -> None:
    """As the proto says: an empty Admin.Reload (and SIGHUP, which calls the same reload) loads the
    directory the server was started with, even after a reload from another directory."""
    start = tagged_copy(trained_artifact, tmp_path / "start", "start-1")
    other = tagged_copy(trained_artifact, tmp_path / "other", "other-1")
    running = ServerThread(model_dir=start)
    assert running.running is not None
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            reply = admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("other-1", "start-1")
            reply = admin.Reload(router_pb2.ReloadRequest(), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("start-1", "other-1")
            admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert running.call(running.running.reload()) == ("start-1", "other-1")  # what SIGHUP runs
    finally:
        running.stop()


def test_sighup_reloads_the_start_directory_after_an_admin_reload(trained_artifact: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from serving.bench.ports import free_port, wait_serving

    start = tagged_copy(trained_artifact, tmp_path / "start", "start-1")
    other = tagged_copy(trained_artifact, tmp_path / "other", "other-1")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "classifier.cli", "serve", "--model", str(start), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            router = router_pb2_grpc.RouterStub(channel)
            router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=60)
            assert router.Info(router_pb2.InfoRequest(), timeout=10).model_version == "other-1"
            server.send_signal(signal.SIGHUP)
            wait_until(lambda: router.Info(router_pb2.InfoRequest(), timeout=10).model_version == "start-1",
                        "SIGHUP to reload the start directory")
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_busy_port_says_so_and_exits_2(trained_artifact: Path, workers: int) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                                 "--port", str(port), "--workers", str(workers)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_admin_token_no_call_could_present(trained_artifact: Path) -> None:
    import os
    import subprocess
    import sys

    from serving.bench.ports import free_port

    # gRPC metadata is ASCII, and a header's value loses its surrounding spaces: with these tokens Reload
    # would refuse every caller, the operator included. Refused once, before any worker starts.
    for token, said, workers in (("pässword", "has a character other than printable ASCII", "1"),
                                 ("pässword", "has a character other than printable ASCII", "2"),
                                 ("password\n", "begins or ends with whitespace", "1")):
        environment = {**os.environ, "PROMPTIER_ADMIN_TOKEN": token}
        port = "0" if workers == "1" else str(free_port())
        result = subprocess.run([sys.executable, "-m", "classifier.cli", "serve", "--model", str(trained_artifact),
                                 "--port", port, "--workers", workers], capture_output=True, text=True, timeout=120,
                                env=environment)
        assert result.returncode == 2, result.stderr
        assert f"PROMPTIER_ADMIN_TOKEN {said}" in result.stderr and "worker" not in result.stderr, result.stderr
        assert token.strip() not in result.stderr and "Traceback" not in result.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_serve_takes_an_ipv6_host_as_written(trained_artifact: Path) -> None:
    """`promptier serve --host ::1` made the address `::1:PORT`, which gRPC cannot parse: the server
    refused to start, saying only that it could not listen."""
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    running = ServerThread(model_dir=trained_artifact, address="::1:0")
    try:
        assert running.running is not None
        with grpc.insecure_channel(f"[::1]:{running.running.port}") as channel:
            reply = router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY), timeout=10)
        assert reply.tier == "small"
    finally:
        running.stop()


def test_reload_good_and_bad_and_drain(trained_artifact: Path, tmp_path: Path) -> None:
    running = ServerThread(model_dir=trained_artifact)
    try:
        other = tmp_path / "v2"
        shutil.copytree(trained_artifact, other)
        manifest = (other / "manifest.json").read_text().replace('"tiny-test-1"', '"tiny-test-2"')
        (other / "manifest.json").write_text(manifest)
        broken = tmp_path / "broken"
        shutil.copytree(trained_artifact, broken)
        (broken / "model.onnx").write_bytes(b"not onnx")
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            router = router_pb2_grpc.RouterStub(channel)
            reply = admin.Reload(router_pb2.ReloadRequest(model_dir=str(other)), timeout=30)
            assert (reply.model_version, reply.previous_model_version) == ("tiny-test-2", "tiny-test-1")
            assert router.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=5).model_version == "tiny-test-2"
            with pytest.raises(grpc.RpcError) as info:
                admin.Reload(router_pb2.ReloadRequest(model_dir=str(broken)), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "old model still serving" in info.value.details()
            assert router.Classify(router_pb2.ClassifyRequest(prompt="hi"), timeout=5).model_version == "tiny-test-2"
            health = health_pb2_grpc.HealthStub(channel)
            assert running.running is not None
            running.call(running.running.health.enter_graceful_shutdown())
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert sample(running.running, "promptier_model_reloads", outcome="refused") == 1
    finally:
        running.stop()


def test_admin_needs_the_token_when_the_server_has_one(trained_artifact: Path) -> None:
    running = ServerThread(model_dir=trained_artifact, admin_token="s3cret")
    try:
        with grpc.insecure_channel(running.target) as channel:
            admin = router_pb2_grpc.AdminStub(channel)
            # The token without its scheme is refused as well: the documented header is `Bearer <token>`.
            for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cre"),),
                             (("authorization", "s3cret"),), (("authorization", "Bearer"),)]:
                with pytest.raises(grpc.RpcError) as info:
                    admin.Reload(router_pb2.ReloadRequest(), metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # from this host too
            reply = admin.Reload(router_pb2.ReloadRequest(), metadata=(("authorization", "Bearer s3cret"),),
                                 timeout=30)
            assert reply.model_version == "tiny-test-1"
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=5).tier == "small"
        assert running.running is not None
        assert sample(running.running, "promptier_model_reloads", outcome="denied") == 5
        assert sample(running.running, "promptier_model_reloads", outcome="ok") == 1
    finally:
        running.stop()


def test_admin_without_a_token_refuses_callers_from_other_hosts(trained_artifact: Path) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no network interface besides loopback")
    running = ServerThread(model_dir=trained_artifact, address="0.0.0.0:0")
    try:
        assert running.running is not None
        with grpc.insecure_channel(f"{address}:{running.running.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "PROMPTIER_ADMIN_TOKEN" in info.value.details()
            # The Router itself is for everyone who can reach the port.
            assert router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(prompt=EASY),
                                                                 timeout=5).tier == "small"
        with grpc.insecure_channel(f"127.0.0.1:{running.running.port}") as channel:
            assert router_pb2_grpc.AdminStub(channel).Reload(router_pb2.ReloadRequest(), timeout=30).model_version
    finally:
        running.stop()


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:50051", True), ("ipv4:127.8.0.1:1", True), ("ipv4:192.0.2.2:50051", False),
    ("ipv6:[::1]:50051", True), ("ipv6:%5B::1%5D:50051", True), ("ipv6:[fd00::2]:50051", False),
    ("ipv6:[::ffff:10.0.0.1]:1", False), ("ipv6:[::ffff:127.0.0.1]:1", True), ("unix:/run/promptier.sock", True),
    ("", False), ("ipv4:nonsense", False),
])
def test_which_peers_count_as_this_host(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local

