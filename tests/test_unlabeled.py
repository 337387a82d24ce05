"""Unlabeled prompts (`promptier train --unlabeled`, `promptier export --prompts`) read from a dispatcher's
decision log: request lines without prompt text are passed over and counted, other bad rows are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import synthetic_rows, tiny_config, write_jsonl
from training.data import OUTCOME_KIND, SkipReport
from training.errors import DataError
from training.inputs import NO_PROMPT_TEXT, read_unlabeled


def _request(number: int, prompt: str | None) -> dict:
    """A decision-log request line as the dispatcher writes it (store_prompts on)."""
    return {"schema_version": 8, "prompt_id": f"dispatcher:{number:032x}", "prompt": prompt, "model": "a-7b",
            "score": None, "source": "dispatcher", "category": "", "tier": "small", "routed_tier": "small",
            "reason": "no_text" if not prompt else "classified", "status": 200}


def _decision_log(path: Path, texts: list[str]) -> Path:
    """Request lines for `texts`, with two requests without user text and an outcome line among them."""
    lines = [_request(0, ""), *(_request(i + 1, text) for i, text in enumerate(texts)), _request(99, None),
             {"schema_version": 8, "kind": OUTCOME_KIND, "prompt_id": f"dispatcher:{1:032x}", "score": 1.0}]
    return write_jsonl(path, lines)


def test_request_lines_without_text_are_passed_over_and_counted(tmp_path: Path) -> None:
    log = _decision_log(tmp_path / "decisions.jsonl", ["first question", "second question"])
    report = SkipReport()
    assert read_unlabeled([log], report) == ["first question", "second question"]
    assert report.not_trainable == {NO_PROMPT_TEXT: 2} and not report.counts
    assert read_unlabeled([log]) == ["first question", "second question"]  # as `promptier export --prompts` reads


def test_other_rows_without_a_prompt_still_stop_the_run_unless_skipped(tmp_path: Path) -> None:
    traffic = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": "hello there"}, {"prompt": ""}, {"text": "x"}])
    with pytest.raises(DataError, match=r"row 2.*missing or empty prompt"):
        read_unlabeled([traffic])
    # Not a text-less request: a decision-log line whose prompt is not a string is invalid.
    bad = write_jsonl(tmp_path / "bad.jsonl", [_request(1, "fine"), {**_request(2, None), "prompt": 7}])
    with pytest.raises(DataError, match=r"row 2.*missing or empty prompt"):
        read_unlabeled([bad])
    report = SkipReport()
    assert read_unlabeled([traffic, bad], report, skip_invalid=True) == ["hello there", "fine"]
    assert report.total == 3 and not report.not_trainable


def test_a_decision_log_without_any_prompt_text_is_refused(tmp_path: Path) -> None:
    """store_prompts off: no request line holds its text, and the run would learn nothing from it."""
    log = write_jsonl(tmp_path / "decisions.jsonl", [_request(1, None), _request(2, None)])
    with pytest.raises(DataError, match="store_prompts off"):
        read_unlabeled([log])


@pytest.mark.slow
def test_a_run_learns_a_decision_logs_prompts_and_passes_over_those_without_text(
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path) -> None:
    from classifier.artifact import TruncationConfig
    from classifier.tokenization import PromptEncoder
    from training.inputs import in_memory_inputs
    from training.pool import load_pool

    config = tiny_config(tiny_backbone, teacher={"kind": "embedding-mlp", "hidden": 16, "epochs": 2})
    truncation = TruncationConfig(max_tokens=config.max_tokens, head_chars=config.resolved_head_chars,
                                  tail_chars=config.resolved_tail_chars, head_fraction=config.head_fraction)
    encoder = PromptEncoder.from_file(tiny_backbone / "tokenizer.json", truncation)
    fresh = [row["prompt"] + " today" for row in synthetic_rows(30, seed=9)[::3]]
    log = _decision_log(tmp_path / "decisions.jsonl", fresh)
    inputs = in_memory_inputs([synthetic_logs], load_pool(pool_file), config, encoder, tiny_backbone, truncation,
                              tmp_path / "work", False, None, [log], 1.0, tmp_path / "cache")
    assert inputs.record["unlabeled_prompts"] == len(fresh)


def test_an_unlabeled_prompt_holding_a_lone_surrogate_is_an_invalid_row(tmp_path: Path) -> None:
    """The tokenizer fails on half a surrogate pair; named where it is read, and skipped under --skip-invalid."""
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text('{"prompt": "fine"}\n{"prompt": "cut emoji \\ud83d"}\n')
    with pytest.raises(DataError, match=r"row 2, column 'prompt': not valid Unicode"):
        read_unlabeled([traffic])
    report = SkipReport()
    assert read_unlabeled([traffic], report, skip_invalid=True) == ["fine"] and report.total == 1
