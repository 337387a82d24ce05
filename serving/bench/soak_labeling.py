"""The soak's label rounds: two `promptier label` jobs started at once on one output, and the check that
exactly one ran and its output holds every input row once."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

import psutil

from serving.bench import soak_clients
from serving.bench.soak_processes import LABEL_NICENESS, TRACEBACK, cli_command, python_env

LABEL_JOB_TIMEOUT_S = 300.0
LABEL_FIRST_AT_S = 5.0  # the first label round starts this long into the window
LOCK_REFUSAL = "is being written by another labeling job"
# The refusal a job gets when the other one has already finished the output (it started later).
EXISTS_REFUSAL = "exists; remove it or choose another output"


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


class LabelJobs:
    """The `promptier label` processes of the rounds under way. They are the soak's children but not in a
    session of their own, and the rounds run in a daemon thread: a soak ended early (SIGTERM, a failed
    start) would leave them labeling after it exited unless `stop_all` ends them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[subprocess.Popen] = []
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether `stop_all` was called: no job starts any more."""
        return self._stopped

    def start(self, command: list[str], workdir: Path, err: IO[bytes]) -> subprocess.Popen | None:
        """Start one job at the label niceness, or none (None) once `stop_all` was called."""
        with self._lock:  # held while starting, so that stop_all cannot miss a job being started
            if self._stopped:
                return None
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=python_env(), cwd=workdir)
            self._running = [job for job in self._running if job.poll() is None] + [process]
        with contextlib.suppress(psutil.Error):  # a job refused at once may be gone already
            psutil.Process(process.pid).nice(LABEL_NICENESS)
        return process

    def stop_all(self, timeout: float = 10.0) -> None:
        """Refuse new jobs and end the running ones: SIGTERM, then SIGKILL after `timeout` s."""
        with self._lock:
            self._stopped = True
            running, self._running = self._running, []
        for process in running:
            if process.poll() is None:
                process.terminate()
        for process in running:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)


def label_round(index: int, input_path: Path, rows: int, workdir: Path, model: Path | None,
                jobs: LabelJobs) -> dict:
    """Two `promptier label` jobs on one output, started at the same moment: how each ended, and
    what the output holds."""
    output = workdir / f"labels-{index}.jsonl"
    command = cli_command("label", str(input_path), "--output", str(output), "--workers", "1",
                   *(["--model", str(model)] if model else []))
    jobs_started = []
    for job in range(2):
        err = (workdir / f"label-{index}-{job}.err").open("wb")
        process = jobs.start(command, workdir, err)
        if process is None:  # the soak is stopping
            err.close()
            break
        jobs_started.append((process, time.monotonic(), err))
    ended = []
    for process, started, err in jobs_started:
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
    # Refused means turned away by the lock or the finished output, with its message: a job that failed
    # any other way (a traceback) did not refuse, and the round does not hold.
    refused = [job for job in ended if job["exit_code"] not in (0, None) and job["refusal"] is not None]
    result = {"round": index, "jobs": ended, "exactly_one_ran": len(ran) == 1 and len(refused) == 1,
              "refused_by": refused[0]["refusal"] if len(refused) == 1 else None,
              "output": check_label_output(output, rows),
              "left_behind": sorted(p.name for p in (output.with_name(output.name + ".lock"),
                                                     output.with_name(output.name + ".parts")) if p.exists())}
    output.unlink(missing_ok=True)
    output.with_name(output.name + ".job.json").unlink(missing_ok=True)
    return result


def label_rounds(input_path: Path, rows: int, workdir: Path, model: Path | None, begin: float, seconds: float,
                 every: float, stop: threading.Event, rounds: list[dict], jobs: LabelJobs) -> None:
    """A label round at LABEL_FIRST_AT_S into the window and every `every` seconds after, while the
    window lasts (a round started inside it may end after it), its jobs started through `jobs`."""
    index = 0
    while True:
        at = LABEL_FIRST_AT_S + index * every
        if at >= seconds or stop.wait(max(0.0, begin + at - time.monotonic())) or jobs.stopped:
            return
        started = round(time.monotonic() - begin, 1)
        rounds.append({"at_s": started, **label_round(index, input_path, rows, workdir, model, jobs)})
        index += 1
