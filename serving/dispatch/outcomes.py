"""Outcome feedback: a gateway, a judge or a user's thumbs report how well an answer served.

`POST /v1/promptier/outcomes` takes `{"request_id": ID, "score": S}` or `{"outcomes": [...]}` (at most
`MAX_OUTCOMES_PER_CALL`), where ID is the `x-promptier-request-id` the dispatcher sent with the answer
and S is in [0, 1], with an optional `judge` (who scored it). Each is appended as an outcome line
(serving.dispatch.decision_log.OutcomeRecord) to the reporting tenant's outcome file beside the decision log
(classifier.decision_files); `promptier train` joins it to the request's line,
which then carries the prompt (with `store_prompts`), the model that answered and this score.

Nothing here checks that the id was issued: with several dispatcher processes or hosts the request may
have been answered by another one, and an unknown id only adds a line that no request line matches
(training counts and skips it). The call is authenticated like chat completions, and the line records
the tenant whose key reported it: training joins an outcome only to a request of the same tenant, so
one tenant's key cannot score (or poison the training data of) another tenant's answers.
"""

from __future__ import annotations

import json
import re
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.dispatch.decision_log import DecisionLog, OutcomeRecord

MAX_OUTCOMES_PER_CALL = 1000
MAX_OUTCOMES_BODY_BYTES = 256 * 1024
# Matched whole (fullmatch): `$` would also let a trailing newline through, and such an id joins no request.
REQUEST_ID = re.compile(r"dispatcher:[0-9a-f]{32}")


class OutcomeReport(BaseModel):
    """One reported outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(max_length=64)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)  # a number: not "0.5", not true
    judge: str | None = Field(default=None, max_length=64)

    @field_validator("request_id")
    @classmethod
    def _issued_shape(cls, value: str) -> str:
        if not REQUEST_ID.fullmatch(value):
            raise ValueError("is not a request id the dispatcher issues (x-promptier-request-id: dispatcher:<32 hex>)")
        return value


class OutcomeBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    outcomes: list[OutcomeReport] = Field(min_length=1, max_length=MAX_OUTCOMES_PER_CALL)


class OutcomeError(ValueError):
    """The body is not a valid outcome report; the message says where."""


def parse_outcomes(raw: bytes) -> list[OutcomeReport]:
    """The outcomes in a request body, all valid, or OutcomeError (none is written then)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise OutcomeError(f"request body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise OutcomeError("request body must be a JSON object")
    if "outcomes" in body and body.keys() & OutcomeReport.model_fields.keys():
        # Which of the two was meant cannot be told; validated as a batch, the message would name only
        # the single outcome's fields, as if they were misspelt.
        raise OutcomeError("give one outcome (request_id, score) or a batch of them (outcomes), not both")
    try:
        if "outcomes" in body:
            return list(OutcomeBatch.model_validate(body).outcomes)
        return [OutcomeReport.model_validate(body)]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise OutcomeError(f"{where}: {first['msg']} ({len(error.errors())} error(s) in all)") from None


def record_outcomes(log: DecisionLog, outcomes: list[OutcomeReport], tenant: str) -> int:
    """Append the outcomes to the reporting `tenant`'s outcome file beside the decision log, each line
    naming that tenant, in one write; returns how many.

    Raises:
        OSError: the file could not take them (a full disk, say); none of them is written.
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.write_outcomes(tenant, [OutcomeRecord(prompt_id=outcome.request_id, score=outcome.score, judge=outcome.judge,
                                              time=now, tenant=tenant).as_dict() for outcome in outcomes])
    return len(outcomes)
