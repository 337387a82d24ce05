"""`promptier label --engine ray`: the same labeling as a Ray Data pipeline.

read (one task per file, through the readers the local engine uses) -> map_batches with a callable
class that loads the artifact once per actor and parses and labels rows with the same functions as
the local engine (classifier/labeling_rows.py, classifier/labeling_worker.py) -> write. Runs on a
local Ray instance by default, or on an existing cluster with `address`. The labeled blocks are
merged into OUTPUT so the result matches the local engine row for row, malformed rows included.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.errors import PromptierError
from classifier.labeling import prepare_job
from classifier.labeling_options import LabelingError, LabelOptions, LabelStats
from classifier.labeling_output import cannot_write, merge_parts, output_lock, output_schema, rows_to_table
from classifier.labeling_rows import input_names, parse_row, read_rows
from classifier.labeling_worker import label_chunk, load_worker_model
from classifier.scratch_dirs import made_by_mkdtemp

# Rows travel from the readers to the labelers as (row name, pickled payload): a payload is a raw
# JSONL line, a record, or a bad row, and records of different files need not share a schema.
ROW_SCHEMA = pa.schema([("row", pa.string()), ("payload", pa.binary())])
# A column of the labeled blocks, dropped before they are written: whether each row's id is its own (not
# its `NAME:N`), which the driver counts as the blocks go by (LabelStats.id_values).
OWN_ID = "promptier.own_id"
# The CPU share of each reader task and model actor: on a 2-core machine, whole-CPU actors starve the
# readers (a Ray Data deadlock).
TASK_CPUS = 0.5


def _read_files(batch: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    """Ray task: the rows of the files named in `batch`, in file order, `batch_rows` at a time."""
    names: list[str] = []
    payloads: list[bytes] = []
    for path, file_name in zip(batch.column("path").to_pylist(), batch.column("name").to_pylist(), strict=True):
        for name, payload in read_rows(Path(path), batch_rows, file_name):
            names.append(name)
            payloads.append(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
            if len(names) == batch_rows:
                yield pa.table([names, payloads], schema=ROW_SCHEMA)
                names, payloads = [], []
    if names:
        yield pa.table([names, payloads], schema=ROW_SCHEMA)


class _Labeler:
    """Ray actor: one model per actor, loaded in __init__."""

    def __init__(self, options: LabelOptions) -> None:
        load_worker_model(options.model)
        self._options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [parse_row(name, pickle.loads(payload), self._options)
                for name, payload in zip(batch.column("row").to_pylist(), batch.column("payload").to_pylist(),
                                         strict=True)]
        table = rows_to_table(label_chunk(rows, self._options), self._options.keep_columns,
                              self._options.id_column)
        return table.append_column(OWN_ID, pa.array([row.own_id for row in rows], pa.bool_()))


def label_with_ray(inputs: list[str], output: Path, options: LabelOptions, address: str | None = None,
                   actors: int = 2, id_column_given: bool = False) -> LabelStats:
    """Label with Ray Data; the output equals the local engine's for the same input and options.

    Holds the output's lock like the local engine, and refuses an existing output (no resume).
    `id_column_given` is label_files's: an id column the caller named is refused when no input has it.

    Raises:
        LabelingError: ray is not installed, bad inputs/outputs, a given id column no input has, another
            job on the output, or a write error (no temporary files are left).
    """
    try:
        import ray
    except ImportError as exc:
        raise LabelingError("the ray engine needs Ray: pip install 'promptier[ray]'") from exc
    if OWN_ID in (*options.keep_columns, options.id_column):  # the labeled blocks carry a column of that name
        raise LabelingError(f"the ray engine uses a column named {OWN_ID!r} of its own: label with --engine local, "
                            "or rename that input column")
    files = prepare_job(inputs, output, options, id_column_given)
    with output_lock(output):
        if output.exists():
            raise LabelingError(f"{output} exists; remove it or choose another output")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started_here = not ray.is_initialized()
        if started_here:
            if address:
                _require_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, TimeoutError) as exc:
                    raise LabelingError(f"cannot reach the Ray cluster at {address}: {exc}") from None
            else:
                ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        try:
            _require_cpus_for(actors, float(ray.cluster_resources().get("CPU", 0)))
            return _run(ray, files, output, options, actors)
        except ray.exceptions.RayTaskError as error:
            # An input that breaks mid-job (a damaged Parquet page) fails inside a Ray task: the user needs
            # its reason, as the local engine gives it, not Ray's tracebacks of the task and its actor.
            cause = getattr(error, "cause", None)
            if isinstance(cause, PromptierError):
                # Ray Data appends its retry advice to the message; the reason is what comes before it.
                raise LabelingError(str(cause).split(_RAY_RETRY_ADVICE, 1)[0]) from None
            raise
        finally:
            if started_here:
                ray.shutdown()


_RAY_RETRY_ADVICE = "\nFailed to apply UDF transform"


def _require_cpus_for(actors: int, cpus: float) -> None:
    """Refuse more model actors than the Ray instance can run beside the file readers: with no CPU left
    for a reader, Ray Data waits forever (actors it cannot place, it also waits for, without a word).

    Raises:
        LabelingError: `actors` x their CPU share, plus one reader's, exceeds `cpus`.
    """
    if actors * TASK_CPUS + TASK_CPUS > cpus:
        most = max(0, int((cpus - TASK_CPUS) / TASK_CPUS))
        raise LabelingError(f"--workers {actors}: each model actor takes {TASK_CPUS:g} CPU beside a reader's "
                            f"{TASK_CPUS:g}, and this Ray instance has {cpus:g} CPUs: use at most {most}")


def _require_reachable(address: str) -> None:
    """Refuse a cluster address nothing listens on: for a `host:port` address Ray retries for minutes
    before it gives up, and for `ray://` only after 30 s. ("auto" and other forms are left to Ray.)

    Raises:
        LabelingError: no connection could be made to the address's host and port.
    """
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise LabelingError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _run(ray, files: list[Path], output: Path, options: LabelOptions, actors: int) -> LabelStats:  # type: ignore[no-untyped-def]
    # Keep input order so the output lines up with the input, as the local engine's does. Set
    # before the datasets are created: a dataset keeps the context it was created with.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Each file with the name its rows' ids are given, as the local engine names them (input_names).
    items = [{"path": str(path.resolve()), "name": name} for path, name in zip(files, input_names(files), strict=True)]
    paths = ray.data.from_items(items, override_num_blocks=len(files))
    rows = paths.map_batches(_read_files, fn_kwargs={"batch_rows": options.chunk_rows}, batch_size=1,
                             batch_format="pyarrow", num_cpus=TASK_CPUS)
    labeled = rows.map_batches(_Labeler, fn_constructor_kwargs={"options": options},
                               batch_size=options.chunk_rows, compute=ray.data.ActorPoolStrategy(size=actors),
                               num_cpus=TASK_CPUS, batch_format="pyarrow")
    # The caller holds the output's lock, so a staging folder of this output already there is a job's that
    # was killed (-9): it would otherwise stay, hidden, as large as the output.
    prefix = f".{output.name}.ray-"
    for abandoned in made_by_mkdtemp(output.parent, prefix):
        shutil.rmtree(abandoned, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    try:
        # Streamed back in dataset order (preserve_order), not via write_parquet: Ray's file
        # names do not sort in block order, and the output must line up with the input.
        parts = []
        stats = LabelStats()
        for number, table in enumerate(labeled.iter_batches(batch_size=None, batch_format="pyarrow")):
            # Counted as the batches go by: read back from the output, a large job's rows would fill memory.
            counted = LabelStats.of_rows(table.select(["error", "tier", *options.keep_columns]).to_pylist(),
                                         options.keep_columns)
            counted.id_values = table.column(OWN_ID).to_pylist().count(True)
            stats.add(counted)
            table = table.drop_columns([OWN_ID])
            parts.append(staging / f"part-{number:08d}.parquet")
            try:
                pq.write_table(table, parts[-1])
            except OSError as exc:
                raise cannot_write(parts[-1], exc, resumable=False) from None
        try:
            merge_parts(parts, output, output_schema(options.keep_columns, options.id_column))
        except OSError as exc:
            raise cannot_write(output, exc, resumable=False) from None
        return stats
    finally:
        shutil.rmtree(staging, ignore_errors=True)
