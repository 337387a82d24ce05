"""The `promptier` command, and the runtime's own subcommands (`classify`, `label`, `bench`).

Each package keeps its commands in its own `cli` module (`training.cli`, `serving.cli`); the
package's `pyproject.toml` names every subcommand under the entry-point group `promptier.commands`.
The command loads only the module of the subcommand it runs, so `promptier serve` never imports
training code and this package imports neither of the others. Each module imports its heavy
dependencies inside the command, so that `promptier --help` stays fast.
"""

from __future__ import annotations

import json
import math
import sys
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from classifier.errors import PromptierError, validation_problems

COMMAND_GROUP = "promptier.commands"
HELP = "Promptier: route each prompt to the cheapest LLM tier that answers it well."

# rich_markup_mode None: click's own help, which wraps each option's text beside it at any terminal width,
# where rich's boxed tables cut long option names short (`--handshake-time…`) at 80 columns.
app = typer.Typer(help="The runtime's commands.", no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


def fail(error: Exception) -> NoReturn:
    """End a command with the error's message on stderr and exit status 2 (no traceback).

    A pydantic ValidationError (a config or a recorded recipe with a bad field) is shown as one
    `field.path: message` line per problem.
    """
    from pydantic import ValidationError

    message = str(error)
    if isinstance(error, ValidationError):
        message = f"invalid {error.title}:\n  " + "\n  ".join(validation_problems(error))
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def finite(value: float | None) -> float | None:
    """A typer callback for float options: `nan` and `inf` parse as floats, and a duration, a budget or
    a rate of either would run forever or write figures no JSON reader takes."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


@cache
def _commands() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=COMMAND_GROUP)}


def command_line(args: list[str]) -> typer.Typer:
    """The `promptier` app for these arguments: the commands of the package that owns the subcommand
    named, or of every package when none is (`promptier --help`)."""
    commands = _commands()
    if not commands:
        raise SystemExit(f"promptier: no commands are installed (entry points {COMMAND_GROUP}); "
                         "reinstall the package: pip install -e .")
    named = next((arg for arg in args if not arg.startswith("-")), None)
    entries = [commands[named]] if named in commands else list(commands.values())
    root = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)

    @root.callback()
    def _group() -> None:
        """Keeps `root` a group of subcommands even with one command registered."""

    for entry in {entry.value: entry for entry in entries}.values():  # each package's app once
        package_app = entry.load()
        if not isinstance(package_app, typer.Typer):
            raise TypeError(f"entry point {entry.value} of {COMMAND_GROUP} is not a Typer app")
        root.registered_commands += package_app.registered_commands
    return root


@app.command()
def classify(
    text: Annotated[str, typer.Argument(help="the prompt; - reads it from standard input (put -- before a "
                                            "prompt that starts with -)")],
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    mode: Annotated[str | None, typer.Option(help="quality | balanced | cost")] = None,
    threshold: Annotated[float | None, typer.Option(callback=finite, help="raw threshold in [0, 1]")] = None,
    top_share: Annotated[float | None, typer.Option(callback=finite,
                                                    help="target share of top-tier calls in [0, 1]")] = None,
    allowed_tier: Annotated[list[str] | None, typer.Option(help="a tier this request may go to (repeat it)")] = None,
) -> None:
    """Classify one prompt and print the routing decision as JSON."""
    import sys
    from dataclasses import asdict

    import classifier

    try:
        # A long prompt or a file does not fit an argument list. Bytes: the runtime decodes them and
        # names the first byte that is not UTF-8.
        prompt: str | bytes = sys.stdin.buffer.read() if text == "-" else text
        runtime = classifier.load(model)
        request = classifier.RoutingRequest(mode=mode, threshold=threshold, top_share=top_share,
                                            allowed_tiers=tuple(allowed_tier) if allowed_tier else None)
        result = runtime.classify(prompt, request)  # type: ignore[arg-type]
    except PromptierError as error:
        fail(error)
    typer.echo(json.dumps(asdict(result), indent=2))


@app.command()
def label(
    inputs: Annotated[list[str], typer.Argument(help="JSONL, Parquet or CSV files or globs")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .jsonl or .parquet")],
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    mode: Annotated[str | None, typer.Option(help="quality | balanced | cost")] = None,
    threshold: Annotated[float | None, typer.Option(callback=finite)] = None,
    prompt_column: Annotated[str, typer.Option()] = "prompt",
    id_column: Annotated[str | None, typer.Option(
        help="the column of each row's id (a row without one is named FILE:N)  [default: prompt_id]")] = None,
    messages_column: Annotated[str, typer.Option(help="chat-style rows: list of {role, content}")] = "messages",
    keep: Annotated[list[str] | None, typer.Option(help="input columns to copy to the output")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="processes (default: all cores); with --engine ray, model actors (default: 2)")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1)] = 4096,
    resume: Annotated[bool, typer.Option(help="continue an interrupted job (local engine); a no-op for a job "
                                              "that already finished")] = False,
    engine: Annotated[str, typer.Option(help="local | ray")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="existing Ray cluster (default: start a local one)")] = None,
) -> None:
    """Label prompt files with the tier each prompt needs (one output row per input row, in input order).

    A row that cannot be labeled (broken or too deeply nested JSON, a JSONL line over 32 MiB, missing
    or non-string prompt, invalid text, a CSV line with the wrong number of fields) gets an `error`
    and null decision fields; the job goes on. A UTF-8 BOM at the start of a file is ignored. An
    --id-column you name that no input has is refused when the inputs are Parquet, and named on the
    console after the job when no labeled row had a value in it.

    One job per output: OUTPUT.lock is held for the whole job, and a second job on the same output
    fails at once, naming the job that holds it. An existing OUTPUT is never replaced: remove it
    first. An interrupted job (OUTPUT.parts) continues with --resume only if its inputs (path, size,
    modification time), model and options are unchanged; --resume of an output this job already
    finished does nothing (OUTPUT.job.json records the job). The local engine's workers exit when
    the job process dies, even by kill -9.

    A write error (disk full) removes the temporary files, keeps the finished parts, and exits with
    status 2, as do all refusals; make room and rerun with --resume. A job whose every row failed
    (a mistyped --prompt-column, say) writes its output and exits with status 1.
    """
    import time

    from classifier.labeling import LabelOptions, label_files
    from classifier.labeling_output import every_row_failed

    # A named id column is checked (a typo would name every row FILE:N); the default need not be the input's.
    named_id = id_column is not None
    if id_column is None:
        id_column = LabelOptions.id_column
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

            stats = label_with_ray(inputs, output, options, address=ray_address, actors=workers or 2,
                                   id_column_given=named_id)
        elif engine == "local":
            if ray_address:
                raise PromptierError("--ray-address needs --engine ray")
            stats = label_files(inputs, output, options, workers=workers, resume=resume, id_column_given=named_id)
        else:
            raise PromptierError(f"unknown engine {engine!r}; use local or ray")
    except PromptierError as error:
        fail(error)
    except KeyboardInterrupt:
        hint = "; the finished parts are kept: rerun the same command with --resume" if engine == "local" else ""
        typer.secho(f"interrupted{hint}", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    if stats.complete:
        typer.echo(f"{output} is already complete ({stats.resumed_rows} rows, labeled earlier by this job); "
                   "nothing to do")
        return
    elapsed = time.perf_counter() - started
    typer.echo(f"labeled {stats.rows} rows ({stats.errors} with errors, {stats.resumed_rows} resumed) in "
               f"{elapsed:.1f} s ({stats.rows / max(elapsed, 1e-9):,.0f} rows/s); tiers {stats.tiers} -> {output}")
    for column in options.keep_columns:
        if stats.rows and not stats.kept_values.get(column):
            typer.secho(f"--keep {column!r}: none of the {stats.rows} rows labeled has a value there: is it a "
                        "column of the input?", fg=typer.colors.YELLOW, err=True)
    if named_id and stats.rows and not stats.id_values:
        typer.secho(f"--id-column {id_column!r}: none of the {stats.rows} rows labeled has a value there, so each "
                    "is named FILE:N: is it a column of the input?", fg=typer.colors.YELLOW, err=True)
    # The job, not this run, is judged: rows an interrupted run labeled count too.
    if stats.rows and stats.errors == stats.rows and (not stats.resumed_rows or every_row_failed(output)):
        typer.secho(f"every row failed (see the error column of {output}): is --prompt-column "
                    f"({prompt_column!r}) or --messages-column ({messages_column!r}) the input's?",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("bench.json"),
    iterations: Annotated[int, typer.Option(min=1, help="timed calls per length bucket (the 100k-character "
                                                   "bucket: a quarter of them, at least 200)")] = 2000,
    seconds: Annotated[float, typer.Option(callback=finite, help="duration of each throughput run, above 0")] = 5.0,
) -> None:
    """Measure the runtime: p50/p90/p99/max latency by length, batched throughput, peak RSS.

    OUT's folder is created if missing, and checked writable before anything is measured."""
    from classifier.bench import main as run_bench

    if seconds <= 0:  # throughput is prompts over this window (typer's min cannot exclude 0 itself)
        raise typer.BadParameter(f"--seconds must be greater than 0, got {seconds}")
    try:
        run_bench(str(model) if model else None, out, iterations, seconds)
    except PromptierError as error:
        fail(error)


def main() -> None:
    """Entry point of the `promptier` command."""
    command_line(sys.argv[1:])()


if __name__ == "__main__":
    main()
