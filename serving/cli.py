"""`promptier serve`, `dispatch`, `loadtest`, `soak`, `dispatch-bench`, `litellm-bench` and `budget-sim`: the
serving product's commands.

Registered with the `promptier` command through the `promptier.commands` entry points (see
`classifier.cli`); heavy imports happen inside each command, and none of them imports training code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from classifier.cli import fail, finite
from classifier.errors import PromptierError, require

# Installed with the package: `promptier dispatch --example` gives it wherever there is no checkout.
EXAMPLE_DISPATCHER_CONFIG = Path(__file__).resolve().parent / "dispatch" / "dispatcher.example.yaml"

app = typer.Typer(help="Serve routers and put them in front of models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _require_bench_extra() -> None:
    """The load tools drive the services with clients the services themselves do not need."""
    try:
        for module in ("httpx", "fastapi"):
            require(module, "bench")
    except PromptierError as error:
        fail(error)


def _bench_model(model: Path | None) -> str | None:
    """The artifact a bench's services load, checked here once (a bad one would otherwise show only as a
    service that never got ready) and made absolute (some of them run in scratch directories)."""
    if model is None:
        return None
    from classifier import load

    try:
        load(model)
    except PromptierError as error:
        fail(error)
    return str(model.resolve())


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
    handshake_timeout: Annotated[float, typer.Option(callback=finite,
                                                     min=0.001, help="seconds a new connection has to send "
                                                     "its HTTP/2 preface; slower ones are closed")] = 10.0,
    idle_timeout: Annotated[float, typer.Option(callback=finite,
                                                min=0, help="close a connection that has carried no call for "
                                                "this many seconds (0: never); gRPC clients reconnect by "
                                                "themselves")] = 300.0,
    max_connection_age: Annotated[float, typer.Option(callback=finite,
                                                      min=0, help="close connections older than this many "
                                                      "seconds (0: never), after 30 s more for calls in "
                                                      "flight")] = 0.0,
    keepalive: Annotated[float, typer.Option(callback=finite,
                                             min=0, help="ping a connection silent for this many seconds and "
                                             "close it if the client does not answer within 20 s (0: gRPC's "
                                             "default, 2 hours)")] = 60.0,
    max_connections: Annotated[int | None, typer.Option(min=1, help="connections open at once, per process; "
                                                        "more are closed on accept (default: the open-file "
                                                        "limit less 128, at most 10,000)")] = None,
    max_streams: Annotated[int, typer.Option(min=1, help="calls in flight per connection; a client queues "
                                             "more itself")] = 256,
    trust_caller_metadata: Annotated[bool, typer.Option(help="take the caller a proxy in front names in "
                                                        "x-promptier-caller as who a call is from (callers "
                                                        "take turns and hold a share of the batch queue); "
                                                        "else each connection is a caller")] = False,
) -> None:
    """Run the gRPC routing service (SIGTERM drains, SIGHUP reloads the model directory it started with).

    Admin.Reload: callers on this host only, or callers with the token in env PROMPTIER_ADMIN_TOKEN.
    Overload is refused at once with RESOURCE_EXHAUSTED: the queues are counted in prompts, with
    separate room for Classify and ClassifyBatch calls, so batch traffic cannot starve single calls.
    """
    import asyncio

    from serving.common.logs import configure_json_logging
    from serving.service.limits import ServerLimits
    from serving.service.server import serve_forever

    configure_json_logging()
    limits = ServerLimits(handshake_timeout_s=handshake_timeout, idle_timeout_s=idle_timeout or None,
                          max_connection_age_s=max_connection_age or None, keepalive_time_s=keepalive or None,
                          max_connections=max_connections, max_streams=max_streams,
                          trust_caller_metadata=trust_caller_metadata)
    if workers > 1:
        from classifier import load
        from serving.common.binding import ensure_port_free
        from serving.service.admin import ADMIN_TOKEN_ENV, check_admin_token
        from serving.service.workers import serve_workers

        if port == 0:
            raise typer.BadParameter("--workers needs a fixed --port: every worker binds the same one")

        try:
            load(model)  # a bad artifact fails here, once, before any worker starts
            ensure_port_free(host, port)  # and a port in use, before workers die trying to bind it
            check_admin_token(os.environ.get(ADMIN_TOKEN_ENV) or None)  # and a token no Admin call could send
        except PromptierError as error:
            fail(error)
        raise typer.Exit(serve_workers(workers, model, f"{host}:{port}", threads, metrics_port, limits))
    try:
        asyncio.run(serve_forever(model, f"{host}:{port}", threads, metrics_port, limits=limits))
    except PromptierError as error:
        fail(error)


@app.command()
def dispatch(
    config: Annotated[Path | None, typer.Option(help="dispatcher YAML config")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="dispatcher processes on the port (one core each)")] = 1,
    check: Annotated[bool, typer.Option("--check", help="validate the config (and the classifier's tiers), "
                                                        "print its fingerprint, and exit without serving")] = False,
    example: Annotated[bool, typer.Option("--example", help="print the package's commented example config and "
                                                            "exit (promptier dispatch --example > dispatcher.yaml)")
                       ] = False,
) -> None:
    """Run the OpenAI-compatible dispatcher in front of the tiers' upstreams (SIGHUP rereads the config).

    Slow callers: config `inbound:` (header_timeout_s, body_timeout_s: 408; max_connections: 503).

    Browsers: POST application/json (else 415); without inbound keys, Host: localhost, an IP or allowed_hosts (403).

    Tiers' `serves:` say what each model takes; operators' page: GET /promptier/savings.
    """
    from classifier import load
    from serving.common.binding import ensure_port_free
    from serving.common.logs import configure_json_logging
    from serving.dispatch.dispatch_config import load_dispatcher_config
    from serving.dispatch.dispatch_supervisor import run

    if example:
        typer.echo(EXAMPLE_DISPATCHER_CONFIG.read_text(encoding="utf-8"), nl=False)
        return
    if config is None:
        fail(PromptierError("--config is required: `promptier dispatch --example > dispatcher.yaml` writes a "
                            "commented example to start from"))
    configure_json_logging()
    try:
        settings = load_dispatcher_config(config)
        if check:  # before a SIGHUP: an edit that does not load is refused, and then a crash stops the dispatcher
            import asyncio

            from serving.dispatch.config_check import check_config

            checked = asyncio.run(check_config(settings))
            typer.echo(f"{config}: OK, config_fingerprint {settings.fingerprint}; {checked}")
            return
        if settings.classifier.embedded:
            load(settings.classifier.model)  # a bad artifact fails here, once, before any worker starts
        # A port in use: uvicorn would say only "[Errno 98] Address already in use" and exit 3, as for a worker
        # that cannot start.
        ensure_port_free(host, port)
    except PromptierError as error:
        fail(error)
    raise typer.Exit(run(config, host, port, workers))


@app.command("dispatch-bench")
def dispatch_bench(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-dispatch.json"),
    requests: Annotated[int, typer.Option(min=1, help="requests per measurement")] = 500,
    config_overlay: Annotated[Path | None, typer.Option(help="YAML whose top-level sections are added to every "
                                                        "dispatcher config of the bench (e.g. tenants and "
                                                        "spend_store, to measure their cost; not the sections "
                                                        "the bench sets: classifier, tiers, fallback_tier, "
                                                        "decision_log)")] = None,
    load: Annotated[bool, typer.Option(help="also measure under load with h2load, if installed")] = True,
) -> None:
    """Measure the latency the dispatcher adds over calling an upstream directly (loopback)."""
    _require_bench_extra()
    import yaml

    from classifier.yaml_files import load_yaml
    from serving.bench.dispatch_bench import BENCH_OWNED_SECTIONS
    from serving.bench.dispatch_bench import main as run_dispatch_bench

    overlay: dict | None = None
    if config_overlay is not None:
        try:
            read = load_yaml(config_overlay.read_text(encoding="utf-8"), str(config_overlay))
        except (OSError, yaml.YAMLError) as error:
            fail(error)
        if not isinstance(read, dict):
            fail(ValueError(f"{config_overlay}: a config overlay is a mapping of config sections"))
        # The bench's own sections say what each of its rows measures: an overlay that replaced them would
        # measure one setup under several names (or write the decision log where the bench cannot read it).
        owned = sorted(set(read) & set(BENCH_OWNED_SECTIONS))
        if owned:
            fail(ValueError(f"{config_overlay}: {', '.join(owned)} {'is' if len(owned) == 1 else 'are'} set by "
                            "the bench itself (each row's classifier, stand-in tiers and decision log); an "
                            "overlay adds other sections, such as tenants and spend_store"))
        overlay = read
    artifact = _bench_model(model)
    try:
        run_dispatch_bench(artifact, out, requests, overlay=overlay, load=load)
    except RuntimeError as error:  # a service it started exited or never got ready: its stderr says why
        fail(error)


@app.command("litellm-bench")
def litellm_bench(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-litellm.json"),
    requests: Annotated[int, typer.Option(min=10, help="requests of each kind")] = 300,
) -> None:
    """Measure the latency the Promptier LiteLLM callback adds to requests through a real LiteLLM proxy
    (loopback; needs the `bench` and `litellm` extras)."""
    import os

    # This process imports LiteLLM (through the callback's module) but prices nothing: without this, the
    # import tries to fetch LiteLLM's model cost map from the network.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    _require_bench_extra()
    try:
        require("litellm", "litellm")
    except PromptierError as error:
        fail(error)
    from serving.bench.litellm_bench import main as run_litellm_bench

    artifact = _bench_model(model)
    try:
        run_litellm_bench(artifact, out, requests)
    except RuntimeError as error:  # the proxy or the upstream exited or never got ready: their output says why
        fail(error)


@app.command("budget-sim")
def budget_sim(
    inputs: Annotated[list[str], typer.Argument(help="decision logs (promptier dispatch) or labeled logs "
                                                "(promptier label): .jsonl or .parquet files or globs")],
    budget_usd: Annotated[float | None, typer.Option(callback=finite,
                                                     min=0.0, help="the period's budget in USD")] = None,
    budget_share: Annotated[float | None, typer.Option(callback=finite,
                                                       min=0.0, help="the budget as a share of the unpaced "
                                                       "spend of these requests (default 0.5)")] = None,
    config: Annotated[Path | None, typer.Option(help="dispatcher config: take --tenant's budget settings and "
                                                "allowed tiers from it (the paced row is replayed even for a "
                                                "tenant with pacing off)")] = None,
    tenant: Annotated[str | None, typer.Option(help="replay only this tenant's rows of a decision log")] = None,
    max_quality_loss: Annotated[float | None, typer.Option(callback=finite,
                                                           min=0.0, max=1.0, help="pacing's quality floor "
                                                           "(default: the config's, else 0.5)")] = None,
    pacing_band: Annotated[float | None, typer.Option(callback=finite,
                                                      min=0.001, max=1.0, help="(default: the config's, "
                                                      "else 0.1)")] = None,
    on_exhausted: Annotated[str | None, typer.Option(help="cheapest | reject (default: the config's, else "
                                                     "cheapest)")] = None,
    model: Annotated[Path | None, typer.Option(help="artifact whose tiers and prices to use (default: the "
                                               "--config's embedded model, else the shipped one)")] = None,
    prompt_tokens: Annotated[int, typer.Option(min=0, help="for rows without usage")] = 500,
    completion_tokens: Annotated[int, typer.Option(min=0, help="for rows without usage")] = 300,
    arrival: Annotated[str, typer.Option(help="uniform: evenly over the period in file order; logged: by each "
                                         "row's time")] = "uniform",
    out: Annotated[Path, typer.Option(help="JSON report")] = Path("budget-sim.json"),
    png: Annotated[Path | None, typer.Option(help="plot of spend over the period (needs matplotlib; default: "
                                             "the --out path with .png)")] = None,
) -> None:
    """Replay logged requests over one budget period: spend and downgrades unpaced, under a hard cap, and
    paced (the dispatcher's own pacing code)."""
    from serving.dispatch.budget_sim import main as run_budget_sim

    if arrival not in ("uniform", "logged"):
        raise typer.BadParameter(f"--arrival must be uniform or logged, not {arrival!r}")
    if on_exhausted not in (None, "cheapest", "reject"):
        raise typer.BadParameter(f"--on-exhausted must be cheapest or reject, not {on_exhausted!r}")
    if budget_usd is not None and budget_share is not None:
        raise typer.BadParameter("give --budget-usd or --budget-share, not both")
    for name, value in (("--budget-usd", budget_usd), ("--budget-share", budget_share),
                        ("--max-quality-loss", max_quality_loss)):
        if value is not None and value <= 0:  # a budget of nothing has no pace; a floor of 0 moves nothing
            raise typer.BadParameter(f"{name} must be greater than 0, got {value}")
    try:
        from classifier.labeling import expand_inputs
        from serving.dispatch.tenant_config import BudgetConfig

        # As `promptier label` reads its inputs: a glob, a rotated log (`decisions.jsonl.1`), and a clear
        # refusal of a directory or a missing file, before any model is loaded.
        files = expand_inputs(inputs)

        settings = BudgetConfig(usd=1.0)  # the config's defaults; usd is replaced below
        allowed = None
        period = None
        if config is not None:
            from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig, read_config

            # The config's settings alone: a replay sends nothing, so the keys it names need not be set.
            dispatcher_config = read_config(config, DispatcherConfig)
            tenants = dispatcher_config.tenants
            if model is None and dispatcher_config.classifier.embedded:
                model = dispatcher_config.classifier.model  # the prices this dispatcher charges (None: shipped)
            elif model is None:
                print("budget-sim: the config's classifier is a gRPC service, whose model a replay cannot ask: "
                      "tiers and prices are the shipped model's; give --model the artifact it serves",
                      file=sys.stderr)
            chosen = tenants.get(tenant) if tenant is not None else None
            if chosen is None or chosen.budget is None:
                raise ConfigError(f"{config}: --tenant must name a tenant with a budget "
                                  f"(these have one: {[name for name, t in tenants.items() if t.budget]})")
            budget = settings = chosen.budget
            allowed = chosen.allowed_tiers
            period = budget.period
            if budget_share is None and budget_usd is None:
                budget_usd = budget.usd
        run_budget_sim(files, out, png or out.with_suffix(".png"), budget_usd=budget_usd, budget_share=budget_share,
                       band=pacing_band if pacing_band is not None else settings.pacing_band,
                       max_quality_loss=max_quality_loss if max_quality_loss is not None else settings.max_quality_loss,
                       on_exhausted=on_exhausted or settings.on_exhausted,  # type: ignore[arg-type]
                       model=model, default_tokens=(prompt_tokens, completion_tokens), arrival=arrival,
                       tenant=tenant, allowed_tiers=allowed, period=period)
    except (PromptierError, OSError) as error:
        fail(error)


@app.command()
def loadtest(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-serving.json"),
    seconds: Annotated[float, typer.Option(callback=finite, min=1.0, help="duration of each scenario")] = 8.0,
    workers: Annotated[int, typer.Option(min=1, help="also test a server with this many processes")] = 2,
    generator: Annotated[str, typer.Option(help="auto (h2load if installed), h2load, or python")] = "auto",
) -> None:
    """Load-test a real `promptier serve` on loopback, with one server process and with `--workers`: unary
    calls at concurrency 1, 32 and 128, batch calls, the coalescing clients and the transport floors."""
    from serving.bench.loadgen import main as run_loadtest

    if generator not in ("auto", "h2load", "python"):
        raise typer.BadParameter(f"--generator must be auto, h2load or python, not {generator!r}")
    artifact = _bench_model(model)  # outside the try: its refusal (typer.Exit) is a RuntimeError too
    try:
        run_loadtest(artifact, out, seconds, workers, generator)
    except (FileNotFoundError, RuntimeError) as error:
        fail(error)


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(callback=finite,
                                           min=0.1, help="length of the window everything runs at once (the "
                                           "first label round starts 5 s into it)")] = 5.0,
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON report")] = Path("bench-soak.json"),
    deadline_ms: Annotated[float, typer.Option(callback=finite,
                                               min=1, help="deadline of each well-behaved Classify call")] = 50.0,
    well_behaved_rate: Annotated[float, typer.Option(callback=finite,
                                                     min=0.1, help="well-behaved Classify calls per second")] = 20.0,
    flood_factor: Annotated[float, typer.Option(callback=finite,
                                                min=0.1, help="the flood, as a multiple of the service's "
                                                "capacity measured just before")] = 2.0,
    slow_connections: Annotated[int, typer.Option(min=0, help="slow connections held to each of the gRPC and "
                                                  "dispatcher ports")] = 200,
    dispatch_rate: Annotated[float, typer.Option(callback=finite,
                                                 min=0.1, help="chat completions per second through the "
                                                 "dispatcher")] = 20.0,
    label_rows: Annotated[int, typer.Option(min=1, help="rows of the generated labeling input")] = 20_000,
    label_every: Annotated[float, typer.Option(callback=finite, min=1, help="seconds between label rounds")] = 60.0,
    chaos_every: Annotated[float, typer.Option(callback=finite,
                                               min=3, help="seconds between serve worker kills (and between "
                                               "reloads)")] = 60.0,
) -> None:
    """Chaos and soak on loopback: flood, slow connections, odd upstreams, worker kills, reloads and
    concurrent label jobs, all at once; prints a table and writes a JSON report.

    Exit code 0 only if the bars held: well-behaved calls served >= 99%, paid upstream answers delivered
    100%, no labeled row lost or duplicated, exactly one label job of each pair run (the other refused),
    no crash; 1 if one did not; 2 if the soak could not start.
    """
    _require_bench_extra()
    from serving.bench.soak import SoakOptions
    from serving.bench.soak import main as run_soak

    artifact = _bench_model(model)  # a bad artifact is named now, not after the services failed to start
    options = SoakOptions(minutes=minutes, model=Path(artifact) if artifact else None, deadline_ms=deadline_ms,
                          well_behaved_rate=well_behaved_rate,
                          flood_factor=flood_factor, slow_connections=slow_connections, dispatch_rate=dispatch_rate,
                          label_rows=label_rows, label_every_s=label_every, chaos_every_s=chaos_every)
    try:
        report = run_soak(options, out)
    except (RuntimeError, TimeoutError) as error:
        fail(error)
    raise typer.Exit(0 if report["passed"] else 1)
