"""Streamed logs: the same prompts, targets and costs as reading them whole, without holding the rows."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from classifier.artifact import TruncationConfig
from classifier.tokenization import PromptEncoder
from tests.conftest import POOL_YAML, synthetic_rows, tiny_config, write_jsonl
from training.data import read_logs
from training.errors import DataError
from training.labels import build_table, prompt_hash
from training.pool import load_pool
from training.streaming import HashIndex, hash64, hash_split, stream_logs
from training.token_store import TokenStoreWriter

_TRUNCATION = TruncationConfig(max_tokens=32, head_chars=128, tail_chars=96, head_fraction=0.5)


@pytest.fixture
def pool(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "pool.yaml"
    path.write_text(POOL_YAML)
    return load_pool(path)


def test_hash_index_finds_what_a_dict_finds() -> None:
    rng = np.random.default_rng(0)
    index, reference = HashIndex(), {}
    for size in rng.integers(1, 300, size=60):
        batch = np.unique(rng.integers(0, 2**63, size=size, dtype=np.uint64) | np.uint64(1))
        fresh = batch[index.find(batch) < 0]
        for key, value in zip(fresh.tolist(), index.add(fresh).tolist(), strict=True):
            reference[key] = value
    keys = np.array(list(reference), dtype=np.uint64)
    assert (index.find(keys) == np.array(list(reference.values()))).all()
    assert (index.find(np.array([0, 2, 4], dtype=np.uint64)) == -1).all()  # even keys were never added
    assert index.size == len(reference) and index.nbytes == 16 * len(reference)
    hashes, ids = index.sorted_items()
    assert (np.diff(hashes.astype(np.float64)) >= 0).all() and sorted(ids.tolist()) == list(range(len(reference)))


def test_split_depends_on_the_prompt_and_seed_only() -> None:
    hashes = np.array([hash64(f"prompt {i}") for i in range(20_000)], dtype=np.uint64)
    split = hash_split(hashes, 13, 0.1, 0.1)
    assert (hash_split(hashes[::-1], 13, 0.1, 0.1) == split[::-1]).all()  # order of the logs does not matter
    assert not (hash_split(hashes, 14, 0.1, 0.1) == split).all()
    shares = np.bincount(split, minlength=3) / len(split)
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    assert f"{hash64('x'):016x}" == prompt_hash("x")


def _logs_in_two_shuffled_files(tmp_path: Path) -> list[Path]:
    """Outcome rows (some with costs), a prompt repeated across files, tier labels, an unmapped model."""
    rows = synthetic_rows(300, seed=4)
    rng = random.Random(1)
    for row in rows[::7]:
        row["cost_usd"] = rng.uniform(0, 0.01)
    rows += [{**row, "prompt_id": "again:" + row["prompt_id"], "score": 1.0 - row["score"]} for row in rows[:90]]
    rows += [{"prompt": f"labeled prompt {i}", "tier": ["small", "medium", "large"][i % 3], "source": "gamma"}
             for i in range(40)]
    rows += [{"prompt": rows[5]["prompt"], "tier": "large", "source": "alpha"}]
    rows += [{**rows[0], "model": "not-in-pool"}]
    rng.shuffle(rows)
    half = len(rows) // 2
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "cost_usd": r.get("cost_usd")} for r in rows[:half]
                                         if "tier" not in r]), parquet)
    jsonl = write_jsonl(tmp_path / "b.jsonl", rows[half:] + [r for r in rows[:half] if "tier" in r])
    return [parquet, jsonl]


def test_streamed_prompts_targets_and_costs_equal_the_in_memory_table(tmp_path: Path, pool, tiny_backbone: Path  # type: ignore[no-untyped-def]
                                                                       ) -> None:
    logs = _logs_in_two_shuffled_files(tmp_path)
    table, unused = build_table(read_logs(logs)[0], pool)
    config = tiny_config(tiny_backbone)
    encoder = PromptEncoder.from_file(tiny_backbone / "tokenizer.json", _TRUNCATION)
    writer = TokenStoreWriter(tmp_path / "store", vocab_size=200)
    streamed = stream_logs(logs, pool, config, encoder, writer, chunk_rows=97)  # many chunks: merges across them
    store = writer.close()
    assert streamed.unused_models == unused and sum(unused.values()) == 1
    by_prompt = {p: i for i, p in enumerate(table.prompts)}
    counts = streamed.prompt_counts
    assert sum(counts.values()) == len(table) and streamed.stats["prompts"] == len(table)
    for row, prompt in enumerate(streamed.heldout.prompts):
        i = by_prompt[prompt]
        assert np.allclose(streamed.heldout.targets[row], table.targets[i], equal_nan=True)
        assert np.allclose(streamed.heldout.costs[row], table.costs[i])
        assert streamed.heldout.sources[row] == table.sources[i]
        assert streamed.heldout.prompt_ids[row] == table.prompt_ids[i]
    # Training prompts exist only as token ids: match them through their hashes and tokens.
    hash_to_row = {int(prompt_hash(p), 16): i for i, p in enumerate(table.prompts)}
    train_rows = [hash_to_row[int(h)] for h in streamed.train_hashes]
    assert np.allclose(streamed.train_targets, table.targets[train_rows], equal_nan=True)
    from training.trainer import tokenize_all

    expected = tokenize_all(encoder, [table.prompts[i] for i in train_rows])
    assert all((a == b).all() for a, b in zip(store.get(np.arange(len(store))), expected, strict=True))
    assert len(store) == counts["train"] and store.disk_bytes == 2 * sum(len(x) for x in expected)  # uint16 ids
    all_hashes = np.concatenate([streamed.train_hashes, [hash64(p) for p in streamed.heldout.prompts]])
    assert len(set(all_hashes.tolist())) == len(table)  # every prompt once
    assert streamed.stats["hash_index_bytes"] == 16 * len(table)


def test_streaming_reports_bad_rows_like_reading_whole(tmp_path: Path, pool, tiny_backbone: Path) -> None:  # type: ignore[no-untyped-def]
    rows = synthetic_rows(60)
    rows[5]["score"] = 7
    logs = write_jsonl(tmp_path / "bad.jsonl", rows)
    encoder = PromptEncoder.from_file(tiny_backbone / "tokenizer.json", _TRUNCATION)
    with pytest.raises(DataError, match=r"bad.jsonl, row 6, column 'score': 7.0 is outside"):
        stream_logs([logs], pool, tiny_config(tiny_backbone), encoder, TokenStoreWriter(tmp_path / "s", 200))
    streamed = stream_logs([logs], pool, tiny_config(tiny_backbone), encoder, TokenStoreWriter(tmp_path / "t", 200),
                           skip_invalid=True)
    assert streamed.skipped.total == 1 and streamed.stats["rows"] == len(rows)


def test_streamed_training_end_to_end(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    """Streaming with the shipped recipe's parts (bag student, anchors, familiarity) on Parquet shards."""
    import classifier
    from classifier.artifact_layout import SEEN_PROMPTS_FILE
    from training.pipeline import train
    from training.synthetic import write_parquet_shards

    shards = write_parquet_shards(tmp_path / "logs", 2400, prompt_chars=120, shard_rows=1000, row_group_rows=300)
    assert len(shards) == 3
    config = tiny_config(tiny_backbone, streaming=True, epochs=4, anchors=3, anchor_weight=2,
                         student={"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32, "pooling_heads": 2,
                                  "length_feature": True}, familiarity={"directions": 8})
    manifest = train([tmp_path / "logs"], pool_file, tmp_path / "model", config, model_version="streamed")
    assert manifest is not None
    data = manifest.training["data"]
    assert isinstance(data, dict) and data["reading"] == "streamed" and data["rows"] == 2400
    prompts = manifest.training["prompts"]
    assert isinstance(prompts, dict) and sum(prompts.values()) == data["prompts"] < 2400 / 2
    summary = manifest.metrics["test"]["all"]  # type: ignore[index]
    assert summary["promptier"]["apgr"] > summary["random"]["apgr"] + 0.1
    assert manifest.familiarity is not None and manifest.metrics["export_parity"]["tier_agreement"] >= 0.995  # type: ignore[index]
    seen = (tmp_path / "model" / SEEN_PROMPTS_FILE).read_text().split()
    assert len(seen) == prompts["train"] + prompts["val"] and seen == sorted(seen)
    runtime = classifier.load(tmp_path / "model")
    assert runtime.classify("prove theorem derive integral eigenvalue lemma " * 5).tier == "large"


def test_streamed_familiarity_statistics_equal_the_in_memory_ones(tmp_path: Path, tiny_backbone: Path) -> None:
    import torch

    from training.config import BagStudentConfig
    from training.model import BagTierModel, fit_feature_statistics
    from training.pipeline import _store_feature_statistics
    from training.trainer import predict

    torch.manual_seed(0)
    model = BagTierModel(np.random.default_rng(0).normal(size=(60, 16)), 3,
                         BagStudentConfig(kind="bag", embedding_dim=16, pooling_heads=2, length_feature=True))
    rng = np.random.default_rng(1)
    tokens = [rng.integers(1, 60, size=rng.integers(2, 30)) for _ in range(700)]
    writer = TokenStoreWriter(tmp_path / "store", vocab_size=60)
    writer.append(tokens)
    store = writer.close()
    streamed = _store_feature_statistics(model, store, directions=6, chunk=128)
    whole = fit_feature_statistics(predict(model, tokens, method="features"), 6)
    assert np.allclose(streamed.mean, whole.mean, atol=1e-6)
    assert np.allclose(streamed.variances, whole.variances, rtol=1e-5)
    assert np.allclose(np.abs(streamed.directions.T @ whole.directions).diagonal(), 1.0, atol=1e-4)


def test_streaming_refuses_a_teacher(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    from training.pipeline import train

    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    config = tiny_config(tiny_backbone, streaming=True, teacher={"kind": "embedding-mlp"})
    with pytest.raises(DataError, match="streaming does not keep"):
        train([logs], pool_file, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    # Unlabeled prompts need a teacher's labels, so a streamed run refuses them rather than drop them.
    traffic = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": "hello there"}])
    with pytest.raises(DataError, match="unlabeled"):
        train([logs], pool_file, tmp_path / "out", tiny_config(tiny_backbone, streaming=True), unlabeled=[traffic])
    assert not (tmp_path / "out").exists()


def test_streamed_fingerprint_follows_the_targets() -> None:
    from training.streaming import _fingerprint

    hashes = np.array([3, 9], dtype=np.uint64)
    a = _fingerprint(hashes, np.array([[1.0, np.nan], [0.0, 1.0]]))
    assert a == _fingerprint(hashes, np.array([[1.0, np.nan], [0.0, 1.0]])) and len(a) == 64
    assert a != _fingerprint(hashes, np.array([[1.0, np.nan], [0.0, 0.5]]))
