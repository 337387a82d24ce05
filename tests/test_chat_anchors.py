"""Chat openers from the ChatterBot corpus: the split into a trained half and a checked half, the easy
anchors they become, and the chat check that `promptier eval` reports."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import classifier
from classifier.artifact_layout import SEEN_PROMPTS_FILE
from classifier.errors import PromptierError
from classifier.policy import RoutingRequest
from tests.conftest import tiny_config
from training import chat_anchors
from training.anchors import ANCHOR_SOURCE, anchor_rows, assumed_outcomes, normalise_prompt
from training.chat_anchors import (
    chat_openers,
    corpus_files,
    evaluate_chat_check,
    half_of,
    render_chat_check,
    topic_of,
)
from training.probes import load_probes, render_probe_markdown

SUITE = [probe.prompt for probe in load_probes()]


def _keys(texts: list[str]) -> set[str]:
    return {normalise_prompt(text) for text in texts}


def test_the_corpus_splits_by_topic_into_two_disjoint_halves_without_trivia() -> None:
    files = corpus_files()
    assert len({path.parent.name for path in files}) >= 20  # languages
    assert {half_of(path) for path in files} == {"train", "check"}
    # A topic is on one side in every language and spelling: its files are often translations.
    for topic in {topic_of(path) for path in files}:
        assert len({half_of(path) for path in files if topic_of(path) == topic}) == 1, topic
    by_name = {f"{path.parent.name}/{path.stem}": path for path in files}
    assert half_of(by_name["spanish/emociones"]) == half_of(by_name["english/emotion"])

    train, check = chat_openers("train"), chat_openers("check")
    assert len(train) > 1000 and len(check) > 500
    assert not _keys(train) & _keys(check)  # an opener of both sides' topics is the training half's alone
    assert chat_openers("train") == train  # the split and the order are fixed
    trivia = [text for path in files if path.stem == "trivia" for text in chat_anchors._first_turns(path)]
    assert trivia and not _keys(trivia) & (_keys(train) | _keys(check))
    # Every opener of a training topic's file is a training opener: the split never cuts a topic.
    one_train_file = next(path for path in files if half_of(path) == "train" and path.stem != "trivia")
    assert _keys(chat_anchors._first_turns(one_train_file)) <= _keys(train)


def test_a_corpus_without_files_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "chatterbot_corpus"
    (package / "data").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", SimpleNamespace(__file__=str(package / "__init__.py")))
    with pytest.raises(PromptierError, match="no data"):
        corpus_files()


def test_excluded_prompts_are_left_out_after_normalising() -> None:
    train = chat_openers("train")
    dropped = train[0]
    kept = chat_openers("train", exclude=[f"  {dropped.upper()}!! "])
    assert dropped not in kept and len(kept) == len(train) - 1


def test_a_missing_corpus_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)  # import fails as if not installed
    with pytest.raises(PromptierError, match="chatterbot-corpus"):
        corpus_files()


def test_an_unreadable_corpus_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "english" / "greetings.yml"
    broken.parent.mkdir()
    broken.write_text("conversations:\n- - hi\n  - [unclosed\n", encoding="utf-8")
    monkeypatch.setattr(chat_anchors, "corpus_files", lambda: [broken])
    chat_anchors._openers.cache_clear()  # the real corpus's openers, read once per process
    try:
        with pytest.raises(PromptierError, match=r"english/greetings\.yml"):
            chat_openers(half_of(broken))
    finally:
        chat_anchors._openers.cache_clear()


def test_chat_anchors_join_the_anchor_table_as_easy_prompts(tiny_backbone: Path, pool_file: Path) -> None:
    from training.inputs import anchor_table
    from training.pool import load_pool

    pool = load_pool(pool_file)
    without = anchor_table(pool, tiny_config(tiny_backbone, anchors=3))
    with_chat = anchor_table(pool, tiny_config(tiny_backbone, anchors=3, chat_anchors=True))
    assert without is not None and with_chat is not None
    added = with_chat.prompts[len(without):]
    assert with_chat.prompts[:len(without)] == without.prompts
    assert len(added) > 1000 and _keys(added) <= _keys(chat_openers("train"))
    assert not _keys(added) & _keys(SUITE)
    assert set(with_chat.sources) == {ANCHOR_SOURCE}
    assert (with_chat.categories[len(without):] == "easy").all()
    assert np.allclose(with_chat.targets[len(without):], assumed_outcomes("easy", len(pool.tier_names)))
    assert len(set(with_chat.prompt_ids)) == len(with_chat)
    # An opener that repeats a generated anchor is left to the generated one; without generated
    # anchors every opener of the training half is there.
    only_chat = anchor_table(pool, tiny_config(tiny_backbone, chat_anchors=True))
    assert only_chat is not None and set(added) <= set(only_chat.prompts)
    assert set(only_chat.prompts) == set(chat_openers("train", exclude=SUITE))
    assert not _keys(added) & _keys(without.prompts)


def test_chat_openers_count_as_often_as_their_own_weight_says(tiny_backbone: Path, pool_file: Path) -> None:
    from training.inputs import anchor_order, anchor_table
    from training.pool import load_pool

    pool = load_pool(pool_file)
    generated_only = tiny_config(tiny_backbone, anchors=3, anchor_weight=4)
    table = anchor_table(pool, generated_only)
    assert table is not None  # without openers, recipes train on the same rows in the same order
    assert np.array_equal(anchor_order(table, generated_only), np.tile(np.arange(len(table)), 4))
    for chat_weight, expected in ((None, 4), (1, 1), (2, 2)):
        config = tiny_config(tiny_backbone, anchors=3, anchor_weight=4, chat_anchors=True,
                             chat_anchor_weight=chat_weight)
        with_chat = anchor_table(pool, config)
        assert with_chat is not None
        order = anchor_order(with_chat, config)
        counts = np.bincount(order, minlength=len(with_chat))
        assert (counts[:len(table)] == 4).all() and (counts[len(table):] == expected).all()
        assert np.array_equal(order[:4 * len(table)], np.tile(np.arange(len(table)), 4))


def test_a_chat_weight_without_chat_openers_is_a_config_error(tiny_backbone: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="chat_anchors: true"):
        tiny_config(tiny_backbone, anchors=3, chat_anchor_weight=2)


def test_the_chat_check_reports_where_the_held_out_openers_go(trained_artifact: Path) -> None:
    runtime = classifier.load(trained_artifact)
    report = evaluate_chat_check(runtime, SUITE)
    openers = chat_openers("check", exclude=SUITE)
    assert report["prompts"] == len(openers) and report["corpus"].startswith("chatterbot-corpus ")
    tiers = runtime.tier_names
    for mode, shares in report["modes"].items():
        decisions = runtime.classify_batch(openers, RoutingRequest(mode=mode))
        assert shares["easy_on_cheapest"] == pytest.approx(np.mean([d.tier == tiers[0] for d in decisions]))
        assert shares["easy_on_top"] == pytest.approx(np.mean([d.tier == tiers[-1] for d in decisions]))
        assert shares["decided_by_prior"] == pytest.approx(np.mean([d.decided_by == "prior" for d in decisions]))
    assert set(report["modes"]) == set(runtime.manifest.policy.thresholds)
    table = render_chat_check(report, runtime.manifest.policy.default_mode)
    default_row = next(line for line in table.splitlines() if "(default)" in line)
    shares = report["modes"][runtime.manifest.policy.default_mode]
    assert f"{shares['easy_on_top']:.1%}" in default_row
    assert table.rstrip("\n") in render_probe_markdown({"probes": 0, "halves": {}, "chat_check": report},
                                                       runtime.manifest.policy.default_mode)


def test_the_chat_check_leaves_out_openers_the_artifact_trained_on(artifact_copy: Path) -> None:
    from training.labels import prompt_hash

    # "Привет!"-like greetings are generated anchors too; an artifact trained on anchors never
    # counts them as held out.
    generated = [row["prompt"] for row in anchor_rows(["small", "medium", "large"], 150, 13, exclude=SUITE)]
    overlap = _keys(generated) & _keys(chat_openers("check", exclude=SUITE))
    assert overlap, "the corpus and the generated anchors share greetings; the exclusion below is tested"

    runtime = classifier.load(artifact_copy)
    before = evaluate_chat_check(runtime, SUITE)["prompts"]
    config = {**runtime.manifest.training["config"], "anchors": 150, "seed": 13}
    runtime.manifest = runtime.manifest.model_copy(update={"training": {**runtime.manifest.training,
                                                                        "config": config}})
    assert evaluate_chat_check(runtime, SUITE)["prompts"] == before - len(overlap)

    learned = chat_openers("check", exclude=SUITE)[:3]  # as if they had been in its logs
    with (artifact_copy / SEEN_PROMPTS_FILE).open("a") as seen:
        seen.write("".join(f"{prompt_hash(text)}\n" for text in learned))
    assert evaluate_chat_check(classifier.load(artifact_copy), SUITE)["prompts"] == before - 3
