"""The gRPC service in a test's process (a real server on a free port, on its own event loop), a model a
test holds on an event, and the worker processes of a `--workers` one, for the tests of every component
that talks to it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path

import psutil

import classifier
from serving.service.server import RunningServer, start_server

EASY = "hello thanks say hi cat dog"
HARD = "prove theorem derive integral eigenvalue lemma"


class HeldModel:
    """Wraps a real model; every model call waits on `release` (a test holds work on this event, never
    on a timer) and is recorded, so a test can see which prompts each model call carried."""

    def __init__(self, model: classifier.TierClassifier) -> None:
        self._model = model
        self.manifest, self.model_version = model.manifest, model.model_version
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def classify_items(self, items):  # type: ignore[no-untyped-def]
        self.calls.append([str(text) for text, _ in items])
        self.entered.set()
        assert self.release.wait(120), "the test never released the model"
        return self._model.classify_items(items)


class ServerThread:
    """Runs start_server on an event loop in a background thread."""

    def __init__(self, **kwargs: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.running: RunningServer | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def begin() -> None:
                self.running = await start_server(**kwargs)  # type: ignore[arg-type]
                ready.set()

            self.loop.run_until_complete(begin())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(60), "server did not start"

    @property
    def target(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    def call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self, grace: float = 1.0) -> None:
        assert self.running is not None
        self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def spawned_workers(parent_pid: int) -> list[psutil.Process]:
    """The worker processes a `--workers` supervisor started (not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process(parent_pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # a killed worker not yet reaped (zombie) or already gone
            continue
    return found


def stop_supervisor(parent: subprocess.Popen[bytes]) -> None:
    """Kill a `--workers` supervisor a test left running, and its workers first: killed alone, it
    would leave them serving the port to the next test."""
    if parent.poll() is None:
        for worker in spawned_workers(parent.pid):
            worker.kill()
        parent.kill()


def worker_serving(parent_pid: int, server_port: int, client_port: int) -> int:
    """The pid of the worker holding the server side of our connection from `client_port` (-1: none)."""
    for worker in spawned_workers(parent_pid):
        try:
            for c in worker.net_connections("tcp"):
                if (c.status == "ESTABLISHED" and c.laddr.port == server_port and c.raddr
                        and c.raddr.port == client_port):
                    return int(worker.pid)
        except psutil.Error:
            continue
    return -1


def tagged_copy(artifact: Path, target: Path, version: str) -> Path:
    """A copy of the test artifact (model version "tiny-test-1") at `target`, under `version`."""
    shutil.copytree(artifact, target)
    manifest = target / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tiny-test-1"', f'"{version}"'))
    return target
