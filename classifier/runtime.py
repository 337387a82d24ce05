"""ONNX Runtime inference: artifact in, typed routing decisions out. No torch on this path."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from classifier.artifact import (
    MODEL_INPUT_NAMES,
    MODEL_OUTPUT_NAME,
    UNFAMILIARITY_OUTPUT_NAME,
    ArtifactManifest,
    check_file_digest,
    load_manifest,
)
from classifier.artifact_layout import MODEL_FILE, TOKENIZER_FILE
from classifier.errors import ArtifactError, InvalidInputError, ModelError, PromptierError
from classifier.model_checks import probe, require_finite
from classifier.policy import RoutingRequest, allowed_mask, choose_tier, resolve_floor, resolve_threshold
from classifier.prior import prior_tier
from classifier.tokenization import EncodedBatch, PromptEncoder, concatenate

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
# Far above any real prompt, far below what would exhaust memory; the text is cut to its head and
# tail windows anyway, this only bounds what a caller may hand us.
MAX_TEXT_CHARS = 2_000_000
MAX_SESSION_BATCH = 16
# Prompts tokenized per hold of the tokenizer's lock (see TierClassifier._encode).
ENCODE_SLICE = 256


@dataclass(frozen=True)
class ClassificationResult:
    """The routing decision for one prompt."""

    tier: str
    scores: dict[str, float]
    threshold: float
    truncated: bool
    tokens: int
    model_version: str
    # "model", or "prior" when the prompt was too unlike the training prompts for the model's scores
    # to be trusted and the documented prior (classifier/prior.py) chose the tier.
    decided_by: str = "model"
    # How typical the prompt is of what the model was trained on: the share of held-out training-like
    # prompts that are more unlike it (1 = as typical as any, 0 = beyond all of them); None when the
    # artifact does not measure it.
    familiarity: float | None = None
    # The cheap floor the request routed under: where the cheapest tier's own score reaches it (and the
    # request allows that tier), that tier is chosen whatever `threshold` says (with `scores`, `threshold`
    # and the artifact's rule, this reproduces the decision); None when the request's mode has none or it
    # gave a threshold.
    cheap_floor: float | None = None


def validate_text(text: object, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Return `text` as a str fit for the model, or raise InvalidInputError saying why not."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"prompt is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    if not isinstance(text, str):
        raise InvalidInputError(f"prompt must be a string, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON can escape one) fails the tokenizer's batch
            raise InvalidInputError(f"prompt is not valid Unicode: unpaired surrogate at character {exc.start}"
                                    ) from None
    if not text.strip():
        raise InvalidInputError("prompt is empty")
    if len(text) > max_chars:
        raise InvalidInputError(f"prompt has {len(text)} characters; the limit is {max_chars}")
    return text


class TierClassifier:
    """A loaded artifact: classify prompts and apply the routing policy.

    Thread-safe: ONNX Runtime sessions may be run concurrently; the tokenizer is guarded.
    """

    def __init__(self, directory: Path, manifest: ArtifactManifest, session: ort.InferenceSession,
                 encoder: PromptEncoder) -> None:
        self.directory = directory
        self.manifest = manifest
        self._session = session
        self._encoder = encoder
        self._tier_names = manifest.tier_names
        self._temperatures = np.asarray(manifest.calibration.temperatures, dtype=np.float32)
        self._encode_lock = threading.Lock()
        familiarity = manifest.familiarity
        self._outputs = [MODEL_OUTPUT_NAME] + ([UNFAMILIARITY_OUTPUT_NAME] if familiarity else [])
        self._reference = np.asarray(familiarity.reference if familiarity else [], dtype=np.float64)
        self._reference_shares = np.linspace(0.0, 1.0, len(self._reference))

    @property
    def tier_names(self) -> list[str]:
        return list(self._tier_names)

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def encoder(self) -> PromptEncoder:
        return self._encoder

    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool], list[int]]:
        """Raw model logits [n, n_tiers] for already-validated texts, with truncation flags and token counts."""
        logits, _, batch = self._run(texts)
        return logits, batch.truncated, batch.token_counts

    def _run(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None, EncodedBatch]:
        """Logits, unfamiliarity (None when the artifact has none) and the encoded batch they came from.

        Raises:
            ModelError: the tokenizer or the model failed on these texts.
        """
        try:
            return self._encode_and_run(texts)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # `tokenizers` reports a Rust panic as a BaseException (pyo3's PanicException), which an
            # `except Exception` misses: in a server's model thread it would end the thread, and every
            # later request would wait forever. As an ordinary error it fails only these prompts.
            raise ModelError(f"the model failed on {len(texts)} prompt(s): {type(exc).__name__}: {exc}") from exc

    def _encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Tokenize under the lock a slice of ENCODE_SLICE prompts at a time: a large batch on one thread
        then holds up another thread's single prompt for one slice, not for the whole batch (50,000
        prompts held every other call for 1.5 s)."""
        if len(texts) <= ENCODE_SLICE:
            with self._encode_lock:
                return self._encoder.encode_batch(texts)
        slices = []
        for start in range(0, len(texts), ENCODE_SLICE):
            with self._encode_lock:
                slices.append(self._encoder.encode_batch(texts[start : start + ENCODE_SLICE]))
        return concatenate(slices, self._encoder.pad_id)

    def _encode_and_run(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None, EncodedBatch]:
        batch = self._encode(texts)
        if len(texts) <= MAX_SESSION_BATCH:  # the serving case: one run, no reordering
            feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            outputs = self._session.run(self._outputs, feeds)
            return outputs[0], outputs[1] if len(outputs) > 1 else None, batch
        # Run length-sorted slices of at most MAX_SESSION_BATCH prompts, each padded only to its own
        # longest prompt: less padding, and a bounded activation peak (a batch of 64 long prompts
        # in one run adds ~80 MB of resident memory).
        order = np.argsort(batch.token_counts, kind="stable")
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(order), MAX_SESSION_BATCH):
            rows = order[start : start + MAX_SESSION_BATCH]
            width = int(max(batch.token_counts[i] for i in rows))
            parts.append(self._session.run(
                self._outputs,
                {"input_ids": batch.input_ids[rows, :width], "attention_mask": batch.attention_mask[rows, :width]},
            ))
        results: list[np.ndarray] = []
        for output in range(len(self._outputs)):
            ordered = np.concatenate([part[output] for part in parts])
            restored = np.empty_like(ordered)
            restored[order] = ordered
            results.append(restored)
        return results[0], results[1] if len(results) > 1 else None, batch

    def probabilities(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool], list[int]]:
        """Calibrated per-tier probabilities [n, n_tiers] for already-validated texts."""
        logits, truncated, tokens = self.logits(texts)
        return self._calibrate(logits), truncated, tokens

    def _calibrate(self, logits: np.ndarray) -> np.ndarray:
        # exp overflows to inf for a logit far below zero, which gives the right probability, 0: not a
        # warning on every call of a model with confident scores.
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-logits / self._temperatures))

    def familiarity(self, unfamiliarity: np.ndarray) -> np.ndarray:
        """Unfamiliarity values as familiarity in [0, 1]: the share of reference prompts more unlike."""
        percentile = np.interp(unfamiliarity, self._reference, self._reference_shares)
        return 1.0 - percentile

    def classify(self, text: str, request: RoutingRequest | None = None) -> ClassificationResult:
        """Classify one prompt.

        Raises:
            InvalidInputError: empty, non-string, invalid UTF-8 or oversized text, text with nothing
                the model reads, or a bad policy.
            ModelError: the model failed on this prompt.
        """
        outcome = self.classify_items([(text, request)])[0]
        if isinstance(outcome, PromptierError):
            raise outcome  # as it is: "item 0" would name a list the caller never made
        return outcome

    def classify_batch(self, texts: Iterable[str], request: RoutingRequest | None = None
                       ) -> list[ClassificationResult]:
        """Classify many prompts in one model call (one policy for all of them).

        Raises:
            InvalidInputError: any text is invalid (the message names its index), the policy is bad, or
                `texts` is one string or not a collection of prompts (a generator is one).
            ModelError: the model failed on a prompt (the message names its index).
        """
        texts = _collection(texts, "classify_batch", "prompts")
        self._policy(_request_of(request))  # one policy for all of them: its error is not any one item's
        outcomes = self.classify_items([(text, request) for text in texts])
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, PromptierError):
                raise type(outcome)(f"item {index}: {outcome}") from outcome
        return outcomes  # type: ignore[return-value]

    def classify_items(self, items: Iterable[tuple[object, RoutingRequest | None]]
                       ) -> list[ClassificationResult | PromptierError]:
        """Classify (text, policy) pairs in one model call; a bad item yields its error, not an exception:
        InvalidInputError for what the caller sent, ModelError for a prompt the model failed on.

        This is the serving and batch-labeling path: one invalid prompt never fails its neighbours.

        Raises:
            InvalidInputError: `items` is not a collection of items (None, or one string).
        """
        items = _collection(items, "classify_items", "(prompt, RoutingRequest or None) pairs")
        outcomes: list[ClassificationResult | PromptierError | None] = [None] * len(items)
        valid: list[_ValidItem] = []
        for index, item in enumerate(items):
            try:
                text, request = _policy_of(item)
                checked = validate_text(text)
                threshold, floor, allowed = self._policy(request)
            except InvalidInputError as error:
                outcomes[index] = error
                continue
            valid.append(_ValidItem(index, checked, threshold, floor, allowed))
        if valid:
            self._decide_isolating(valid, outcomes)
        return [outcome for outcome in outcomes if outcome is not None]

    def _decide_isolating(self, items: list[_ValidItem], outcomes: list[ClassificationResult | PromptierError | None]
                          ) -> None:
        """`_decide`, and where the model fails on the batch, again on each half: only the prompts it
        fails on get its error, in about 2 log2(n) more runs per failing prompt rather than n."""
        try:
            self._decide(items, outcomes)
        except ModelError as error:
            if len(items) == 1:
                outcomes[items[0].position] = error
                return
            middle = len(items) // 2
            self._decide_isolating(items[:middle], outcomes)
            self._decide_isolating(items[middle:], outcomes)

    def _policy(self, request: RoutingRequest | None) -> tuple[float, float | None, tuple[bool, ...] | None]:
        """The threshold, cheap floor and allowed tiers (None: all) a request routes under.

        Raises:
            InvalidInputError: an unknown mode or tier, or a threshold or share out of range.
        """
        threshold = resolve_threshold(self.manifest.policy, request)
        floor = resolve_floor(self.manifest.policy, request)
        allowed = (None if request is None or request.allowed_tiers is None
                   else tuple(allowed_mask(self._tier_names, request.allowed_tiers).tolist()))
        return threshold, floor, allowed

    def _decide(self, valid: list[_ValidItem], outcomes: list[ClassificationResult | PromptierError | None]
                ) -> None:
        texts = [item.text for item in valid]
        logits, unfamiliarity, batch = self._run(texts)
        require_finite(logits, unfamiliarity, len(texts))
        # Python floats at once, not one numpy scalar per score; the policy then runs per row in
        # Python (`choose_tier`), since one request is one row.
        rows = self._calibrate(logits).tolist()
        familiar: list[float | None] = [None] * len(valid)
        unknown = [False] * len(valid)
        config = self.manifest.familiarity
        if unfamiliarity is not None and config is not None:
            familiar = self.familiarity(unfamiliarity).tolist()
            # A prompt none of whose tokens the vocabulary knows ([UNK]: a script it lacks, only emoji)
            # gives the model nothing but its length: the prior routes it, as it does one unlike the
            # training prompts. (Not a share short of all: many CJK ideographs are [UNK] too, and the
            # ones it knows carry what the model learned of those languages.)
            unreadable = [unread == content for unread, content in
                          zip(batch.unknown_tokens, batch.content_tokens, strict=True)]
            unknown = [far or unread for far, unread in
                       zip((unfamiliarity > config.threshold).tolist(), unreadable, strict=True)]
            # Such a prompt is nothing like the training prompts, whatever a row of [UNK]s measures
            # (the same row for every such prompt, and a typical one): reported as typical, it would
            # contradict the prior's deciding it.
            familiar = [0.0 if unread else share for share, unread in zip(familiar, unreadable, strict=True)]
        rule = self.manifest.policy.rule
        for row, item in enumerate(valid):
            if batch.content_tokens[row] == 0:
                # Zero-width spaces, a byte-order mark, control characters: the tokenizer deletes them
                # all, and the model would score the bare [CLS] [SEP] as a confident easy prompt.
                outcomes[item.position] = InvalidInputError(
                    "prompt has no text the model reads: what it reads (the whole prompt, or the start and "
                    "end of a long one) is only whitespace, control or formatting characters")
                continue
            if unknown[row]:
                assert config is not None
                chosen = _nearest_allowed(prior_tier(item.text, len(self._tier_names), config.prior), item.allowed)
            else:
                chosen = choose_tier(rows[row], item.threshold, item.allowed, rule, item.cheap_floor)
            outcomes[item.position] = ClassificationResult(
                tier=self._tier_names[chosen],
                scores=dict(zip(self._tier_names, rows[row], strict=True)),
                threshold=item.threshold,
                truncated=batch.truncated[row],
                tokens=batch.token_counts[row],
                model_version=self.manifest.model_version,
                decided_by="prior" if unknown[row] else "model",
                familiarity=familiar[row],
                cheap_floor=item.cheap_floor,
            )


def _collection(values: object, method: str, what: str) -> Sequence:
    """`values` as a sequence: as it is when it is one, else the list of what it yields (a generator).

    Raises:
        InvalidInputError: it is one string or bytes (whose characters would each be read as a prompt),
            a mapping (whose keys would be) or a set (whose order, which the results follow, is no one's),
            or not iterable at all (None, say).
    """
    if isinstance(values, str | bytes | bytearray):
        kind = "string" if isinstance(values, str) else "bytes object"
        raise InvalidInputError(f"{method} takes a list of {what}, not one {kind}")
    if isinstance(values, Mapping | AbstractSet):
        raise InvalidInputError(f"{method} takes a list of {what}, not a {type(values).__name__}: its results "
                                "come back in the order of the list")
    if isinstance(values, Sequence):
        return values
    if not isinstance(values, Iterable):
        raise InvalidInputError(f"{method} takes a list of {what}, got {type(values).__name__}")
    return list(values)


def _policy_of(item: object) -> tuple[object, RoutingRequest | None]:
    """An item as its (text, policy) pair.

    Raises:
        InvalidInputError: the item is not a pair, or its policy is neither a RoutingRequest nor None.
    """
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise InvalidInputError(f"an item is a (prompt, RoutingRequest or None) pair, got {type(item).__name__}")
    text, request = item
    return text, _request_of(request)


def _request_of(request: object) -> RoutingRequest | None:
    """`request` as a policy.

    Raises:
        InvalidInputError: it is neither a RoutingRequest nor None.
    """
    if request is not None and not isinstance(request, RoutingRequest):
        raise InvalidInputError(f"a policy is a RoutingRequest or None, got {type(request).__name__}")
    return request


class _ValidItem(NamedTuple):
    """One item that passed validation, with the policy it routes under."""

    position: int
    text: str
    threshold: float
    cheap_floor: float | None
    allowed: tuple[bool, ...] | None  # None: every tier


def _nearest_allowed(tier: int, allowed: tuple[bool, ...] | None) -> int:
    """`tier` if allowed, else the next more capable allowed tier, else the most capable allowed one."""
    if allowed is None:
        return tier
    candidates = [index for index, ok in enumerate(allowed) if ok]
    return next((index for index in candidates if index >= tier), candidates[-1])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or 'unreadable'}") from exc


# ONNX Runtime keeps its thread count in a C int and fails on more with a TypeError that names none of
# this; far beyond any machine's cores, so it only stops a typo.
MAX_THREADS = 1024


def _session(model: bytes, model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for corrupt/invalid graphs
        raise ArtifactError(f"{model_path} is not a loadable ONNX model: {exc}") from exc


# Tries of a load whose directory is replaced while it reads it (see `load`).
LOAD_ATTEMPTS = 3


def load(path: str | Path | None = None, threads: int = 1) -> TierClassifier:
    """Load and validate an artifact directory; `None` loads the default model shipped with the package.

    The model runs once on a probe prompt before this returns, so a broken artifact fails here,
    never on a live request.

    Args:
        path: artifact directory, or None for the default model.
        threads: ONNX Runtime intra-op threads (1 gives the lowest latency per call).

    Raises:
        ArtifactError: `path` is not an artifact directory (missing, or a file), missing files, invalid
            manifest, unloadable ONNX or tokenizer, wrong input or output signature, an output the
            manifest does not read, a failure, wrong shape or non-finite output on the probe, or a model
            or tokenizer whose sha256 is not the one the manifest records.
        InvalidInputError: `path` is neither None nor a path (an empty string included), or `threads` is
            not a whole number from 1 to MAX_THREADS.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InvalidInputError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
    if path is not None and not isinstance(path, str | os.PathLike):
        raise InvalidInputError(f"path must be an artifact directory or None, got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():
        # Path("") is the working directory: an unset setting would load whatever artifact is there, or
        # fail naming ".", instead of saying what is wrong.
        raise InvalidInputError("path is empty: give an artifact directory, or None for the shipped model")
    directory = Path(path) if path is not None else DEFAULT_MODEL_DIR
    # A re-export or `eval --record` replaces the directory whole (artifact_layout): a load that read its
    # manifest before the swap and its files after would mix two artifacts, or find neither, and blame the
    # artifact. Where the directory was replaced meanwhile, the load is tried again on the one now there.
    for attempt in range(LOAD_ATTEMPTS):
        before = _directory_identity(directory)
        try:
            return _load_once(directory, threads)
        except ArtifactError:
            if attempt == LOAD_ATTEMPTS - 1 or _directory_identity(directory) == before:
                raise
    raise AssertionError("unreachable")


def _directory_identity(directory: Path) -> tuple[int, int] | None:
    """The directory's device and inode (a replaced directory has another), or None where there is none."""
    try:
        status = os.stat(directory)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _load_once(directory: Path, threads: int) -> TierClassifier:
    """`load` of one directory as it is now (see `load`)."""
    manifest = load_manifest(directory)
    # Each file is read once: the bytes whose digest is checked are the bytes that serve.
    tokenizer_bytes, model_bytes = _read(directory / TOKENIZER_FILE), _read(directory / MODEL_FILE)
    encoder = PromptEncoder.from_bytes(tokenizer_bytes, manifest.truncation, directory / TOKENIZER_FILE)
    session = _session(model_bytes, directory / MODEL_FILE, threads)
    input_names = tuple(sorted(i.name for i in session.get_inputs()))
    if input_names != tuple(sorted(MODEL_INPUT_NAMES)):
        raise ArtifactError(f"model inputs are {input_names}, expected {MODEL_INPUT_NAMES}")
    output_names = [o.name for o in session.get_outputs()]
    expected = [MODEL_OUTPUT_NAME] + ([UNFAMILIARITY_OUTPUT_NAME] if manifest.familiarity else [])
    if manifest.familiarity is None and UNFAMILIARITY_OUTPUT_NAME in output_names:
        # Without the manifest's threshold the output would be ignored: no prompt could reach the prior.
        raise ArtifactError(f"the model has an {UNFAMILIARITY_OUTPUT_NAME!r} output but the manifest has no "
                            "familiarity section to read it with")
    if output_names != expected:  # an output the manifest does not read would be ignored without a word
        raise ArtifactError(f"model outputs are {output_names}, expected {expected}")
    classifier = TierClassifier(directory, manifest, session, encoder)
    probe(classifier._run, len(manifest.tiers), session, encoder)
    # After the checks above, so that a file that is not a model or tokenizer at all is named as such;
    # a valid one that is not the exported file is refused here.
    check_file_digest(manifest, TOKENIZER_FILE, tokenizer_bytes)
    check_file_digest(manifest, MODEL_FILE, model_bytes)
    return classifier
