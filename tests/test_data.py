"""Reading logs and pools: every bad input names file, row, column and reason."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import POOL_YAML, synthetic_rows, write_jsonl
from training.data import OutcomeRow, TierLabelRow, read_logs
from training.errors import DataError
from training.labels import build_table, split_table
from training.pool import load_pool

GOOD = {"prompt_id": "alpha:1", "prompt": "hi", "model": "a-7b", "score": 1.0, "source": "alpha"}


@pytest.fixture
def pool(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "pool.yaml"
    path.write_text(POOL_YAML)
    return load_pool(path)


@pytest.mark.parametrize(("row", "column", "reason"), [
    ({**GOOD, "prompt": None}, "prompt", "missing value"),
    ({**GOOD, "prompt": "  "}, "prompt", "empty string"),
    ({**GOOD, "prompt": 5}, "prompt", "expected a string"),
    ({**GOOD, "score": 1.5}, "score", "outside [0, 1]"),
    ({**GOOD, "score": "high"}, "score", "expected a number"),
    ({**GOOD, "score": True}, "score", "expected a number"),
    ({k: v for k, v in GOOD.items() if k != "model"}, "model", "missing value"),
    ({**GOOD, "cost_usd": -1}, "cost_usd", "negative"),
])
def test_bad_row_names_file_row_column_reason(tmp_path: Path, row: dict, column: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "logs.jsonl", [GOOD, row])
    with pytest.raises(DataError) as info:
        read_logs([path])
    assert info.value.row == 2 and info.value.column == column
    assert reason in str(info.value) and str(path) in str(info.value)


def test_invalid_json_and_utf8_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{not json\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="row 2: invalid JSON"):
        read_logs([path])
    rows, report = read_logs([path], skip_invalid=True)
    assert len(rows) == 1 and report.total == 2
    assert "invalid UTF-8" in report.summary() and "invalid JSON" in report.summary()


def test_a_prompt_holding_a_lone_surrogate_is_an_invalid_row(tmp_path: Path) -> None:
    """JSON can escape half of a surrogate pair (a JavaScript client cutting a string inside an emoji); the
    tokenizer fails on it, so it is refused where it is read, with file, row and column."""
    path = tmp_path / "logs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD).replace('"hi"', '"hi \\ud83d"') + "\n")
    with pytest.raises(DataError, match="row 2, column 'prompt': not valid Unicode: holds an unpaired surrogate"):
        read_logs([path])
    rows, report = read_logs([path], skip_invalid=True)
    assert [row.prompt for row in rows] == ["hi"] and report.total == 1


def test_logs_are_read_as_the_labeler_reads_prompt_files(tmp_path: Path) -> None:
    """One reader for both: a leading BOM is dropped, and JSON nested too deep, JSON that is not an
    object and broken JSON are each a row's problem (counted by reason, without where in the line)."""
    from classifier.labeling import LabelOptions, parse_row, read_rows

    path = tmp_path / "logs.jsonl"
    lines = ["\ufeff" + json.dumps(GOOD), '{"prompt_id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
             "[1, 2]", "{not json", "{also not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, report = read_logs([path], skip_invalid=True)
    assert [row.prompt for row in rows] == ["hi"]
    assert report.counts == {"JSON nested deeper than 64 levels": 1, "expected an object, got list": 1,
                             "invalid JSON: Expecting property name enclosed in double quotes": 2}
    labeled = [parse_row(name, payload, LabelOptions()) for name, payload in read_rows(path)]
    assert [row.error is None for row in labeled] == [True, False, False, False, False]
    assert labeled[1].error == "line 2: JSON nested deeper than 64 levels"
    assert labeled[3].error == "line 4: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"


def test_skip_invalid_counts_by_column_and_fault(tmp_path: Path) -> None:
    """Counted by column and fault, not by value: a judge on a 0-10 scale is one reason, not one per
    score, and a misnamed prompt column says which column its rows lack."""
    rows = [GOOD, {**GOOD, "score": 2}, {**GOOD, "score": 3}, {**GOOD}, {**GOOD, "prompt": None, "text": "hi"}]
    path = write_jsonl(tmp_path / "logs.jsonl", rows)
    kept, report = read_logs([path], skip_invalid=True)
    assert len(kept) == 2
    assert report.counts == {"column 'score': outside [0, 1]": 2, "column 'prompt': missing value": 1}
    assert report.examples[0].endswith("row 2, column 'score': 2.0 is outside [0, 1]")


def test_a_file_every_row_of_which_is_skipped_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under --skip-invalid, a file of another format (its prompts under `text`) left training with
    nothing but a count among the skipped rows."""
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, {**GOOD, "score": 3}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "hi", "model": "m", "score": 1.0}] * 3)
    with caplog.at_level("WARNING", logger="training.data"):
        kept, _ = read_logs([good, other], skip_invalid=True)
    assert len(kept) == 1
    assert [record.getMessage() for record in caplog.records] == [
        f"{other}: all 3 of its rows are invalid (3 x column 'prompt': missing value), so none of it trains: are "
        "its columns those of the log format (prompt, model, score, ...)?"]
    # A decision log whose requests have no outcome yet, cut short by a killed writer, is of the right format.
    request = {"schema_version": 8, "prompt_id": "dispatcher:1", "prompt": "hi", "model": "m", "score": None,
               "source": "dispatcher", "category": "", "tier": "small", "routed_tier": "small"}
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text(json.dumps(request) + "\n" + json.dumps(request)[:20] + "\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.data"):
        read_logs([good, decisions], skip_invalid=True)
    assert not caplog.records


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "logs.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_logs([tmp_path / "logs.csv"])
    with pytest.raises(DataError, match="no such file"):
        read_logs([tmp_path / "absent.jsonl"])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read Parquet"):
        read_logs([tmp_path / "broken.parquet"])


def test_parquet_and_jsonl_read_the_same(tmp_path: Path, pool) -> None:  # type: ignore[no-untyped-def]
    rows = synthetic_rows(30)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from_jsonl, _ = build_table(read_logs([jsonl])[0], pool)
    from_parquet, _ = build_table(read_logs([tmp_path / "a.parquet"])[0], pool)
    assert from_jsonl.fingerprint() == from_parquet.fingerprint()



def test_a_parquet_prompt_that_is_not_utf8_names_its_row(tmp_path: Path) -> None:
    """Arrow does not check that a string column holds UTF-8: such a row is an invalid row, not a crash."""
    rows = [GOOD, {**GOOD, "prompt_id": "alpha:2"}, {**GOOD, "prompt_id": "alpha:3"}]
    table = pa.Table.from_pylist(rows)
    prompts = pa.array([b"hi", b"caf\xe9", b"hi"], pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", prompts),
                   tmp_path / "logs.parquet")
    with pytest.raises(DataError, match=r"row 2: invalid UTF-8 in column 'prompt'"):
        read_logs([tmp_path / "logs.parquet"])
    kept, report = read_logs([tmp_path / "logs.parquet"], skip_invalid=True)
    assert [row.prompt_id for row in kept] == ["alpha:1", "alpha:3"] and report.total == 1

def test_missing_outcomes_are_masked_not_failures(pool) -> None:  # type: ignore[no-untyped-def]
    from training.data import OutcomeRow

    outcome_rows = [
        OutcomeRow("beta:1", "p", "b-8b", 0.0, "beta", "", None),
        OutcomeRow("beta:1", "p", "b-51b", 1.0, "beta", "", None),
        OutcomeRow("beta:1", "p", "unknown-model", 1.0, "beta", "", None),
    ]
    table, unused = build_table(outcome_rows, pool)
    assert table.targets[0, :2].tolist() == [0.0, 1.0]
    assert np.isnan(table.targets[0, 2])  # beta has no large model: unknown, not 0
    assert unused == {"beta/unknown-model": 1}


def test_a_source_the_pool_maps_no_model_of_is_named_on_the_console(tmp_path: Path, pool,  # type: ignore[no-untyped-def]
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from training.config import TrainConfig
    from training.inputs import prepare_data

    served = [{"prompt_id": f"d{i}", "prompt": f"question {i}", "model": "mistral-7b", "score": 1.0,
               "source": "dispatcher"} for i in range(3)]
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60) + served)
    with caplog.at_level("WARNING", logger="training.inputs"):
        data = prepare_data([logs], pool, TrainConfig())
    assert pool.unmapped_sources(data.unused_models) == {"dispatcher": 3}
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert "source 'dispatcher': none of its 3 outcome rows is used" in warning
    assert "sources: {dispatcher: {TIER: MODEL, ...}}" in warning and "mistral-7b" in warning
    # A model the pool leaves out of a source it maps is a choice, not a forgotten source: no warning.
    assert pool.unmapped_sources({"beta/unknown-model": 1}) == {}


def test_duplicate_prompts_merge_and_scores_average(pool) -> None:  # type: ignore[no-untyped-def]
    from training.data import OutcomeRow

    rows = [OutcomeRow("alpha:1", "same", "a-7b", 1.0, "alpha", "", 0.5),
            OutcomeRow("alpha:2", "same", "a-7b", 0.0, "alpha", "", 1.5),
            OutcomeRow("alpha:3", "other", "a-7b", 1.0, "alpha", "", None)]
    table, _ = build_table(rows, pool)
    assert len(table) == 2
    assert table.targets[0, 0] == 0.5 and table.costs[0, 0] == 1.0  # measured costs averaged
    assert table.costs[1, 0] > 0  # estimated from price x tokens


def test_tier_labels_mean_every_tier_from_the_label_up(pool) -> None:  # type: ignore[no-untyped-def]
    table, _ = build_table([TierLabelRow("", "q", "medium", "x", "")], pool)
    assert table.targets[0].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(DataError, match="unknown tier 'huge'"):
        build_table([TierLabelRow("", "q", "huge", "x", "")], pool)


def test_a_label_naming_no_tier_of_the_pool_is_an_invalid_row(tmp_path: Path, pool) -> None:  # type: ignore[no-untyped-def]
    """Read against the pool, a tier label it lacks names file, row and column, and --skip-invalid skips it."""
    path = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "q", "tier": "medium"}, {"prompt": "r", "tier": "huge"}])
    with pytest.raises(DataError) as info:
        read_logs([path], tiers=pool.tier_names)
    assert (info.value.row, info.value.column) == (2, "tier") and str(path) in str(info.value)
    assert "'huge' is an unknown tier" in str(info.value)
    rows, report = read_logs([path], skip_invalid=True, tiers=pool.tier_names)
    assert [row.prompt for row in rows] == ["q"] and report.total == 1
    # Counted by fault, whatever tier each row names: one reason, not one per misspelling.
    path = write_jsonl(tmp_path / "more.jsonl", [{"prompt": f"r{i}", "tier": name}
                                                 for i, name in enumerate(["small", "huge", "xl", "tiny"])])
    _, report = read_logs([path], skip_invalid=True, tiers=pool.tier_names)
    assert len(report.counts) == 1 and report.total == 3


def test_tier_labeled_rows_with_a_null_model_are_labels(tmp_path: Path, pool) -> None:  # type: ignore[no-untyped-def]
    """Parquet gives every row every column: in a file of outcome and label rows, a label row's model is
    null, and it is still a label, not an outcome row missing its prompt_id."""
    rows = [{"prompt_id": "q1", "prompt": "hello", "model": "a-7b", "score": 1.0, "source": "alpha", "tier": None},
            {"prompt_id": None, "prompt": "prove it", "model": None, "score": None, "source": "alpha",
             "tier": "large"}]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    read, report = read_logs([path], tiers=pool.tier_names)
    assert report.total == 0
    assert [type(row).__name__ for row in read] == ["OutcomeRow", "TierLabelRow"]
    assert isinstance(read[1], TierLabelRow) and read[1].tier == "large"


def test_a_number_too_large_for_a_float_is_an_invalid_row(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    good = {"prompt_id": "a", "prompt": "a", "model": "a-7b", "score": 1.0, "source": "alpha"}
    path.write_text(json.dumps(good) + "\n"
                    + '{"prompt_id": "b", "prompt": "b", "model": "a-7b", "source": "alpha", "score": 1'
                    + "0" * 400 + "}\n")
    with pytest.raises(DataError, match=r"row 2, column 'score': too large a number"):
        read_logs([path])
    rows, report = read_logs([path], skip_invalid=True)
    assert len(rows) == 1 and report.total == 1


def test_lines_of_invalid_utf8_are_counted_as_one_fault(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(json.dumps({"prompt_id": str(i), "prompt": "x" * i + "\u00e9", "model": "a-7b",
                                          "score": 1.0, "source": "alpha"}, ensure_ascii=False)
                              .encode("latin-1") + b"\n" for i in range(1, 6)))
    with path.open("a") as file:
        file.write(json.dumps({"prompt_id": "ok", "prompt": "fine", "model": "a-7b", "score": 1.0,
                               "source": "alpha"}) + "\n")
    _, report = read_logs([path], skip_invalid=True)
    assert report.total == 5 and list(report.counts) == ["invalid UTF-8"]


def test_a_prompt_id_naming_two_texts_is_warned_about(pool, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    rows = [OutcomeRow("q1", "What is 2+2?", "a-7b", 1.0, "alpha", "", None),
            OutcomeRow("q1", "What is 2+2? ", "a-70b", 1.0, "alpha", "", None),
            OutcomeRow("q2", "Prove it", "a-7b", 0.0, "alpha", "", None),
            OutcomeRow("q2", "Prove it", "a-70b", 1.0, "alpha", "", None)]
    table, _ = build_table(rows, pool)
    assert len(table) == 3
    assert "1 prompt_id(s) name more than one prompt text, e.g. 'q1'" in caplog.text
    caplog.clear()
    build_table(rows[2:], pool)
    assert "prompt_id" not in caplog.text


def test_split_is_seeded_by_prompt_and_holds_out_sources(pool) -> None:  # type: ignore[no-untyped-def]
    from training.data import OutcomeRow

    rows = [OutcomeRow(f"{s}:{i}", f"prompt {s} {i}", m, 1.0, s, "c", None)
            for i in range(100) for s, m in (("alpha", "a-7b"), ("beta", "b-8b"))]
    table, _ = build_table(rows, pool)
    first, again = split_table(table, seed=3), split_table(table, seed=3)
    assert (first == again).all() and not (first == split_table(table, seed=4)).all()
    held = split_table(table, seed=3, holdout_sources=["beta"])
    assert (held[table.sources == "beta"] == "test").all()
    assert {"train", "val"} <= set(held[table.sources == "alpha"])


@pytest.mark.parametrize(("text", "reason"), [
    ("tiers: [{name: a, usd_per_mtok: {input: 1, output: 1}}]", "at least 2"),
    ("tiers: [{name: a, usd_per_mtok: {input: 1, output: 1}}, {name: a, usd_per_mtok: {input: 1, output: 1}}]",
     "unique"),
    ("tiers: [{name: a, usd_per_mtok: {input: -1, output: 1}}, {name: b, usd_per_mtok: {input: 1, output: 1}}]",
     "greater than or equal to 0"),
    (POOL_YAML + "  gamma: {huge: x}\n", "unknown tier"),
    # A mistyped price key was reported as three fields the file never names (input_usd_per_mtok, ...).
    ("tiers: [{name: a, usd_per_mtoks: {input: 1, output: 1}}, {name: b, usd_per_mtok: {input: 1, output: 1}}]",
     r"pool\.yaml: invalid pool: tiers: Value error, tier 'a' has no `usd_per_mtok: \{input: \.\.\., output: "
     r"\.\.\.\}` \(USD per million tokens\); its keys: name, usd_per_mtoks$"),
    ("tiers: [", "cannot read pool file"),
    # Routing reads tiers by position: a pool written most capable first would route backwards.
    ("tiers: [{name: large, usd_per_mtok: {input: 1.25, output: 5}}, {name: small, usd_per_mtok: {input: 0.2, "
     "output: 0.2}}]", r"cheapest first: 'small' \(USD 0.2 / 0.2 per million input / output tokens\) comes after "
                       r"'large' \(1.25 / 5\) and costs less"),
    ("tiers: [{name: a, usd_per_mtok: {input: 1, output: 1}}, {name: ' ', usd_per_mtok: {input: 2, output: 2}}]",
     "more than white space"),
    ("tiers: [{name: a, usd_per_mtok: {input: 1, output: 1}}, {name: ' b', usd_per_mtok: {input: 2, output: 2}}]",
     r"none at its start or end, got \[' b'\]"),
    ("tiers: [{name: a, usd_per_mtok: {input: true, output: 1}}, {name: b, usd_per_mtok: {input: 2, output: 2}}]",
     r"tiers\.0\.input_usd_per_mtok: Input should be a valid number"),
    (POOL_YAML.replace("small: a-7b", "small: a-70b"), r"maps model 'a-70b' to tiers \['small', 'medium'\]"),
    (POOL_YAML + "  alpha: {small: a-7b}\n", r"key 'alpha' is written twice \(first on line \d+\)"),
])
def test_bad_pool_files(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=reason):
        load_pool(path)


def test_logs_may_be_named_by_a_glob_pattern(tmp_path: Path) -> None:
    rows = synthetic_rows()
    write_jsonl(tmp_path / "a.jsonl", rows[:10])
    write_jsonl(tmp_path / "b.jsonl", rows[10:30])
    (tmp_path / "notes.txt").write_text("not a log")
    read, _ = read_logs([str(tmp_path / "*.jsonl")])
    assert len(read) == 30  # both files, in name order, and nothing else
    assert [row.prompt for row in read][:10] == [row["prompt"] for row in rows[:10]]
    with pytest.raises(DataError, match="no log file matches this pattern"):
        read_logs([str(tmp_path / "*.parquet")])
    # `**` matches directories too, and patterns may overlap: each log file is still read once.
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", rows[30:35])
    read, _ = read_logs([str(tmp_path / "**"), str(tmp_path / "*.jsonl"), str(tmp_path / "sub" / ".." / "b.jsonl")])
    assert len(read) == 35
    named = tmp_path / "run[1].jsonl"  # glob characters in a name that exists: that file
    write_jsonl(named, rows[:3])
    assert len(read_logs([str(named)])[0]) == 3


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(("option", "name", "kind"), [("holdout_sources", "alpha_typo", "source"),
                                                      ("holdout_categories", "nope", "category")])
def test_a_held_out_name_no_prompt_has_is_refused_before_training(  # type: ignore[no-untyped-def]
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path, streaming: bool, option: str,
        name: str, kind: str) -> None:
    """A misspelt --holdout-source would hold out nothing and report a random split as transfer."""
    from tests.conftest import tiny_config
    from training.pipeline import train

    held_out = ["alpha", name] if kind == "source" else [name]
    config = tiny_config(tiny_backbone, streaming=streaming, **{option: held_out})
    with pytest.raises(DataError, match=f"no prompt has the held-out {kind} '{name}'; the logs' {kind} names") as info:
        train([synthetic_logs], pool_file, tmp_path / "model", config)
    if kind == "source":
        assert "alpha, beta" in str(info.value)
    assert not (tmp_path / "model").exists()


def test_a_pool_model_no_row_of_its_source_names_is_named_on_the_console(tmp_path: Path, pool,  # type: ignore[no-untyped-def]
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A mistyped model name in the pool leaves its tier unknown for the whole source: said, with the
    source's models the pool does not map (the right name is usually among them)."""
    from training.config import TrainConfig
    from training.inputs import prepare_data

    mistyped = pool.model_copy(update={"sources": {**pool.sources, "alpha": {**pool.sources["alpha"],
                                                                             "medium": "a-70B"}}})
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60))
    with caplog.at_level("WARNING", logger="training.inputs"):
        data = prepare_data([logs], mistyped, TrainConfig())
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    alpha = int((data.table.sources == "alpha").sum())
    assert (f"source 'alpha': the pool maps tier 'medium' to model 'a-70B', which none of its rows names, so that "
            f"tier is unknown for all {alpha} of its prompts (its models the pool does not map: a-70b)") == warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.inputs"):
        prepare_data([logs], pool, TrainConfig())  # beta maps no large model: a choice, not a typo
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_holding_out_every_source_says_so_rather_than_blaming_the_size_of_the_logs(  # type: ignore[no-untyped-def]
        tmp_path: Path, pool) -> None:
    """`--holdout-source` naming a log's only source sent every prompt to test, and the run said only
    "too few prompts (650)" of logs that were big enough."""
    from training.config import TrainConfig
    from training.inputs import prepare_data

    logs = write_jsonl(tmp_path / "logs.jsonl", [row for row in synthetic_rows(60) if row["source"] == "alpha"])
    with pytest.raises(DataError, match=r"too few prompts \((\d+)\) for a train and a validation split: the held-out "
                                        r"sources and categories put \1 of them in the test split, leaving 0 "):
        prepare_data([logs], pool, TrainConfig(holdout_sources=["alpha"]))


@pytest.mark.parametrize("streaming", [False, True])
def test_logs_the_pool_maps_nothing_of_name_the_pool_entry_to_add(  # type: ignore[no-untyped-def]
        tmp_path: Path, tiny_backbone: Path, pool_file: Path, streaming: bool) -> None:
    """A decision log trained on with a pool that lacks its `dispatcher` source said only "no row maps to a
    tier of the pool" and a dict of pairs, not what to add; in-memory and streamed runs say the same."""
    from tests.conftest import tiny_config
    from training.pipeline import train

    rows = [{**row, "source": "dispatcher" if row["source"] == "alpha" else "default"} for row in synthetic_rows(60)]
    logs = write_jsonl(tmp_path / "decisions.jsonl", rows)
    with pytest.raises(DataError, match=r"no row maps to a tier of the pool, which maps none of the models of these "
                                        r"sources: 'default' \(.+\); 'dispatcher' \(.+\)\. Add each source to the "
                                        r"pool's `sources:` as `SOURCE: \{TIER: MODEL, \.\.\.\}`"):
        train([logs], pool_file, tmp_path / "model", tiny_config(tiny_backbone, streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_tier_no_prompt_has_an_outcome_on_is_refused(  # type: ignore[no-untyped-def]
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path, streaming: bool) -> None:
    """A typo in the pool's only model of the top tier was warned about, and then a model was trained and
    exported with a top tier it never saw answer."""
    import yaml

    from tests.conftest import tiny_config
    from training.pipeline import train

    pool = yaml.safe_load(pool_file.read_text())
    for source, models in pool["sources"].items():
        if "large" in models:
            pool["sources"][source] = {**models, "large": models["large"] + "-typo"}
    mistyped = tmp_path / "pool.yaml"
    mistyped.write_text(yaml.safe_dump(pool))
    with pytest.raises(DataError, match=r"no prompt of the logs has an outcome on the tier\(s\) \['large'\]"):
        train([synthetic_logs], mistyped, tmp_path / "model", tiny_config(tiny_backbone, streaming=streaming))
    assert not (tmp_path / "model").exists()


def test_a_parquet_column_python_cannot_hold_is_named(tmp_path: Path) -> None:
    """A timestamp written in the wrong unit (or a date past year 9999), even in a column training never
    reads, fails Arrow's conversion: the file and column are named, with no traceback."""
    good = [{"prompt_id": "a", "prompt": "a", "model": "a-7b", "score": 1.0, "source": "alpha"}]
    table = pa.Table.from_pylist(good).append_column("logged_at", pa.array([10**17], type=pa.timestamp("ms")))
    path = tmp_path / "stamped.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"stamped\.parquet: cannot read Parquet: column 'logged_at' holds a value "
                                        r"Python cannot represent"):
        read_logs([path], skip_invalid=True)


def test_a_log_line_writing_a_key_twice_is_an_invalid_row(tmp_path: Path) -> None:
    """json.loads keeps the last of two equal keys: `"score": 7.0, "score": 0.5` would train on 0.5."""
    path = tmp_path / "twice.jsonl"
    path.write_text('{"prompt_id": "a", "prompt": "a", "model": "a-7b", "score": 1.0, "source": "alpha"}\n'
                    '{"prompt_id": "b", "prompt": "b", "model": "a-7b", "score": 7.0, "score": 0.5, '
                    '"source": "alpha"}\n')
    with pytest.raises(DataError, match=r"row 2: key 'score' is written twice in one object"):
        read_logs([path])
    rows, report = read_logs([path], skip_invalid=True)
    assert [row.prompt for row in rows] == ["a"] and report.total == 1
