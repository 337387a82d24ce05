"""`promptier train`, `eval` and `export`: the training product's commands (they need the `train` extra).

Registered with the `promptier` command through the `promptier.commands` entry points (see
`classifier.cli`); heavy imports happen inside each command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from classifier.artifact_layout import check_destination
from classifier.cli import fail, finite
from classifier.errors import PromptierError

if TYPE_CHECKING:
    from classifier.artifact import ArtifactManifest
    from training.config import TrainConfig

app = typer.Typer(help="Train and evaluate routers.", no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

LogsOption = Annotated[list[Path], typer.Option(
    "--logs", help="a log file, directory or quoted glob pattern (JSONL/Parquet); repeat for more")]
DEFAULT_DISTILL_WEIGHT = 0.5
PoolOption = Annotated[Path, typer.Option("--pool", help="pool YAML: tiers, prices, models per source")]


def _require_training_extra() -> None:
    """Training, evaluation and export need the `train` extra; say how to install it, not a traceback."""
    from classifier.errors import require

    try:
        for module in ("torch", "transformers", "sklearn"):
            require(module, "train")
    except PromptierError as error:
        fail(error)


@app.command()
def train(
    logs: LogsOption,
    pool: PoolOption,
    out: Annotated[Path, typer.Option(help="artifact directory to write")],
    config: Annotated[Path | None, typer.Option(help="training config YAML, or a recipe of the package by name "
                                                     "(`default` is the shipped model's); without it, the "
                                                     "built-in defaults")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="checkpoints (default: OUT.work); rerun to resume")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid rows and report them")] = False,
    teacher: Annotated[Path | None, typer.Option(help="distil from this artifact's probabilities")] = None,
    unlabeled: Annotated[list[Path] | None, typer.Option(help="prompts without outcomes (e.g. your gateway's "
                                                               "traffic; JSONL or Parquet with a `prompt` column), "
                                                               "learned from the teacher's labels: --teacher's or "
                                                               "the recipe's embedding teacher's")] = None,
    distill_weight: Annotated[float | None, typer.Option(callback=finite,
        min=0, max=1, help="weight of the teacher's probabilities in the targets (1 = pure distillation): "
        f"--teacher's (default {DEFAULT_DISTILL_WEIGHT}), else the recipe's embedding teacher's (overrides the "
        "config's teacher.distill_weight)")] = None,
    epochs: Annotated[float | None, typer.Option(callback=finite)] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    holdout_source: Annotated[list[str] | None, typer.Option(help="put a whole source in test")] = None,
    holdout_category: Annotated[list[str] | None, typer.Option(help="put a whole category in test")] = None,
    model_version: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto (a GPU when torch sees one), cpu or cuda; "
                                                    "overrides the config's")] = None,
    precision: Annotated[str | None, typer.Option(help="on a GPU: auto (bf16, else fp16), fp32, bf16 or fp16; "
                                                       "always fp32 on a CPU")] = None,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="stream the logs (memory bounded by "
                                                "the held-out prompts; split by prompt hash)")] = None,
    processes: Annotated[int, typer.Option(min=1, help="data-parallel processes on this machine, started with "
                                                       "torchrun (one per GPU with --device cuda)")] = 1,
    init_from: Annotated[Path | None, typer.Option(help="continue this artifact's training checkpoint on LOGS (same "
                                                        "tiers, its recipe unless --config); promoted to OUT only "
                                                        "if not worse on the new held-out prompts")] = None,
    force: Annotated[bool, typer.Option(help="with --init-from: promote even if worse")] = False,
) -> None:
    """Train a calibrated tier classifier on routing logs and write an evaluated ONNX artifact."""
    _require_training_extra()
    # The launcher of --processes N only starts torchrun: it imports no torch (and holds no memory).
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if init_from is not None and (teacher is not None or unlabeled or distill_weight is not None):
        fail(PromptierError("--init-from continues a model on new logs alone: --teacher, --unlabeled and "
                            "--distill-weight need a fresh run (leave out --init-from)"))
    try:
        check_destination(out)  # before hours of training, not at the end
    except PromptierError as error:
        fail(error)
    if processes > 1 and world_size == 1:
        from training.config import load_config

        try:
            if distill_weight is not None and teacher is None:  # refused here once, not by every process
                _with_distill_weight(load_config(config), teacher, distill_weight)
            check_gpus_for_processes(processes, _requested_device(device, config, init_from), visible_gpus())
        except (PromptierError, ValueError, OSError) as error:
            fail(error)
        _launch(processes, {"logs": logs, "pool": pool, "out": out, "config": config, "work_dir": work_dir,
                            "skip_invalid": skip_invalid, "teacher": teacher, "unlabeled": unlabeled,
                            "distill_weight": distill_weight, "epochs": epochs, "seed": seed,
                            "holdout_source": holdout_source, "holdout_category": holdout_category,
                            "model_version": model_version, "device": device, "precision": precision,
                            "stream": stream, "processes": processes, "init_from": init_from, "force": force})
        return
    from training.config import load_config
    from training.pipeline import train as run_training

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    overrides = {"epochs": epochs, "seed": seed, "holdout_sources": holdout_source,
                 "holdout_categories": holdout_category, "device": device, "precision": precision, "streaming": stream}
    command = "promptier " + shlex.join(sys.argv[1:])
    if init_from is not None:
        _retrain(init_from, logs, pool, out, config, overrides, force, work_dir, skip_invalid, model_version, command)
        return
    if config is None and rank == 0:
        typer.secho("no --config: training/config.py's built-in defaults (a whole MiniLM fine-tune, no anchors, no "
                    "student), not the shipped recipe: pass --config training/configs/default.yaml for that",
                    fg=typer.colors.YELLOW, err=True)
    try:
        cfg = _with_distill_weight(load_config(config, **overrides), teacher, distill_weight)
        manifest = run_training(logs, pool, out, cfg, work_dir=work_dir, skip_invalid=skip_invalid,
                                teacher=teacher, unlabeled=unlabeled or (),
                                distill_weight=DEFAULT_DISTILL_WEIGHT if distill_weight is None else distill_weight,
                                model_version=model_version, command=command,
                                cache_dir=Path.home() / ".cache" / "promptier")
    except (PromptierError, ValueError, OSError) as error:
        fail(error)
    except KeyboardInterrupt:
        _interrupted(out)
    if manifest is None:  # a process of a distributed run other than the main one
        return
    typer.echo(f"wrote {out} ({manifest.model_version}); thresholds {manifest.policy.thresholds}")
    test = manifest.metrics.get("test")
    if isinstance(test, dict):
        for group, methods in test.items():
            typer.echo(f"  {group}: APGR {methods['promptier']['apgr']:.4f}")


def _interrupted(out: Path) -> NoReturn:
    """End a training run stopped by Ctrl-C with what to do next: typer would exit with status 130 and
    say nothing, leaving the user to guess whether the minutes trained are lost."""
    typer.secho(f"interrupted: {out} is as it was; rerun the same command to resume from the last checkpoint",
                fg=typer.colors.RED, err=True)
    raise typer.Exit(130)


def _with_distill_weight(config: TrainConfig, teacher: Path | None, distill_weight: float | None) -> TrainConfig:
    """The config with `--distill-weight` applied to the recipe's embedding teacher, when there is no
    `--teacher` artifact for it to weight; refused when neither teacher exists, as a flag that changes
    nothing would let a run look like something it is not."""
    if distill_weight is None or teacher is not None:
        return config
    if config.teacher is None:
        raise PromptierError("--distill-weight weights a teacher's probabilities: pass --teacher, or use a recipe "
                             "with an embedding teacher (training/configs/default.yaml)")
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"distill_weight": distill_weight})})


def _retrain(previous: Path, logs: list[Path], pool: Path, out: Path, config: Path | None, overrides: dict,
             force: bool, work_dir: Path | None, skip_invalid: bool, model_version: str | None, command: str) -> None:
    """`train --init-from`: continue, compare, promote or not (exit status 3 when not promoted)."""
    from training.config import load_config
    from training.generalization_report import format_lead
    from training.retrain import retrain

    try:
        result = retrain(previous, logs, pool, out, load_config(config, **overrides) if config else None,
                         force=force, work_dir=work_dir, skip_invalid=skip_invalid, model_version=model_version,
                         command=command, cache_dir=Path.home() / ".cache" / "promptier", overrides=overrides)
    except (PromptierError, ValueError, FileNotFoundError) as error:
        fail(error)
    except KeyboardInterrupt:
        _interrupted(out)
    if result is None:  # a process of a distributed run other than the main one
        return
    comparison = result.comparison
    typer.echo(f"on {comparison['prompts']} held-out prompts of the new logs (APGR, previous -> new):")
    for group, values in comparison["apgr"].items():
        typer.echo(f"  {group}: {values['previous']:.4f} -> {values['new']:.4f}")
    lead = comparison.get("lead")
    if lead is not None:
        typer.echo(f"  lead of the new model: {format_lead(lead)} (95% paired-bootstrap interval)")
        if lead["ci95"][0] <= 0 <= lead["ci95"][1]:
            # "Not worse" on a handful of prompts is a coin toss: whoever promotes on it should know.
            typer.secho(f"the {comparison['comparable_prompts']} held-out prompts known on two tiers cannot tell "
                        "the two models apart (the interval spans zero): compare them with `promptier eval` on "
                        "more judged prompts before relying on this decision", fg=typer.colors.YELLOW, err=True)
    sense = comparison.get("common_sense")
    if isinstance(sense, dict):
        typer.echo(f"on the probe suite's {sense['probes']} {sense['half']}-half prompts of obvious difficulty "
                   f"(AUC, previous -> new): {sense['previous_auc']:.3f} -> {sense['new_auc']:.3f}")
    if result.promoted:
        kept = f"; the artifact it replaces is at {result.rollback}" if result.rollback else ""
        typer.echo(f"promoted {result.manifest.model_version} to {result.location}{kept}")
        return
    typer.secho(f"not promoted: {_why_not_promoted(result.manifest.model_version, comparison)}; it is at "
                f"{result.location} (rerun with --force to promote it)", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(3)


def _why_not_promoted(version: str, comparison: dict) -> str:
    """Why a continued model was not promoted: worse than the model it continued, or not comparable with
    it at all (no held-out prompt known on two tiers, so both APGRs are 0 and measure nothing)."""
    previous = comparison["previous_model_version"]
    sense = comparison.get("common_sense")
    if isinstance(sense, dict) and sense["lost"] and comparison["worse"] is False:
        return (f"{version} ranks the probe suite's prompts of obvious difficulty far worse than {previous} (AUC "
                f"{sense['new_auc']:.3f} against {sense['previous_auc']:.3f}), though the new logs score it no "
                "worse: they may score answers backwards (a judge whose scale is inverted?) or teach it something "
                "that does not hold outside them")
    if comparison["worse"] is None:
        return (f"{version} and {previous} cannot be compared: none of the {comparison['prompts']} held-out "
                "prompts of the new logs that neither saw has outcomes on two tiers (the cheapest and a more "
                "capable one). A decision log knows one tier per request: add judged prompts that "
                f"{previous} never saw (benchmark logs, or a sample judged on every tier)")
    return f"{version} is worse than {previous} on the new logs"


def _requested_device(device: str | None, config: Path | None, init_from: Path | None) -> str:
    """The device every process of the run will ask for: `--device`, else the config's, else (continuing
    a model without `--config`) its recorded recipe's, else the built-in default."""
    from training.config import load_config

    if init_from is not None and config is None and device is None:
        from classifier.artifact import load_manifest

        recorded = load_manifest(init_from).training.get("config")
        return str(recorded.get("device", "auto")) if isinstance(recorded, dict) else "auto"
    return load_config(config, device=device).device


def visible_gpus() -> int:
    """How many GPUs torch sees here, asked of a short-lived child process: the launcher itself imports no
    torch, so that it holds no memory while the run trains. 0 when torch cannot be asked."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)
    try:
        return int(probe.stdout.strip()) if probe.returncode == 0 else 0
    except ValueError:
        return 0


def check_gpus_for_processes(processes: int, device: str, gpus: int) -> None:
    """Refuse `--processes N` that cannot start, before torchrun does: where torch sees GPUs, `auto` and
    `cuda` give each process a GPU of its own, so with fewer GPUs than processes the extra ones would fail
    only once the others had started.

    Raises:
        PromptierError: `cuda` without a GPU, or fewer GPUs than processes under `auto` or `cuda`.
    """
    if device == "cpu":
        return
    if device == "cuda" and gpus == 0:
        raise PromptierError("device 'cuda' was asked for, but torch sees no CUDA device here; use --device cpu "
                             "or auto")
    if 0 < gpus < processes:
        raise PromptierError(f"--processes {processes} with device '{device}' trains one process per GPU, and torch "
                             f"sees {gpus} GPU{'s' if gpus > 1 else ''} here: use --processes {gpus}, or --device "
                             f"cpu for {processes} CPU processes")


def _launch(processes: int, options: dict[str, object]) -> None:
    """Run this same `train` command as `processes` processes under torchrun (PyTorch's launcher),
    on this machine, at a free port; exit with its status.

    Stopping the launcher (SIGTERM, SIGHUP, or its death) stops torchrun and, through it, every process of
    the run: none is left training on.
    """
    arguments = ["train"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or (value is False and name != "stream"):
            continue  # the defaults: left out, so that the recorded command reads as it was typed
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                arguments += [flag, str(item)]
        else:
            arguments += [flag, str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               # "--": torchrun's own parser would otherwise claim --logs (a prefix of its --logs-specs).
               "-m", "training.cli", "--", *arguments]
    typer.echo(f"starting {processes} processes: {shlex.join(command)}", err=True)
    # torchrun stops its workers when it is signalled, but nothing tells it that this launcher was: a
    # `kill` of the command the user started would leave the run training on, to write OUT later.
    launched = subprocess.Popen(command, preexec_fn=_stop_with_parent)
    with _forwarding_signals(launched):
        status = launched.wait()
    if status:
        raise typer.Exit(status)


# Signals that ask the launcher to stop, passed on to torchrun (SIGINT reaches it from the terminal itself).
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_with_parent() -> None:
    """In the child, before torchrun starts: have Linux send it SIGTERM when the launcher dies, however
    it dies (kill -9 included), so that it stops its workers."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def _forwarding_signals(process: subprocess.Popen) -> Iterator[None]:
    """Pass the signals that stop the launcher on to `process` while the block runs, and wait for it."""
    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@app.command("train-bench")
def train_bench(
    rows: Annotated[str, typer.Option(help="synthetic log sizes in rows, comma-separated (full run: "
                                          "100000,1000000)")] = "100000",
    devices: Annotated[str, typer.Option(help="'available' (the CPU, and CUDA when present), or cpu,cuda")
                       ] = "available",
    processes: Annotated[str, typer.Option(help="data-parallel process counts to compare")] = "1,2",
    reading: Annotated[str, typer.Option(help="streamed, memory, or both comma-separated")] = "streamed",
    max_steps: Annotated[int, typer.Option(min=1, help="training steps per run (global batches of 32)")] = 200,
    backbone: Annotated[str, typer.Option(help="'minilm-l6' (the shipped model's), 'tiny' (the test fixture's) "
                                               "or a model directory")] = "minilm-l6",
    prompt_chars: Annotated[int, typer.Option(min=10, help="characters per synthetic prompt")] = 1000,
    recipe: Annotated[Path | None, typer.Option(help="training config to run (default: the shipped recipe); "
                                                     "its teacher is dropped")] = None,
    work_dir: Annotated[Path, typer.Option(help="synthetic logs (kept for reuse), models, per-run logs")
                        ] = Path("train-bench.work"),
    out: Annotated[Path, typer.Option(help="JSON results")] = Path("train-bench.json"),
    timeout: Annotated[float, typer.Option(callback=finite,
                                           help="seconds before a run is stopped, with every process it "
                                                "started")] = 3600.0,
) -> None:
    """Measure training: prompts/s and peak memory on synthetic logs, per device and process count.

    Every option is checked before the synthetic logs are written (exit status 2 when one is wrong).
    Exit status 1 when any run failed or timed out: each is named, and the JSON keeps the others' figures."""
    _require_training_extra()
    from training.bench import failed_runs, plan_runs, run_bench
    from training.config import SHIPPED_RECIPE

    try:
        sizes, run_modes = plan_runs(rows, devices, processes, reading, max_steps, backbone,
                                     recipe or SHIPPED_RECIPE, timeout, work_dir, out)
        report = run_bench(sizes, run_modes, max_steps, backbone, prompt_chars, work_dir, out, timeout,
                           recipe or SHIPPED_RECIPE)
    except (PromptierError, ValueError, OSError) as error:
        fail(error)
    typer.echo(f"wrote {out}")
    failed = failed_runs(report)
    if failed:
        typer.secho(f"{len(failed)} of {len(report['runs'])} runs failed:\n  " + "\n  ".join(failed),
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    logs: LogsOption,
    pool: PoolOption,
    model: Annotated[Path | None, typer.Option(help="artifact directory (default: the shipped model)")] = None,
    out: Annotated[Path | None, typer.Option(help="report directory (default: MODEL/eval; runs/eval for the "
                                                  "shipped model, which is part of the installed package)")] = None,
    embedding_baseline: Annotated[bool, typer.Option(help="include the MiniLM embedding baseline")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="embedding cache (default ~/.cache/promptier)")] = None,
    skip_invalid: Annotated[bool, typer.Option()] = False,
    record: Annotated[bool, typer.Option(help="store the results in the artifact (manifest, eval files, "
                                               "model card)")] = False,
    loso: Annotated[bool, typer.Option("--loso", help="also retrain the model's recipe once per source with that "
                                                     "source held out, and score it there")] = False,
    loso_traffic: Annotated[bool, typer.Option("--loso-traffic", help="with --loso, also retrain each fold with "
                                                                     "the texts of half the held-out source's "
                                                                     "prompts unlabeled (as a customer's traffic "
                                                                     "without outcomes), scored on the other "
                                                                     "half")] = False,
    loso_seeds: Annotated[str | None, typer.Option(help="also run leave-one-source-out once per seed (e.g. "
                                                        "13,14,15) and judge each held-out source on the mean")] = None,
    seeds: Annotated[str | None, typer.Option(help="also retrain the recipe with these seeds (e.g. 13,14,15) and "
                                                   "report the spread of its in-distribution APGR")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="where --loso, --loso-seeds and --seeds train (default: "
                                                       "MODEL.generalization; runs/generalization for the shipped "
                                                       "model)")] = None,
) -> None:
    """Evaluate a model against baselines on the prompts of LOGS it never saw, and on the probe suite."""
    _require_training_extra()
    import classifier

    model = model or classifier.DEFAULT_MODEL_DIR
    out_given = out is not None
    if model.resolve() == classifier.DEFAULT_MODEL_DIR.resolve():
        # The shipped model lives in the installed package: reports go where the command runs.
        work_dir = work_dir or Path("runs") / "generalization"
        out = out or Path("runs") / "eval"
    from classifier.artifact import load_manifest
    from classifier.artifact_layout import EVAL_FILES, EVAL_MD_FILE, EVAL_REPORT_DIR
    from training.data import read_logs
    from training.evaluate import evaluate_logs
    from training.inputs import warn_unmapped_sources, warn_unseen_pool_models
    from training.labels import build_table
    from training.model import backbone_directory
    from training.pool import load_pool

    try:
        if record and out_given:
            raise PromptierError("--record writes the results into MODEL, and --out names where they go without "
                                 "it: pass one of them")
        if record and not os.access(model, os.W_OK):
            # Found at the end, after the whole evaluation (and any --loso retraining), as a temporary file's error.
            raise PromptierError(f"--record writes into {model}, which this user cannot write: make it writable, or "
                                 "pass --out instead")
        if out_given and out is not None and out.resolve() == model.resolve():
            # Written there, these logs' figures would replace the artifact's own test-split evaluation, which
            # the model card is rendered from, while its manifest kept the old ones.
            raise PromptierError(f"--out {out} is the model's own directory: give --out another folder (its "
                                 "default is MODEL/eval), or --record to store the figures in the artifact")
        if loso_traffic and not loso:
            raise PromptierError("--loso-traffic extends --loso: pass both")
        seed_list = _seed_list("--seeds", seeds) if seeds else []
        loso_seed_list = _seed_list("--loso-seeds", loso_seeds) if loso_seeds else []
        manifest = load_manifest(model)
        recipe = manifest.training.get("config")
        if loso_traffic and not (isinstance(recipe, dict) and recipe.get("teacher")):
            raise PromptierError("--loso-traffic gives each fold unlabeled prompts, which only a recipe with an "
                                 "embedding teacher can learn from; this model's recipe has none")
        pool_spec = load_pool(pool)
        if pool_spec.tier_names != manifest.tier_names:
            raise PromptierError(f"pool tiers {pool_spec.tier_names} differ from the model's {manifest.tier_names}")
        rows, skipped = read_logs(logs, skip_invalid, tiers=pool_spec.tier_names)
        table, unused = build_table(rows, pool_spec)
        warn_unmapped_sources(pool_spec, unused)  # their prompts are not evaluated: say so, as training does
        warn_unseen_pool_models(pool_spec, table, unused)
        config = manifest.training.get("config", {})
        backbone = str(config.get("backbone", "minilm-l6")) if isinstance(config, dict) else "minilm-l6"
        backbone_dir = backbone_directory(backbone) if embedding_baseline else None
        out_dir = model if record else (out or model / EVAL_REPORT_DIR)
        from training.probes import evaluate_probes, render_probe_markdown

        probes = evaluate_probes(classifier.load(model))
        report = evaluate_logs(model, table, backbone_dir, out_dir,
                               cache_dir or Path.home() / ".cache" / "promptier", probes)
        generalization = None
        if loso or seed_list or loso_seed_list:
            generalization = _generalization(model, manifest, logs, pool, loso, seed_list, work_dir, backbone_dir,
                                             cache_dir or Path.home() / ".cache" / "promptier", skip_invalid,
                                             loso_traffic, probes, loso_seed_list)
        if record:
            from training.evaluate import record_in_artifact

            record_in_artifact(model, report, table, probes, generalization)
        elif generalization is not None:
            from training.generalization_report import write_report

            write_report(generalization, out_dir)
    except (PromptierError, ValueError, OSError) as error:  # OSError: e.g. a read-only --out or --record
        fail(error)
    typer.echo((out_dir / EVAL_MD_FILE).read_text())
    typer.echo(render_probe_markdown(probes, manifest.policy.default_mode))
    if generalization is not None:
        from training.generalization_report import render_markdown

        typer.echo(render_markdown(generalization))
    typer.echo(f"wrote {out_dir}/{', '.join(EVAL_FILES)} ({report['rows']} prompts; {skipped.summary()})")


def _generalization(model: Path, manifest: ArtifactManifest, logs: list[Path], pool: Path, loso: bool,
                    seeds: list[int], work_dir: Path | None, backbone_dir: Path | None, cache_dir: Path,
                    skip_invalid: bool, loso_traffic: bool = False, probes: dict | None = None,
                    loso_seeds: list[int] | None = None) -> dict:
    """Retrain the artifact's recipe for --loso (and --loso-traffic), --loso-seeds and --seeds.

    `probes`, the probe figures just measured on the artifact, stand for its own seed's run: those in its
    manifest may predate a change of the runtime (the prior), and every other seed is measured now."""
    from training.config import TrainConfig
    from training.generalization import (
        apgr_per_method,
        leave_one_source_out,
        loso_seed_spread,
        own_run,
        report_probes,
        seed_spread,
    )

    if manifest.training.get("teacher"):
        raise PromptierError("--loso and --seeds retrain the recipe, and this model was distilled from a teacher "
                             "artifact the recipe does not rebuild")
    if manifest.training.get("unlabeled_prompts"):
        raise PromptierError("--loso and --seeds retrain the recipe on the logs, and this model also learned "
                             f"{manifest.training['unlabeled_prompts']} unlabeled prompts that the logs do not hold: "
                             "measure the recipe on a model trained without them")
    config = TrainConfig.model_validate(manifest.training["config"])
    root = work_dir or model.with_name(model.name + ".generalization")
    result: dict = {}
    if loso:
        result["leave_one_source_out"] = leave_one_source_out(logs, pool, config, root / "loso", backbone_dir,
                                                               cache_dir, skip_invalid, loso_traffic)
    if loso_seeds:
        # The recipe's own seed was just trained by --loso, on the same logs: its folds count once.
        trained = {config.seed: {source: apgr_per_method(methods)
                                 for source, methods in result["leave_one_source_out"]["sources"].items()}
                   } if loso else None
        result["loso_seeds"] = loso_seed_spread(logs, pool, config, loso_seeds, root / "loso-seeds", backbone_dir,
                                                cache_dir, skip_invalid, trained)
    if seeds:
        known = own_run(manifest.metrics, manifest.data_fingerprint, logs, pool, config, skip_invalid)
        measured = manifest.metrics if probes is None else {"probes": probes}
        known_probes = {seed: report_probes(measured, config.default_mode) for seed in known}
        result["seeds"] = seed_spread(logs, pool, config, seeds, root / "seeds", skip_invalid, known, cache_dir,
                                      known_probes)
    return result


def _seed_list(option: str, seeds: str) -> list[int]:
    """The seeds an option names, e.g. "13,14,15"; each once (a seed run twice is one run counted twice)."""
    try:
        seed_list = [int(seed) for seed in seeds.split(",")]
    except ValueError as error:
        raise PromptierError(f"{option} takes integers separated by commas, got {seeds!r}") from error
    if len(set(seed_list)) < len(seed_list):
        raise PromptierError(f"{option} names a seed more than once: {seeds!r}")
    return seed_list


@app.command()
def export(
    artifact: Annotated[Path, typer.Option(help="an artifact made by `promptier train`")],
    checkpoint: Annotated[Path, typer.Option(help="its training checkpoint (WORK_DIR/checkpoint.pt)")],
    prompts: Annotated[list[Path], typer.Option(help="prompts for the parity check (JSONL/Parquet with a "
                                                      "`prompt` column; at least 500 distinct)")],
    out: Annotated[Path, typer.Option(help="artifact directory to write")],
    quantize: Annotated[bool, typer.Option(help="try int8 first (kept only if it clears the parity bars)")] = True,
) -> None:
    """Re-export a trained model to ONNX with the parity check (e.g. to try int8, or after an ORT upgrade)."""
    _require_training_extra()
    from training.export import export_checkpoint
    from training.inputs import read_unlabeled

    try:
        check_destination(out)
        manifest, report = export_checkpoint(artifact, checkpoint, read_unlabeled(prompts), out, quantize)
    except (PromptierError, ValueError, OSError) as error:  # OSError: a file missing, a folder not writable
        fail(error)
    typer.echo(f"wrote {out} ({manifest.architecture.get('quantization')}): tier agreement "
               f"{report.tier_agreement:.4f}, max probability difference {report.max_probability_diff:.2e} "
               f"on {report.prompts} prompts")


if __name__ == "__main__":  # how torchrun starts each process of `promptier train --processes N`
    app()
