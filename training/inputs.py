"""What a training run trains on: the logs read into memory or streamed, with teacher targets and anchors.

`promptier train` (training/pipeline.py) builds its TrainingInputs here, fits on them, and finishes
(calibration, export, evaluation) with what they hold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifier.artifact import TruncationConfig
from classifier.artifact_layout import SEEN_PROMPTS_FILE
from classifier.runtime import TierClassifier
from classifier.runtime import load as load_artifact
from classifier.tokenization import PromptEncoder
from training.anchors import CHAT_ANCHOR_PREFIX
from training.config import TrainConfig
from training.data import SkipReport, check_unicode, read_logs
from training.errors import DataError
from training.labels import PromptTable, build_table, check_holdouts, held_out, prompt_hash, split_table
from training.pool import Pool, load_pool

if TYPE_CHECKING:
    from training.token_store import Examples

log = logging.getLogger(__name__)
TRAINSET_DIR = "trainset"  # in the work dir: the training set as token ids, for streaming and other processes


@dataclass
class PreparedData:
    table: PromptTable
    split: np.ndarray
    pool: Pool
    skipped: SkipReport
    unused_models: dict[str, int]


def warn_unmapped_sources(pool: Pool, unused: dict[str, int]) -> None:
    """Say which sources of the logs go wholly unused because the pool maps none of their models: a
    forgotten pool entry (a decision log's `dispatcher` most often) would otherwise leave a log out of
    training with nothing on the console to say so."""
    for source, rows in pool.unmapped_sources(unused).items():
        models = sorted(key.split("/", 1)[1] for key in unused if key.split("/", 1)[0] == source)
        log.warning("source %r: none of its %d outcome rows is used, as the pool maps none of its models to a "
                    "tier; to use them, add to the pool `sources: {%s: {TIER: MODEL, ...}}` (its models: %s)",
                    source, rows, source, ", ".join(models[:5]) + (", ..." if len(models) > 5 else ""))


def warn_unseen_pool_models(pool: Pool, table: PromptTable, unused: dict[str, int]) -> None:
    """Say which tiers the pool maps, in a source of the logs, to a model none of that source's rows
    names: a mistyped model name would otherwise leave the tier unknown (masked) for every prompt of the
    source, and the model would be trained and evaluated without it, with nothing on the console."""
    for source in sorted(set(table.sources.tolist())):
        mapped = pool.sources.get(source, {})
        rows = table.sources == source
        for tier, model in mapped.items():
            if np.isnan(table.targets[rows, pool.tier_names.index(tier)]).all():
                others = sorted(key.split("/", 1)[1] for key in unused if key.split("/", 1)[0] == source)
                listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                log.warning("source %r: the pool maps tier %r to model %r, which none of its rows names, so that "
                            "tier is unknown for all %d of its prompts (its models the pool does not map: %s)",
                            source, tier, model, int(rows.sum()), listed or "none")


def prepare_data(logs: Sequence[str | Path], pool_path: str | Path | Pool, config: TrainConfig,
                 skip_invalid: bool = False) -> PreparedData:
    pool = pool_path if isinstance(pool_path, Pool) else load_pool(pool_path)
    rows, skipped = read_logs(logs, skip_invalid=skip_invalid, explored_only=config.outcome_rows == "explored",
                              tiers=pool.tier_names)
    table, unused = build_table(rows, pool)
    warn_unmapped_sources(pool, unused)
    warn_unseen_pool_models(pool, table, unused)
    check_holdouts(table.sources, table.categories, config.holdout_sources, config.holdout_categories)
    split = split_table(table, config.seed, config.val_fraction, config.test_fraction,
                        config.holdout_sources, config.holdout_categories)
    if not (split == "train").any() or not (split == "val").any():
        raise DataError("logs", f"too few prompts ({len(table)}) for a train and a validation split"
                        + held_out_note(table, config))
    return PreparedData(table, split, pool, skipped, unused)


def held_out_note(table: PromptTable, config: TrainConfig) -> str:
    """What a too-small split owes to `--holdout-source`/`--holdout-category` ("" when nothing is held
    out): holding out a log's only source sends every prompt to test, which "too few prompts" alone
    would blame on the size of the logs."""
    held = held_out(table, config.holdout_sources, config.holdout_categories)
    if not held.any():
        return ""
    return (f": the held-out sources and categories put {int(held.sum())} of them in the test split, leaving "
            f"{int((~held).sum())} to train and validate on; hold out less, or add logs of other sources")


def anchor_order(anchors: PromptTable, config: TrainConfig) -> np.ndarray:
    """The anchor table's rows in the order training sees them: the whole set of generated anchors
    `anchor_weight` times over, then the chat openers `chat_anchor_weight` times over (a weight of their
    own because they outnumber the generated easy anchors, all of one kind)."""
    is_chat = np.array([prompt_id.startswith(CHAT_ANCHOR_PREFIX) for prompt_id in anchors.prompt_ids], dtype=bool)
    chat_weight = config.chat_anchor_weight or config.anchor_weight
    return np.concatenate([np.tile(np.flatnonzero(~is_chat), config.anchor_weight),
                           np.tile(np.flatnonzero(is_chat), chat_weight)]).astype(np.int64)


def anchor_table(pool: Pool, config: TrainConfig) -> PromptTable | None:
    """The config's anchor prompts, generated and chat openers (none of them in the probe suite), as a
    table, or None."""
    if not config.anchors and not config.chat_anchors:
        return None
    from training.anchors import ANCHOR_SOURCE, anchor_rows, assumed_outcomes
    from training.probes import load_probes

    probes = [p.prompt for p in load_probes()]
    rows = anchor_rows(pool.tier_names, config.anchors, config.seed, exclude=probes)
    if config.chat_anchors:
        from training.chat_anchors import chat_openers

        openers = chat_openers("train", exclude=probes + [row["prompt"] for row in rows])
        rows += [{"prompt": text, "source": ANCHOR_SOURCE, "category": "easy", "prompt_id": f"{CHAT_ANCHOR_PREFIX}{i}"}
                 for i, text in enumerate(openers)]
    n_tiers = len(pool.tier_names)
    prompts = [row["prompt"] for row in rows]
    return PromptTable(
        prompts=prompts, prompt_ids=[row["prompt_id"] for row in rows],
        sources=np.array([row["source"] for row in rows], dtype=object),
        categories=np.array([row["category"] for row in rows], dtype=object),
        targets=np.array([assumed_outcomes(row["category"], n_tiers) for row in rows]),
        costs=np.array([[pool.estimated_cost(k, len(text)) for k in range(n_tiers)] for text in prompts]),
        tier_names=pool.tier_names)


# The reason a decision-log request line without prompt text is left out: the dispatcher logs an empty
# prompt for a request with no user text to classify, and none at all with store_prompts off.
NO_PROMPT_TEXT = "request without prompt text (no user text, or decision_log.store_prompts off)"


def read_unlabeled(paths: Sequence[str | Path], report: SkipReport | None = None,
                   skip_invalid: bool = False) -> list[str]:
    """Prompts without outcomes (JSONL or Parquet with a `prompt` column), for distillation or the
    export's parity check.

    A decision log's outcome lines, which hold no prompt, are passed over; so are its request lines
    without prompt text, counted in `report` as not trainable (as the outcome join counts them), since
    the dispatcher logs them for requests with no user text.

    Raises:
        DataError: the first invalid row (a line of another file without a prompt, say), unless
            `skip_invalid` (then it is counted in `report`); decision logs none of whose request lines
            holds its text.
    """
    from training.data import OUTCOME_KIND, expand_paths, read_records

    report = report if report is not None else SkipReport()
    prompts = []
    passed_over = skipped = 0
    for path in expand_paths(paths):
        for number, record in read_records(path):
            if isinstance(record, dict) and record.get("kind") == OUTCOME_KIND:
                continue
            try:
                text = _unlabeled_prompt(record, str(path), number)
            except DataError as error:
                if not skip_invalid:
                    raise
                report.add(error)
                skipped += 1
                continue
            if text is None:
                passed_over += 1
                continue
            prompts.append(text)
    if skipped:
        log.warning("unlabeled prompts: %d invalid rows skipped (--skip-invalid)", skipped)
    if passed_over:
        report.not_trainable[NO_PROMPT_TEXT] += passed_over
        log.info("unlabeled prompts: %d decision-log request lines without prompt text passed over", passed_over)
        if not prompts:  # all of them without text: store_prompts was off, and the run would learn nothing
            raise DataError(", ".join(map(str, paths)), "no request line holds its prompt text (a decision log "
                            "written with decision_log.store_prompts off): nothing to learn from")
    return prompts


def _unlabeled_prompt(record: object, path: str, row: int) -> str | None:
    """A record's prompt text; None for a decision log's request line without one.

    Raises:
        DataError: the record is not a line of prompts (the reader's error, or no prompt text outside a
            decision log's request lines).
    """
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(path, "missing or empty prompt", row, "prompt")
    text = record.get("prompt")
    # A request line of a decision log (only those record the routed tier), as the outcome join knows them.
    if "routed_tier" in record and (text is None or (isinstance(text, str) and not text.strip())):
        return None
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, "missing or empty prompt", row, "prompt")
    check_unicode(text, path, row, "prompt")
    return text


def new_unlabeled(paths: Sequence[str | Path], table: PromptTable, split: np.ndarray, report: SkipReport | None = None,
                  skip_invalid: bool = False) -> tuple[list[str], int]:
    """The unlabeled prompts of `paths` that the training and validation logs do not hold, each once;
    and how many were dropped. Rows left out as they are read are counted in `report` (see
    `read_unlabeled`).

    A training prompt already has its outcomes, a validation prompt is what calibration and thresholds
    are chosen on (training on its text would bias them), and a repeat would only weigh one prompt more
    than the rest. A test prompt is kept, with a warning: the test figures then include prompts whose
    text, though none of their outcomes, was trained on (leave-one-source-out with traffic does this on
    purpose and scores only the other half).
    """
    if not paths:
        return [], 0
    given = read_unlabeled(paths, report, skip_invalid)
    known = {table.prompts[i] for i in np.flatnonzero(split != "test")}
    tested = {table.prompts[i] for i in np.flatnonzero(split == "test")}
    fresh: list[str] = []
    for text in given:
        if text not in known:
            known.add(text)
            fresh.append(text)
    if len(fresh) < len(given):
        log.info("unlabeled prompts: %d of %d dropped (training or validation prompts of the logs, or repeats)",
                 len(given) - len(fresh), len(given))
    in_test = sum(text in tested for text in fresh)
    if in_test:
        log.warning("unlabeled prompts: %d are test-split prompts of the logs; the test figures include their texts",
                    in_test)
    return fresh, len(given) - len(fresh)


@dataclass
class TrainingInputs:
    """What a run trains on and is judged by, from logs read into memory or streamed.

    `table` and `split` hold every prompt when the logs were read into memory, and only the held-out
    (validation and test) prompts when they were streamed; then the training prompts exist only as
    token ids in the store behind `tokens`.
    """

    tokens: list[np.ndarray] | Examples
    targets: np.ndarray
    table: PromptTable
    split: np.ndarray
    seen_hashes: np.ndarray  # uint64 hashes of every prompt trained or calibrated on
    familiarity_texts: list[str] | None  # the texts trained on; None: read the token store
    anchor_texts: list[str]
    parity_extra: list[str]  # training prompts that fill the parity set when too few are held out
    fingerprint: str
    record: dict  # what the manifest's `training` says about the data

    @property
    def streamed(self) -> bool:
        """The training prompts exist only as token ids: held-out prompts are scored a chunk at a time."""
        return self.familiarity_texts is None


def with_previous_seen(inputs: TrainingInputs, previous: Path) -> TrainingInputs:
    """The inputs of a run continued from the artifact `previous`, which counts what it saw as seen.

    The continued weights learned from every prompt `previous` saw, and from its ancestors' (its
    `seen_prompts.txt` holds theirs, this function having put them there): the new artifact's seen
    prompts hold them all, so that `promptier eval` never scores it on them, and its test split leaves
    out those among its own test prompts (they are neither trained on nor evaluated: moving them to
    training would change the split that a rerun of the recipe must rebuild).

    Raises:
        DataError: every test prompt of the logs was seen by `previous` or an ancestor.
    """
    from training.streaming import hash64, read_hashes

    inherited = read_hashes(previous / SEEN_PROMPTS_FILE)
    hashes = np.fromiter((hash64(text) for text in inputs.table.prompts), dtype=np.uint64,
                         count=len(inputs.table))
    seen_before = (inputs.split == "test") & np.isin(hashes, inherited)
    tested = int(np.count_nonzero(inputs.split == "test"))
    if tested and int(seen_before.sum()) == tested:
        raise DataError("logs", f"every test prompt of the new logs was seen by {previous} or a model it was "
                        "continued from: nothing to evaluate the continued model on")
    if seen_before.any():
        log.info("test split: %d of %d prompts left out, as %s or a model it was continued from saw them",
                 int(seen_before.sum()), tested, previous)
    keep = np.flatnonzero(~seen_before)
    return replace(inputs, table=inputs.table.subset(keep), split=inputs.split[keep],
                   seen_hashes=np.union1d(inputs.seen_hashes.astype(np.uint64), inherited),
                   record={**inputs.record, "test_prompts_seen_before": int(seen_before.sum())})


def require_enough_prompts(distinct_prompts: int) -> None:
    """Refuse logs too small for the export's parity check, which holds the exported model to torch's on
    MIN_PARITY_PROMPTS prompts (held-out ones first, then training ones) before anything is written."""
    from training.export import MIN_PARITY_PROMPTS

    if distinct_prompts < MIN_PARITY_PROMPTS:
        raise DataError("logs", f"too few prompts: {distinct_prompts} distinct prompts in the logs; training needs "
                        f"at least {MIN_PARITY_PROMPTS} distinct prompts (the exported model is checked against "
                        "torch on that many before it is written)")


# Calibration and the mode thresholds are chosen by routing validation prompts among the tiers whose
# outcomes they have: a prompt known on one tier only can go nowhere else, so it measures no threshold.
MIN_COMPARABLE_PROMPTS = 20


def require_comparable_prompts(table: PromptTable, split: np.ndarray) -> None:
    """Refuse logs whose validation prompts too rarely have outcomes on two tiers or more (fewer than
    MIN_COMPARABLE_PROMPTS, unless every one of a smaller split has): the thresholds chosen on them would
    mean nothing (a log of served requests, one tier per prompt, chooses threshold 0: every prompt to the
    cheapest tier)."""
    validation = table.targets[split == "val"]
    comparable = int(np.count_nonzero((~np.isnan(validation)).sum(axis=1) >= 2))
    if comparable < min(MIN_COMPARABLE_PROMPTS, len(validation)) or comparable == 0:
        raise DataError("logs", f"only {comparable} of the {len(validation)} validation prompts have outcomes on two "
                        f"tiers or more (at least {MIN_COMPARABLE_PROMPTS} are needed to choose the thresholds). "
                        "A decision log knows one tier per request: train on it together with logs that score "
                        "several tiers per prompt (benchmark logs, or a sample judged on every tier)")


def require_every_tier_known(table: PromptTable, tier_names: Sequence[str]) -> None:
    """Refuse logs in which a tier of the pool has no outcome for any prompt: the pool maps it, in every
    source, to a model that no row names (a typo, most often, warned about as the logs are read), and the
    model would ship a tier it never learned from outcomes, its scores for it chance or the anchors'.

    Raises:
        DataError: naming the tiers.
    """
    unknown = [name for k, name in enumerate(tier_names) if np.isnan(table.targets[:, k]).all()]
    if unknown:
        raise DataError("logs", f"no prompt of the logs has an outcome on the tier(s) {unknown}: the pool maps them "
                        "to models that no row names (see the warnings above), and a model cannot learn a tier "
                        "it never saw answer")


def vocab_size(tokenizer_file: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(tokenizer_file)).get_vocab_size())


def in_memory_inputs(logs: Sequence[str | Path], pool: Pool, config: TrainConfig, encoder: PromptEncoder,
                      backbone_dir: Path, truncation: TruncationConfig, work_dir: Path, skip_invalid: bool,
                      teacher: Path | None, unlabeled: Sequence[str | Path], distill_weight: float,
                      cache_dir: Path | None) -> TrainingInputs:
    """Every row read into a PromptTable; teacher targets, unlabeled prompts and anchors added."""
    from training.export import MIN_PARITY_PROMPTS
    from training.trainer import tokenize_all

    data = prepare_data(logs, pool, config, skip_invalid)
    table, split = data.table, data.split
    require_enough_prompts(len(table))  # before any teacher labels or fits anything
    require_comparable_prompts(table, split)
    log.info("%d prompts (%s); %s", len(table), {s: int((split == s).sum()) for s in ("train", "val", "test")},
             data.skipped.summary())
    train_index = np.flatnonzero(split == "train")
    train_texts = [table.prompts[i] for i in train_index]
    targets = table.targets[train_index]
    extra, repeated = new_unlabeled(unlabeled, table, split, data.skipped, skip_invalid)
    if teacher is not None:
        teacher_runtime = load_artifact(teacher, threads=config.threads)
        if teacher_runtime.tier_names != pool.tier_names:
            raise DataError(str(teacher), f"teacher tiers {teacher_runtime.tier_names} differ from the pool's "
                            f"{pool.tier_names}")
        teacher_probs = _cached_teacher_probabilities(teacher_runtime, train_texts + extra, work_dir)
        targets = np.concatenate([blend(teacher_probs[: len(train_texts)], targets, distill_weight),
                                  teacher_probs[len(train_texts):]])
    else:
        # Outcomes unknown (NaN): the embedding teacher, fitted on the logged prompts, labels them
        # (pipeline.train has refused unlabeled prompts when the recipe has no teacher).
        targets = np.concatenate([targets, np.full((len(extra), targets.shape[1]), np.nan)])
    train_texts = train_texts + extra
    anchors = anchor_table(pool, config)
    order = anchor_order(anchors, config) if anchors is not None else np.zeros(0, dtype=np.int64)
    anchor_rows = len(order)
    if anchors is not None:
        train_texts = train_texts + [anchors.prompts[i] for i in order]
        targets = np.concatenate([targets, anchors.targets[order]])
    teacher_report = None
    if config.teacher is not None:
        distilled, teacher_report = _embedding_teacher_targets(config, backbone_dir, truncation, cache_dir,
                                                               train_texts, targets, table, split)
        # Anchors keep the outcomes they stand for: the teacher's softer guesses for them would blur
        # the very ends they are there to mark. Logged and unlabeled prompts take the teacher's.
        taught = len(train_texts) - anchor_rows
        targets = np.concatenate([distilled[:taught], targets[taught:]])
    # Unlabeled prompts count as seen: an evaluation must not score the model on what it trained on.
    seen_texts = [table.prompts[i] for i in np.flatnonzero(split != "test")] + extra
    seen = np.array(sorted({int(prompt_hash(text), 16) for text in seen_texts}), dtype=np.uint64)
    record = {"prompts": {s: int((split == s).sum()) for s in ("train", "val", "test")},
              "unlabeled_prompts": len(extra), "unlabeled_dropped": repeated,
              "anchor_prompts": len(anchors) if anchors else 0, "embedding_teacher": teacher_report,
              "skipped_rows": dict(data.skipped.counts), "unused_models": data.unused_models}
    return TrainingInputs(tokens=tokenize_all(encoder, train_texts), targets=targets, table=table, split=split,
                          seen_hashes=seen, familiarity_texts=train_texts,
                          anchor_texts=anchors.prompts if anchors is not None else [],
                          parity_extra=[table.prompts[i] for i in train_index[:MIN_PARITY_PROMPTS]],
                          fingerprint=table.fingerprint(), record=record)


def streamed_inputs(logs: Sequence[str | Path], pool: Pool, config: TrainConfig, encoder: PromptEncoder,
                     tokenizer_file: Path, work_dir: Path, skip_invalid: bool, teacher: Path | None
                     ) -> TrainingInputs:
    """The logs streamed into a token store in the work dir (training/streaming.py); anchors appended."""
    from training.streaming import stream_logs
    from training.token_store import Examples, TokenStoreWriter, save_examples
    from training.trainer import tokenize_all

    if teacher is not None or config.teacher is not None:
        raise DataError("config", "a teacher reads every training prompt's text, which streaming does not keep: "
                        "train with streaming: false, or use a recipe without a teacher")
    writer = TokenStoreWriter(work_dir / TRAINSET_DIR, vocab_size(tokenizer_file))
    data = stream_logs(logs, pool, config, encoder, writer, skip_invalid)
    warn_unmapped_sources(pool, data.unused_models)
    require_enough_prompts(sum(data.prompt_counts.values()))
    n_train = len(data.train_targets)
    slots, targets = np.arange(n_train), data.train_targets
    anchors = anchor_table(pool, config)
    if anchors is not None:
        anchor_slots = writer.append(tokenize_all(encoder, anchors.prompts))
        order = anchor_order(anchors, config)
        slots = np.concatenate([slots, np.asarray(anchor_slots)[order]])
        targets = np.concatenate([targets, anchors.targets[order]])
    store = writer.close()
    require_comparable_prompts(data.heldout, data.heldout_split)
    save_examples(work_dir / TRAINSET_DIR, slots, targets)
    log.info("%s prompts; %s", data.prompt_counts, data.skipped.summary())
    record = {"prompts": data.prompt_counts, "unlabeled_prompts": 0,
              "anchor_prompts": len(anchors) if anchors else 0, "embedding_teacher": None,
              "skipped_rows": dict(data.skipped.counts), "unused_models": data.unused_models,
              "data": {"reading": "streamed", **data.stats}}
    return TrainingInputs(tokens=Examples(store, slots), targets=targets, table=data.heldout,
                          split=data.heldout_split, seen_hashes=np.concatenate([data.train_hashes, data.val_hashes]),
                          familiarity_texts=None, anchor_texts=anchors.prompts if anchors is not None else [],
                          parity_extra=data.parity_texts, fingerprint=data.fingerprint, record=record)


def _embedding_teacher_targets(config: TrainConfig, backbone_dir: Path, truncation: TruncationConfig,
                               cache_dir: Path | None, texts: list[str], targets: np.ndarray, table: PromptTable,
                               split: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fit the embedding teacher on (texts, targets) and return the student's targets: its probabilities,
    blended with the known targets by `distill_weight`; and its validation APGR per source."""
    from training.embedding_teacher import fit_teacher, teacher_features, teacher_probabilities
    from training.evaluate import routing_groups, score_group

    spec = config.teacher
    assert spec is not None
    log.info("embedding teacher: features for %d prompts", len(texts))
    features = teacher_features(texts, backbone_dir, truncation, cache_dir)
    # Unlabeled prompts (no known outcome) carry no loss; the teacher labels them afterwards.
    labelled = ~np.isnan(targets).all(axis=1)
    network = fit_teacher(features[labelled], targets[labelled], spec, config.seed)
    blended = blend(teacher_probabilities(network, features), targets, spec.distill_weight)
    val = np.flatnonzero(split == "val")
    val_probabilities = teacher_probabilities(
        network, teacher_features([table.prompts[i] for i in val], backbone_dir, truncation, cache_dir))
    report = {}
    groups = routing_groups(table.sources[val], table.targets[val])
    for source, rows in groups.items():
        if source == "all":
            continue  # the teacher is reported per source
        group = score_group({"teacher": val_probabilities[rows]}, table.targets[val][rows], table.costs[val][rows],
                            table.tier_names, config.policy_rule)
        report[source] = round(group["methods"]["teacher"]["apgr"], 4)
    log.info("embedding teacher: validation APGR %s", report)
    return blended, {"validation_apgr": report}


def blend(teacher: np.ndarray, targets: np.ndarray, weight: float) -> np.ndarray:
    """Distillation targets: `weight` x the teacher's probabilities + the rest from the logged outcomes;
    the teacher's alone where the outcome is unknown (NaN)."""
    return np.where(np.isnan(targets), teacher, weight * teacher + (1 - weight) * np.nan_to_num(targets))


def _cached_teacher_probabilities(runtime: TierClassifier, texts: Sequence[str], work_dir: Path,
                                  batch: int = 64) -> np.ndarray:
    """The teacher's probabilities for `texts`, kept in the work dir so that a resumed run skips them."""
    import hashlib

    from tqdm.auto import tqdm

    key = hashlib.sha256(runtime.model_version.encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    cache = work_dir / f"teacher-{key.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    parts = [runtime.probabilities(texts[i : i + batch])[0]
             for i in tqdm(range(0, len(texts), batch), desc="teacher", unit="batch")]
    probabilities = np.concatenate(parts)
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, probabilities)
    return probabilities
