"""`promptier soak`: everything at once, on loopback, for a few minutes, then a verdict.

Started together and run for the whole window:

- a real `promptier serve --workers 2` (its own process group), with metrics;
- a flood of ClassifyBatch calls at a multiple (default 2x) of the service's capacity, measured alone
  just before, while a well-behaved client makes single Classify calls with a short deadline at a
  modest rate;
- slow connections to the gRPC port and to the dispatcher's port (silent, or trickling a byte at a
  time), reopened whenever the server closes them;
- a real `promptier dispatch` (embedded classifier) in front of a fake upstream that answers with
  unreadable `usage`, 500s and streams cut midway, with a client checking every answer against what
  the upstream sent;
- rounds of two `promptier label` jobs started at the same moment on one output: one must run, the
  other must be refused (by the lock, or by the finished output if it came after the first had
  finished), and the output must hold every input row exactly once;
- chaos on a schedule: `kill -9` of the oldest serve worker, then SIGHUP to the serve supervisor and
  to the dispatcher, once per `chaos_every_s` each, each checked to have taken effect.

At the end: a table, a JSON report, and whether the bars held (well-behaved calls served, paid answers
delivered, labeled rows neither lost nor duplicated, no crash). The traffic lives in
`serving.bench.soak_clients`, the fake upstream in `serving.bench.soak_upstream`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from classifier.bench import write_report
from classifier.signals import exit_deferred, sigterm_as_exit
from serving.bench import soak_clients, soak_slow_clients
from serving.bench.ports import listen_ports, port_taken
from serving.bench.report_path import check_report_path
from serving.bench.soak_labeling import LABEL_JOB_TIMEOUT_S, LabelJobs, label_rounds, write_label_input
from serving.bench.soak_processes import (
    LOAD_NICENESS,
    SERVE_WORKERS,
    TRACEBACK,
    Children,
    answers_grpc,
    cli_command,
    http_ok,
    reloads_ok,
    serve_ready,
    spawned_children,
    start_process,
    stop_process,
    wait_started,
    wait_until,
)
from serving.bench.soak_report import pct, render_table, render_timeline, summarize
from serving.bench.soak_upstream import run_upstream

CAPACITY_SECONDS = 3.0
TRAFFIC_SETUP_S = 10.0  # for the traffic processes to start and connect before the window opens
START_TIMEOUT_S = 120.0  # for the service, the dispatcher and the upstream to come up
CONFIRM_TIMEOUT_S = 60.0  # for a kill or a reload to show its effect


@dataclass(frozen=True)


class SoakOptions:
    """What a soak run does. The defaults are `promptier soak`'s."""

    minutes: float = 5.0
    model: Path | None = None
    deadline_ms: float = 50.0  # of each well-behaved Classify call
    well_behaved_rate: float = 20.0  # well-behaved calls per second
    flood_batch: int = 256  # prompts per flooding ClassifyBatch call
    flood_factor: float = 2.0  # the flood's prompts/s as a multiple of the measured capacity
    slow_connections: int = 200  # per port (gRPC and dispatcher)
    dispatch_rate: float = 20.0  # chat completions per second through the dispatcher
    label_rows: int = 20_000
    label_every_s: float = 60.0
    chaos_every_s: float = 60.0

    def __post_init__(self) -> None:
        positive = (self.minutes, self.deadline_ms, self.well_behaved_rate, self.flood_batch, self.flood_factor,
                    self.dispatch_rate, self.label_rows, self.label_every_s, self.chaos_every_s)
        if not all(value > 0 for value in positive) or self.slow_connections < 0:
            raise ValueError(f"every soak option must be positive (slow_connections may be 0): {self}")
        if self.flood_batch > 256:
            raise ValueError("flood_batch is at most 256, the service's ClassifyBatch limit")


# ---------------------------------------------------------------- chaos


@dataclass


class ChaosRecord:
    """What the chaos schedule did, and how much of it was seen to take effect."""

    worker_kills: int = 0
    worker_kills_replaced: int = 0
    serve_reloads: int = 0
    serve_reloads_confirmed: int = 0
    dispatcher_reloads: int = 0
    dispatcher_reloads_confirmed: int = 0
    events: list[dict] = field(default_factory=list)

    def count(self) -> None:
        """Fill the counts from the events."""
        kills = [e for e in self.events if e["action"] == "kill" and "pid" in e]
        reloads = [e for e in self.events if e["action"] == "reload"]
        self.worker_kills = len(kills)
        self.worker_kills_replaced = sum(bool(e.get("replaced_after_s") is not None) for e in kills)
        self.serve_reloads = self.dispatcher_reloads = len(reloads)
        self.serve_reloads_confirmed = sum(e.get("serve_confirmed_after_s") is not None for e in reloads)
        self.dispatcher_reloads_confirmed = sum(e.get("dispatcher_confirmed_after_s") is not None for e in reloads)


def _confirm(event: dict, key: str, condition: Callable[[], bool]) -> None:
    """Set `event[key]` to the seconds `condition` took to hold (None: not within CONFIRM_TIMEOUT_S)."""
    started = time.monotonic()
    event[key] = round(time.monotonic() - started, 1) if wait_until(condition, CONFIRM_TIMEOUT_S) else None


def _chaos(serve: subprocess.Popen, dispatch: subprocess.Popen, metrics_ports: list[int], dispatch_url: str,
           begin: float, seconds: float, every: float, stop: threading.Event, record: ChaosRecord) -> None:
    """Per `every` seconds: at a third of it kill -9 the oldest serve worker, at two thirds SIGHUP the
    serve supervisor and the dispatcher. Each is followed until it shows, within CONFIRM_TIMEOUT_S: a
    replacement worker serving; the reload counted by every serve worker; the dispatcher's workers
    replaced (followed in a thread of its own, as its workers take longest to start)."""
    schedule = sorted([(k * every + every / 3, "kill") for k in range(int(seconds // every) + 1)]
                      + [(k * every + 2 * every / 3, "reload") for k in range(int(seconds // every) + 1)])
    followers: list[threading.Thread] = []
    for at, action in schedule:
        if at >= seconds or stop.wait(max(0.0, begin + at - time.monotonic())) or time.monotonic() - begin >= seconds:
            break
        if serve.poll() is not None or dispatch.poll() is not None:
            break  # a main process is gone: that is reported as a crash, not chaos to go on with
        event: dict = {"at_s": round(time.monotonic() - begin, 2), "action": action}
        record.events.append(event)
        if action == "kill":
            workers = spawned_children(serve.pid)
            if not workers:
                event["skipped"] = "no worker to kill"
                continue
            victim = workers[0].pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            event["pid"] = victim

            def replaced_and_serving(victim: int = victim) -> bool:
                return (victim not in {p.pid for p in spawned_children(serve.pid)}
                        and serve_ready(serve, metrics_ports))

            _confirm(event, "replaced_after_s", replaced_and_serving)
        else:
            before = {port: reloads_ok(port) for port in metrics_ports}
            dispatch_before = {p.pid for p in spawned_children(dispatch.pid)}
            os.kill(serve.pid, signal.SIGHUP)
            os.kill(dispatch.pid, signal.SIGHUP)

            def dispatch_reloaded(before: set = dispatch_before) -> bool:
                now = {p.pid for p in spawned_children(dispatch.pid)}
                return bool(now) and not now & before and http_ok(f"{dispatch_url}/health")

            def serve_reloaded(before: dict = before) -> bool:
                now = {port: reloads_ok(port) for port in metrics_ports}
                return all(now[port] is not None and (before[port] is None or now[port] > before[port])  # type: ignore[operator]
                           for port in metrics_ports)

            follower = threading.Thread(target=_confirm, args=(event, "dispatcher_confirmed_after_s",
                                                               dispatch_reloaded), daemon=True)
            follower.start()
            followers.append(follower)
            _confirm(event, "serve_confirmed_after_s", serve_reloaded)
    for follower in followers:
        follower.join(CONFIRM_TIMEOUT_S + 10)
    record.count()


# ---------------------------------------------------------------- the run


def _tiers(model: Path | None) -> list[str]:
    """The model's tiers, cheapest first (the dispatcher's config must name the same, in order)."""
    from classifier.artifact import load_manifest
    from classifier.runtime import DEFAULT_MODEL_DIR

    return load_manifest(model or DEFAULT_MODEL_DIR).tier_names


def _dispatcher_config(path: Path, upstream_port: int, tiers: list[str], model: Path | None, workdir: Path) -> None:
    """Every tier on the fake upstream, under a model name of its own (`<tier>-model`)."""
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    config = {
        "classifier": {"embedded": True, "timeout_ms": 20, **({"model": str(model)} if model else {})},
        "tiers": {tier: {"base_url": upstream, "model": f"{tier}-model", "first_byte_timeout_s": 30,
                         "read_timeout_s": 30} for tier in tiers},
        "fallback_tier": tiers[-1],
        "decision_log": {"path": str(workdir / "decisions.jsonl")},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _count_in(path: Path, needle: str) -> int:
    return _read(path).count(needle)


def _unexpected_worker_deaths(serve_err: Path) -> int:
    """Serve workers that died other than by this run's SIGKILL (exit code -9), per the supervisor's log."""
    deaths = 0
    with contextlib.suppress(FileNotFoundError), serve_err.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if '"worker_died"' in line:
                try:
                    deaths += json.loads(line).get("exitcode") != -signal.SIGKILL
                except ValueError:
                    deaths += 1
    return deaths


def _decision_notes(path: Path) -> dict[str, int]:
    """Decision-log lines by their `note` (why an answer was logged without usage or cost)."""
    notes: Counter[str] = Counter()
    for log_file in sorted(path.parent.glob(path.name + "*")):
        with log_file.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    note = json.loads(line).get("note")
                    if note:
                        notes[note] += 1
    return dict(notes)


def _busy_pct(before: Any, after: Any) -> float | None:
    """The share of the machine's CPU time (all cores, every process, this run's and others') that was
    busy between two `psutil.cpu_times()`."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return pct(total - idle, total)


def run_soak(options: SoakOptions, workdir: Path) -> dict:
    """Run the soak with its scratch files (configs, logs, label inputs and outputs) in `workdir`;
    returns the report (see `summarize`). Everything it starts is stopped before it returns."""
    seconds = options.minutes * 60
    grpc_port, dispatch_port, upstream_port, metrics_port = listen_ports(3 + SERVE_WORKERS)[:4]
    metrics_ports = [metrics_port + i for i in range(SERVE_WORKERS)]
    target, dispatch_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{dispatch_port}"
    model_args = ["--model", str(options.model)] if options.model else []
    config_path = workdir / "dispatcher.yaml"
    tiers = _tiers(options.model)
    _dispatcher_config(config_path, upstream_port, tiers, options.model, workdir)
    label_input = workdir / "label-input.jsonl"
    write_label_input(label_input, options.label_rows)

    children = Children()
    label_jobs = LabelJobs()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    report: dict = {"options": {key: str(value) if isinstance(value, Path) else value
                                for key, value in asdict(options).items()},
                    "cpus": os.cpu_count(), "load_average_before": list(os.getloadavg())}
    serve: subprocess.Popen | None = None
    dispatch: subprocess.Popen | None = None
    try:
        with exit_deferred():  # a SIGTERM while they start still stops them
            serve = start_process(cli_command("serve", "--port", str(grpc_port), "--workers", str(SERVE_WORKERS),
                                              "--metrics-port", str(metrics_port), *model_args), workdir, "serve")
        with exit_deferred():
            dispatch = start_process(cli_command("dispatch", "--config", str(config_path), "--port",
                                                 str(dispatch_port)), workdir, "dispatch")
        children.start_process("upstream", run_upstream, upstream_port, f"{tiers[-1]}-model")
        wait_started(serve, "serve", workdir, answers_grpc(target), START_TIMEOUT_S)  # its exit, and why, at once
        if not wait_until(lambda: serve_ready(serve, metrics_ports), START_TIMEOUT_S):
            raise RuntimeError(f"promptier serve did not start its {SERVE_WORKERS} workers; see {workdir}/serve.err")
        if not wait_until(lambda: http_ok(f"{dispatch_url}/health") or dispatch.poll() is not None,
                           START_TIMEOUT_S) or dispatch.poll() is not None:
            raise RuntimeError(f"promptier dispatch did not start; see {workdir}/dispatch.err")
        if not wait_until(lambda: port_taken(upstream_port), START_TIMEOUT_S):
            raise RuntimeError("the fake upstream did not start")

        children.start("capacity", soak_clients.measure_capacity, target=target, batch=options.flood_batch,
                       seconds=CAPACITY_SECONDS)
        capacity = children.collect(["capacity"], CAPACITY_SECONDS + 60)["capacity"]
        if "error" in capacity or not capacity["prompts_per_s"]:
            raise RuntimeError(f"could not measure the service's capacity: {capacity}")
        report["capacity"] = capacity
        flood_rate = options.flood_factor * capacity["prompts_per_s"] / options.flood_batch

        # Every traffic process sets up (imports, connections), then all start at `start_at`.
        start_at = time.time() + TRAFFIC_SETUP_S
        children.start("flood", soak_clients.flood, niceness=LOAD_NICENESS, target=target, batch=options.flood_batch,
                       calls_per_s=flood_rate, seconds=seconds, start_at=start_at)
        # The well-behaved client stands for a caller on another machine: in a scheduling group of its
        # own, so that what it measures is the service, not its share of a core beside the load generators.
        children.start("well_behaved", soak_clients.well_behaved, own_session=True, target=target,
                       calls_per_s=options.well_behaved_rate, deadline_s=options.deadline_ms / 1000,
                       seconds=seconds, start_at=start_at)
        children.start("dispatch", soak_clients.dispatch_traffic, niceness=LOAD_NICENESS, base_url=dispatch_url,
                       calls_per_s=options.dispatch_rate, seconds=seconds, start_at=start_at)
        if options.slow_connections:
            children.start("slow", soak_slow_clients.slow_connections, niceness=LOAD_NICENESS,
                           ports={"grpc": grpc_port, "http": dispatch_port}, per_port=options.slow_connections,
                           seconds=seconds, start_at=start_at)
        time.sleep(max(0.0, start_at - time.time()))
        begin, cpu_before = time.monotonic(), psutil.cpu_times()
        chaos = ChaosRecord()
        rounds: list[dict] = []
        threads = [
            threading.Thread(target=_chaos, name="soak-chaos", daemon=True,
                             args=(serve, dispatch, metrics_ports, dispatch_url, begin, seconds,
                                   options.chaos_every_s, stop, chaos)),
            threading.Thread(target=label_rounds, name="soak-label", daemon=True,
                             args=(label_input, options.label_rows, workdir, options.model, begin, seconds,
                                   options.label_every_s, stop, rounds, label_jobs)),
        ]
        for thread in threads:
            thread.start()
        names = ["flood", "well_behaved", "dispatch", *(["slow"] if options.slow_connections else [])]
        traffic = children.collect(names, seconds + 120)  # each ends by itself, `seconds` after start_at
        report["window_seconds"] = time.monotonic() - begin
        report["machine_cpu_busy_pct"] = _busy_pct(cpu_before, psutil.cpu_times())
        stop.set()  # no new chaos or label round; the ones under way finish (each bounded)
        for thread in threads:
            thread.join(LABEL_JOB_TIMEOUT_S * 2 + CONFIRM_TIMEOUT_S)

        # Crashes first: a main process that is gone before it is asked to stop.
        report["serve_exited_early"] = serve.poll()
        report["dispatch_exited_early"] = dispatch.poll()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}/soak/paid", timeout=10) as response:
                upstream = json.loads(response.read())
        except OSError as error:
            upstream = {"error": str(error), "paid": [], "answers": {}}
        report.update(traffic=traffic, upstream=upstream, chaos=asdict(chaos), label_rounds=rounds)
    finally:
        stop.set()
        # A SIGTERM or Ctrl-C while this runs (stopping the dispatcher may take STOP_TIMEOUT_S) waits for
        # its end: acted on midway, it would leave the service, in a session of its own, running for good.
        with exit_deferred():
            # The label jobs and the traffic first: on a soak ended early they still run, and the slow
            # connections would hold the dispatcher's shutdown open until it is killed.
            label_jobs.stop_all()
            children.stop_all()
            report["dispatch_stop_exit_code"] = stop_process(dispatch) if dispatch is not None else None
            report["serve_stop_exit_code"] = stop_process(serve) if serve is not None else None
    report["load_average_after"] = list(os.getloadavg())
    report["logs"] = {
        "serve_tracebacks": _count_in(workdir / "serve.err", TRACEBACK),
        "dispatch_tracebacks": _count_in(workdir / "dispatch.err", TRACEBACK),
        "serve_unexpected_worker_deaths": _unexpected_worker_deaths(workdir / "serve.err"),
        "dispatch_worker_deaths": len(re.findall(r"Child process \[\d+\] died",
                                                 _read(workdir / "dispatch.err"))),
        "dispatch_reloads_aborted": _count_in(workdir / "dispatch.err", "aborting the restart"),
        "decision_log_notes": _decision_notes(workdir / "decisions.jsonl"),
    }
    return summarize(report)


def main(options: SoakOptions, out: Path) -> dict:
    """Run the soak, print the table, write the JSON report to `out`; returns the report. The scratch
    directory is removed when the bars held, and kept (its path printed) for a look when not."""
    check_report_path(out)
    workdir = Path(tempfile.mkdtemp(prefix="promptier-soak-"))
    print(f"soak: {options.minutes:g} min on loopback; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{value:.2f}' for value in os.getloadavg())}; scratch {workdir}", flush=True)
    with sigterm_as_exit():  # SIGTERM stops the services it started too, as Ctrl-C does
        report = run_soak(options, workdir)
    write_report(out, report)
    print(render_table(report))
    print(render_timeline(report))
    if report["traffic_errors"]:
        print(f"\ntraffic processes that failed: {report['traffic_errors']}")
    busy = report["machine_cpu_busy_pct"]
    print(f"\nmachine CPU busy over the window: {'-' if busy is None else f'{busy:.0f}%'} of {report['cpus']} cores "
          f"(every process, this run's and others'); load average before "
          f"{' '.join(f'{v:.2f}' for v in report['load_average_before'])}, after "
          f"{' '.join(f'{v:.2f}' for v in report['load_average_after'])}; "
          f"{'all bars held' if report['passed'] else 'a bar did not hold'}; wrote {out}")
    if report["passed"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs and outputs kept in {workdir}")
    return report
