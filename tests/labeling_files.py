"""Input rows for the labeler's tests, and its output read back."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from tests.grpc_server import EASY, HARD


def sample_rows(n: int) -> list[dict]:
    """`n` prompt rows with ids and a `team` column: the test model's easy, hard and a non-ASCII prompt, in turn."""
    return [{"prompt_id": f"p{i}", "prompt": (EASY, HARD, "sort python list héllo 🙂")[i % 3] + f" {i}",
             "team": f"t{i % 4}"} for i in range(n)]


def read_output(path: Path) -> list[dict]:
    """A labeler's output file (JSONL or Parquet) as rows."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]
