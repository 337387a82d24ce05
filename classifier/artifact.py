"""The artifact manifest: its schema, and its one reader and writer.

The files of an artifact directory are named in classifier/artifact_layout.py. `load_manifest` is
the only reader of `manifest.json`; everything that needs an artifact goes through
`classifier.load`, which calls it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from classifier.artifact_layout import MANIFEST_FILE, MODEL_FILE, REQUIRED_FILES, TOKENIZER_FILE, write_member_text
from classifier.errors import ArtifactError

# Version 2 added `files`, the sha256 of the model and the tokenizer, which loading checks. Version 1
# manifests (without it) still load, unchecked.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
DIGESTED_FILES = (MODEL_FILE, TOKENIZER_FILE)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
MODEL_OUTPUT_NAME = "logits"
# Optional second output: how unlike the training prompts each prompt is (see FamiliarityConfig).
UNFAMILIARITY_OUTPUT_NAME = "unfamiliarity"
MODES = ("quality", "balanced", "cost")
# The temperatures a manifest may hold. Training fits them within [0.05, 20]; far outside, the runtime's
# float32 logits / temperature flatten every score to 0.5 or push it to 0, 1 or NaN.
TEMPERATURE_RANGE = (1e-3, 1e3)
# The most characters a prompt's head or tail cut may keep (32 per token at the longest window, 4,096 tokens).
MAX_CUT_CHARS = 32 * 4096
# How a tier's probability is compared with the top tier's: see classifier.policy.relative_scores.
Rule = Literal["ratio", "difference"]


class _Strict(BaseModel):
    # allow_inf_nan: json.loads reads NaN and Infinity, and a NaN temperature or threshold would load
    # and then serve NaN scores; every float of a manifest must be finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TierSpec(_Strict):
    """One tier: a price class, cheapest first in the manifest."""

    name: str = Field(min_length=1)
    # strict: a price is a number, never `true` (which pydantic would read as 1.0) or a string
    input_usd_per_mtok: float = Field(ge=0, strict=True)
    output_usd_per_mtok: float = Field(ge=0, strict=True)


class TruncationConfig(_Strict):
    """Bounds the work spent on one prompt, whatever its length.

    The text is first cut to its first `head_chars` and last `tail_chars` characters (tokenizing
    a megabyte only to throw most of it away is what makes long prompts slow), then to
    `max_tokens` tokens including the two special tokens, keeping `head_fraction` of them from the
    start and the rest from the end.
    """

    max_tokens: int = Field(ge=8, le=4096)
    # Bounded: the cut is what keeps a 2-million-character prompt from being tokenized whole.
    head_chars: int = Field(ge=16, le=MAX_CUT_CHARS)
    tail_chars: int = Field(ge=0, le=MAX_CUT_CHARS)
    head_fraction: float = Field(gt=0, le=1)


class CurvePoint(_Strict):
    """Routing on the validation split at one threshold."""

    # A `top_share` request is served the threshold interpolated from these points: each must be a
    # threshold and a share a request could give itself, or one edited point routes every such request
    # to one tier.
    threshold: float = Field(ge=0, le=1)
    top_share: float = Field(ge=0, le=1)
    quality: float
    cost_usd: float = Field(ge=0)


class PolicyConfig(_Strict):
    """Pick the cheapest tier whose calibrated probability reaches a threshold.

    `thresholds` maps each named mode to the threshold chosen on validation data; `quality_bands`
    records the band below the top tier's quality each mode was chosen to hold. `curve` lets a
    caller ask for a target share of top-tier calls instead of a threshold.
    """

    default_mode: str = "balanced"
    rule: Rule = "ratio"  # artifacts written before the field existed used "ratio"
    thresholds: dict[str, float]
    quality_bands: dict[str, float]
    curve: list[CurvePoint] = Field(default_factory=list)
    # Per mode: the cheapest tier is taken whenever its calibrated probability reaches this floor,
    # whatever the top tier's (a mode without one has no floor; see `classifier.policy`).
    cheap_floors: dict[str, float] = Field(default_factory=dict)

    @field_validator("thresholds", "cheap_floors")
    @classmethod
    def _values_in_unit_interval(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(0.0 <= number <= 1.0 for number in value.values()):
            raise ValueError("every mode's threshold and cheap floor must be in [0, 1]")
        return value

    @field_validator("curve")
    @classmethod
    def _share_grows_with_threshold(cls, value: list[CurvePoint]) -> list[CurvePoint]:
        # A `top_share` request is served by interpolating this curve, which is well defined only where
        # the top tier's share grows with the threshold, as routing makes it do.
        ordered = sorted(value, key=lambda point: point.threshold)
        if any(b.top_share < a.top_share for a, b in itertools.pairwise(ordered)):
            raise ValueError("the top tier's share must not fall as the threshold rises")
        return value

    @model_validator(mode="after")
    def _modes_known(self) -> PolicyConfig:
        if self.default_mode not in self.thresholds:
            raise ValueError("default_mode names a mode that has no threshold")
        unknown = sorted(set(self.cheap_floors) - set(self.thresholds))
        if unknown:
            raise ValueError(f"cheap_floors names modes that have no threshold: {unknown}")
        return self


class CalibrationConfig(_Strict):
    """Per-tier temperature scaling: p = sigmoid(logit / temperature)."""

    method: Literal["temperature"] = "temperature"  # the only one the runtime applies
    temperatures: list[float]

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(t <= 0 for t in value):
            raise ValueError("temperatures must be positive")
        low, high = TEMPERATURE_RANGE
        if not all(low <= t <= high for t in value):
            raise ValueError(f"temperatures must be between {low:g} and {high:g} (training fits them within "
                             "0.05 and 20; far outside, every score is flat or saturated)")
        return value


class PriorConfig(_Strict):
    """The documented rule for prompts the model does not know (classifier/prior.py)."""

    short_chars: int = Field(default=200, ge=1)
    long_chars: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _short_below_long(self) -> PriorConfig:
        if self.short_chars >= self.long_chars:
            raise ValueError("short_chars must be less than long_chars (a prompt cannot be both)")
        return self


class FamiliarityConfig(_Strict):
    """When a prompt is too unlike the training prompts for the model's scores to be trusted.

    The model's `unfamiliarity` output is how far a prompt's pooled features lie from the training
    prompts', in units of their spread (training/model.py, WithUnfamiliarity).
    Above `threshold` the prior decides the tier. `reference` holds the 0th, 1st, ..., 100th percentiles
    of the unfamiliarity of held-out prompts like the training ones, so a value reads as a percentile.
    """

    # Bounded where the model's float32 output can reach it: past that, no prompt ever would.
    threshold: float = Field(gt=0, le=1e30)
    reference: list[float] = Field(min_length=2)
    prior: PriorConfig = Field(default_factory=PriorConfig)

    @field_validator("threshold", "reference")
    @classmethod
    def _finite(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("must be finite")
        if isinstance(value, list) and any(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("percentiles must not decrease")  # read by interpolation, which needs them sorted
        return value


class ArtifactManifest(_Strict):
    """Everything the runtime needs to know about a model, validated on load."""

    schema_version: int = SCHEMA_VERSION
    model_version: str = Field(min_length=1)
    tiers: list[TierSpec] = Field(min_length=2)
    policy: PolicyConfig
    calibration: CalibrationConfig
    truncation: TruncationConfig
    architecture: dict[str, int | str | float] = Field(default_factory=dict)
    training: dict[str, object] = Field(default_factory=dict)
    data_fingerprint: str = ""
    metrics: dict[str, object] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    familiarity: FamiliarityConfig | None = None
    # sha256 (hex) of each file of DIGESTED_FILES, as exported: a model or tokenizer changed afterwards,
    # or copied in from another artifact, is refused at load instead of routing with parts that differ
    # from those evaluated.
    files: dict[str, str] = Field(default_factory=dict)

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    @field_validator("model_version")
    @classmethod
    def _version_as_written(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError("must be more than white space, with none at its start or end")
        return value

    @field_validator("files")
    @classmethod
    def _digests(cls, files: dict[str, str]) -> dict[str, str]:
        if not set(files) <= set(DIGESTED_FILES) or not all(map(_SHA256_HEX.fullmatch, files.values())):
            raise ValueError(f"must give the sha256 (lowercase hex) of {' and '.join(DIGESTED_FILES)}")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactManifest:
        names = self.tier_names
        if len(set(names)) != len(names):
            raise ValueError("tier names are not unique")
        # Said without the names or prices: a manifest's errors never quote the file (see _describe).
        try:
            check_tier_names(names)
        except ValueError:
            raise ValueError("a tier name is blank or has white space at its start or end") from None
        try:
            check_cheapest_first(self.tiers)
        except ValueError:
            raise ValueError("tiers are not listed cheapest first: routing reads them by position, and would "
                             "send what it is sure of to the wrong end") from None
        if len(self.calibration.temperatures) != len(names):
            raise ValueError(
                f"calibration has {len(self.calibration.temperatures)} temperatures for {len(names)} tiers"
            )
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"schema_version {self.schema_version} is not supported "
                             f"(expected one of {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
        if self.schema_version == 1 and self.files:
            raise ValueError("files needs schema_version 2")
        return self


def check_cheapest_first(tiers: Sequence[TierSpec]) -> None:
    """Refuse tiers listed out of price order. Routing reads the list by position (the first tier is the
    cheapest, the last the most capable), so a pool written most capable first would train a router that
    sends every prompt it is sure of to the wrong end, and a manifest edited so would serve one. A tier is
    out of order where it is cheaper than the one before it on one price and no dearer on the other; one
    dearer on input and cheaper on output (other providers' price shapes) is left as written."""
    for before, after in itertools.pairwise(tiers):
        prices = (after.input_usd_per_mtok, after.output_usd_per_mtok)
        previous = (before.input_usd_per_mtok, before.output_usd_per_mtok)
        if prices != previous and all(price <= earlier for price, earlier in zip(prices, previous, strict=True)):
            raise ValueError(
                f"tiers must be listed cheapest first: {after.name!r} (USD {after.input_usd_per_mtok:g} / "
                f"{after.output_usd_per_mtok:g} per million input / output tokens) comes after {before.name!r} "
                f"({before.input_usd_per_mtok:g} / {before.output_usd_per_mtok:g}) and costs less")


def check_tier_names(names: Sequence[str]) -> None:
    """Refuse a tier name that is blank or padded with white space: it is matched exactly (allowed tiers,
    a dispatcher's tiers, a pool's sources), so such a name is a slip that no caller would match."""
    bad = [name for name in names if not name.strip() or name != name.strip()]
    if bad:
        raise ValueError(f"a tier name must be more than white space, with none at its start or end, got {bad}")


def _schema_fields(model: type[BaseModel], seen: set[str] | None = None) -> set[str]:
    """The field names of `model` and of the models its fields hold."""
    names = seen if seen is not None else set()
    for name, info in model.model_fields.items():
        names.add(name)
        for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _schema_fields(candidate, names)
    return names


_SCHEMA_FIELDS = frozenset(_schema_fields(ArtifactManifest))


def _describe(error: ErrorDetails) -> str:
    """One validation error as the field's path and the rule it breaks. Nothing read from the file (a
    value, or a key the file chose) is repeated: the message may reach a caller of Admin.Reload, who may
    point the server at a file they cannot read themselves."""
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in _SCHEMA_FIELDS:
            where += f".{part}" if where else part
        else:
            where += "[...]"
    if error["type"] == "extra_forbidden":
        return f"{where.removesuffix('[...]') or 'the manifest'} has a field it does not know"
    return f"{where or 'the manifest'}: {error['msg']}"


def load_manifest(directory: Path) -> ArtifactManifest:
    """Read and validate `manifest.json`, checking that every required file is present.

    Error messages name the field and the rule; they never quote the file's content.

    Raises:
        ArtifactError: the directory, a file, or a manifest field is missing or invalid.
    """
    try:
        if directory.is_file():
            raise ArtifactError(f"{directory} is a file; give the artifact directory that holds it")
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory {directory} does not exist")
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise ArtifactError(f"artifact {directory} is incomplete: missing {', '.join(missing)}")
        text = (directory / MANIFEST_FILE).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not UTF-8 text") from exc
    except OSError as exc:  # a path too long, a directory not readable...
        raise ArtifactError(f"cannot read artifact directory {directory}: {exc.strerror or 'unreadable'}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not valid JSON: {exc.msg} at line {exc.lineno} "
                            f"column {exc.colno}") from exc
    except RecursionError:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not a manifest: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ArtifactError(f"{directory / MANIFEST_FILE} is not a manifest: {str(exc).split(';')[0]}") from None
    try:
        manifest = ArtifactManifest.model_validate(raw)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_context=False, include_input=False)
        shown = "; ".join(_describe(problem) for problem in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ArtifactError(f"{directory / MANIFEST_FILE} is invalid: {shown}{more}") from exc
    # A manifest being built has no digests yet; one written at schema 2 has them all.
    missing_digests = [name for name in DIGESTED_FILES if name not in manifest.files]
    if manifest.schema_version >= 2 and missing_digests:
        raise ArtifactError(f"{directory / MANIFEST_FILE} is invalid: files has no sha256 of "
                            f"{' and '.join(missing_digests)}")
    return manifest


def file_digest(content: bytes) -> str:
    """The digest `files` records for a file's bytes."""
    return hashlib.sha256(content).hexdigest()


def with_file_digests(manifest: ArtifactManifest, directory: Path) -> ArtifactManifest:
    """`manifest` at the current schema, recording the digests of `directory`'s model and tokenizer as
    they are now: for the writer that has just put them there."""
    files = {name: file_digest((directory / name).read_bytes()) for name in DIGESTED_FILES}
    return manifest.model_copy(update={"schema_version": SCHEMA_VERSION, "files": files})


def check_file_digest(manifest: ArtifactManifest, name: str, content: bytes) -> None:
    """Refuse `content` as the artifact's file `name` when the manifest records another digest.

    Raises:
        ArtifactError: the digests differ.
    """
    recorded = manifest.files.get(name)
    if recorded is not None and file_digest(content) != recorded:
        raise ArtifactError(f"{name} is not the file this manifest was exported with (its sha256 differs): "
                            "it changed after export or comes from another artifact; restore the exported file "
                            "or re-export (promptier export)")


def save_manifest(manifest: ArtifactManifest, directory: Path) -> None:
    """Write `manifest.json` whole (the artifact's other files are written by their owners)."""
    write_member_text(directory, MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")
