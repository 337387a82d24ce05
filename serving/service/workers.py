"""`promptier serve --workers N`: N server processes on one port (SO_REUSEPORT), one model each.

One Python process is bound by its GIL to about one core of protocol work. With several processes
the kernel spreads incoming connections over them, so a gateway with a few connections uses every
core. The parent only supervises: it forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every
worker, relays a reload one worker was asked for to the others (serving.service.fleet), and restarts
a worker that dies, logging it, so a crash costs capacity, never the port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from serving.service.fleet import FLEET_SIGNAL, FleetModel

if TYPE_CHECKING:
    from serving.service.limits import ServerLimits

log = logging.getLogger("promptier.serve")
# A worker that dies sooner than this after its start counts as a failed start. After
# MAX_FAILED_STARTS of them in a row, with no other worker alive, the supervisor stops and exits
# non-zero: a restart loop (port taken, broken environment) would only hide the reason. While another
# worker serves, the slot is started again, every MAX_RESTART_DELAY seconds at most: a crash (and a
# replacement that cannot load a model deployed badly meanwhile) costs capacity, never the port.
MIN_HEALTHY_SECONDS = 10.0
MAX_FAILED_STARTS = 3
MAX_RESTART_DELAY = 30.0


def _worker(model_dir: Path | None, address: str, threads: int, metrics_port: int | None,
            limits: ServerLimits | None, fleet: FleetModel) -> None:
    import asyncio
    import threading

    from serving.common.logs import configure_json_logging
    from serving.service.server import serve_forever

    configure_json_logging()
    # The parent handles Ctrl-C and forwards it as SIGTERM; a second copy would skip the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_drain_when_orphaned, args=(os.getppid(),), daemon=True).start()
    from classifier import PromptierError

    try:
        asyncio.run(serve_forever(model_dir, address, threads, metrics_port, reuse_port=True, limits=limits,
                                  fleet=fleet))
    except PromptierError as error:  # e.g. its metrics port is taken: said once, without a traceback
        log.error(json.dumps({"event": "worker_failed", "reason": str(error)}))
        raise SystemExit(2) from None


def _drain_when_orphaned(parent: int) -> None:
    """A supervisor killed with SIGKILL cannot forward anything: drain rather than hold the port forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error(json.dumps({"event": "supervisor_gone", "action": "draining"}))
    os.kill(os.getpid(), signal.SIGTERM)


def serve_workers(workers: int, model_dir: Path | None, address: str, threads: int,
                  metrics_port: int | None, limits: ServerLimits | None = None) -> int:
    """Run `workers` server processes on `address` until SIGTERM/SIGINT; returns the exit code.

    Worker i serves Prometheus metrics on `metrics_port + i` (each process has its own counters).
    """
    context = multiprocessing.get_context("spawn")
    processes: dict[int, tuple[BaseProcess, float]] = {}
    fleet_dir = Path(tempfile.mkdtemp(prefix="promptier-serve-"))
    fleet = FleetModel(fleet_dir / "model_dir", os.getpid())
    reload_signals = {signal.SIGHUP, FLEET_SIGNAL}

    def start(index: int) -> None:
        port = None if metrics_port is None else metrics_port + index
        process = context.Process(target=_worker, args=(model_dir, address, threads, port, limits, fleet),
                                  name=f"promptier-serve-{index}", daemon=False)
        # SIGHUP's (and SIGUSR1's) default action ends a process, and a worker installs its reload
        # handlers only once it serves: a reload forwarded while a replacement starts would kill it (and
        # count as a failed start). Started with them blocked (the mask survives exec), the worker gets
        # such a reload once it can handle it. Blocked here, not ignored, so that none sent meanwhile is lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, reload_signals)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, reload_signals)
        processes[index] = (process, time.monotonic())
        log.info(json.dumps({"event": "worker_started", "worker": index, "pid": process.pid}))
        if stopping and process.pid is not None:  # a SIGTERM forwarded while it started did not reach it
            _send(process.pid, signal.SIGTERM)

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        if signum == signal.SIGHUP:  # an operator's SIGHUP: every worker back to the start directory
            try:
                fleet.write(None)
                signum = FLEET_SIGNAL  # through the file, so a reload announced meanwhile cannot overtake it
            except OSError as error:  # each worker's own SIGHUP reloads its start directory all the same
                log.error(json.dumps({"event": "fleet_write_failed", "reason": str(error)}))
        for process, _ in processes.values():
            if process.is_alive() and process.pid is not None:
                _send(process.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, *reload_signals):
        signal.signal(signum, forward)
    try:
        for index in range(workers):
            start(index)
        exit_code = 0
        failed_starts = dict.fromkeys(range(workers), 0)
        restarts: dict[int, float] = {}  # a dead worker's slot -> when (monotonic) it is started again
        while processes or restarts:
            time.sleep(0.2)
            for index, due in list(restarts.items()):
                if stopping:  # a SIGTERM during the back-off was forwarded to the live workers only
                    del restarts[index]
                elif time.monotonic() >= due:
                    del restarts[index]
                    start(index)
            for index, (process, started) in list(processes.items()):
                if process.is_alive():
                    continue
                del processes[index]
                if stopping:
                    continue
                quick = time.monotonic() - started < MIN_HEALTHY_SECONDS
                failed_starts[index] = failed_starts[index] + 1 if quick else 0
                others_alive = any(other.is_alive() for other, _ in processes.values())
                log.error(json.dumps({"event": "worker_died", "worker": index, "exitcode": process.exitcode,
                                      "failed_starts_in_a_row": failed_starts[index],
                                      "other_workers_serving": others_alive}))
                if failed_starts[index] >= MAX_FAILED_STARTS and not others_alive:
                    exit_code = 1
                    stopping = True
                    restarts.clear()
                    forward(signal.SIGTERM, None)  # it cannot stay up: stop all and say so
                    continue
                # Back off a worker that keeps dying young; the others are watched meanwhile.
                restarts[index] = time.monotonic() + min(MAX_RESTART_DELAY, 0.5 * failed_starts[index])
        return exit_code
    finally:
        shutil.rmtree(fleet_dir, ignore_errors=True)


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone; the supervision loop notices
        os.kill(pid, signum)
