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
import multiprocessing
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psutil
import yaml

from serving.bench import soak_clients
from serving.bench.ports import port_taken, wait_serving
from serving.bench.soak_upstream import run_upstream

# The bars a run must hold for exit code 0.
WELL_BEHAVED_BAR_PCT = 99.0
PAID_DELIVERED_BAR_PCT = 100.0
SERVE_WORKERS = 2
CAPACITY_SECONDS = 3.0
TRAFFIC_SETUP_S = 10.0  # for the traffic processes to start and connect before the window opens
START_TIMEOUT_S = 120.0  # for the service, the dispatcher and the upstream to come up
STOP_TIMEOUT_S = 30.0  # for a SIGTERM to end a process before it is killed
CONFIRM_TIMEOUT_S = 60.0  # for a kill or a reload to show its effect
LABEL_JOB_TIMEOUT_S = 300.0
LABEL_FIRST_AT_S = 5.0  # the first label round starts this long into the window
# Label jobs run as batch work beside a latency-bound service should (serving/README.md): at a lower CPU
# priority, so that on a small machine they take the cores the service leaves idle, not its deadlines.
LABEL_NICENESS = 10
# The flooder, the slow connections and the dispatcher's callers stand for other machines: on loopback
# they run at a lower priority, so that the services, not the load generators, get the cores they share.
# The well-behaved client keeps the services' priority: its own waits count against it.
LOAD_NICENESS = 10
LOCK_REFUSAL = "is being written by another labeling job"
# The refusal a job gets when the other one has already finished the output (it started later).
EXISTS_REFUSAL = "exists; remove it or choose another output"
TRACEBACK = "Traceback (most recent call last)"
TIMELINE_BIN_S = 10  # the printed timeline of failures counts them per this many seconds


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


# ---------------------------------------------------------------- processes
def _python_env() -> dict[str, str]:
    """The environment for `python -m classifier.cli` children: this checkout's packages first, so they
    run the same code as this process whatever is installed."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PROMPTIER_ADMIN_TOKEN", None)  # SIGHUP is how this run reloads; Admin stays local-only
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "classifier.cli", *args]


def _start(command: list[str], workdir: Path, name: str) -> subprocess.Popen:
    """Start a main process in a session (process group) of its own, its output in files of `workdir`."""
    with (workdir / f"{name}.out").open("wb") as out, (workdir / f"{name}.err").open("wb") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=_python_env(), start_new_session=True,
                                cwd=workdir)


def _stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
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
        process.wait(10)
    return code


def _spawned_children(pid: int) -> list:
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
                niceness: int) -> None:
    try:
        os.nice(niceness)
        results.put((name, function(**kwargs)))
    except Exception:
        results.put((name, {"error": traceback.format_exc()}))


class _Children:
    """Traffic functions of `serving.bench.soak_clients`, each in a spawned process, and their results."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._results: multiprocessing.Queue = self._context.Queue()
        self._processes: dict[str, BaseProcess] = {}

    def start(self, name: str, function: Callable[..., dict], niceness: int = 0, **kwargs: object) -> None:
        """Run `function(**kwargs)` in a process of its own, `niceness` added to its CPU priority."""
        process = self._context.Process(target=_child_main, args=(name, function, kwargs, self._results, niceness),
                                        name=f"soak-{name}", daemon=True)
        process.start()
        self._processes[name] = process

    def start_process(self, name: str, target: Callable[..., None], *args: object) -> BaseProcess:
        """A long-running process of ours (the fake upstream), stopped by `stop_all`."""
        process = self._context.Process(target=target, args=args, name=f"soak-{name}", daemon=True)
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def listen_ports(count: int) -> list[int]:
    """`count` consecutive free ports on 127.0.0.1, outside the kernel's range for outgoing connections.

    A port picked by binding port 0 comes from that range, and this run opens and closes thousands of
    connections: one of them may take the metrics port of a serve worker killed a moment before, and
    its replacement, failing to bind it, would count as a failed start.

    Raises:
        RuntimeError: no such run of free ports was found in a bounded number of tries.
    """
    import random
    import socket

    low, high = _ephemeral_range()
    first, last = (1024, low - 1) if low - 1024 > high - 65535 else (high + 1, 65535)
    for _ in range(200):
        start = random.randint(first, last - count + 1)
        try:
            with contextlib.ExitStack() as held:
                for port in range(start, start + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return list(range(start, start + count))
        except OSError:
            continue
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1 between {first} and {last}")


# ---------------------------------------------------------------- readiness and metrics
def _metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _reloads_ok(port: int) -> float | None:
    """`promptier_model_reloads_total{outcome="ok"}` of the serve worker with metrics on `port`."""
    text = _metrics(port)
    if text is None:
        return None
    match = re.search(r'^promptier_model_reloads_total\{outcome="ok"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_until(condition: Callable[[], bool], timeout: float, stop: threading.Event | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if stop is not None and stop.is_set():
            return False
        time.sleep(0.25)
    return condition()


def _serve_ready(serve: subprocess.Popen, metrics_ports: list[int]) -> bool:
    return (len(_spawned_children(serve.pid)) == SERVE_WORKERS
            and all(_metrics(port) is not None for port in metrics_ports))


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
    event[key] = round(time.monotonic() - started, 1) if _wait_until(condition, CONFIRM_TIMEOUT_S) else None


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
            workers = _spawned_children(serve.pid)
            if not workers:
                event["skipped"] = "no worker to kill"
                continue
            victim = workers[0].pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            event["pid"] = victim

            def replaced_and_serving(victim: int = victim) -> bool:
                return (victim not in {p.pid for p in _spawned_children(serve.pid)}
                        and _serve_ready(serve, metrics_ports))

            _confirm(event, "replaced_after_s", replaced_and_serving)
        else:
            before = {port: _reloads_ok(port) for port in metrics_ports}
            dispatch_before = {p.pid for p in _spawned_children(dispatch.pid)}
            os.kill(serve.pid, signal.SIGHUP)
            os.kill(dispatch.pid, signal.SIGHUP)

            def dispatch_reloaded(before: set = dispatch_before) -> bool:
                now = {p.pid for p in _spawned_children(dispatch.pid)}
                return bool(now) and not now & before and _http_ok(f"{dispatch_url}/health")

            def serve_reloaded(before: dict = before) -> bool:
                now = {port: _reloads_ok(port) for port in metrics_ports}
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


# ---------------------------------------------------------------- labeling
def write_label_input(path: Path, rows: int) -> None:
    """A JSONL input of `rows` prompts with ids `row-000000`, ...; each prompt is different."""
    texts = soak_clients.prompts(min(rows, 4096), 30, seed=5)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            handle.write(json.dumps({"prompt_id": f"row-{index:06d}",
                                     "prompt": f"{texts[index % len(texts)]} ({index})"}) + "\n")


def check_label_output(path: Path, rows: int) -> dict:
    """Whether `path` holds each of the `rows` input ids exactly once: lost, duplicated and foreign ids,
    rows with an error, and whether they are in input order."""
    seen: Counter[str] = Counter()
    order: list[str] = []
    errors = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                seen[row["prompt_id"]] += 1
                order.append(row["prompt_id"])
                errors += row.get("error") is not None
    except FileNotFoundError:
        return {"exists": False, "lost": rows, "duplicated": 0, "foreign": 0, "error_rows": 0, "in_order": False}
    expected = {f"row-{index:06d}" for index in range(rows)}
    return {"exists": True, "rows": len(order), "lost": len(expected - set(seen)),
            "duplicated": sum(count - 1 for count in seen.values() if count > 1),
            "foreign": sum(count for row_id, count in seen.items() if row_id not in expected),
            "error_rows": errors, "in_order": order == sorted(expected)}


def label_round(index: int, input_path: Path, rows: int, workdir: Path, model: Path | None) -> dict:
    """Two `promptier label` jobs on one output, started at the same moment: how each ended, and
    what the output holds."""
    output = workdir / f"labels-{index}.jsonl"
    command = _cli("label", str(input_path), "--output", str(output), "--workers", "1",
                   *(["--model", str(model)] if model else []))
    jobs = []
    for job in range(2):
        err = (workdir / f"label-{index}-{job}.err").open("wb")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=_python_env(), cwd=workdir)
        with contextlib.suppress(psutil.Error):  # a job refused at once may be gone already
            psutil.Process(process.pid).nice(LABEL_NICENESS)
        jobs.append((process, time.monotonic(), err))
    ended = []
    for process, started, err in jobs:
        try:
            code: int | None = process.wait(max(1.0, started + LABEL_JOB_TIMEOUT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            code = None  # timed out
        err.close()
        stderr = Path(err.name).read_text(encoding="utf-8", errors="replace")
        refusal = "lock" if LOCK_REFUSAL in stderr else "finished output" if EXISTS_REFUSAL in stderr else None
        ended.append({"exit_code": code, "seconds": round(time.monotonic() - started, 1), "refusal": refusal,
                      "traceback": TRACEBACK in stderr})
    ran = [job for job in ended if job["exit_code"] == 0]
    refused = [job for job in ended if job["exit_code"] not in (0, None)]
    result = {"round": index, "jobs": ended, "exactly_one_ran": len(ran) == 1 and len(refused) == 1,
              "refused_by": refused[0]["refusal"] if len(refused) == 1 else None,
              "output": check_label_output(output, rows),
              "left_behind": sorted(p.name for p in (output.with_name(output.name + ".lock"),
                                                     output.with_name(output.name + ".parts")) if p.exists())}
    output.unlink(missing_ok=True)
    output.with_name(output.name + ".job.json").unlink(missing_ok=True)
    return result


def _label_rounds(input_path: Path, rows: int, workdir: Path, model: Path | None, begin: float, seconds: float,
                  every: float, stop: threading.Event, rounds: list[dict]) -> None:
    """A label round at LABEL_FIRST_AT_S into the window and every `every` seconds after, while the
    window lasts (a round started inside it may end after it)."""
    index = 0
    while True:
        at = LABEL_FIRST_AT_S + index * every
        if at >= seconds or stop.wait(max(0.0, begin + at - time.monotonic())):
            return
        started = round(time.monotonic() - begin, 1)
        rounds.append({"at_s": started, **label_round(index, input_path, rows, workdir, model)})
        index += 1


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
    return _pct(total - idle, total)


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


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

    children = _Children()
    serve = _start(_cli("serve", "--port", str(grpc_port), "--workers", str(SERVE_WORKERS),
                        "--metrics-port", str(metrics_port), *model_args), workdir, "serve")
    dispatch = _start(_cli("dispatch", "--config", str(config_path), "--port", str(dispatch_port)), workdir,
                      "dispatch")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    report: dict = {"options": {key: str(value) if isinstance(value, Path) else value
                                for key, value in asdict(options).items()},
                    "cpus": os.cpu_count(), "load_average_before": list(os.getloadavg())}
    try:
        children.start_process("upstream", run_upstream, upstream_port, f"{tiers[-1]}-model")
        wait_serving(target, START_TIMEOUT_S)
        if not _wait_until(lambda: _serve_ready(serve, metrics_ports), START_TIMEOUT_S):
            raise RuntimeError(f"promptier serve did not start its {SERVE_WORKERS} workers; see {workdir}/serve.err")
        if not _wait_until(lambda: _http_ok(f"{dispatch_url}/health") or dispatch.poll() is not None,
                           START_TIMEOUT_S) or dispatch.poll() is not None:
            raise RuntimeError(f"promptier dispatch did not start; see {workdir}/dispatch.err")
        if not _wait_until(lambda: port_taken(upstream_port), START_TIMEOUT_S):
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
        children.start("well_behaved", soak_clients.well_behaved, target=target,
                       calls_per_s=options.well_behaved_rate, deadline_s=options.deadline_ms / 1000,
                       seconds=seconds, start_at=start_at)
        children.start("dispatch", soak_clients.dispatch_traffic, niceness=LOAD_NICENESS, base_url=dispatch_url,
                       calls_per_s=options.dispatch_rate, seconds=seconds, start_at=start_at)
        if options.slow_connections:
            children.start("slow", soak_clients.slow_connections, niceness=LOAD_NICENESS,
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
            threading.Thread(target=_label_rounds, name="soak-label", daemon=True,
                             args=(label_input, options.label_rows, workdir, options.model, begin, seconds,
                                   options.label_every_s, stop, rounds)),
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
        report["dispatch_stop_exit_code"] = _stop(dispatch)
        report["serve_stop_exit_code"] = _stop(serve)
        children.stop_all()
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


def summarize(raw: dict) -> dict:
    """The report: the raw counts of `run_soak` under `details`, the headline figures, the bars and
    whether they held (`passed`)."""
    traffic = raw["traffic"]
    well = traffic["well_behaved"]
    well_ok = well.get("outcomes", {}).get("OK", 0)
    well_calls = sum(well.get("outcomes", {}).values())
    flood = traffic["flood"]
    flood_outcomes = flood.get("outcomes", {})
    flood_calls = sum(flood_outcomes.values())
    refused = flood_outcomes.get("RESOURCE_EXHAUSTED", 0)
    dispatch = traffic["dispatch"]
    intact = set(dispatch.get("intact_ids", []))
    paid_list = raw["upstream"].get("paid", [])
    paid = set(paid_list)
    delivered = len(paid & intact)
    dispatch_outcomes = dispatch.get("outcomes", {})
    rounds = raw["label_rounds"]
    logs = raw["logs"]
    crashes = {
        "serve_exited_early": int(raw["serve_exited_early"] is not None),
        "dispatcher_exited_early": int(raw["dispatch_exited_early"] is not None),
        "serve_stopped_uncleanly": int(raw["serve_exited_early"] is None and raw["serve_stop_exit_code"] != 0),
        "dispatcher_stopped_uncleanly": int(raw["dispatch_exited_early"] is None
                                            and raw["dispatch_stop_exit_code"] != 0),
        "serve_tracebacks": logs["serve_tracebacks"],
        "dispatcher_tracebacks": logs["dispatch_tracebacks"],
        "serve_workers_died_unexpectedly": logs["serve_unexpected_worker_deaths"],
        "dispatcher_workers_died": logs["dispatch_worker_deaths"],
    }
    chaos = raw["chaos"]
    figures = {
        "well_behaved": {"calls": well_calls, "served": well_ok, "served_pct": _pct(well_ok, well_calls),
                         "deadline_ms": well.get("deadline_ms"), "p50_ms": well.get("p50_ms"),
                         "p99_ms": well.get("p99_ms"), "by_status": well.get("outcomes", {}),
                         "answered_but_seen_late": well.get("answered_but_seen_late"),
                         "server_held": well.get("server_held"), "client_loop_lag": well.get("client_loop_lag"),
                         "client_loop_lags_over_deadline": well.get("client_loop_lags_over_deadline"),
                         "failures_by_second": well.get("failures_by_second")},
        "flood": {"calls": flood_calls, "refused_resource_exhausted": refused,
                  "refused_pct": _pct(refused, flood_calls), "by_status": flood_outcomes,
                  "calls_per_s": flood.get("calls_per_s"), "prompts_per_call": flood.get("batch"),
                  "not_sent": flood.get("not_sent"), "load_generators_niceness": LOAD_NICENESS,
                  "capacity_prompts_per_s": raw["capacity"]["prompts_per_s"]},
        "dispatcher": {"requests": sum(dispatch_outcomes.values()), "by_outcome": dispatch_outcomes,
                       "paid_answers": len(paid), "paid_delivered_intact": delivered,
                       "paid_delivered_pct": _pct(delivered, len(paid)),
                       "paid_twice": len(paid_list) - len(paid), "intact_but_never_paid": len(intact - paid),
                       "upstream_answers": raw["upstream"].get("answers", {}),
                       "routing_reasons": dispatch.get("routing_reasons", {}),
                       "failures": dispatch.get("failures", [])},
        "labeling": {"rounds": len(rounds), "rows_per_round": raw["options"]["label_rows"], "niceness": LABEL_NICENESS,
                     "rows_lost": sum(r["output"]["lost"] for r in rounds),
                     "rows_duplicated": sum(r["output"]["duplicated"] + r["output"]["foreign"] for r in rounds),
                     "rounds_exactly_one_ran": sum(r["exactly_one_ran"] for r in rounds),
                     # Which job wins is the scheduler's choice; the other is refused by the lock or, if
                     # it reached the output after the first had finished, by the finished output.
                     "second_job_refused_by_lock": sum(r["refused_by"] == "lock" for r in rounds),
                     "second_job_refused_by_finished_output": sum(r["refused_by"] == "finished output"
                                                                  for r in rounds),
                     "files_left_behind": sum(len(r["left_behind"]) for r in rounds)},
        "chaos": {key: value for key, value in chaos.items() if key != "events"},
        "crashes": {"total": sum(crashes.values()), **crashes},
    }
    errors = {name: result["error"] for name, result in traffic.items() if "error" in result}
    labeling = figures["labeling"]
    bars = {
        f"well-behaved calls served >= {WELL_BEHAVED_BAR_PCT:g}%":
            (figures["well_behaved"]["served_pct"] or 0.0) >= WELL_BEHAVED_BAR_PCT,
        "paid upstream answers delivered intact: 100%":
            bool(paid) and (figures["dispatcher"]["paid_delivered_pct"] or 0.0) >= PAID_DELIVERED_BAR_PCT,
        "labeled rows lost or duplicated: 0":
            labeling["rounds"] > 0 and labeling["rows_lost"] == 0 and labeling["rows_duplicated"] == 0,
        "label rounds with exactly one job running: all":
            labeling["rounds"] > 0 and labeling["rounds_exactly_one_ran"] == labeling["rounds"],
        "crashes: 0": figures["crashes"]["total"] == 0,
        "every traffic process reported": not errors,
    }
    return {"passed": all(bars.values()), "bars": bars, **figures, "traffic_errors": errors,
            "load_average_before": raw["load_average_before"], "load_average_after": raw["load_average_after"],
            "cpus": raw["cpus"], "machine_cpu_busy_pct": raw.get("machine_cpu_busy_pct"),
            "window_seconds": raw.get("window_seconds"), "options": raw["options"],
            "details": {"chaos_events": chaos["events"], "label_rounds": rounds,
                        "slow_connections": traffic.get("slow"), "capacity": raw["capacity"], "logs": logs,
                        "flood_schedule": {k: flood.get(k) for k in ("sent", "not_sent", "seconds")},
                        "well_behaved_schedule": {k: well.get(k) for k in ("sent", "not_sent", "seconds")},
                        "dispatch_schedule": {k: dispatch.get(k) for k in ("sent", "not_sent", "seconds")}}}


def _count_pct(part: int, whole: int, pct: float | None) -> str:
    return f"{part:,} of {whole:,} ({pct:.2f}%)" if pct is not None else f"{part:,} of {whole:,}"


def render_table(report: dict) -> str:
    """The short table `promptier soak` prints."""
    well, flood, dispatch = report["well_behaved"], report["flood"], report["dispatcher"]
    labeling, chaos, crashes = report["labeling"], report["chaos"], report["crashes"]
    outcomes = dispatch["by_outcome"]
    bars = list(report["bars"].values())
    ok = ["yes" if held else "**no**" for held in bars]
    rows = [
        ("well-behaved Classify calls served within their deadline "
         f"({well['deadline_ms']:g} ms; as the client saw them: p50 {_ms(well['p50_ms'])}, p99 "
         f"{_ms(well['p99_ms'])}; the server held them p99 {_ms((well['server_held'] or {}).get('p99_ms'))})",
         _count_pct(well["served"], well["calls"], well["served_pct"]), f">= {WELL_BEHAVED_BAR_PCT:g}%", ok[0]),
        (f"flooder ClassifyBatch calls ({flood['prompts_per_call']} prompts, {flood['calls_per_s']:.1f}/s = "
         f"{flood['calls_per_s'] * flood['prompts_per_call'] / flood['capacity_prompts_per_s']:.1f}x the "
         f"{flood['capacity_prompts_per_s']:,.0f} prompts/s measured; load generators at nice "
         f"{flood['load_generators_niceness']}) refused RESOURCE_EXHAUSTED",
         _count_pct(flood["refused_resource_exhausted"], flood["calls"], flood["refused_pct"]), "expected", "-"),
        ("paid upstream answers (200s) delivered intact through the dispatcher",
         _count_pct(dispatch["paid_delivered_intact"], dispatch["paid_answers"], dispatch["paid_delivered_pct"]),
         "100%", ok[1]),
        ("dispatcher requests: intact / cut streams ended with stream_interrupted / upstream 500s returned "
         "as 5xx / other 5xx / connection closed with no answer / mangled",
         " / ".join(f"{outcomes.get(kind, 0):,}" for kind in ("intact", "interrupted", "returned_5xx", "failed_5xx",
                                                             "transport_error", "mangled")) +
         f" of {dispatch['requests']:,}", "-", "-"),
        (f"labeled rows lost / duplicated ({labeling['rounds']} rounds x {labeling['rows_per_round']:,} rows, "
         f"jobs at nice {labeling['niceness']})",
         f"{labeling['rows_lost']} / {labeling['rows_duplicated']}", "0 / 0", ok[2]),
        ("label rounds: exactly one job ran / the other refused by the lock, by the finished output",
         f"{labeling['rounds_exactly_one_ran']} / {labeling['second_job_refused_by_lock']}, "
         f"{labeling['second_job_refused_by_finished_output']} of {labeling['rounds']}",
         "all", ok[3]),
        ("serve worker kills (replaced) / reloads: serve (confirmed), dispatcher (confirmed)",
         f"{chaos['worker_kills']} ({chaos['worker_kills_replaced']}) / {chaos['serve_reloads']} "
         f"({chaos['serve_reloads_confirmed']}), {chaos['dispatcher_reloads']} "
         f"({chaos['dispatcher_reloads_confirmed']})",
         "-", "-"),
        ("crashes (main processes exited, tracebacks, workers dead unasked)", str(crashes["total"]), "0", ok[4]),
    ]
    lines = ["| what | result | bar | held |", "|---|---|---|---|"]
    lines += [f"| {what} | {result} | {bar} | {held} |" for what, result, bar, held in rows]
    return "\n".join(lines)


def render_timeline(report: dict) -> str:
    """When the well-behaved calls failed, beside what happened then, and how long the client's own
    event loop waited for a core: what tells a starved service from a machine short of CPU."""
    well, details = report["well_behaved"], report["details"]
    events = [f"{e['action']} {e['at_s']:g}s" for e in details["chaos_events"]]
    events += [f"label {r['at_s']:g}s" for r in details["label_rounds"]]
    bins: Counter[int] = Counter()
    for second, count in (well["failures_by_second"] or {}).items():
        bins[int(second) // TIMELINE_BIN_S * TIMELINE_BIN_S] += count
    failures = ", ".join(f"{start}-{start + TIMELINE_BIN_S}s: {count}" for start, count in sorted(bins.items()))
    lag = well["client_loop_lag"] or {}
    return (f"\nwell-behaved calls failed, by {TIMELINE_BIN_S} s of the window: {failures or 'none'}\n"
            f"events: {', '.join(events) or 'none'}\n"
            f"the client's event loop woke late from 10 ms sleeps by p50 {_ms(lag.get('p50_ms'))}, p99 "
            f"{_ms(lag.get('p99_ms'))}, max {_ms(lag.get('max_ms'))} ({well['client_loop_lags_over_deadline']} "
            f"times by more than the deadline); {well['answered_but_seen_late']} calls answered in time were "
            "seen late by the client")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def main(options: SoakOptions, out: Path) -> dict:
    """Run the soak, print the table, write the JSON report to `out`; returns the report. The scratch
    directory is removed when the bars held, and kept (its path printed) for a look when not."""
    workdir = Path(tempfile.mkdtemp(prefix="promptier-soak-"))
    print(f"soak: {options.minutes:g} min on loopback; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{value:.2f}' for value in os.getloadavg())}; scratch {workdir}", flush=True)
    report = run_soak(options, workdir)
    out.write_text(json.dumps(report, indent=2) + "\n")
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
