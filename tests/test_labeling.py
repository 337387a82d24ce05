"""Batch labeling: formats, columns, bad rows, resume after kill -9, bounded inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import classifier
from classifier.labeling import LabelingError, LabelOptions, LabelStats, label_files
from tests.grpc_server import EASY, HARD
from tests.labeling_files import read_output, sample_rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_formats_and_columns(tmp_path: Path, shipped_artifact: Path, suffix: str) -> None:
    rows = [{"id": r["prompt_id"], "text": r["prompt"], "team": r["team"]} for r in sample_rows(50)]
    source = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), source)
    else:
        source.write_text("id,text,team\n" + "".join(f"{r['id']},{r['text']},{r['team']}\n" for r in rows))
    options = LabelOptions(prompt_column="text", id_column="id", keep_columns=("team",), model=str(shipped_artifact),
                           chunk_rows=16)
    stats = label_files([str(source)], tmp_path / "out.jsonl", options, workers=2, progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert stats.rows == 50 and stats.errors == 0 and len(out) == 50
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # one output row per input row, in order
    assert out[0]["tier"] == "small" and out[1]["tier"] == "large"
    assert set(out[0]["scores"]) == {"small", "medium", "large"}
    policy = classifier.load(shipped_artifact).manifest.policy  # the floor it routed under, as a result says
    assert out[0]["cheap_floor"] == policy.cheap_floors.get(policy.default_mode) is not None
    model_version = json.loads((shipped_artifact / "manifest.json").read_text())["model_version"]
    assert out[0]["team"] == "t0" and out[0]["model_version"] == model_version
    default_mode = json.loads((shipped_artifact / "manifest.json").read_text())["policy"]["default_mode"]
    assert json.loads(out[0]["policy"]) == {"mode": default_mode, "threshold": None}  # what routed them
    # Who decided each row (the model, or the prior for a prompt unlike its training data) is the runtime's.
    runtime = classifier.load(shipped_artifact)
    assert [r["decided_by"] for r in out] == [runtime.classify(r["text"]).decided_by for r in rows]


def test_bad_rows_are_reported_and_job_goes_on(tmp_path: Path, shipped_artifact: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        json.dumps({"prompt_id": "a", "prompt": EASY}).encode() + b"\n"
        + json.dumps({"prompt_id": "b"}).encode() + b"\n"
        + json.dumps({"prompt_id": "c", "prompt": 5}).encode() + b"\n"
        + b'{"prompt_id": "d", "prompt": "\xff\xfe"}\n'
        + b"not json\n"
        + json.dumps({"prompt_id": "f", "prompt": ""}).encode() + b"\n"
        + json.dumps({"prompt_id": "g", "messages": [{"role": "user", "content": HARD}]}).encode() + b"\n"
        + json.dumps({"prompt_id": "h", "prompt": HARD * 20_000}).encode() + b"\n"
    )
    stats = label_files([str(source)], tmp_path / "out.parquet", LabelOptions(model=str(shipped_artifact)),
                        workers=1, progress=False)
    out = read_output(tmp_path / "out.parquet")
    assert [r["prompt_id"] for r in out] == ["a", "b", "c", "d", "in.jsonl:5", "f", "g", "h"]
    errors = {r["prompt_id"]: r["error"] for r in out if r["error"]}
    assert set(errors) == {"b", "c", "d", "in.jsonl:5", "f"} and stats.errors == 5
    assert "must be a string" in errors["c"] and "UTF-8" in errors["d"] and "empty" in errors["f"]
    assert out[6]["tier"] == "large" and out[7]["truncated"] is True
    assert all(r["decided_by"] is None and r["familiarity"] is None for r in out if r["error"])
    assert all(r["decided_by"] in ("model", "prior") for r in out if not r["error"])
    assert source.read_bytes().startswith(b'{"prompt_id": "a"')  # input untouched


def test_the_progress_bar_counts_rows_in_whole_numbers(tmp_path: Path, shipped_artifact: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """What a user watching `promptier label` reads: `34 rows`, not `34.0rows`."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(34)))
    label_files([str(source)], tmp_path / "out.jsonl", LabelOptions(model=str(shipped_artifact)), workers=1,
                progress=True)
    bar = capfd.readouterr().err.split("\r")[-1]
    assert bar.startswith("labeling: 34 rows [") and " rows/s]" in bar, bar


def test_empty_input_and_refusals(tmp_path: Path, shipped_artifact: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    options = LabelOptions(model=str(shipped_artifact))
    assert label_files([str(empty)], tmp_path / "out.jsonl", options, workers=1, progress=False).rows == 0
    assert (tmp_path / "out.jsonl").read_text() == ""
    label_files([str(empty)], tmp_path / "parquet" / "out.parquet", options, workers=1, progress=False)
    assert "tier" in pq.read_schema(tmp_path / "parquet" / "out.parquet").names  # not a table without columns
    with pytest.raises(LabelingError, match="exists"):
        label_files([str(empty)], tmp_path / "out.jsonl", options, workers=1, progress=False)
    with pytest.raises(LabelingError, match="overwrite an input"):
        label_files([str(empty)], empty, options, progress=False)
    with pytest.raises(LabelingError, match="no input files"):
        label_files([str(tmp_path / "*.parquet")], tmp_path / "x.jsonl", options, progress=False)
    with pytest.raises(LabelingError, match="output must end"):
        label_files([str(empty)], tmp_path / "x.txt", options, progress=False)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path, trained_artifact: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(6000)))
    reference = tmp_path / "reference.jsonl"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=200)
    label_files([str(source)], reference, options, workers=2, progress=False)

    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "classifier.cli", "label", str(source), "-o", str(out), "--model",
               str(trained_artifact), "--chunk-rows", "200", "--workers", "2"]
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.jsonl"))) < 3:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the job and its workers, mid-run
    job.wait()
    written = len(list(parts.glob("part-*.jsonl")))
    assert 3 <= written < 30 and not out.exists()
    with pytest.raises(LabelingError, match="--resume"):
        label_files([str(source)], out, options, progress=False)
    stats = label_files([str(source)], out, options, workers=2, resume=True, progress=False)
    assert stats.resumed_rows >= 600
    assert out.read_text() == reference.read_text()
    assert not parts.exists()


def test_ray_engine_equals_local_engine(tmp_path: Path, trained_artifact: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from classifier.labeling_ray import label_with_ray

    rows = sample_rows(900)
    rows[7]["prompt"] = ""  # a bad row is reported the same way by both engines
    # Several files, the first much larger: Ray labels them in parallel, the small ones finish first,
    # and the output must still keep the input order. In two folders, and one file's rows without ids:
    # both engines name those rows by the file's path below the folder the inputs share.
    for part, (start, end) in enumerate([(0, 700), (700, 800), (800, 900)]):
        folder = tmp_path / ("a" if part == 0 else "b")
        folder.mkdir(exist_ok=True)
        chunk = [{k: v for k, v in row.items() if k != "prompt_id" or part != 1} for row in rows[start:end]]
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"in-{part}.parquet")
    source = tmp_path / "*" / "in-*.parquet"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=64, keep_columns=("team",))
    label_files([str(source)], tmp_path / "local.jsonl", options, workers=2, progress=False)
    stats = label_with_ray([str(source)], tmp_path / "ray.jsonl", options)
    local, ray_rows = read_output(tmp_path / "local.jsonl"), read_output(tmp_path / "ray.jsonl")
    assert stats.rows == 900 and stats.errors == 1
    assert stats.tiers == LabelStats.of_rows(local).tiers  # counted as the batches went by
    assert stats.kept_values == {"team": sum(row["team"] is not None for row in local)}
    assert [r["prompt_id"] for r in ray_rows] == [r["prompt_id"] for r in local]
    assert local[700]["prompt_id"] == "b/in-1.parquet:1" and local[699]["prompt_id"] == rows[699]["prompt_id"]
    for a, b in zip(local, ray_rows, strict=True):
        assert a["tier"] == b["tier"] and a["error"] == b["error"] and a["team"] == b["team"]
        if a["scores"] is not None:
            assert all(abs(a["scores"][k] - b["scores"][k]) <= 0.02 for k in a["scores"])  # int8 batch effects


def test_a_job_that_cannot_run_is_refused_before_it_leaves_anything(tmp_path: Path, shipped_artifact: Path,
                                                                     shipped_artifact_copy: Path) -> None:
    """Refused at start, not as an error in every row or a traceback in every worker; and a job that
    failed before it labeled a row leaves no parts that the next run would take for an interrupted job."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(20)))
    out = tmp_path / "out.jsonl"
    parts = out.with_name(out.name + ".parts")
    model = str(shipped_artifact)
    for options, reason in ((LabelOptions(model=model, mode="bogus"), "unknown mode 'bogus'"),
                            (LabelOptions(model=model, threshold=5.0), r"threshold must be in \[0, 1\]"),
                            (LabelOptions(model=model, mode="cost", threshold=0.4), "at most one of")):
        with pytest.raises(LabelingError, match=reason):
            label_files([str(source)], out, options, workers=1, progress=False)
    with pytest.raises(LabelingError, match=r"no input files match '.*nomatch-\*\.jsonl'"):  # beside one that matches
        label_files([str(source), str(tmp_path / "nomatch-*.jsonl")], out, LabelOptions(model=model), progress=False)
    (shipped_artifact_copy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(classifier.ArtifactError, match="not a loadable ONNX model"):
        label_files([str(source)], out, LabelOptions(model=str(shipped_artifact_copy)), progress=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(LabelingError, match="Parquet"):
        label_files([str(broken)], out, LabelOptions(model=model), workers=1, progress=False)
    assert not parts.exists() and not out.exists()
    assert label_files([str(source)], out, LabelOptions(model=model), workers=1, progress=False).rows == 20


def test_the_command_says_when_every_row_failed(tmp_path: Path, shipped_artifact: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(5)))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "classifier.cli", "label", str(source), "--output", str(out), "--model",
               str(shipped_artifact), "--workers", "1", "--prompt-column", "text"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "every row failed" in result.stderr and "'text'" in result.stderr
    assert len(read_output(out)) == 5  # written all the same: each row says why
    refused = subprocess.run([*command[:-2], "--ray-address", "ray://nowhere:1"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "--ray-address needs --engine ray" in refused.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_unreachable_ray_cluster_is_refused_at_once(tmp_path: Path, shipped_artifact: Path, address: str) -> None:
    """Ray itself retries a host:port address for minutes before it gives up."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from classifier.labeling_ray import label_with_ray

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(LabelingError, match=f"cannot reach the Ray cluster at {address}"):
        label_with_ray([str(source)], tmp_path / "out.jsonl", LabelOptions(model=str(shipped_artifact)),
                       address=address)


@pytest.mark.parametrize(("flags", "actors"), [([], 2), (["--workers", "3"], 3)])
def test_workers_sets_the_ray_engines_model_actors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   flags: list[str], actors: int) -> None:
    """`--workers` is how many processes label; on the Ray engine those are its model actors."""
    from typer.testing import CliRunner

    from classifier import labeling_ray
    from classifier.cli import app

    asked: list[int] = []

    def recorded(inputs: list[str], output: Path, options: object, address: str | None = None,
                 actors: int = 2, id_column_given: bool = False) -> LabelStats:
        asked.append(actors)
        return LabelStats(rows=1)

    monkeypatch.setattr(labeling_ray, "label_with_ray", recorded)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "hi"}) + "\n")
    result = CliRunner().invoke(app, ["label", str(source), "--output", str(tmp_path / "out.jsonl"),
                                      "--engine", "ray", *flags])
    assert result.exit_code == 0, result.output
    assert asked == [actors]


def test_more_ray_actors_than_the_instance_can_run_beside_a_reader_are_refused() -> None:
    """Ray Data would wait forever for actors it cannot place, or for a reader the actors starve."""
    from classifier.labeling_ray import _require_cpus_for

    _require_cpus_for(3, 2.0)  # 3 x 0.5 + 0.5: every CPU, and no more
    with pytest.raises(LabelingError, match=r"--workers 4: .* has 2 CPUs: use at most 3"):
        _require_cpus_for(4, 2.0)


def test_a_kept_column_no_row_has_is_named_on_the_console(tmp_path: Path, shipped_artifact: Path) -> None:
    """A mistyped --keep gives a column of nulls: said, as a mistyped --prompt-column is."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({**row, "team": "search"}) + "\n" for row in sample_rows(5)))

    def label(keep: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "classifier.cli", "label", str(source), "--output",
                               str(tmp_path / out), "--model", str(shipped_artifact), "--workers", "1",
                               "--keep", keep], capture_output=True, text=True, timeout=120)

    mistyped = label("teem", "mistyped.jsonl")
    assert mistyped.returncode == 0, mistyped.stderr
    assert "--keep 'teem': none of the 5 rows labeled has a value there" in mistyped.stderr
    right = label("team", "right.jsonl")
    assert right.returncode == 0 and "--keep" not in right.stderr, right.stderr
    assert {row["team"] for row in read_output(tmp_path / "right.jsonl")} == {"search"}


def test_a_named_id_column_no_row_has_is_named_on_the_console(tmp_path: Path, shipped_artifact: Path) -> None:
    """A mistyped --id-column names every row FILE:N rather than by the ids asked for: said after the job
    for JSONL (whose rows each have their own columns), refused up front for Parquet. Not given, the default
    id column is no one's typo: rows without it are named FILE:N without a word."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in sample_rows(5)))

    def label(path: Path, out: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "classifier.cli", "label", str(path), "--output",
                               str(tmp_path / out), "--model", str(shipped_artifact), "--workers", "1", *flags],
                              capture_output=True, text=True, timeout=120)

    mistyped = label(source, "mistyped.jsonl", "--id-column", "promt_id")
    assert mistyped.returncode == 0, mistyped.stderr
    assert "--id-column 'promt_id': none of the 5 rows labeled has a value there, so each is named FILE:N" in (
        mistyped.stderr)
    assert [row["promt_id"] for row in read_output(tmp_path / "mistyped.jsonl")][:2] == ["in.jsonl:1", "in.jsonl:2"]
    right = label(source, "right.jsonl", "--id-column", "prompt_id")
    assert right.returncode == 0 and "--id-column" not in right.stderr, right.stderr
    no_ids = tmp_path / "no-ids.jsonl"
    no_ids.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in sample_rows(3)))
    default = label(no_ids, "default.jsonl")
    assert default.returncode == 0 and "--id-column" not in default.stderr, default.stderr
    assert [row["prompt_id"] for row in read_output(tmp_path / "default.jsonl")] == [
        "no-ids.jsonl:1", "no-ids.jsonl:2", "no-ids.jsonl:3"]
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows(5)), parquet)
    refused = label(parquet, "refused.jsonl", "--id-column", "promt_id")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: --id-column 'promt_id': no input has that column; the input's columns "
                                     "are 'prompt_id', 'prompt', 'team'")
    assert not (tmp_path / "refused.jsonl").exists()
