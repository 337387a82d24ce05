"""From rows to one record per distinct prompt: per-tier targets (NaN = unknown), costs, split."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.artifact_layout import SEEN_PROMPTS_FILE
from training.data import OutcomeRow, TierLabelRow
from training.errors import DataError
from training.pool import Pool

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def prompt_hash(text: str) -> str:
    """Stable 16-hex-digit identity of a prompt text (what `seen_prompts` stores)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def seen_prompts(artifact: Path) -> set[str]:
    """The hashes of the prompts an artifact was trained or calibrated on (none recorded: empty)."""
    path = artifact / SEEN_PROMPTS_FILE
    return set(path.read_text().split()) if path.exists() else set()


@dataclass
class PromptTable:
    """One row per distinct prompt text; tiers cheapest first.

    `targets[i, k]` is the mean score of tier k's model on prompt i: the probability-like target
    that tier k answers well; NaN where the log has no outcome for that tier (masked in the loss
    and in every metric, never counted as a failure). `costs[i, k]` is the measured cost when the log
    has one, else the pool's price x estimated tokens.
    """

    prompts: list[str]
    prompt_ids: list[str]
    sources: np.ndarray
    categories: np.ndarray
    targets: np.ndarray
    costs: np.ndarray
    tier_names: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: np.ndarray) -> PromptTable:
        return PromptTable(
            prompts=[self.prompts[i] for i in index],
            prompt_ids=[self.prompt_ids[i] for i in index],
            sources=self.sources[index],
            categories=self.categories[index],
            targets=self.targets[index],
            costs=self.costs[index],
            tier_names=self.tier_names,
        )

    @property
    def known(self) -> np.ndarray:
        return ~np.isnan(self.targets)

    def fingerprint(self) -> str:
        """sha256 of the prompts and targets, independent of file and row order."""
        digest = hashlib.sha256()
        order = np.argsort([prompt_hash(p) for p in self.prompts], kind="stable")
        for i in order:
            digest.update(self.prompts[i].encode("utf-8", "surrogatepass"))
            digest.update(np.nan_to_num(self.targets[i], nan=-1.0).astype("<f8").tobytes())
        return digest.hexdigest()


def nothing_mapped(unused: dict[str, int]) -> DataError:
    """The error of logs whose rows the pool maps none of, naming each source with its models and the
    pool entry that would map them (a decision log's source is `dispatcher`; a row without a `source`
    column is of the source `default`)."""
    models: dict[str, list[str]] = {}
    for key in unused:
        source, _, model = key.partition("/")
        models.setdefault(source, []).append(model)
    listed = "; ".join(f"{source!r} ({', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''})"
                       for source, names in sorted(models.items()))
    return DataError("logs", f"no row maps to a tier of the pool, which maps none of the models of these sources: "
                             f"{listed}. Add each source to the pool's `sources:` as `SOURCE: {{TIER: MODEL, ...}}`")


def build_table(rows: Iterable[OutcomeRow | TierLabelRow], pool: Pool) -> tuple[PromptTable, dict[str, int]]:
    """Merge duplicate prompts and average each tier's scores.

    Outcome rows whose model plays no tier of the pool for their source are not used; they are
    counted in the returned stats, per model, so that a mis-typed pool is visible.

    Raises:
        DataError: a tier-labeled row names a tier the pool does not have, or no row maps to a tier.
    """
    n_tiers = len(pool.tiers)
    index_of: dict[str, int] = {}
    prompts: list[str] = []
    ids: list[str] = []
    sources: list[str] = []
    categories: list[str] = []
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    cost_sums: list[np.ndarray] = []
    cost_counts: list[np.ndarray] = []
    unused: dict[str, int] = {}
    text_of_id: dict[str, str] = {}
    texts_differ: dict[str, str] = {}  # a prompt_id -> a second text it names
    for row in rows:
        if row.prompt_id:
            first = text_of_id.setdefault(row.prompt_id, row.prompt)
            if first != row.prompt and row.prompt_id not in texts_differ:
                texts_differ[row.prompt_id] = row.prompt
        if isinstance(row, OutcomeRow):
            tier = pool.tier_of(row.source, row.model)
            if tier is None:
                key = f"{row.source}/{row.model}"
                unused[key] = unused.get(key, 0) + 1
                continue
        elif row.tier not in pool.tier_names:
            raise DataError("labels", f"unknown tier {row.tier!r} (pool tiers: {pool.tier_names})",
                            column="tier")
        i = index_of.get(row.prompt)
        if i is None:
            i = index_of[row.prompt] = len(prompts)
            prompts.append(row.prompt)
            ids.append(row.prompt_id or f"{row.source}:{prompt_hash(row.prompt)}")
            sources.append(row.source)
            categories.append(row.category)
            sums.append(np.zeros(n_tiers))
            counts.append(np.zeros(n_tiers))
            cost_sums.append(np.zeros(n_tiers))
            cost_counts.append(np.zeros(n_tiers))
        if isinstance(row, OutcomeRow):
            sums[i][tier] += row.score
            counts[i][tier] += 1
            if row.cost_usd is not None:
                cost_sums[i][tier] += row.cost_usd
                cost_counts[i][tier] += 1
        else:
            # "the cheapest tier that answers well is t" says every tier from t up answers well.
            label = pool.tier_names.index(row.tier)
            sums[i] += np.arange(n_tiers) >= label
            counts[i] += 1
    if not prompts:
        raise nothing_mapped(unused)
    if texts_differ:
        _warn_ids_with_several_texts(texts_differ, text_of_id)
    count_matrix = np.stack(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        targets = np.stack(sums) / count_matrix
        measured = np.stack(cost_sums) / np.stack(cost_counts)
    estimated = np.array(
        [[pool.estimated_cost(k, len(text)) for k in range(n_tiers)] for text in prompts]
    )
    costs = np.where(np.isnan(measured), estimated, measured)
    table = PromptTable(
        prompts=prompts,
        prompt_ids=ids,
        sources=np.array(sources, dtype=object),
        categories=np.array(categories, dtype=object),
        targets=targets.astype(np.float64),
        costs=costs,
        tier_names=pool.tier_names,
    )
    keep = table.known.any(axis=1)
    return table.subset(np.flatnonzero(keep)), unused


def _warn_ids_with_several_texts(texts_differ: dict[str, str], text_of_id: dict[str, str]) -> None:
    """Say that some prompt_ids name more than one text. Prompts are merged by their text, so each text
    trains as a prompt of its own with only the tiers its own rows score: a gateway that trims or
    templates a prompt differently per call splits one prompt's outcomes without a word."""
    prompt_id, second = next(iter(texts_differ.items()))
    log.warning("%d prompt_id(s) name more than one prompt text, e.g. %r: %r and %r; each text is trained on "
                "as a prompt of its own, with only the outcomes of its own rows: log one text per prompt_id",
                len(texts_differ), prompt_id, text_of_id[prompt_id][:80], second[:80])


def check_holdouts(sources: Iterable[str], categories: Iterable[str], holdout_sources: Sequence[str],
                   holdout_categories: Sequence[str]) -> None:
    """Refuse a held-out source or category that no prompt of the logs has.

    A misspelt name would hold out nothing: the run would train on every source and report a random
    split as if it measured transfer.

    Raises:
        DataError: names the held-out names no prompt has, and the names the logs do have.
    """
    for kind, wanted, present in (("source", holdout_sources, set(sources)),
                                  ("category", holdout_categories, set(categories))):
        missing = [name for name in wanted if name not in present]
        if missing:
            known = sorted(present)
            shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
            raise DataError("logs", f"no prompt has the held-out {kind} {', '.join(map(repr, missing))}; "
                                    f"the logs' {kind} names (of rows the pool maps): {shown}")


def held_out(table: PromptTable, sources: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """Which prompts of `table` are of a held-out source or category (`split_table` puts them in test)."""
    return np.isin(table.sources, list(sources)) | np.isin(table.categories, list(categories))


def split_table(table: PromptTable, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1,
                holdout_sources: Sequence[str] = (), holdout_categories: Sequence[str] = ()) -> np.ndarray:
    """Assign each prompt to train/val/test, seeded and by prompt (duplicates were merged already).

    Prompts of a held-out source or category all go to test, so the test split measures transfer to
    traffic the model never saw.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    n = len(table)
    split = np.empty(n, dtype=object)
    held = held_out(table, holdout_sources, holdout_categories)
    rng = np.random.default_rng(seed)
    rest = rng.permutation(np.flatnonzero(~held))
    n_val = round(len(rest) * val_fraction)
    n_test = round(len(rest) * test_fraction)
    split[rest[:n_val]] = "val"
    split[rest[n_val : n_val + n_test]] = "test"
    split[rest[n_val + n_test :]] = "train"
    split[held] = "test"
    return split
