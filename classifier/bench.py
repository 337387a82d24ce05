"""`promptier bench`: latency by prompt length, batched throughput and memory of the runtime.

Timings live here, never in tests. Prompts are built from a fixed English corpus, shuffled per prompt,
and sized with the artifact's own tokenizer, so the buckets mean the same on every machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from classifier.errors import PromptierError

CORPUS = (
    "A platform team runs a gateway in front of several language models and wants each request to go to "
    "the cheapest model that will answer it well. Some prompts ask for a capital city or a greeting, others "
    "ask to prove a theorem about eigenvalues, to optimise a database query, to refactor a Python module "
    "with tests, or to explain the trade-offs between consistency models in distributed storage. Given the "
    "following table of quarterly revenue, compute the growth rate and summarise the risks in two paragraphs. "
    "Which of the following options best describes the mechanism of action of the drug? Write a function "
    "that returns the longest palindromic substring, then analyse its time complexity and edge cases."
).split()
BUCKETS: tuple[tuple[str, int | None, int | None], ...] = (
    ("16 tokens", 16, None), ("64 tokens", 64, None), ("128 tokens", 128, None), ("512 tokens", 512, None),
    ("100k chars", None, 100_000),
)


def make_prompts(runtime, tokens: int | None, chars: int | None, count: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    """`count` different prompts of `tokens` tokens (special tokens included, before truncation) or of
    `chars` characters."""
    rng = random.Random(seed)
    tokenizer = runtime.encoder._tokenizer
    prompts = []
    for _ in range(count):
        if chars is not None:
            text = ""
            while len(text) < chars:
                text += " ".join(rng.choice(CORPUS) for _ in range(2000)) + " "
            prompts.append(text[:chars])
            continue
        assert tokens is not None
        text = " ".join(rng.choice(CORPUS) for _ in range(tokens * 2))
        encoding = tokenizer.encode(text, add_special_tokens=False)
        # Cut at a token boundary so the prompt is exactly `tokens` tokens with [CLS] and [SEP].
        end = encoding.offsets[tokens - 3][1]
        prompts.append(text[:end])
    return prompts


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model name and whether it has VNNI int8 instructions (None where unknown).

    The same build's latency differs by a third between the CPUs a cloud hands out, so a figure
    without its CPU cannot be compared with another.
    """
    name, flags = "", None
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return {"model": name or platform.processor() or platform.machine(),
            "avx512_vnni": None if flags is None else "avx512_vnni" in flags,
            "avx_vnni": None if flags is None else "avx_vnni" in flags}


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "max_ms": float(values.max()),
            "mean_ms": float(values.mean()), "n": len(samples_ms)}


def latency(runtime, prompts: list[str], iterations: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Batch-1 latency of classify(), tokenization and policy included."""
    for prompt in prompts[:20]:
        runtime.classify(prompt)
    samples = []
    for i in range(iterations):
        prompt = prompts[i % len(prompts)]
        start = time.perf_counter()
        runtime.classify(prompt)
        samples.append((time.perf_counter() - start) * 1000)
    return _percentiles(samples)


def _throughput_worker(args: tuple[str | None, list[str], int, int, float]) -> tuple[int, float, float]:
    """Prompts classified in a window of about `seconds` (at least one batch), and the window's start and
    end on the monotonic clock, which is the same in every process of the machine."""
    model, prompts, threads, batch, seconds = args
    import classifier

    runtime = classifier.load(model, threads=threads)
    runtime.classify_batch(prompts[:batch])
    done, began = 0, time.monotonic()
    while True:
        start = (done * batch) % max(1, len(prompts) - batch)
        runtime.classify_batch(prompts[start : start + batch])
        done += batch
        # The last batch ends past `seconds`: dividing by the time the batches took, not by `seconds`,
        # keeps a short window (or a slow batch) from overstating the rate.
        if (ended := time.monotonic()) >= began + seconds:
            return done, began, ended


def _rate(parts: list[tuple[int, float, float]]) -> float:
    """Prompts per second of workers that ran side by side: all their prompts over the span from the first
    start to the last end. Their windows start as each has loaded its model, so they overlap only in
    part; a sum of each worker's own rate would count a worker that ran alone at the edges as if the
    others had been running too."""
    return sum(done for done, _, _ in parts) / (max(end for _, _, end in parts) - min(start for _, start, _ in parts))


def throughput(model: str | None, prompts: list[str], processes: int, threads: int, batch: int,
               seconds: float) -> float:
    """Prompts per second over about `seconds`, with `processes` workers of `threads` ORT threads each."""
    if processes == 1:
        return _rate([_throughput_worker((model, prompts, threads, batch, seconds))])
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        # Each worker loads its model first and times only its own window.
        parts = pool.map(_throughput_worker, [(model, prompts, threads, batch, seconds)] * processes)
    return _rate(parts)


def loaded_rss_mb(model: str | None) -> float:
    """Peak RSS of a fresh process that imports the runtime, loads the model and classifies."""
    code = ("import resource, sys, classifier; r = classifier.load(None if sys.argv[1] == '-' else sys.argv[1]); "
            "[r.classify('measure the memory of a loaded runtime ' * 20) for _ in range(100)]; "
            "r.classify_batch(['a fairly long prompt about distributed systems ' * 30] * 64); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    output = subprocess.run([sys.executable, "-c", code, model or "-"], capture_output=True, text=True, check=True)
    return int(output.stdout.strip().splitlines()[-1]) / 1024


def run_benchmark(model: str | None, iterations: int = 2000, seconds: float = 5.0) -> dict:
    import onnxruntime

    import classifier

    runtime = classifier.load(model, threads=1)
    result: dict = {"model_version": runtime.model_version, "architecture": runtime.manifest.architecture,
                    "cpu": cpu_description(), "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                    # What the run was asked for, so a figure can be rerun as it was measured (the long
                    # character bucket takes a quarter of the iterations, at least 200: each bucket's `n` says).
                    "settings": {"iterations": iterations, "seconds": seconds},
                    "latency_batch1_1thread": {}, "throughput": {}}
    prompts_by_bucket = {}
    for index, (name, tokens, chars) in enumerate(BUCKETS):
        prompts = make_prompts(runtime, tokens, chars, 50 if chars else 200, seed=index)
        prompts_by_bucket[name] = prompts
        runs = iterations if chars is None else max(200, iterations // 4)
        result["latency_batch1_1thread"][name] = latency(runtime, prompts, runs)
    # Most scripts take the fast tokenizer path once their block has been examined (a CJK character,
    # a decomposed accent here); a character beyond the Basic Multilingual Plane other than emoji (a
    # rare ideograph) sends a prompt to `tokenizers`: these buckets show both prices.
    for name, inserted in (("128 tokens + a CJK character", " \u6570 "),
                           ("128 tokens + a combining mark", "e\u0301 "),
                           ("128 tokens + a rare ideograph (the `tokenizers` path)", "\U00020000 ")):
        changed = [prompt.replace(" ", f" {inserted}", 1) for prompt in prompts_by_bucket["128 tokens"]]
        result["latency_batch1_1thread"][name] = latency(runtime, changed, iterations)
    prompts_128 = make_prompts(runtime, 128, None, 2048, seed=99)
    for label, processes, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)):
        result["throughput"][f"{label}, batch 64, 128 tokens"] = round(
            throughput(model, prompts_128, processes, threads, 64, seconds), 1)
    result["best_throughput_per_s"] = max(result["throughput"].values())
    result["loaded_process_peak_rss_mb"] = round(loaded_rss_mb(model), 1)
    result["bench_process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _shape(architecture: dict) -> str:
    """The model's shape in a few words: a backbone names itself (a bag student has no layers to count)."""
    backbone = architecture.get("backbone")
    if backbone and not architecture.get("layers"):
        return f"{backbone}, width {architecture.get('hidden')}"
    return f"{architecture.get('layers')} layers, hidden {architecture.get('hidden')}"


def render(result: dict) -> str:
    lines = [f"model {result['model_version']} ({_shape(result['architecture'])}), "
             f"{result['cpu_count']} CPUs ({result['cpu']['model']}, "
             f"AVX-512 VNNI: {result['cpu']['avx512_vnni']}), ORT {result['onnxruntime']}",
             "", "| prompt length | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for name, stats in result["latency_batch1_1thread"].items():
        lines.append(f"| {name} | {stats['p50_ms']:.3f} | {stats['p90_ms']:.3f} | {stats['p99_ms']:.3f} | "
                     f"{stats['max_ms']:.3f} |")
    lines += ["", "| batched throughput | prompts/s |", "|---|---|"]
    lines += [f"| {name} | {value:,.0f} |" for name, value in result["throughput"].items()]
    lines += ["", f"peak RSS of a process with the runtime loaded: {result['loaded_process_peak_rss_mb']} MB"]
    return "\n".join(lines)


def try_writing(out: Path) -> None:
    """Create and remove a trial file beside `out`, and open `out` for writing if it exists (left as it is).

    A trial rather than os.access: access() says yes to root on a read-only file system.

    Raises:
        OSError: either cannot be done.
    """
    with tempfile.NamedTemporaryFile(dir=out.absolute().parent, prefix=f".{out.name}.", suffix=".check"):
        pass
    if out.exists():
        with out.open("r+b"):
            pass


def write_report(out: Path, report: dict, indent: int = 2) -> None:
    """Write a command's JSON report whole or not at all: into a file beside `out`, then renamed over it,
    so that a run killed while writing (or a reader meanwhile) never finds half a report, and a rewrite
    after each of a bench's runs never loses the runs before it."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.absolute().parent, prefix=f".{out.name}.",
                                     suffix=".partial", delete=False) as handle:
        partial = Path(handle.name)
        try:
            handle.write(json.dumps(report, indent=indent) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    try:
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def check_output(out: Path) -> None:
    """Make sure the JSON can be written at `out` before minutes of measuring: its folder is created
    (as `promptier label` does for its output) and a file is created and removed there.

    Raises:
        PromptierError: `out` is a directory, or its folder cannot be created or written to.
    """
    if out.is_dir():
        raise PromptierError(f"cannot write {out}: it is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try_writing(out)
    except OSError as error:
        raise PromptierError(f"cannot write {out}: {error.strerror or error}") from None


def main(model: str | None, out: Path, iterations: int, seconds: float) -> dict:
    """Run the benchmark, write its JSON to `out` (checked writable first) and print its tables.

    Raises:
        PromptierError: `out` cannot be written, or the model cannot be loaded.
    """
    if iterations < 1 or seconds <= 0:  # no samples to take percentiles of, no window to divide by
        raise PromptierError(f"iterations must be at least 1 and seconds above 0, not {iterations} and {seconds}")
    check_output(out)
    result = run_benchmark(model, iterations, seconds)
    write_report(out, result)
    print(render(result))
    print(f"\nwrote {out}")
    return result


__all__ = ["check_output", "main", "render", "run_benchmark"]
