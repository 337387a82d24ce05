"""`promptier dispatch`'s parent process: uvicorn's supervisor over the dispatcher's worker processes.

Apart from the workers' entry (`serving.dispatch.worker`) so that the parent, which only holds the listening
socket and watches the workers, does not import the request path (aiohttp, Starlette, gRPC, prometheus):
measured with an embedded model, 95 MB resident instead of 117 (49 MB of its own instead of 63).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from uvicorn.config import Config
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

log = logging.getLogger("uvicorn.error")

# How the supervisor hands the config to the worker processes it spawns.
CONFIG_ENV = "PROMPTIER_DISPATCH_CONFIG"
# prometheus_client's multi-process mode: each worker keeps its metrics in files here, and /metrics
# (answered by whichever worker gets the scrape) adds up every worker's.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_START_TIMEOUT_S = 30


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor, with a dead worker seen as dead at once, and a reload that does not wait for
    the workers it retires.

    uvicorn pings each worker over a pipe and waits up to the health-check timeout for the answer. The
    parent keeps its copy of the worker's end of that pipe open, so a worker killed while a ping is in
    flight (or frozen, then killed) never shows as end-of-file, and the loop would wait out the whole
    timeout (30 s) before replacing it. Closing the parent's copy once the worker holds its own turns a
    death into an immediate end-of-file, and the worker is replaced in the same pass.

    On SIGHUP uvicorn replaces the workers one at a time and waits for each retired one to exit before
    starting the next replacement; a retired worker finishes its requests first, and an LLM stream can
    last minutes, during which the workers serve two configs and the supervisor answers no signal and
    replaces no dead worker. Here a retired worker is told to stop and left to finish on its own: the
    next replacement starts at once, and the retired ones are reaped as they exit (and awaited at stop).
    """

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.retiring: list[Process] = []  # told to stop on a reload, finishing their requests

    def restart_all(self) -> None:
        """Replace each worker, bringing its replacement into service before the old one is told to stop
        (uvicorn's order), without waiting for the old one to finish its requests."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = Process(self.config, self.sockets)
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error(f"New child process [{new.pid}] was not ready in time; keeping worker "
                              f"[{old.pid}] and aborting the restart.")
                return
            old.terminate()
            self.retiring.append(old)
            self.processes[index] = new

    def join_all(self) -> None:
        """Wait for the workers, and for those a reload retired, to finish their requests and exit."""
        super().join_all()
        for process in self.retiring:
            process.join()

    def keep_subprocess_alive(self) -> None:
        """Reap retired workers that have exited; close the parent's copies of started workers' pipe ends;
        then uvicorn's check and restart."""
        self.retiring = [process for process in self.retiring if process.exitcode is None]
        for process in self.processes:
            # `child_conn` is uvicorn's (0.54); were it renamed, supervision goes on as uvicorn does it.
            connection = getattr(process, "child_conn", None)
            if connection is not None and process.pid is not None:  # started: the worker has its own copy
                connection.close()  # idempotent; uvicorn closes it again on terminate/kill
        super().keep_subprocess_alive()


def run(config_path: Path, host: str, port: int, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.

    Even one process runs under uvicorn's supervisor, which holds the listening socket and runs
    `workers` processes on it (each accepts its own connections, reads `config_path` and loads its own
    classifier): it restarts a worker that dies, and on SIGHUP replaces the workers one at a time, each
    replacement serving before the worker it replaces retires (retired workers finish their requests
    meanwhile), so a config change takes effect with no
    refused connection (one that fails to start leaves the old ones serving). Their metrics are added
    up on /metrics and they share the decision log. (Against a plain single process, in interleaved
    runs: no difference in added latency or throughput.)
    """
    from uvicorn.config import STARTUP_FAILURE

    from serving.dispatch.inbound import DispatchServerConfig

    # No access log (the decision log is the record) and no proxy-header rewriting: both cost per request.
    options: dict = {"host": host, "port": port, "access_log": False, "proxy_headers": False,
                     "server_header": False}
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    own_dir = METRICS_DIR_ENV not in os.environ
    metrics_dir = tempfile.mkdtemp(prefix="promptier-dispatch-metrics-") if own_dir else os.environ[METRICS_DIR_ENV]
    if not own_dir:  # files left by an earlier run would add their counts to ours
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink()
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        # Log level info: the supervisor says at that level when a worker died and was replaced.
        # The health-check timeout also bounds a replacement's start-up on SIGHUP (imports and loading an
        # embedded model: 2.4-3 s here, more on a busy host); at uvicorn's 5 s a reload could be refused.
        # Each worker takes its connection limits (config `inbound:`) from the app it loads.
        server_config = DispatchServerConfig("serving.dispatch.worker:app_from_environment", factory=True,
                                             workers=workers, log_level="info",
                                             timeout_worker_healthcheck=WORKER_START_TIMEOUT_S, **options)
        supervisor = WorkerSupervisor(server_config, sockets=[server_config.bind_socket()])
        supervisor.run()
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    # The supervisor stops everything when a worker fails before serving (bad artifact, tiers that
    # differ from the classifier's); that must not look like a clean exit.
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0
