"""The transport floor of a compiled gRPC server: `serving/bench/native/echo_server.cc`, built on demand.

`promptier loadtest` drives it with h2load exactly like the real server, so the table shows what a
C++ gRPC front end would cost per call on this machine before any model work (issue #4's unary bar
asks whether the Python server's per-call cost is the limit). Building needs g++, protoc with the
gRPC C++ plugin and libgrpc++ (Debian: `apt-get install g++ libgrpc++-dev protobuf-compiler-grpc`);
without them the row is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.codegen import proto_root

SOURCE = Path(__file__).resolve().parent / "native" / "echo_server.cc"
TOOLS = ("g++", "protoc", "grpc_cpp_plugin", "pkg-config")


class NativeBuildUnavailable(Exception):
    """The compiler, gRPC C++ library or .proto files are not there; the message says which."""


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "promptier" / "native"


def build_echo_server(cache: Path | None = None) -> Path:
    """Compile the echo server (cached by the hash of its sources) and return the binary's path.

    Raises:
        NativeBuildUnavailable: a tool, libgrpc++ or the .proto files are missing.
        subprocess.CalledProcessError: the compiler failed (its output is in the error).
    """
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise NativeBuildUnavailable(f"missing {', '.join(missing)} (Debian: apt-get install g++ pkg-config "
                                     f"libgrpc++-dev protobuf-compiler-grpc)")
    if subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        raise NativeBuildUnavailable("pkg-config finds no grpc++/protobuf (Debian: apt-get install libgrpc++-dev)")
    root = proto_root()
    protos = sorted(root.rglob("*.proto"))
    if not protos:
        raise NativeBuildUnavailable(f"no .proto files under {root}")
    digest = hashlib.sha256(SOURCE.read_bytes() + b"".join(p.read_bytes() for p in protos)).hexdigest()[:16]
    binary = (cache or _cache_dir()) / f"echo_server-{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="promptier-native-") as workdir:
        generated = Path(workdir)
        plugin = shutil.which("grpc_cpp_plugin")
        subprocess.run(["protoc", f"-I{root}", f"--cpp_out={generated}", f"--grpc_out={generated}",
                        f"--plugin=protoc-gen-grpc={plugin}", *[str(p.relative_to(root)) for p in protos]],
                       check=True, capture_output=True, text=True)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], check=True,
                               capture_output=True, text=True).stdout.split()
        sources = [str(SOURCE), *map(str, sorted(generated.rglob("*.cc")))]
        staging = binary.with_suffix(".partial")
        subprocess.run(["g++", "-O2", "-std=c++17", f"-I{generated}", *sources, *flags, "-o", str(staging)],
                       check=True, capture_output=True, text=True)
        staging.replace(binary)  # only a finished binary gets the cached name
    return binary


def answered_calls(port: int) -> int:
    """How many Classify calls the echo server has answered (it reports them through Info)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = router_pb2_grpc.RouterStub(channel).Info(router_pb2.InfoRequest(), timeout=5)
    prefix, _, count = info.model_version.partition(":")
    if prefix != "echo":
        raise RuntimeError(f"port {port} is not the echo server (Info says {info.model_version!r})")
    return int(count)


def launch_echo_server(binary: Path, port: int) -> subprocess.Popen:
    """Start the echo server on loopback, without waiting for it."""
    return subprocess.Popen([str(binary), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_echo_server(process: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    """Wait until the echo server `process` answers Info; killed, and RuntimeError, if it exits or does
    not answer within `timeout` s."""
    deadline = time.time() + timeout
    while True:
        try:
            answered_calls(port)
            return
        except grpc.RpcError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"echo server did not start: {process.stderr.read().decode()[:500]}"
                                   if process.stderr else "echo server did not start") from None
            time.sleep(0.05)
