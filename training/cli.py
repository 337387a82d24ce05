"""The `promptier` command. Each subcommand imports its package lazily: `serve` and `classify` work
without the train extra, and `promptier --help` starts fast."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from classifier.errors import PromptierError

if TYPE_CHECKING:
    from classifier.artifact import ArtifactManifest

app = typer.Typer(help="Promptier: route each prompt to the cheapest LLM tier that answers it well.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

LogsOption = Annotated[list[Path], typer.Option("--logs", help="log files or directories (JSONL/Parquet)")]
PoolOption = Annotated[Path, typer.Option("--pool", help="pool YAML: tiers, prices, models per source")]


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _require_training_extra() -> None:
    """Training, evaluation and export need the `train` extra; say how to install it, not a traceback."""
    from training.errors import require

    try:
        for module in ("torch", "transformers", "sklearn"):
            require(module)
    except PromptierError as error:
        _fail(error)


@app.command()
def train(
    logs: LogsOption,
    pool: PoolOption,
    out: Annotated[Path, typer.Option(help="artifact directory to write")],
    config: Annotated[Path | None, typer.Option(help="training config YAML")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="checkpoints (default: OUT.work); rerun to resume")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid rows and report them")] = False,
    teacher: Annotated[Path | None, typer.Option(help="distil from this artifact's probabilities")] = None,
    unlabeled: Annotated[list[Path] | None, typer.Option(help="prompts without outcomes, for distillation")] = None,
    distill_weight: Annotated[float, typer.Option(help="weight of the teacher's probabilities in the targets "
                                                       "(1 = pure distillation)")] = 0.5,
    epochs: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    holdout_source: Annotated[list[str] | None, typer.Option(help="put a whole source in test")] = None,
    holdout_category: Annotated[list[str] | None, typer.Option(help="put a whole category in test")] = None,
    model_version: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Train a calibrated tier classifier on routing logs and write an evaluated ONNX artifact."""
    _require_training_extra()
    from training.config import load_config
    from training.pipeline import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, epochs=epochs, seed=seed, holdout_sources=holdout_source,
                          holdout_categories=holdout_category)
        manifest = run_training(logs, pool, out, cfg, work_dir=work_dir, skip_invalid=skip_invalid,
                                teacher=teacher, unlabeled=unlabeled or (), distill_weight=distill_weight,
                                model_version=model_version,
                                command="promptier " + shlex.join(sys.argv[1:]),
                                cache_dir=Path.home() / ".cache" / "promptier")
    except (PromptierError, ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(f"wrote {out} ({manifest.model_version}); thresholds {manifest.policy.thresholds}")
    test = manifest.metrics.get("test")
    if isinstance(test, dict):
        for group, methods in test.items():
            typer.echo(f"  {group}: APGR {methods['promptier']['apgr']:.4f}")


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="artifact directory")],
    logs: LogsOption,
    pool: PoolOption,
    out: Annotated[Path | None, typer.Option(help="report directory (default: MODEL/eval)")] = None,
    embedding_baseline: Annotated[bool, typer.Option(help="include the MiniLM embedding baseline")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="embedding cache (default ~/.cache/promptier)")] = None,
    skip_invalid: Annotated[bool, typer.Option()] = False,
    record: Annotated[bool, typer.Option(help="store the results in the artifact (manifest, eval files, "
                                               "model card)")] = False,
    loso: Annotated[bool, typer.Option("--loso", help="also retrain the model's recipe once per source with that "
                                                     "source held out, and score it there")] = False,
    seeds: Annotated[str | None, typer.Option(help="also retrain the recipe with these seeds (e.g. 13,14,15) and "
                                                   "report the spread of its in-distribution APGR")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="where --loso and --seeds train (default: MODEL.generalization)"
                                                  )] = None,
) -> None:
    """Evaluate a model against baselines on the prompts of LOGS it never saw, and on the probe suite."""
    _require_training_extra()
    from classifier.artifact import load_manifest
    from training.data import read_logs
    from training.evaluate import EVAL_MD, evaluate_logs
    from training.labels import build_table
    from training.model import backbone_directory
    from training.pool import load_pool

    try:
        manifest = load_manifest(model)
        pool_spec = load_pool(pool)
        if pool_spec.tier_names != manifest.tier_names:
            raise PromptierError(f"pool tiers {pool_spec.tier_names} differ from the model's {manifest.tier_names}")
        rows, skipped = read_logs(logs, skip_invalid)
        table, _ = build_table(rows, pool_spec)
        config = manifest.training.get("config", {})
        backbone = str(config.get("backbone", "minilm-l6")) if isinstance(config, dict) else "minilm-l6"
        backbone_dir = backbone_directory(backbone) if embedding_baseline else None
        out_dir = model if record else (out or model / "eval")
        report = evaluate_logs(model, table, backbone_dir, out_dir,
                               cache_dir or Path.home() / ".cache" / "promptier")
        import classifier
        from training.probes import evaluate_probes, render_probe_markdown

        probes = evaluate_probes(classifier.load(model))
        generalization = None
        if loso or seeds:
            generalization = _generalization(model, manifest, logs, pool, loso, seeds, work_dir, backbone_dir,
                                             cache_dir or Path.home() / ".cache" / "promptier", skip_invalid)
        if record:
            from training.evaluate import record_in_artifact

            record_in_artifact(model, report, table, probes, generalization)
    except (PromptierError, ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo((out_dir / EVAL_MD).read_text())
    typer.echo(render_probe_markdown(probes, manifest.policy.default_mode))
    if generalization is not None:
        from training.generalization import render_markdown

        typer.echo(render_markdown(generalization))
    typer.echo(f"wrote {out_dir}/eval.json, eval.md, eval.png ({report['rows']} prompts; {skipped.summary()})")


def _generalization(model: Path, manifest: ArtifactManifest, logs: list[Path], pool: Path, loso: bool,
                    seeds: str | None, work_dir: Path | None, backbone_dir: Path | None, cache_dir: Path,
                    skip_invalid: bool) -> dict:
    """Retrain the artifact's recipe for --loso and --seeds."""
    from training.config import TrainConfig
    from training.generalization import leave_one_source_out, seed_spread

    if manifest.training.get("teacher"):
        raise PromptierError("--loso and --seeds retrain the recipe, and this model was distilled from a teacher "
                             "artifact the recipe does not rebuild")
    config = TrainConfig.model_validate(manifest.training["config"])
    root = work_dir or model.with_name(model.name + ".generalization")
    result: dict = {}
    if loso:
        result["leave_one_source_out"] = leave_one_source_out(logs, pool, config, root / "loso", backbone_dir,
                                                               cache_dir, skip_invalid)
    if seeds:
        try:
            seed_list = [int(seed) for seed in seeds.split(",")]
        except ValueError as error:
            raise PromptierError(f"--seeds takes integers separated by commas, got {seeds!r}") from error
        result["seeds"] = seed_spread(logs, pool, config, seed_list, root / "seeds", skip_invalid)
    return result


@app.command()
def classify(
    text: Annotated[str, typer.Argument(help="the prompt")],
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    mode: Annotated[str | None, typer.Option(help="quality | balanced | cost")] = None,
    threshold: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Classify one prompt and print the routing decision as JSON."""
    from dataclasses import asdict

    import classifier

    try:
        runtime = classifier.load(model)
        request = classifier.RoutingRequest(mode=mode, threshold=threshold)
        result = runtime.classify(text, request)
    except PromptierError as error:
        _fail(error)
    typer.echo(json.dumps(asdict(result), indent=2))


@app.command()
def label(
    inputs: Annotated[list[str], typer.Argument(help="JSONL, Parquet or CSV files or globs")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .jsonl or .parquet")],
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    mode: Annotated[str | None, typer.Option(help="quality | balanced | cost")] = None,
    threshold: Annotated[float | None, typer.Option()] = None,
    prompt_column: Annotated[str, typer.Option()] = "prompt",
    id_column: Annotated[str, typer.Option()] = "prompt_id",
    messages_column: Annotated[str, typer.Option(help="chat-style rows: list of {role, content}")] = "messages",
    keep: Annotated[list[str] | None, typer.Option(help="input columns to copy to the output")] = None,
    workers: Annotated[int | None, typer.Option(help="processes (default: all cores)")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1)] = 4096,
    resume: Annotated[bool, typer.Option(help="continue an interrupted job (local engine); a no-op for a job "
                                              "that already finished")] = False,
    engine: Annotated[str, typer.Option(help="local | ray")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="existing Ray cluster (default: start a local one)")] = None,
) -> None:
    """Label prompt files with the tier each prompt needs (one output row per input row, in input order).

    A row that cannot be labeled (broken or too deeply nested JSON, missing or non-string prompt,
    invalid text, a CSV line with the wrong number of fields) gets an `error` and null decision
    fields; the job goes on. A UTF-8 BOM at the start of a file is ignored.

    One job per output: OUTPUT.lock is held for the whole job, and a second job on the same output
    fails at once, naming the job that holds it. An existing OUTPUT is never replaced: remove it
    first. An interrupted job (OUTPUT.parts) continues with --resume only if its inputs (path, size,
    modification time), model and options are unchanged; --resume of an output this job already
    finished does nothing (OUTPUT.job.json records the job). The local engine's workers exit when
    the job process dies, even by kill -9.

    A write error (disk full) removes the temporary files, keeps the finished parts, and exits with
    status 2, as do all refusals; make room and rerun with --resume.
    """
    import time

    from classifier.labeling import LabelOptions, label_files

    options = LabelOptions(prompt_column=prompt_column, id_column=id_column, messages_column=messages_column,
                           keep_columns=tuple(keep or ()), mode=mode, threshold=threshold, chunk_rows=chunk_rows,
                           model=str(model) if model else None)
    started = time.perf_counter()
    try:
        if engine == "ray":
            if resume:
                raise PromptierError("--resume works with the local engine only; the ray engine labels "
                                     "everything in one run")
            from classifier.labeling_ray import label_with_ray

            stats = label_with_ray(inputs, output, options, address=ray_address)
        elif engine == "local":
            stats = label_files(inputs, output, options, workers=workers, resume=resume)
        else:
            raise PromptierError(f"unknown engine {engine!r}; use local or ray")
    except PromptierError as error:
        _fail(error)
    if stats.complete:
        typer.echo(f"{output} is already complete ({stats.resumed_rows} rows, labeled earlier by this job); "
                   "nothing to do")
        return
    elapsed = time.perf_counter() - started
    typer.echo(f"labeled {stats.rows} rows ({stats.errors} with errors, {stats.resumed_rows} resumed) in "
               f"{elapsed:.1f} s ({stats.rows / max(elapsed, 1e-9):,.0f} rows/s); tiers {stats.tiers} -> {output}")


@app.command()
def bench(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench.json"),
    iterations: Annotated[int, typer.Option(help="timed calls per length bucket")] = 2000,
    seconds: Annotated[float, typer.Option(help="duration of each throughput run")] = 5.0,
) -> None:
    """Measure the runtime: p50/p90/p99/max latency by length, batched throughput, peak RSS."""
    from classifier.bench import main as run_bench

    try:
        run_bench(str(model) if model else None, out, iterations, seconds)
    except PromptierError as error:
        _fail(error)


@app.command()
def loadtest(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-serving.json"),
    seconds: Annotated[float, typer.Option(help="duration of each scenario")] = 8.0,
    workers: Annotated[int, typer.Option(min=1, help="also test a server with this many processes")] = 2,
    generator: Annotated[str, typer.Option(help="auto (h2load if installed), h2load, or python")] = "auto",
) -> None:
    """Load-test a real `promptier serve` on loopback at concurrency 1, 32 and 128, with one server
    process and with `--workers`."""
    from serving.loadgen import main as run_loadtest

    if generator not in ("auto", "h2load", "python"):
        raise typer.BadParameter(f"--generator must be auto, h2load or python, not {generator!r}")
    try:
        run_loadtest(str(model) if model else None, out, seconds, workers, generator)
    except FileNotFoundError as error:
        _fail(error)


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(min=0.05, help="length of the window everything runs at once")] = 5.0,
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON report")] = Path("bench-soak.json"),
    deadline_ms: Annotated[float, typer.Option(min=1, help="deadline of each well-behaved Classify call")] = 50.0,
    well_behaved_rate: Annotated[float, typer.Option(min=0.1, help="well-behaved Classify calls per second")] = 20.0,
    flood_factor: Annotated[float, typer.Option(min=0.1, help="the flood, as a multiple of the service's "
                                                "capacity measured just before")] = 2.0,
    slow_connections: Annotated[int, typer.Option(min=0, help="slow connections held to each of the gRPC and "
                                                  "dispatcher ports")] = 200,
    dispatch_rate: Annotated[float, typer.Option(min=0.1, help="chat completions per second through the "
                                                 "dispatcher")] = 20.0,
    label_rows: Annotated[int, typer.Option(min=1, help="rows of the generated labeling input")] = 20_000,
    label_every: Annotated[float, typer.Option(min=1, help="seconds between label rounds")] = 60.0,
    chaos_every: Annotated[float, typer.Option(min=3, help="seconds between serve worker kills (and between "
                                               "reloads)")] = 60.0,
) -> None:
    """Chaos and soak on loopback: flood, slow connections, odd upstreams, worker kills, reloads and
    concurrent label jobs, all at once; prints a table and writes a JSON report.

    Exit code 0 only if the bars held: well-behaved calls served >= 99%, paid upstream answers delivered
    100%, no labeled row lost or duplicated (and one label job of each pair refused by the lock), no
    crash; 1 if one did not; 2 if the soak could not start.
    """
    from serving.soak import SoakOptions
    from serving.soak import main as run_soak

    options = SoakOptions(minutes=minutes, model=model, deadline_ms=deadline_ms, well_behaved_rate=well_behaved_rate,
                          flood_factor=flood_factor, slow_connections=slow_connections, dispatch_rate=dispatch_rate,
                          label_rows=label_rows, label_every_s=label_every, chaos_every_s=chaos_every)
    try:
        report = run_soak(options, out)
    except (RuntimeError, TimeoutError) as error:
        _fail(error)
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def export(
    artifact: Annotated[Path, typer.Option(help="an artifact made by `promptier train`")],
    checkpoint: Annotated[Path, typer.Option(help="its training checkpoint (WORK_DIR/checkpoint.pt)")],
    prompts: Annotated[list[Path], typer.Option(help="prompts for the parity check (JSONL/Parquet with a "
                                                      "`prompt` column; at least 500)")],
    out: Annotated[Path, typer.Option(help="artifact directory to write")],
    quantize: Annotated[bool, typer.Option(help="try int8 first (kept only if it clears the parity bars)")] = True,
) -> None:
    """Re-export a trained model to ONNX with the parity check (e.g. to try int8, or after an ORT upgrade)."""
    _require_training_extra()
    from training.export import export_checkpoint
    from training.pipeline import read_unlabeled

    try:
        manifest, report = export_checkpoint(artifact, checkpoint, read_unlabeled(prompts), out, quantize)
    except (PromptierError, ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(f"wrote {out} ({manifest.architecture.get('quantization')}): tier agreement "
               f"{report.tier_agreement:.4f}, max probability difference {report.max_probability_diff:.2e} "
               f"on {report.prompts} prompts")


@app.command()
def serve(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 50051,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads of the model worker")] = 1,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port of --host "
                                                     "(worker i of --workers on this port + i)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="server processes sharing the port (SO_REUSEPORT), "
                                         "one model each; about one per core")] = 1,
    handshake_timeout: Annotated[float, typer.Option(min=0.001, help="seconds a new connection has to send "
                                                     "its HTTP/2 preface; slower ones are closed")] = 10.0,
    idle_timeout: Annotated[float, typer.Option(min=0, help="close a connection that has carried no call for "
                                                "this many seconds (0: never); gRPC clients reconnect by "
                                                "themselves")] = 300.0,
    max_connection_age: Annotated[float, typer.Option(min=0, help="close connections older than this many "
                                                      "seconds (0: never), after 30 s more for calls in "
                                                      "flight")] = 0.0,
    keepalive: Annotated[float, typer.Option(min=0, help="ping a connection silent for this many seconds and "
                                             "close it if the client does not answer within 20 s (0: gRPC's "
                                             "default, 2 hours)")] = 60.0,
    max_connections: Annotated[int | None, typer.Option(min=1, help="connections open at once, per process; "
                                                        "more are closed on accept (default: the open-file "
                                                        "limit less 128)")] = None,
    max_streams: Annotated[int, typer.Option(min=1, help="calls in flight per connection; a client queues "
                                             "more itself")] = 256,
) -> None:
    """Run the gRPC routing service (SIGTERM drains, SIGHUP reloads the model directory it started with).

    Admin.Reload: callers on this host only, or callers with the token in env PROMPTIER_ADMIN_TOKEN.
    Overload is refused at once with RESOURCE_EXHAUSTED: the queues are counted in prompts, with
    separate room for Classify and ClassifyBatch calls, so batch traffic cannot starve single calls.
    """
    import asyncio

    from serving.logs import configure_json_logging
    from serving.server import ServerLimits, serve_forever

    configure_json_logging()
    limits = ServerLimits(handshake_timeout_s=handshake_timeout, idle_timeout_s=idle_timeout or None,
                          max_connection_age_s=max_connection_age or None, keepalive_time_s=keepalive or None,
                          max_connections=max_connections, max_streams=max_streams)
    if workers > 1:
        from classifier import load
        from serving.server import ensure_port_free
        from serving.workers import serve_workers

        if port == 0:
            raise typer.BadParameter("--workers needs a fixed --port: every worker binds the same one")

        try:
            load(model)  # a bad artifact fails here, once, before any worker starts
            ensure_port_free(host, port)  # and a port in use, before workers die trying to bind it
        except PromptierError as error:
            _fail(error)
        raise typer.Exit(serve_workers(workers, model, f"{host}:{port}", threads, metrics_port, limits))
    try:
        asyncio.run(serve_forever(model, f"{host}:{port}", threads, metrics_port, limits=limits))
    except PromptierError as error:
        _fail(error)


@app.command()
def dispatch(
    config: Annotated[Path, typer.Option(help="dispatcher YAML config")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="dispatcher processes on the port (one core each)")] = 1,
    check: Annotated[bool, typer.Option("--check", help="validate the config (and the classifier's tiers), "
                                                        "print its fingerprint, and exit without serving")] = False,
) -> None:
    """Run the OpenAI-compatible dispatcher in front of the tiers' upstreams (SIGHUP rereads the config).

    Slow callers: config `inbound:` (header_timeout_s, body_timeout_s: 408; max_connections: 503).

    Browsers: POST application/json (else 415); without inbound keys, Host: localhost, an IP or allowed_hosts (403).
    """
    from classifier import load
    from serving.dispatch_config import load_dispatcher_config
    from serving.dispatch_supervisor import run
    from serving.logs import configure_json_logging

    configure_json_logging()
    try:
        settings = load_dispatcher_config(config)
        if check:  # before a SIGHUP: an edit that does not load is refused, and then a crash stops the dispatcher
            import asyncio

            from serving.dispatcher import check_config

            checked = asyncio.run(check_config(settings))
            typer.echo(f"{config}: OK, config_fingerprint {settings.fingerprint}; {checked}")
            return
        if settings.classifier.embedded:
            load(settings.classifier.model)  # a bad artifact fails here, once, before any worker starts
    except PromptierError as error:
        _fail(error)
    raise typer.Exit(run(config, host, port, workers))


@app.command("dispatch-bench")
def dispatch_bench(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-dispatch.json"),
    requests: Annotated[int, typer.Option(help="requests per measurement")] = 500,
) -> None:
    """Measure the latency the dispatcher adds over calling an upstream directly (loopback)."""
    from serving.dispatch_bench import main as run_dispatch_bench

    run_dispatch_bench(str(model) if model else None, out, requests)


def main() -> None:
    """Entry point of the `promptier` command."""
    app()


if __name__ == "__main__":
    main()
