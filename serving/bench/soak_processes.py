"""The soak's processes: the `promptier` commands it starts and stops, the traffic functions it runs in
spawned children, the loopback ports it listens on, and how it tells they are ready."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import psutil

from classifier.signals import exit_deferred
from serving.bench.ports import wait_serving

SERVE_WORKERS = 2
STOP_TIMEOUT_S = 30.0  # for a SIGTERM to end a process before it is killed
# Label jobs run as batch work beside a latency-bound service should (serving/README.md): at a lower CPU
# priority, so that on a small machine they take the cores the service leaves idle, not its deadlines.
LABEL_NICENESS = 10
# The flooder, the slow connections and the dispatcher's callers stand for other machines: on loopback
# they run at a lower priority, so that the services, not the load generators, get the cores they share.
# The well-behaved client keeps the services' priority: its own waits count against it.
LOAD_NICENESS = 10
TRACEBACK = "Traceback (most recent call last)"


def python_env() -> dict[str, str]:
    """The environment for `python -m classifier.cli` children: this checkout's packages first, so they
    run the same code as this process whatever is installed."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PROMPTIER_ADMIN_TOKEN", None)  # SIGHUP is how this run reloads; Admin stays local-only
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "classifier.cli", *args]


def start_process(command: list[str], workdir: Path, name: str) -> subprocess.Popen:
    """Start a main process in a session (process group) of its own, its output in files of `workdir`."""
    with (workdir / f"{name}.out").open("wb") as out, (workdir / f"{name}.err").open("wb") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=python_env(), start_new_session=True,
                                cwd=workdir)


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL to its whole group if it has not ended within `timeout`; returns the exit
    code it ended with by itself (None: it had to be killed)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    code = process.poll()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # workers it may have left behind
    if code is None:
        # A process not started in a session of its own leads no group of its own to kill.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)
    return code


def spawned_children(pid: int) -> list:
    """The worker processes of a supervisor that starts them with multiprocessing's spawn (both the
    serve supervisor and uvicorn's do), oldest first; not its resource tracker."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and \
                    any("spawn_main" in part for part in child.cmdline()):
                workers.append((child.create_time(), child))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [child for _, child in sorted(workers, key=lambda pair: pair[0])]


def _child_main(name: str, function: Callable[..., dict], kwargs: dict, results: multiprocessing.Queue,
                niceness: int, own_session: bool = False) -> None:
    try:
        if own_session:
            # A session of its own is a scheduling group of its own where the kernel groups sessions
            # (autogroup): the process then gets a fair share of the CPU however busy the soak's other
            # processes keep theirs, as a process on another machine would.
            os.setsid()
        os.nice(niceness)
        results.put((name, function(**kwargs)))
    except Exception:
        results.put((name, {"error": traceback.format_exc()}))


class Children:
    """Traffic functions of `serving.bench.soak_clients`, each in a spawned process, and their results."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._results: multiprocessing.Queue = self._context.Queue()
        self._processes: dict[str, BaseProcess] = {}

    def start(self, name: str, function: Callable[..., dict], niceness: int = 0, own_session: bool = False,
              **kwargs: object) -> None:
        """Run `function(**kwargs)` in a process of its own, `niceness` added to its CPU priority; with
        `own_session`, in a session (and so a scheduling group) of its own."""
        process = self._context.Process(target=_child_main,
                                        args=(name, function, kwargs, self._results, niceness, own_session),
                                        name=f"soak-{name}", daemon=True)
        with exit_deferred():  # recorded before a SIGTERM's exit, so that stop_all ends it
            process.start()
            self._processes[name] = process

    def start_process(self, name: str, target: Callable[..., None], *args: object) -> BaseProcess:
        """A long-running process of ours (the fake upstream), stopped by `stop_all`."""
        process = self._context.Process(target=target, args=args, name=f"soak-{name}", daemon=True)
        with exit_deferred():
            process.start()
            self._processes[name] = process
        return process

    def collect(self, names: list[str], timeout: float) -> dict[str, dict]:
        """The results of `names`, waiting at most `timeout` seconds in all; a child that has not
        answered by then is killed and reported as such."""
        results: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(names) and time.monotonic() < deadline:
            try:
                name, result = self._results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                if not any(self._processes[n].is_alive() for n in names if n not in results):
                    break  # the ones missing died without a word
                continue
            results[name] = result
        for name in names:
            process = self._processes.pop(name)
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            results.setdefault(name, {"error": f"no result (exit code {process.exitcode})"})
        return results

    def stop_all(self) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
                process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._processes.clear()


def metrics_text(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def reloads_ok(port: int) -> float | None:
    """`promptier_model_reloads_total{outcome="ok"}` of the serve worker with metrics on `port`."""
    text = metrics_text(port)
    if text is None:
        return None
    match = re.search(r'^promptier_model_reloads_total\{outcome="ok"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def answers_http(url: str) -> Callable[[], bool]:
    """A readiness check: whether anything answers HTTP at `url` (any status)."""
    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).close()
        except urllib.error.HTTPError:
            return True  # an answer all the same
        except OSError:
            return False
        return True
    return answers


def answers_grpc(address: str) -> Callable[[], bool]:
    """A readiness check: whether the gRPC health service at `address` says SERVING."""
    def answers() -> bool:
        try:
            wait_serving(address, timeout=1)
        except TimeoutError:
            return False
        return True
    return answers


def wait_started(process: subprocess.Popen, name: str, workdir: Path, ready: Callable[[], bool],
                 timeout: float = 60.0) -> None:
    """Block until `ready()` for a process `start_process` started as `name` in `workdir`. One that
    exits first (say, a dispatcher refusing its config) or never gets ready raises RuntimeError with the
    end of what it wrote to stderr, instead of a bare timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} exited with status {process.returncode} before it was ready:\n"
                               f"{stderr_tail(workdir, name)}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"the {name} was not ready after {timeout:g} s:\n{stderr_tail(workdir, name)}")


def stderr_tail(workdir: Path, name: str, lines: int = 20) -> str:
    """The last `lines` lines a process `start_process` started as `name` wrote to stderr."""
    text = (workdir / f"{name}.err").read_text(encoding="utf-8", errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:]) or "(nothing on stderr)"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, stop: threading.Event | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if stop is not None and stop.is_set():
            return False
        time.sleep(0.25)
    return condition()


def serve_ready(serve: subprocess.Popen, metrics_ports: list[int]) -> bool:
    return (len(spawned_children(serve.pid)) == SERVE_WORKERS
            and all(metrics_text(port) is not None for port in metrics_ports))
