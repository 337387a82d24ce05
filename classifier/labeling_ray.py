"""`promptier label --engine ray`: the same labeling as a Ray Data pipeline.

read -> map_batches with a callable class that loads the artifact once per actor -> write. Runs on a
local Ray instance by default, or on an existing cluster with `address`. Ray writes a directory of
part files; they are merged into OUTPUT so the result matches the local engine row for row.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from classifier.labeling import (
    LabelingError,
    LabelOptions,
    LabelStats,
    _count,
    _merge,
    expand_inputs,
    label_chunk,
    rows_to_table,
)


class _Labeler:
    """Ray actor: one model per actor, loaded in __init__."""

    def __init__(self, options: LabelOptions) -> None:
        from classifier import labeling

        labeling._init_worker(options.model)
        self._options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pylist()
        for number, record in enumerate(records):
            record.setdefault("__row__", str(number))
        rows = label_chunk(records, self._options)
        return rows_to_table(rows, self._options.keep_columns, self._options.id_column)


def label_with_ray(inputs: list[str], output: Path, options: LabelOptions, address: str | None = None,
                   actors: int = 2) -> LabelStats:
    """Label with Ray Data; the output equals the local engine's for the same input and options.

    Raises:
        LabelingError: ray is not installed, or bad inputs/outputs.
    """
    try:
        import ray
    except ImportError as exc:
        raise LabelingError("the ray engine needs Ray: pip install 'promptier[ray]'") from exc
    files = expand_inputs(inputs)
    if output.exists():
        raise LabelingError(f"{output} exists; remove it or choose another output")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        # Keep input order so the output lines up with the input, as the local engine's does. Set
        # before the datasets are created: a dataset keeps the context it was created with.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        suffixes = {path.suffix for path in files}
        names = [str(path.resolve()) for path in files]
        if suffixes <= {".parquet"}:
            dataset = ray.data.read_parquet(names)
        elif suffixes <= {".jsonl", ".json"}:
            dataset = ray.data.read_json(names, lines=True)
        elif suffixes <= {".csv"}:
            dataset = ray.data.read_csv(names)
        else:
            raise LabelingError("the ray engine needs all inputs in one format")
        # The local engine names rows without an id `file:row`; Ray has no row numbers, so require ids.
        if options.id_column not in dataset.schema().names:
            raise LabelingError(f"the ray engine needs an id column ({options.id_column!r}) in the input")
        # 0.5 CPU per actor: on a 2-core machine, whole-CPU actors starve the readers (Ray Data deadlock).
        labeled = dataset.map_batches(_Labeler, fn_constructor_kwargs={"options": options},
                                      batch_size=options.chunk_rows, concurrency=actors, num_cpus=0.5,
                                      batch_format="pyarrow")
        staging = Path(tempfile.mkdtemp(prefix=".ray-", dir=output.parent))
        try:
            # Streamed back in dataset order (preserve_order), not via write_parquet: Ray's file
            # names do not sort in block order, and the output must line up with the input.
            parts = []
            for number, table in enumerate(labeled.iter_batches(batch_size=None, batch_format="pyarrow")):
                parts.append(staging / f"part-{number:08d}.parquet")
                pq.write_table(table, parts[-1])
            _merge(parts, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if started_here:
            ray.shutdown()
    stats = LabelStats()
    if output.suffix == ".parquet":
        _count(pq.read_table(output).to_pylist(), stats)
    else:
        import json

        _count([json.loads(line) for line in output.read_text().splitlines()], stats)
    return stats
