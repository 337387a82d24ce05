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
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from classifier.artifact_layout import MANIFEST_FILE
from classifier.errors import PromptierError
from training.config import SHIPPED_RECIPE, recipe_path


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
    with log_file.open("w", encoding="utf-8") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        memory = TreeMemory(child.pid)
        try:
            status = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            status = -9
        tree_peak = memory.stop()
    wall = time.perf_counter() - started
    result: dict = {"rows": rows, "mode": mode.name, "device": mode.device, "processes": mode.processes,
                    "reading": mode.reading, "max_steps": max_steps, "wall_seconds": round(wall, 1),
                    "peak_rss_tree_mb": round(tree_peak / 2**20, 1), "status": status, "log": str(log_file),
                    # Other work on the machine slows a run: its 1-minute load average before and after.
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if status != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-1500:]
        result["error"] = tail
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


def run_bench(rows: list[int], devices: list[str], processes: list[int], readings: list[str], max_steps: int,
              backbone: str, prompt_chars: int, root: Path, out: Path, timeout: float,
              recipe: Path = SHIPPED_RECIPE) -> dict:
    """Every (rows, mode) run, printed as it finishes and written to `out` as JSON."""
    import torch

    from training.synthetic import POOL_YAML, build_tiny_backbone

    unknown = set(readings) - {"streamed", "memory"}
    if unknown:
        raise PromptierError(f"--reading takes streamed and/or memory, not {sorted(unknown)}")
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
    print(f"{'rows':>9} {'mode':<22} {'prompts/s':>10} {'steps':>6} {'main MB':>8} {'tree MB':>8} {'wall s':>7} "
          f"{'load':>9}")
    for count in rows:
        logs = _logs(root, count, prompt_chars)
        for mode in modes(devices, processes, readings):
            result = run_one(root, logs, pool, backbone, mode, max_steps, count, timeout, recipe)
            report["runs"].append(result)
            if "error" in result:
                print(f"{count:>9} {mode.name:<22} failed (status {result['status']}); see {result['log']}")
            else:
                load = result["load_average"]
                print(f"{count:>9} {mode.name:<22} {result['train_prompts_per_second']:>10.0f} {result['steps']:>6} "
                      f"{result['peak_rss_main_mb']:>8.0f} {result['peak_rss_tree_mb']:>8.0f} "
                      f"{result['wall_seconds']:>7.0f} {load[0]:>4.1f}-{load[1]:<4.1f}", flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report
