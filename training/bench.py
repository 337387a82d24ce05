"""`promptier train-bench`: training throughput and peak memory on synthetic logs, per device mode.

Each run is a real `promptier train` in a child process (so that its memory is its own), on
synthetic Parquet shards of long prompts (`training.synthetic.write_parquet_shards`, cached per
size), with the shipped recipe's student and no teacher (streaming cannot feed one). Training stops
after `max_steps` steps; everything else runs in full: reading, dedup, split, tokenizing,
calibration, familiarity, export with its parity check, evaluation.

Figures per run: training prompts per second (the training loop alone, as the run measures it),
wall time of the whole command, the main process's resident-memory high-water mark (exact, from the
kernel) and the sampled peak of the sum over the whole process tree (the launcher and every
process of a distributed run).

Each run's child starts a session of its own; a run that outlasts `--timeout`, or a bench stopped by
SIGTERM or Ctrl-C, kills it with every process under it (torchrun starts each worker in a session of
its own too), so that no worker keeps training and writes a model after its run was reported failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from classifier.artifact_layout import MANIFEST_FILE
from classifier.bench import write_report
from classifier.errors import PromptierError
from classifier.signals import exit_deferred, sigterm_as_exit
from training.config import SHIPPED_RECIPE, recipe_path

if TYPE_CHECKING:
    import psutil

DEVICES = ("available", "cpu", "cuda")
READINGS = ("streamed", "memory")
KILL_WAIT_S = 30.0  # for the processes of a killed run to be gone


@dataclass(frozen=True)
class Mode:
    device: str
    processes: int
    reading: str  # "streamed" or "memory"

    @property
    def name(self) -> str:
        return f"{self.device} x{self.processes} {self.reading}"


def bench_config(backbone: str, streaming: bool, max_steps: int, device: str, recipe: Path = SHIPPED_RECIPE) -> dict:
    """A recipe (the shipped one by default) without its teacher (which needs every prompt's text),
    capped at `max_steps`, with the fused optimizer that large runs should use."""
    config = yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{recipe} is not a training config (a YAML mapping)")
    config.pop("teacher", None)
    config.update(backbone=backbone, streaming=streaming, max_steps=max_steps, device=device, epochs=1,
                  fused_optimizer=True)
    return config


class TreeMemory:
    """Samples the resident memory of a process and all its descendants, summed, every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.peak = 0
        self._pid, self._interval = pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self._pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for process in [root, *root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _logs(root: Path, rows: int, prompt_chars: int) -> Path:
    """Synthetic shards for this size, written once and reused."""
    from training.synthetic import write_parquet_shards

    directory = root / f"logs-{rows}-{prompt_chars}"
    done = directory / "COMPLETE"
    if not done.exists():
        started = time.perf_counter()
        write_parquet_shards(directory, rows, prompt_chars)
        done.write_text(f"{time.perf_counter() - started:.1f} s\n")
    return directory


def _alive(process: psutil.Process) -> bool:
    """Whether `process` still runs: a zombie does not (one whose parent was killed may wait long for
    a reaper)."""
    import psutil

    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def stop_tree(child: subprocess.Popen) -> None:
    """SIGKILL `child` (started in a session of its own), its process group and every process under it,
    and wait until they are gone.

    A signal to the group is not enough: torchrun starts each worker in a session of its own. The tree
    is frozen (SIGSTOP) first, so that no process starts another between being listed and killed; the
    child itself, not yet reaped, keeps its pid (and so its group's id) from being reused meanwhile.
    """
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGSTOP)
    frozen: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(child.pid)
        while True:  # until a listing finds no process that is not frozen yet
            new = [process for process in [root, *root.children(recursive=True)] if process.pid not in frozen]
            if not new:
                break
            for process in new:
                with contextlib.suppress(psutil.Error):
                    process.suspend()
                frozen[process.pid] = process
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    for process in frozen.values():
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil checks the pid is still this process's
    child.wait()
    # Orphaned workers are reaped by init, not by us: wait until none runs, so that none writes after this.
    deadline = time.monotonic() + KILL_WAIT_S
    while any(_alive(process) for process in frozen.values()) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass(frozen=True)
class ChildRun:
    status: int  # the child's exit status; negative: the signal that ended it
    timed_out: bool
    tree_peak_bytes: int


def run_child(command: list[str], log_file: Path, timeout: float) -> ChildRun:
    """Run `command` in a session of its own, its output in `log_file`, sampling its tree's memory;
    killed with every process under it (`stop_tree`) after `timeout` s, or when this process's wait
    ends otherwise (SIGTERM under `sigterm_as_exit`, Ctrl-C), which then propagates."""
    with log_file.open("w", encoding="utf-8") as output:
        # A session of its own: so that the whole group can be killed, and Ctrl-C (sent to the terminal's
        # group) reaches this process, which then stops the run, rather than torchrun's workers directly.
        child: subprocess.Popen | None = None
        memory: TreeMemory | None = None
        timed_out = False
        try:
            with exit_deferred():  # a SIGTERM while it starts still stops it
                child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            memory = TreeMemory(child.pid)
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = child is not None and child.poll() is None  # not if it ended at that very moment
        finally:
            if child is not None and child.poll() is None:  # timed out, or this process is being stopped
                stop_tree(child)
            tree_peak = memory.stop() if memory is not None else 0
    assert child is not None and child.returncode is not None
    return ChildRun(child.returncode, timed_out, tree_peak)


def run_one(root: Path, logs: Path, pool: Path, backbone: str, mode: Mode, max_steps: int, rows: int,
            timeout: float, recipe: Path = SHIPPED_RECIPE) -> dict:
    """One `promptier train` in a child process; its figures."""
    name = f"{rows}-{mode.device}-{mode.processes}-{mode.reading}"
    config_file = root / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(bench_config(backbone, mode.reading == "streamed", max_steps,
                                                       mode.device, recipe)), encoding="utf-8")
    out, work = root / f"model-{name}", root / f"model-{name}.work"
    for stale in (out, work):
        if stale.exists():
            import shutil

            shutil.rmtree(stale)
    command = [sys.executable, "-m", "training.cli", "train", "--logs", str(logs), "--pool", str(pool),
               "--config", str(config_file), "--out", str(out), "--work-dir", str(work),
               "--processes", str(mode.processes)]
    log_file = root / f"{name}.log"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run = run_child(command, log_file, timeout)
    status, tree_peak = run.status, run.tree_peak_bytes
    wall = time.perf_counter() - started
    result: dict = {"rows": rows, "mode": mode.name, "device": mode.device, "processes": mode.processes,
                    "reading": mode.reading, "max_steps": max_steps, "wall_seconds": round(wall, 1),
                    "peak_rss_tree_mb": round(tree_peak / 2**20, 1), "status": status, "log": str(log_file),
                    # Other work on the machine slows a run: its 1-minute load average before and after.
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    "timed_out": run.timed_out}
    if status != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-1500:]
        stopped = f"stopped after --timeout {timeout:g} s, with every process it started\n" if run.timed_out else ""
        result["error"] = stopped + tail
        return result
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    training = manifest["training"]
    fit = training["fit"]
    result.update(prompts=sum(training["prompts"].values()), train_prompts=training["prompts"]["train"],
                  steps=fit["steps"], precision=fit["precision"], fit_seconds=fit["seconds"],
                  train_prompts_per_second=fit["examples_per_second"],
                  peak_rss_main_mb=training["peak_rss_mb"], stage_peak_rss_mb=training["stage_peak_rss_mb"],
                  validation_loss=round(manifest["metrics"]["validation"]["loss"], 4),
                  stage_seconds=training["stage_seconds"])
    if "data" in training:
        data = training["data"]
        result["streaming_state_mb"] = {key.removesuffix("_bytes"): round(data[key] / 2**20, 1)
                                        for key in ("hash_index_bytes", "per_prompt_bytes", "heldout_text_bytes",
                                                    "token_store_bytes")}
    return result


def modes(devices: list[str], processes: list[int], readings: list[str]) -> list[Mode]:
    """Device modes to run: `available` means the CPU, and CUDA when torch sees a GPU."""
    import torch

    chosen: list[str] = []
    for device in devices:
        if device == "available":
            chosen += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        elif device == "cuda" and not torch.cuda.is_available():
            raise PromptierError("--devices cuda: torch sees no CUDA device here")
        else:
            chosen.append(device)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [Mode(device, count, reading) for device in dict.fromkeys(chosen) for count in processes
            for reading in readings if device != "cuda" or count <= gpus]


def parse_counts(option: str, text: str) -> list[int]:
    """A comma-separated list of whole numbers above 0 (`--rows`, `--processes`), once each, in order.

    Raises:
        PromptierError: an item is not such a number.
    """
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise PromptierError(f"{option} takes whole numbers above 0, comma-separated, not {text!r}")
    return list(dict.fromkeys(counts))


def parse_choices(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names among `allowed`, once each, in order.

    Raises:
        PromptierError: a name is not among them.
    """
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        choices = ", ".join(allowed[:-1]) + f" and/or {allowed[-1]}"
        raise PromptierError(f"{option} takes {choices}, not {unknown}")
    return list(dict.fromkeys(names))


def plan_runs(rows: str, devices: str, processes: str, reading: str, max_steps: int, backbone: str,
              recipe: Path, timeout: float, root: Path, out: Path) -> tuple[list[int], list[Mode]]:
    """The log sizes and modes to run, once every option is checked: before the synthetic logs are
    written (a minute per 100,000 rows) and before any run, which would otherwise fail late, or each
    fail alike, on an option that was wrong from the start.

    Raises:
        PromptierError: naming the option that is wrong.
    """
    from classifier.bench import check_output
    from training.config import TrainConfig
    from training.export import MIN_PARITY_PROMPTS
    from training.synthetic import rows_for_distinct_prompts

    sizes = parse_counts("--rows", rows)
    fewest = rows_for_distinct_prompts(MIN_PARITY_PROMPTS)
    too_few = [size for size in sizes if size < fewest]
    if too_few:  # every run would train and then be refused at export
        raise PromptierError(f"--rows {too_few}: training needs at least {MIN_PARITY_PROMPTS} distinct prompts, "
                             f"which the synthetic logs reach from {fewest:,} rows")
    counts = parse_counts("--processes", processes)
    run_modes = modes(parse_choices("--devices", devices, DEVICES), counts,
                      parse_choices("--reading", reading, READINGS))
    if not run_modes:  # --devices cuda only, each process count above the GPUs there are
        raise PromptierError(f"nothing to run: with --devices {devices}, every --processes count ({processes}) "
                             "needs more GPUs than torch sees here (one per process)")
    if timeout <= 0:
        raise PromptierError(f"--timeout must be greater than 0, got {timeout:g}")
    if backbone != "tiny":
        from training.model import backbone_directory

        try:
            backbone_directory(backbone)
        except (FileNotFoundError, ImportError) as error:
            raise PromptierError(f"--backbone takes 'minilm-l6', 'tiny' or a model directory: {error}") from None
    # The config of every run, as its `promptier train` will read it: a recipe that is missing, not YAML or
    # not a valid config fails here, once, rather than in each run.
    try:
        for mode in run_modes:
            TrainConfig.model_validate(bench_config(backbone, mode.reading == "streamed", max_steps, mode.device,
                                                    recipe))
    except (OSError, yaml.YAMLError, ValueError) as error:
        raise PromptierError(f"--recipe {recipe}: {error}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PromptierError(f"cannot create --work-dir {root}: {error.strerror or error}") from None
    check_output(out)
    return sizes, run_modes


def run_bench(rows: list[int], run_modes: list[Mode], max_steps: int, backbone: str, prompt_chars: int, root: Path,
              out: Path, timeout: float, recipe: Path = SHIPPED_RECIPE) -> dict:
    """Every (rows, mode) run, printed as it finishes and written to `out` as JSON (options checked by
    `plan_runs`). SIGTERM, like Ctrl-C, kills the run in progress with its workers, then ends the bench."""
    import torch

    from training.synthetic import POOL_YAML, build_tiny_backbone

    with sigterm_as_exit():
        root.mkdir(parents=True, exist_ok=True)
        pool = root / "pool.yaml"
        pool.write_text(POOL_YAML, encoding="utf-8")
        if backbone == "tiny":
            backbone = str(build_tiny_backbone(root / "tiny-backbone"))
        report: dict = {
            "command": "promptier " + " ".join(sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
            "recipe": str(recipe), "backbone": backbone, "prompt_chars": prompt_chars, "runs": [],
        }
        print(f"{'rows':>9} {'mode':<22} {'prompts/s':>10} {'steps':>6} {'main MB':>8} {'tree MB':>8} "
              f"{'wall s':>7} {'load':>9}")
        for count in rows:
            logs = _logs(root, count, prompt_chars)
            for mode in run_modes:
                result = run_one(root, logs, pool, backbone, mode, max_steps, count, timeout, recipe)
                report["runs"].append(result)
                if "error" in result:
                    why = f", timed out after {timeout:g} s" if result.get("timed_out") else ""
                    print(f"{count:>9} {mode.name:<22} failed (status {result['status']}{why}); "
                          f"see {result['log']}", flush=True)
                else:
                    load = result["load_average"]
                    print(f"{count:>9} {mode.name:<22} {result['train_prompts_per_second']:>10.0f} "
                          f"{result['steps']:>6} {result['peak_rss_main_mb']:>8.0f} {result['peak_rss_tree_mb']:>8.0f} "
                          f"{result['wall_seconds']:>7.0f} {load[0]:>4.1f}-{load[1]:<4.1f}", flush=True)
                write_report(out, report, indent=1)
    return report


def failed_runs(report: dict) -> list[str]:
    """One line per run of `report` that failed: its size, mode, exit status and log."""
    return [f"{run['rows']} rows, {run['mode']}: status {run['status']}"
            f"{' (timed out)' if run.get('timed_out') else ''}, see {run['log']}"
            for run in report["runs"] if run["status"] != 0]
