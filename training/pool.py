"""The pool file: ordered tiers with prices, and which model plays which tier in each source."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from classifier.artifact import TierSpec, check_cheapest_first, check_tier_names
from classifier.errors import validation_problems
from classifier.yaml_files import load_yaml
from training.errors import DataError

# Answers' lengths are not in the logs; cost estimates assume this many output tokens per call.
DEFAULT_OUTPUT_TOKENS = 256
# Token count estimate for prices when a log has no measured cost (about 4 characters per token).
CHARS_PER_TOKEN = 4.0


class Pool(BaseModel):
    """A validated pool file."""

    model_config = ConfigDict(extra="forbid")
    tiers: list[TierSpec] = Field(min_length=2)
    sources: dict[str, dict[str, str]] = Field(default_factory=dict)
    output_tokens_estimate: int = Field(default=DEFAULT_OUTPUT_TOKENS, ge=0)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers_from_file(cls, value: object) -> object:
        """The file writes a tier's price as `usd_per_mtok: {input, output}`; the artifact's `TierSpec`
        is the one tier-and-price model everywhere else, so the file form is read into it here."""
        if not isinstance(value, list):
            return value
        return [_tier_from_file(tier) if isinstance(tier, dict) and not _in_artifact_form(tier) else tier
                for tier in value]

    @model_validator(mode="after")
    def _consistent(self) -> Pool:
        names = self.tier_names
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        check_tier_names(names)
        check_cheapest_first(self.tiers)
        for source, mapping in self.sources.items():
            unknown = sorted(set(mapping) - set(names))
            if unknown:
                raise ValueError(f"source {source!r} maps unknown tier(s) {unknown}; tiers are {names}")
            _check_one_tier_per_model(source, mapping)
        return self

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    def tier_specs(self) -> list[TierSpec]:
        return list(self.tiers)

    def estimated_cost(self, tier_index: int, prompt_chars: int) -> float:
        """Price x tokens for one call, for logs that carry no measured cost."""
        tier = self.tiers[tier_index]
        input_tokens = prompt_chars / CHARS_PER_TOKEN
        return (input_tokens * tier.input_usd_per_mtok
                + self.output_tokens_estimate * tier.output_usd_per_mtok) / 1e6

    def unmapped_sources(self, unused: Mapping[str, int]) -> dict[str, int]:
        """The sources of `unused` ("source/model" -> rows, as the log readers count them) that this pool
        maps no model of, with their rows: every outcome of such a source goes unused."""
        rows: dict[str, int] = {}
        for key, count in unused.items():
            source = key.split("/", 1)[0]
            if source not in self.sources:
                rows[source] = rows.get(source, 0) + count
        return rows

    def tier_of(self, source: str, model: str) -> int | None:
        """Which tier `model` plays in `source`, or None if it plays none."""
        for name, mapped in self.sources.get(source, {}).items():
            if mapped == model:
                return self.tier_names.index(name)
        return None


def _check_one_tier_per_model(source: str, mapping: Mapping[str, str]) -> None:
    """Refuse one model playing two tiers of a source: each row is one model's outcome, read as one tier's,
    so the other tier would be left unknown for the whole source (and reported as a model no row names)."""
    tiers_of: dict[str, list[str]] = {}
    for tier, model in mapping.items():
        tiers_of.setdefault(model, []).append(tier)
    shared = {model: tiers for model, tiers in tiers_of.items() if len(tiers) > 1}
    if shared:
        model, tiers = next(iter(shared.items()))
        raise ValueError(f"source {source!r} maps model {model!r} to tiers {tiers}: a model plays one tier "
                         "of a source")


def _in_artifact_form(tier: dict) -> bool:
    """Whether a tier of the file gives its prices as the artifact's TierSpec does (`input_usd_per_mtok`)."""
    return "usd_per_mtok" not in tier and ("input_usd_per_mtok" in tier or "output_usd_per_mtok" in tier)


def _tier_from_file(tier: dict) -> dict:
    if "usd_per_mtok" not in tier:
        # Said here: TierSpec would report its own fields (input_usd_per_mtok, ...) as missing, names the
        # file never holds, and not the mistyped key that is there.
        raise ValueError(f"tier {tier.get('name')!r} has no `usd_per_mtok: {{input: ..., output: ...}}` "
                         f"(USD per million tokens); its keys: {', '.join(map(str, tier))}")
    price = tier["usd_per_mtok"]
    if not isinstance(price, dict) or set(price) != {"input", "output"}:
        raise ValueError("usd_per_mtok must have exactly the keys input and output")
    rest = {key: value for key, value in tier.items() if key != "usd_per_mtok"}
    return {**rest, "input_usd_per_mtok": price["input"], "output_usd_per_mtok": price["output"]}


def load_pool(path: str | Path) -> Pool:
    """Read and validate a pool YAML file.

    Raises:
        DataError: unreadable YAML or an invalid field (the message names it).
    """
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(str(path), f"cannot read pool file: {exc}") from exc
    try:
        return Pool.model_validate(raw)
    except ValidationError as exc:
        raise DataError(str(path), f"invalid pool: {'; '.join(validation_problems(exc))}") from exc
