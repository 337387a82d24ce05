"""Logs larger than memory: one pass over the rows, with memory bounded by the prompts, not the rows.

`build_table` keeps every row and every prompt's text: a million outcome rows of 1 KB prompts cost
gigabytes before training starts. Streaming (`streaming: true` in the config) reads the same logs
(JSONL line by line, Parquet a batch at a time) once, and keeps per distinct prompt only:

- its 8-byte hash (the first 8 bytes of its sha256, what `seen_prompts.txt` lists) in a sorted,
  run-merged index: duplicates are found without holding any text;
- the sums and counts of each tier's scores and costs (a prompt's rows may be anywhere in the logs);
- which split it is in, decided by its hash and the seed alone (so a row's split is known when it
  is read, and does not depend on the order of the logs).

Training prompts are tokenized as they first appear and their token ids go to a token store on disk;
only the held-out prompts (validation and test, which calibration and evaluation read as text) stay
in memory. Lower `val_fraction` and `test_fraction` for logs of many millions of prompts.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classifier.prompt_files import batched
from classifier.tokenization import PromptEncoder
from training.config import TrainConfig
from training.data import OutcomeRow, SkipReport, TierLabelRow, iter_rows
from training.errors import DataError
from training.labels import PromptTable, check_holdouts, nothing_mapped
from training.pool import Pool
from training.token_store import Growable, TokenStoreWriter

log = logging.getLogger(__name__)
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = np.array(["train", "val", "test"], dtype=object)
PARITY_RESERVE = 500  # training prompts kept as text, for the export's parity set when few are held out
_MASK64 = (1 << 64) - 1


def hash64(text: str) -> int:
    """The prompt's identity: the first 8 bytes of its sha256 (`labels.prompt_hash` is its hex)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit function of each value (uint64 arithmetic wraps, as intended)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_split(hashes: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """TRAIN, VAL or TEST per prompt hash: a uniform draw fixed by (hash, seed), so every reader of
    the logs, in any order, puts a prompt in the same split."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    salt = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    uniform = (_splitmix64(hashes.astype(np.uint64) ^ salt) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.where(uniform < test_fraction, TEST, np.where(uniform < test_fraction + val_fraction, VAL, TRAIN)
                    ).astype(np.int8)


class HashIndex:
    """A compact map from 8-byte prompt hashes to dense ids 0, 1, 2, ... in order of first sight.

    Sorted runs of (hash, id), merged when a run is no more than twice the size of the next (as in a
    log-structured merge tree): O(log n) runs to search, amortised O(log n) work per insert, and 16
    bytes per prompt; a Python dict of ints would take about 100.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """The id of each hash, or -1 for hashes never added."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        for keys, ids in self._runs:
            position = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
            hit = keys[position] == hashes
            found[hit] = ids[position[hit]]
        return found

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Give new ids to `hashes` (distinct, none added before), in the order given."""
        ids = np.arange(self.size, self.size + len(hashes), dtype=np.int64)
        self.size += len(hashes)
        if len(hashes):
            order = np.argsort(hashes, kind="stable")
            self._runs.append((hashes[order], ids[order]))
            while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                (keys_a, ids_a), (keys_b, ids_b) = self._runs.pop(), self._runs.pop()
                keys = np.concatenate([keys_b, keys_a])
                order = np.argsort(keys, kind="stable")  # two sorted runs: a linear-time merge
                self._runs.append((keys[order], np.concatenate([ids_b, ids_a])[order]))
        return ids

    def sorted_items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (hash, id), sorted by hash."""
        if not self._runs:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        keys = np.concatenate([k for k, _ in self._runs])
        order = np.argsort(keys, kind="stable")
        return keys[order], np.concatenate([i for _, i in self._runs])[order]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + i.nbytes for k, i in self._runs)


@dataclass
class StreamedData:
    """What streaming the logs leaves for training: the training set on disk, the held-out prompts in memory.

    `heldout` holds the validation and test prompts (`heldout_split` says which) with targets and
    costs as `build_table` computes them; the token store the training prompts' token ids (slots
    0, 1, ...) and `train_targets` their targets, slot by slot.
    """

    heldout: PromptTable
    heldout_split: np.ndarray
    train_targets: np.ndarray
    train_hashes: np.ndarray
    val_hashes: np.ndarray
    parity_texts: list[str]
    skipped: SkipReport
    unused_models: dict[str, int]
    fingerprint: str
    stats: dict[str, int | float] = field(default_factory=dict)

    @property
    def prompt_counts(self) -> dict[str, int]:
        return {"train": len(self.train_targets), "val": int((self.heldout_split == "val").sum()),
                "test": int((self.heldout_split == "test").sum())}


class _Codes:
    """Strings (sources, categories) as small integer codes."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}

    def code(self, name: str) -> int:
        found = self._codes.get(name)
        if found is None:
            found = self._codes[name] = len(self.names)
            self.names.append(name)
        return found

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.array(self.names, dtype=object)[codes] if len(codes) else np.zeros(0, dtype=object)


class _Streamer:
    """The state of one pass over the logs (see `stream_logs`)."""

    def __init__(self, pool: Pool, config: TrainConfig, encoder: PromptEncoder, writer: TokenStoreWriter) -> None:
        self.pool, self.config, self.encoder, self.writer = pool, config, encoder, writer
        n_tiers = len(pool.tiers)
        self.index = HashIndex()
        self.sums = Growable(np.float64, n_tiers)
        self.counts = Growable(np.int32, n_tiers)
        self.cost_sums = Growable(np.float64, n_tiers)
        self.cost_counts = Growable(np.int32, n_tiers)
        self.split = Growable(np.int8)
        self.slot = Growable(np.int64)  # token-store slot (train) or held-out position (val, test)
        self.sources, self.categories = _Codes(), _Codes()
        self.source = Growable(np.int32)
        self.category = Growable(np.int32)
        self.train_prompt = Growable(np.int64)  # prompt id of each store slot
        self.heldout_prompt = Growable(np.int64)
        self.heldout_texts: list[str] = []
        self.heldout_ids: list[str] = []
        self.parity_texts: list[str] = []
        self.unused: dict[str, int] = {}
        self.rows = 0
        self.used_rows = 0
        self.holdout_sources = set(config.holdout_sources)
        self.holdout_categories = set(config.holdout_categories)

    def add(self, chunk: list[OutcomeRow | TierLabelRow]) -> None:
        used: list[OutcomeRow | TierLabelRow] = []
        tiers: list[int] = []
        for row in chunk:
            if isinstance(row, OutcomeRow):
                tier = self.pool.tier_of(row.source, row.model)
                if tier is None:
                    key = f"{row.source}/{row.model}"
                    self.unused[key] = self.unused.get(key, 0) + 1
                    continue
            elif row.tier not in self.pool.tier_names:
                raise DataError("labels", f"unknown tier {row.tier!r} (pool tiers: {self.pool.tier_names})",
                                column="tier")
            else:
                tier = -1 - self.pool.tier_names.index(row.tier)  # a label: negative, decoded below
            used.append(row)
            tiers.append(tier)
        self.rows += len(chunk)
        self.used_rows += len(used)
        if not used:
            return
        hashes = np.fromiter((hash64(row.prompt) for row in used), dtype=np.uint64, count=len(used))
        unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        ids = self.index.find(unique)
        new = np.flatnonzero(ids < 0)
        new = new[np.argsort(first[new], kind="stable")]  # ids in order of first sight, as build_table
        ids[new] = self.index.add(unique[new])
        self._new_prompts([used[i] for i in first[new]], unique[new], ids[new])
        self._aggregate(ids[inverse.reshape(-1)], np.array(tiers), used)

    def _new_prompts(self, rows: Sequence[OutcomeRow | TierLabelRow], hashes: np.ndarray, ids: np.ndarray) -> None:
        for column in (self.sums, self.counts, self.cost_sums, self.cost_counts, self.split, self.slot,
                       self.source, self.category):
            column.reserve(self.index.size)
        splits = hash_split(hashes, self.config.seed, self.config.val_fraction, self.config.test_fraction)
        held = np.array([row.source in self.holdout_sources or row.category in self.holdout_categories
                         for row in rows], dtype=bool)
        splits[held] = TEST
        self.split.array[ids] = splits
        self.source.array[ids] = [self.sources.code(row.source) for row in rows]
        self.category.array[ids] = [self.categories.code(row.category) for row in rows]
        train = np.flatnonzero(splits == TRAIN)
        if len(train):
            texts = [rows[i].prompt for i in train.tolist()]
            if len(self.parity_texts) < PARITY_RESERVE:
                self.parity_texts += texts[: PARITY_RESERVE - len(self.parity_texts)]
            from training.trainer import tokenize_all

            self.slot.array[ids[train]] = self.writer.append(tokenize_all(self.encoder, texts))
            self.train_prompt.extend(ids[train])
        heldout = np.flatnonzero(splits != TRAIN)
        if len(heldout):
            self.slot.array[ids[heldout]] = np.arange(len(self.heldout_texts), len(self.heldout_texts) + len(heldout))
            self.heldout_prompt.extend(ids[heldout])
            for i in heldout.tolist():
                row = rows[i]
                self.heldout_texts.append(row.prompt)
                self.heldout_ids.append(row.prompt_id or f"{row.source}:{int(hashes[i]):016x}")

    def _aggregate(self, ids: np.ndarray, tiers: np.ndarray, rows: Sequence[OutcomeRow | TierLabelRow]) -> None:
        outcome = tiers >= 0
        scores = np.array([row.score if isinstance(row, OutcomeRow) else 0.0 for row in rows])
        np.add.at(self.sums.array, (ids[outcome], tiers[outcome]), scores[outcome])
        np.add.at(self.counts.array, (ids[outcome], tiers[outcome]), 1)
        costs = np.array([row.cost_usd if isinstance(row, OutcomeRow) and row.cost_usd is not None else np.nan
                          for row in rows])
        priced = outcome & ~np.isnan(costs)
        np.add.at(self.cost_sums.array, (ids[priced], tiers[priced]), costs[priced])
        np.add.at(self.cost_counts.array, (ids[priced], tiers[priced]), 1)
        n_tiers = len(self.pool.tiers)
        for i in np.flatnonzero(~outcome):
            # "the cheapest tier that answers well is t" says every tier from t up answers well.
            label = -1 - int(tiers[i])
            self.sums.array[ids[i]] += np.arange(n_tiers) >= label
            self.counts.array[ids[i]] += 1

    def memory(self) -> dict[str, int]:
        """Bytes held per kind of state (what grows with the logs)."""
        per_prompt = sum(column.nbytes for column in (self.sums, self.counts, self.cost_sums, self.cost_counts,
                                                       self.split, self.slot, self.source, self.category,
                                                       self.train_prompt, self.heldout_prompt))
        texts = sum(sys.getsizeof(t) for t in self.heldout_texts) + sum(sys.getsizeof(t) for t in self.heldout_ids)
        return {"hash_index_bytes": self.index.nbytes, "per_prompt_bytes": per_prompt, "heldout_text_bytes": texts}


def stream_logs(paths: Sequence[str | Path], pool: Pool, config: TrainConfig, encoder: PromptEncoder,
                writer: TokenStoreWriter, skip_invalid: bool = False, chunk_rows: int = 16384) -> StreamedData:
    """Read the logs once: dedupe and aggregate by prompt hash, split by hash, tokenize the training
    prompts into `writer` (slots 0, 1, ... in order of first sight; the caller closes it), keep the
    held-out prompts.

    Raises:
        DataError: an invalid row (unless `skip_invalid`), no usable row, or too few prompts for a
            training and a validation split.
    """
    from training.memory import peak_rss_mb

    skipped = SkipReport()
    streamer = _Streamer(pool, config, encoder, writer)
    explored_only = config.outcome_rows == "explored"
    for chunk in batched(iter_rows(paths, skipped, skip_invalid, explored_only, pool.tier_names), chunk_rows):
        streamer.add(chunk)
    where = ", ".join(map(str, paths))
    if not streamer.rows:
        raise DataError(where, "no valid rows")
    if not streamer.index.size:
        raise nothing_mapped(streamer.unused)
    check_holdouts(streamer.sources.names, streamer.categories.names, config.holdout_sources,
                   config.holdout_categories)
    n = streamer.index.size
    with np.errstate(invalid="ignore", divide="ignore"):
        targets = streamer.sums.array / streamer.counts.array
        measured = streamer.cost_sums.array / streamer.cost_counts.array
    train_ids, heldout_ids = streamer.train_prompt.array, streamer.heldout_prompt.array
    if not len(train_ids) or not (streamer.split.array == VAL).any():
        raise DataError("logs", f"too few prompts ({n}) for a train and a validation split")
    texts = streamer.heldout_texts
    estimated = np.array([[pool.estimated_cost(k, len(text)) for k in range(len(pool.tiers))] for text in texts])
    heldout_measured = measured[heldout_ids]
    heldout = PromptTable(
        prompts=texts, prompt_ids=streamer.heldout_ids,
        sources=streamer.sources.decode(streamer.source.array[heldout_ids]),
        categories=streamer.categories.decode(streamer.category.array[heldout_ids]),
        targets=targets[heldout_ids], costs=np.where(np.isnan(heldout_measured), estimated, heldout_measured),
        tier_names=pool.tier_names)
    hashes, ids = streamer.index.sorted_items()
    order = np.empty(n, dtype=np.int64)
    order[ids] = np.arange(n)  # position of each prompt id in hash order
    hash_of = hashes[order]  # hash of each prompt id
    stats: dict[str, int | float] = {
        "rows": streamer.rows + skipped.total, "rows_used": streamer.used_rows, "prompts": n,
        "token_store_bytes": writer.bytes_written, **streamer.memory(),
        "peak_rss_mb": peak_rss_mb(),
        # Two distinct prompts share an 8-byte hash with probability about n^2 / 2^65.
        "hash_collision_probability": float(n) ** 2 / 2.0**65,
    }
    log.info("streamed %d rows: %d prompts (%d train, %d held out); hash index %.1f MB, per-prompt state %.1f MB, "
             "held-out texts %.1f MB, token store %.1f MB on disk", stats["rows"], n, len(train_ids), len(heldout_ids),
             stats["hash_index_bytes"] / 1e6, stats["per_prompt_bytes"] / 1e6, stats["heldout_text_bytes"] / 1e6,
             stats["token_store_bytes"] / 1e6)
    return StreamedData(
        heldout=heldout, heldout_split=SPLIT_NAMES[streamer.split.array[heldout_ids]],
        train_targets=targets[train_ids], train_hashes=hash_of[train_ids],
        val_hashes=hash_of[heldout_ids][streamer.split.array[heldout_ids] == VAL],
        parity_texts=streamer.parity_texts, skipped=skipped, unused_models=streamer.unused,
        fingerprint=_fingerprint(hashes, targets[ids]), stats=stats)


def _fingerprint(sorted_hashes: np.ndarray, targets: np.ndarray, chunk: int = 65536) -> str:
    """sha256 of the prompt hashes and their targets, in hash order (independent of file and row order)."""
    digest = hashlib.sha256()
    for start in range(0, len(sorted_hashes), chunk):
        digest.update(sorted_hashes[start : start + chunk].astype(">u8").tobytes())
        digest.update(np.nan_to_num(targets[start : start + chunk], nan=-1.0).astype("<f8").tobytes())
    return digest.hexdigest()


def write_hashes(path: Path, hashes: np.ndarray, chunk: int = 65536) -> None:
    """Sorted 16-hex-digit prompt hashes, one a line (the artifact's `seen_prompts.txt`), written in chunks."""
    values = np.sort(hashes.astype(np.uint64))
    with path.open("w", encoding="utf-8") as handle:
        for start in range(0, len(values), chunk):
            handle.write("".join(f"{int(v):016x}\n" for v in values[start : start + chunk]))


def read_hashes(path: Path, chunk: int = 65536) -> np.ndarray:
    """The prompt hashes of a `seen_prompts.txt` as uint64 (none recorded: empty), read in chunks: an
    artifact trained on millions of prompts would cost far more memory as a set of strings."""
    if not path.exists():
        return np.zeros(0, dtype=np.uint64)
    parts = []
    with path.open(encoding="utf-8") as handle:
        while lines := handle.readlines(chunk * 17):
            parts.append(np.array([int(line, 16) for line in lines if line.strip()], dtype=np.uint64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
