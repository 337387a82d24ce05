"""Offline batch labeling: prompt files in, one routing decision per row out.

`label_files` is the entry (what `promptier label` runs): it checks the job, takes the output's
lock and runs the local engine. The input is never modified. The work is split by job:

- classifier/labeling_options.py: the job's options, its counts and its error;
- classifier/labeling_rows.py: reading the input in a deterministic order, and the one row parser
  both engines share (a row that cannot be labeled becomes an output row with an `error`);
- classifier/labeling_worker.py: what a labeling process runs in either engine (model, labeling);
- classifier/labeling_output.py: the output's lock, the job record a resume is checked against,
  the staged parts and the atomic merge into OUTPUT;
- classifier/labeling_local.py: the local multi-process engine;
- classifier/labeling_ray.py: the same labeling on Ray Data.

The names users import from here (`label_files`, `LabelOptions`, `LabelStats`, `LabelingError`,
`parse_row`, ...) are re-exported from those modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from classifier.errors import InvalidInputError
from classifier.labeling_local import label_locally, label_part
from classifier.labeling_options import (
    DECISION_COLUMNS,
    INPUT_SUFFIXES,
    OUTPUT_SUFFIXES,
    LabelingError,
    LabelOptions,
    LabelStats,
)
from classifier.labeling_output import JOB_RECORD, cannot_write, lock_path, output_lock, record_path, rows_to_table
from classifier.labeling_rows import ParsedRow, parse_row, read_chunks, read_rows
from classifier.labeling_worker import label_chunk, load_worker_model
from classifier.prompt_files import (
    PromptFileError,
    each_once,
    expand_pattern,
    file_format,
    parquet_columns,
    refuse_json_array,
)

__all__ = [
    "DECISION_COLUMNS",
    "INPUT_SUFFIXES",
    "JOB_RECORD",
    "OUTPUT_SUFFIXES",
    "LabelOptions",
    "LabelStats",
    "LabelingError",
    "ParsedRow",
    "check_id_column",
    "check_job",
    "expand_inputs",
    "label_chunk",
    "label_files",
    "label_part",
    "load_worker_model",
    "output_lock",
    "parse_row",
    "prepare_job",
    "read_chunks",
    "read_rows",
    "rows_to_table",
]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Input files named by paths or globs, in a deterministic order.

    Raises:
        LabelingError: a path does not exist, is not a regular file or has an unsupported type, or a
            glob matches no file (a mistyped one among several would otherwise drop its files from the
            job unnoticed).
    """
    files: list[Path] = []
    for pattern in patterns:
        matches = expand_pattern(pattern)
        if matches != [pattern]:  # a glob: its files (a `**` pattern also matches directories)
            matches = [match for match in matches if Path(match).is_file()]
            if not matches:
                raise LabelingError(f"no input files match {pattern!r}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise LabelingError(f"{match}: is a directory; name its files, or a glob such as '{match}/*.jsonl'")
            if path.exists() and not path.is_file():  # a pipe (`<(zcat log.jsonl.gz)`) is no missing file
                raise LabelingError(f"{match}: not a regular file (a pipe or a device); write it to a .jsonl, "
                                    ".csv or .parquet file and label that")
            if not path.is_file():
                raise LabelingError(f"{match}: no such file")
            if file_format(path) is None:
                raise LabelingError(f"{match}: unsupported input type {path.suffix!r} (use "
                                    f"{', '.join(INPUT_SUFFIXES)}, or a rotated log such as NAME.jsonl.1)")
            files.append(path)
    if not files:
        raise LabelingError("no input files given")
    return each_once(files)



def check_job(files: Sequence[Path], output: Path, options: LabelOptions) -> None:
    """Refuse an output or options that cannot work, before anything is written.

    Raises:
        LabelingError: the output type is wrong, the output (or a file beside it) is an input, the id
            column or a kept column would overwrite an output column, a column is kept twice,
            chunk_rows is not positive, a JSON input holds an array rather than JSON Lines, or a
            Parquet input's footer cannot be read.
    """
    if output.suffix not in OUTPUT_SUFFIXES:
        raise LabelingError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {output.name}")
    inputs = {f.resolve() for f in files}
    if output.resolve() in inputs:
        raise LabelingError("output would overwrite an input; the labeler never edits its input")
    beside = [lock_path(output), record_path(output)]
    if any(path.resolve() in inputs for path in beside):
        raise LabelingError(f"an input is named like a file the labeler keeps beside {output.name}: "
                            f"{', '.join(p.name for p in beside)}")
    if options.id_column in DECISION_COLUMNS:
        raise LabelingError(f"--id-column {options.id_column!r} would overwrite the output column of the same "
                            f"name; the output's columns are {', '.join(DECISION_COLUMNS)}")
    clashes = [c for c in options.keep_columns if c == options.id_column or c in DECISION_COLUMNS]
    if clashes:
        raise LabelingError(f"--keep {clashes} would overwrite output columns of the same name")
    # A Parquet output cannot hold two columns of one name (its merge would fail after every row was labeled).
    twice = sorted({c for c in options.keep_columns if options.keep_columns.count(c) > 1})
    if twice:
        raise LabelingError(f"--keep names {', '.join(map(repr, twice))} more than once; name each column once")
    if options.chunk_rows < 1:
        raise LabelingError(f"chunk_rows must be at least 1, got {options.chunk_rows}")
    for path in files:  # found here, not after the files before it were labeled
        try:
            if file_format(path) == "jsonl":
                refuse_json_array(path)
            elif file_format(path) == "parquet":
                parquet_columns(path)  # its footer is readable
        except PromptFileError as exc:
            raise LabelingError(str(exc)) from None


def check_id_column(files: Sequence[Path], id_column: str) -> None:
    """Refuse an id column that no input has, when every input says its columns up front (Parquet).

    For a user who names the id column: a typo would otherwise name every row `NAME:N` rather than by
    the ids they asked for. A JSONL or CSV input's columns are known only as its rows are read (the
    command then names an id column that no labeled row had a value in); an input that lacks the column
    beside one that has it is no typo, and its rows are named `NAME:N`.

    Raises:
        LabelingError: every input is Parquet and none has the column; the message lists those it has.
    """
    if not files or any(file_format(path) != "parquet" for path in files):
        return
    try:
        columns = list(dict.fromkeys(name for path in files for name in parquet_columns(path)))
    except PromptFileError as exc:
        raise LabelingError(str(exc)) from None
    if id_column not in columns:
        raise LabelingError(f"--id-column {id_column!r}: no input has that column; the input's columns are "
                            f"{', '.join(map(repr, columns))} (without --id-column, a row is named by its "
                            f"{LabelOptions.id_column!r}, else FILE:N)")


def check_model_and_policy(options: LabelOptions) -> None:
    """Load the job's model once, here, and route by its policy: a model that does not load would
    otherwise fail in every worker, and a bad mode or threshold in every row, after the job had started.

    Raises:
        ArtifactError: the model is not a valid artifact.
        LabelingError: the mode or threshold is not one the model can route by.
    """
    from classifier.policy import RoutingRequest, resolve_threshold
    from classifier.runtime import load

    model = load(options.model)
    try:
        resolve_threshold(model.manifest.policy, RoutingRequest(mode=options.mode, threshold=options.threshold))
    except InvalidInputError as exc:
        raise LabelingError(f"--mode/--threshold: {exc}") from None


def label_files(inputs: Sequence[str], output: Path, options: LabelOptions, workers: int | None = None,
                resume: bool = False, progress: bool = True, id_column_given: bool = False) -> LabelStats:
    """Label every row of `inputs` into `output` (.jsonl or .parquet).

    `id_column_given`: the caller named `options.id_column` (rather than taking the default), so it is
    refused when no input has it (`check_id_column`).

    One job per output at a time (`OUTPUT.lock`). An existing output is never replaced: without
    `resume` it is refused; with `resume` it must be the finished output of this very job (same
    inputs, model and options, per `OUTPUT.job.json`), and then nothing runs (`complete` is set).
    An interrupted job (`OUTPUT.parts`) continues only with `resume` and only if it is the same job.
    A write error (disk full) removes temporary files and keeps the finished parts.

    Raises:
        LabelingError: bad inputs/outputs, a given id column no input has, another job on the output, an
            existing output or an interrupted job that is not this job's, or a write error.
        ArtifactError: the model is not a valid artifact.
    """
    if workers is not None and workers < 1:
        raise LabelingError(f"workers must be at least 1, got {workers}")
    files = prepare_job(inputs, output, options, id_column_given)
    with output_lock(output):
        return label_locally(files, output, options, workers, resume, progress)


def prepare_job(inputs: Sequence[str], output: Path, options: LabelOptions,
                id_column_given: bool = False) -> list[Path]:
    """The job's input files, once the job is checked and the output's folder exists (both engines).

    Raises:
        LabelingError: bad inputs or options (an id column the caller gave that no input has, too), or
            the output's folder cannot be created.
        ArtifactError: the model is not a valid artifact.
    """
    files = expand_inputs(inputs)
    check_job(files, output, options)
    if id_column_given:
        check_id_column(files, options.id_column)
    check_model_and_policy(options)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # its errno's words, "File exists", do not say what is wrong
        raise LabelingError(f"cannot write {output}: {output.parent} is a file, not a folder") from None
    except OSError as exc:
        raise cannot_write(output.parent, exc, resumable=False) from None
    return files
