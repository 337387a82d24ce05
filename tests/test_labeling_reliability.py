"""Batch labeling when things go wrong: each test stages one failure with real processes and files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from classifier import labeling, labeling_local, labeling_output, labeling_worker
from classifier.cli import app
from classifier.labeling import LabelingError, LabelOptions, label_files
from tests.grpc_server import EASY, HARD
from tests.labeling_files import read_output, sample_rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "classifier.cli", "label", *args]


def _wait_for(condition, what: str, seconds: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition` until it holds; a generous bound, only to end a test that would hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _leftovers(root: Path) -> list[str]:
    """Temporary and lock files anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".tmp", ".lock")))


# ---------------------------------------------------------------- one job per output
def test_second_job_on_the_same_output_fails_fast_and_the_first_finishes(tmp_path: Path,
                                                                         trained_artifact: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(3000))
    options = LabelOptions(model=str(trained_artifact), chunk_rows=200)
    label_files([str(source)], tmp_path / "reference.jsonl", options, workers=2, progress=False)
    out = tmp_path / "out.jsonl"
    command = _cli(str(source), "-o", str(out), "--model", str(trained_artifact), "--chunk-rows", "200",
                   "--workers", "2", "--resume")
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = out.with_name(out.name + ".lock")
    try:
        # Freeze the first job once it holds the lock: from then on the race is decided, whatever the speed.
        _wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), "the first job's lock")
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert str(out) in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert not out.exists()  # the second job touched nothing
        os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, stderr
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text()
    assert not out.with_name(out.name + ".parts").exists() and _leftovers(tmp_path) == []
    # Once the job is done, --resume says so and leaves the output alone.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text()


def test_lock_is_per_output_and_released(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with labeling.output_lock(out):
        with pytest.raises(LabelingError, match=rf"{out}.*pid {os.getpid()}"), labeling.output_lock(out):
            pass
        with labeling.output_lock(tmp_path / "other.jsonl"):
            pass
    with labeling.output_lock(out):  # released and taken again
        pass
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- resume checks the job
def test_resume_refuses_an_unrelated_output(tmp_path: Path, trained_artifact: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(20))
    out = tmp_path / "out.jsonl"
    out.write_text('{"something": "else"}\n')
    result = CliRunner().invoke(app, ["label", str(source), "-o", str(out), "--model", str(trained_artifact),
                                      "--resume"])
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and "not the output of this job" in result.output
    assert out.read_text() == '{"something": "else"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    # Without --resume an existing output is refused as well, and kept.
    result = CliRunner().invoke(app, ["label", str(source), "-o", str(out), "--model", str(trained_artifact)])
    assert result.exit_code == 2 and "exists" in result.output
    assert out.read_text() == '{"something": "else"}\n'


def test_resume_of_a_finished_job_checks_its_record(tmp_path: Path, trained_artifact: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(30))
    out = tmp_path / "out.parquet"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=8)
    label_files([str(source)], out, options, workers=1, progress=False)
    finished = out.read_bytes()
    stats = label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    assert stats.complete and stats.resumed_rows == 30 and stats.rows == 0
    with pytest.raises(LabelingError, match="mode"):
        label_files([str(source)], out, LabelOptions(model=str(trained_artifact), chunk_rows=8, mode="cost"),
                    workers=1, resume=True, progress=False)
    with pytest.raises(LabelingError, match="model"):
        label_files([str(source)], out, LabelOptions(chunk_rows=8), workers=1, resume=True, progress=False)
    # A job recorded by a version whose output had other columns is not taken for this one.
    record_path = out.with_name(out.name + ".job.json")
    record = json.loads(record_path.read_text())
    older = {**record["job"], "columns": record["job"]["columns"][:-2]}
    record_path.write_text(json.dumps({**record, "job": older, "fingerprint": "from an older version"}))
    with pytest.raises(LabelingError, match="columns"):
        label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    record_path.write_text(json.dumps(record))
    with source.open("a") as handle:
        handle.write(json.dumps({"prompt_id": "late", "prompt": EASY}) + "\n")
    with pytest.raises(LabelingError, match=r"input in\.jsonl"):
        label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    assert out.read_bytes() == finished
    assert _leftovers(tmp_path) == []


def _interrupted_before_merging(source: Path, out: Path, options: LabelOptions,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A job on `out` stopped (Ctrl-C) once every part is written, before they are merged."""
    def interrupted(parts: list[Path], output: Path, schema: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(labeling_output, "merge_parts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            label_files([str(source)], out, options, workers=1, progress=False)


def test_resume_of_an_interrupted_job_checks_its_fingerprint(tmp_path: Path, trained_artifact: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(40))
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=8)
    label_files([str(source)], tmp_path / "reference.jsonl", options, workers=1, progress=False)
    _interrupted_before_merging(source, out, options, monkeypatch)
    parts = out.with_name(out.name + ".parts")
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    assert len(before) == 6  # five parts and the job record
    with pytest.raises(LabelingError, match=r"chunk_rows \(8 -> 16\)") as refused:
        label_files([str(source)], out, LabelOptions(model=str(trained_artifact), chunk_rows=16), workers=1,
                    resume=True, progress=False)
    assert "keep_columns" not in str(refused.value)  # only what differs, not a list read back from JSON
    (parts / "job.json").write_text("{broken")
    with pytest.raises(LabelingError, match=r"job\.json"):
        label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    # A job started by a version whose columns meant something else is not continued.
    record = json.loads(before["job.json"])
    del record["job"]["format"]
    record["fingerprint"] = labeling_output._fingerprint(record["job"])
    (parts / "job.json").write_text(json.dumps(record))
    with pytest.raises(LabelingError, match="started by another version"):
        label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    (parts / "job.json").write_bytes(before["job.json"])
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before and not out.exists()
    stats = label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    assert stats.resumed_rows == 40 and out.read_text() == (tmp_path / "reference.jsonl").read_text()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_resume_labels_again_a_part_a_power_loss_cut_short(tmp_path: Path, trained_artifact: Path,
                                                              monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """A kill leaves a part whole or absent; a machine that lost power can leave one cut short, or empty
    though named as done. A resume checks each part's rows and labels a damaged one's chunk again."""
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(40))
    out = tmp_path / f"out{suffix}"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=8)
    label_files([str(source)], tmp_path / f"reference{suffix}", options, workers=1, progress=False)
    _interrupted_before_merging(source, out, options, monkeypatch)
    parts = sorted(out.with_name(out.name + ".parts").glob(f"part-*{suffix}"))
    assert len(parts) == 5
    whole = parts[1].read_bytes()
    parts[1].write_bytes(whole[: len(whole) // 2])  # cut short
    parts[3].write_bytes(b"")  # named as done, never written
    damaged = 2
    if suffix == ".parquet":  # its footer whole, a data page not
        page = bytearray(parts[4].read_bytes())
        page[20:60] = bytes(byte ^ 0xFF for byte in page[20:60])
        parts[4].write_bytes(bytes(page))
        damaged = 3
    stats = label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    assert stats.resumed_rows == 40 - 8 * damaged and stats.rows == 8 * damaged
    assert read_output(out) == read_output(tmp_path / f"reference{suffix}")


@pytest.mark.parametrize(("earlier_rows_good", "status"), [(True, 0), (False, 1)])
def test_a_resumed_job_is_judged_by_all_its_rows(tmp_path: Path, trained_artifact: Path,
                                                 monkeypatch: pytest.MonkeyPatch, earlier_rows_good: bool,
                                                 status: int) -> None:
    """Only the rows labeled on resume failed: the job did not (exit 0, as an uninterrupted run's); when the
    rows labeled before the interruption failed too, every row did (exit 1)."""
    earlier = sample_rows(16) if earlier_rows_good else [{"prompt_id": f"x{i}"} for i in range(16)]
    source = _jsonl(tmp_path / "in.jsonl", earlier + [{"prompt_id": f"bad{i}"} for i in range(8)])
    out = tmp_path / "out.jsonl"
    _interrupted_before_merging(source, out, LabelOptions(model=str(trained_artifact), chunk_rows=8), monkeypatch)
    (out.with_name(out.name + ".parts") / "part-00000002.jsonl").unlink()  # the run stopped before it
    result = CliRunner().invoke(app, ["label", str(source), "--output", str(out), "--model", str(trained_artifact),
                                      "--chunk-rows", "8", "--workers", "1", "--resume"])
    assert result.exit_code == status, result.output
    assert "labeled 8 rows (8 with errors, 16 resumed)" in result.output
    assert ("every row failed" in result.output) == (status == 1) and len(read_output(out)) == 24


def test_a_finished_job_whose_parts_were_being_removed_resumes_as_complete(tmp_path: Path,
                                                                          trained_artifact: Path) -> None:
    """A kill while the finished job's parts were deleted left parts without their record: every resume
    was refused, and its message said to start over a job whose output was complete."""
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(16))
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=8)
    label_files([str(source)], out, options, workers=1, progress=False)
    finished = out.read_bytes()
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "part-00000001.jsonl").write_text(out.read_text().splitlines(keepends=True)[8])  # its record gone
    stats = label_files([str(source)], out, options, workers=1, resume=True, progress=False)
    assert stats.complete and stats.resumed_rows == 16 and out.read_bytes() == finished
    assert not parts.exists() and _leftovers(tmp_path) == []
    # Removing a folder renames it first: a kill mid-way leaves a `.removing` folder, never a half-emptied one.
    parts.mkdir()
    (parts / "job.json").write_text("{}")
    labeling_output.remove_folder(parts)
    assert not parts.exists() and not parts.with_name(parts.name + ".removing").exists()


# ---------------------------------------------------------------- malformed rows
def _malformed_jsonl(path: Path) -> Path:
    lines = [
        "\ufeff" + json.dumps({"prompt_id": "bom", "prompt": EASY}),  # a UTF-8 BOM before the first row
        json.dumps({"prompt_id": "deep", "prompt": EASY, "meta": "x"})[:-1] + ', "nest": ' + "[" * 100_000
        + "]" * 100_000 + "}",
        json.dumps({"prompt_id": "chat", "messages": [{"role": "user", "content": HARD}]}),
        '{"prompt_id": "nan", "prompt": NaN}',
        json.dumps({"prompt_id": "obj", "prompt": {"text": EASY}}),
        json.dumps({"prompt_id": "msgstr", "messages": "hello"}),
        json.dumps({"prompt_id": "msgint", "messages": [{"role": "user", "content": 5}]}),
        "[1, 2]",
        "null",
        '{"prompt_id": "broken", "prompt": ',
        '{"prompt_id": "surrogate", "prompt": "hi \\ud800 there"}',
        '{"prompt_id": "bad-id-\\udfff", "prompt": "hello"}',
        json.dumps({"prompt_id": "marker", "prompt": EASY, "__error__": "not mine", "__row__": "nor this"}),
        json.dumps({"prompt_id": 7, "prompt": HARD, "team": {"name": "a", "tags": [1, 2]}}),
        json.dumps({"prompt_id": "shallow", "prompt": EASY, "nest": [[[[[[[[1]]]]]]]]}),
        json.dumps({"prompt_id": "last", "prompt": HARD}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return path


def _malformed_csv(path: Path) -> Path:
    path.write_bytes(
        b"\xef\xbb\xbfprompt_id,prompt,team\n"
        b"007," + EASY.encode() + b",a\n"
        b"short,only two\n"
        b"long,too,many,fields\n"
        b"utf," + b"\xff\xfe bad" + b",b\n"
        b'multi,"' + HARD.encode() + b'\nsecond line",c\n'
        b"\n"
        b"huge," + (HARD + " ") .encode() * 5_000 + b",d\n"
        b"end," + HARD.encode() + b",e\n"
    )
    return path


EXPECTED_JSONL_ERRORS = {
    "in.jsonl:2": "line 2: JSON nested deeper than 64 levels",
    "nan": "prompt must be a string, got float",
    "obj": "prompt must be a string, got dict",
    "msgstr": "'messages' must be a list of messages, got str",
    "msgint": "message 0 content must be a string, a list of parts or null, got int",
    "in.jsonl:8": "line 8: expected an object, got list",
    "in.jsonl:9": "line 9: expected an object, got NoneType",
    "in.jsonl:10": "line 10: Expecting value",
    "surrogate": "prompt is not valid Unicode: unpaired surrogate at character 3",
    "bad-id-\\udfff": "column 'prompt_id': unpaired surrogate at character 7",
}


def test_malformed_jsonl_rows_become_row_errors(tmp_path: Path, trained_artifact: Path) -> None:
    source = _malformed_jsonl(tmp_path / "in.jsonl")
    options = LabelOptions(model=str(trained_artifact), keep_columns=("team",), chunk_rows=4)
    stats = label_files([str(source)], tmp_path / "out.jsonl", options, workers=1, progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert [r["prompt_id"] for r in out] == [
        "bom", "in.jsonl:2", "chat", "nan", "obj", "msgstr", "msgint", "in.jsonl:8", "in.jsonl:9", "in.jsonl:10",
        "surrogate", "bad-id-\\udfff", "marker", "7", "shallow", "last"]
    errors = {r["prompt_id"]: r["error"] for r in out if r["error"]}
    assert set(errors) == set(EXPECTED_JSONL_ERRORS) and stats.errors == len(EXPECTED_JSONL_ERRORS)
    for row_id, fragment in EXPECTED_JSONL_ERRORS.items():
        assert fragment in errors[row_id], (row_id, errors[row_id])
    by_id = {r["prompt_id"]: r for r in out}
    assert by_id["bom"]["tier"] == "small" and by_id["chat"]["tier"] == "large"
    assert by_id["marker"]["tier"] == "small" and by_id["shallow"]["tier"] == "small"
    assert json.loads(by_id["7"]["team"]) == {"name": "a", "tags": [1, 2]}


def test_malformed_csv_rows_become_row_errors(tmp_path: Path, trained_artifact: Path) -> None:
    source = _malformed_csv(tmp_path / "in.csv")
    options = LabelOptions(model=str(trained_artifact), keep_columns=("team",))
    stats = label_files([str(source)], tmp_path / "out.jsonl", options, workers=1, progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert [r["prompt_id"] for r in out] == ["007", "short", "long", "utf", "multi", "huge", "end"]
    errors = {r["prompt_id"]: r["error"] for r in out if r["error"]}
    assert set(errors) == {"short", "long", "utf"} and stats.errors == 3
    assert "2 fields" in errors["short"] and "4 fields" in errors["long"] and "UTF-8" in errors["utf"]
    by_id = {r["prompt_id"]: r for r in out}
    assert by_id["007"]["tier"] == "small" and by_id["007"]["team"] == "a"
    assert by_id["multi"]["tier"] == "large" and by_id["huge"]["truncated"] is True


def test_parquet_values_of_any_type_are_kept_as_text(tmp_path: Path, trained_artifact: Path) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt_id": 1, "prompt": EASY, "when": datetime(2026, 1, 2, 3, 4, 5), "blob": b"\x00\xff"},
        {"prompt_id": 2, "prompt": None, "when": None, "blob": None},
    ]), source)
    options = LabelOptions(model=str(trained_artifact), keep_columns=("when", "blob"))
    label_files([str(source)], tmp_path / "out.jsonl", options, workers=1, progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert [r["prompt_id"] for r in out] == ["1", "2"]
    assert out[0]["error"] is None and "2026-01-02" in out[0]["when"] and out[0]["blob"]
    assert "no 'prompt'" in out[1]["error"] and out[1]["when"] is None


def test_ray_engine_agrees_with_local_on_malformed_rows(tmp_path: Path, trained_artifact: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from classifier.labeling_ray import label_with_ray

    inputs = [str(_malformed_jsonl(tmp_path / "in.jsonl")), str(_malformed_csv(tmp_path / "in.csv"))]
    options = LabelOptions(model=str(trained_artifact), keep_columns=("team",), chunk_rows=4)
    label_files(inputs, tmp_path / "local.jsonl", options, workers=1, progress=False)
    # What a Ray job on this output killed with -9 left, and another output's job (not this one's to remove).
    # (Of the output "ray.jsonl.ray-a.jsonl", whose name starts like this one's staging folders.)
    killed = tmp_path / ".ray.jsonl.ray-killed01"
    others = [tmp_path / ".other.jsonl.ray-running", tmp_path / ".ray.jsonl.ray-a.jsonl.ray-running"]
    for staging in (killed, *others):
        staging.mkdir()
        (staging / "part-00000000.parquet").write_bytes(b"half a part")
    stats = label_with_ray(inputs, tmp_path / "ray.jsonl", options)
    assert not killed.exists() and all((other / "part-00000000.parquet").exists() for other in others)
    local, ray_rows = read_output(tmp_path / "local.jsonl"), read_output(tmp_path / "ray.jsonl")
    assert stats.rows == len(local) == 23 and stats.errors == len(EXPECTED_JSONL_ERRORS) + 3
    for a, b in zip(local, ray_rows, strict=True):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        if a["scores"] is not None:
            assert all(abs(a["scores"][k] - b["scores"][k]) <= 0.02 for k in a["scores"])  # int8 batch effects
    assert _leftovers(tmp_path) == []
    # An input whose data breaks mid-job fails in a Ray task: its reason, as the local engine gives it.
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows(200)), damaged, compression="snappy")
    page = bytearray(damaged.read_bytes())
    page[40:400] = bytes(byte ^ 0x5A for byte in page[40:400])
    damaged.write_bytes(bytes(page))
    with pytest.raises(LabelingError) as local_error:
        label_files([str(damaged)], tmp_path / "local-damaged.jsonl", options, workers=1, progress=False)
    with pytest.raises(LabelingError) as ray_error:
        label_with_ray([str(damaged)], tmp_path / "ray-damaged.jsonl", options)
    assert "ray::" not in str(ray_error.value) and "Traceback" not in str(ray_error.value)
    assert str(ray_error.value) == str(local_error.value), (ray_error.value, local_error.value)


# ---------------------------------------------------------------- workers die with the job
def test_workers_exit_when_the_job_is_killed(tmp_path: Path, trained_artifact: Path) -> None:
    psutil = pytest.importorskip("psutil")
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(20_000))
    job = subprocess.Popen(_cli(str(source), "-o", str(tmp_path / "out.jsonl"), "--model", str(trained_artifact),
                                "--chunk-rows", "100", "--workers", "2"),
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list = []  # type: ignore[type-arg]

    def gone(process) -> bool:  # type: ignore[no-untyped-def]
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        parent = psutil.Process(job.pid)

        def workers() -> list:  # type: ignore[type-arg]
            found = []
            for process in parent.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "spawn_main" in " ".join(process.cmdline()):
                        found.append(process)
            return found

        _wait_for(lambda: len(workers()) == 2, "two worker processes")
        children = parent.children(recursive=True)
        job.send_signal(signal.SIGKILL)  # the job process alone, as the OOM killer would
        assert job.wait() == -signal.SIGKILL
        _wait_for(lambda: all(gone(p) for p in children), "the workers to exit", seconds=60)
    finally:
        for process in children:  # whatever outlived the job must not outlive the test
            if not gone(process):
                process.kill()
        if job.poll() is None:
            job.kill()
            job.wait()


# ---------------------------------------------------------------- write errors
def test_disk_full_while_merging_fails_cleanly_and_resumes(tmp_path: Path, trained_artifact: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(50))
    label_files([str(source)], tmp_path / "reference.jsonl", LabelOptions(model=str(trained_artifact), chunk_rows=16),
                workers=1, progress=False)
    out = tmp_path / "out.jsonl"
    args = ["label", str(source), "-o", str(out), "--model", str(trained_artifact), "--chunk-rows", "16",
            "--workers", "1"]

    def full_disk(source_file, target_file, *args: object) -> None:  # type: ignore[no-untyped-def]
        target_file.write(source_file.read(10))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(labeling_output.shutil, "copyfileobj", full_disk)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and str(out) in result.output and "--resume" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert len(list(out.with_name(out.name + ".parts").glob("part-*.jsonl"))) == 4  # finished work is kept
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_disk_full_in_a_worker_leaves_no_partial_part(tmp_path: Path, trained_artifact: Path, suffix: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import classifier

    monkeypatch.setattr(labeling_worker, "_worker_model", classifier.load(trained_artifact))
    real_open = Path.open

    def full_disk(self: Path, mode: str = "r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "w" not in mode:
            return real_open(self, mode, *args, **kwargs)
        handle = real_open(self, mode, *args, **kwargs)
        handle.write(b"partial" if "b" in mode else "partial")
        handle.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "open", full_disk)
    part = tmp_path / f"part-00000000{suffix}"
    chunk = [(f"in.jsonl:{i}", json.dumps(row).encode()) for i, row in enumerate(sample_rows(5), start=1)]
    with pytest.raises(LabelingError, match=rf"{part}.*No space left on device"):
        labeling_local.label_part(chunk, LabelOptions(), part)
    assert list(tmp_path.iterdir()) == []


def test_write_error_in_a_worker_ends_the_job_cleanly(tmp_path: Path, trained_artifact: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source = _jsonl(tmp_path / "in.jsonl", sample_rows(50))
    out = tmp_path / "out.jsonl"
    options = LabelOptions(model=str(trained_artifact), chunk_rows=16)
    label_files([str(source)], tmp_path / "reference.jsonl", options, workers=1, progress=False)
    _interrupted_before_merging(source, out, options, monkeypatch)  # its four parts are written
    parts = out.with_name(out.name + ".parts")
    (parts / "part-00000002.jsonl").unlink()
    (parts / "part-00000002.tmp").mkdir()  # where the worker writes that part again: a write error
    command = _cli(str(source), "-o", str(out), "--model", str(trained_artifact), "--chunk-rows", "16",
                   "--workers", "2", "--resume")
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    assert "part-00000002" in failed.stderr and "Is a directory" in failed.stderr and "--resume" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not out.exists() and [p.name for p in tmp_path.rglob("*.lock")] == []
    kept = {p.name for p in parts.glob("part-*.jsonl")}
    assert {"part-00000000.jsonl", "part-00000001.jsonl"} <= kept and "part-00000002.jsonl" not in kept
    (parts / "part-00000002.tmp").rmdir()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text() and _leftovers(tmp_path) == []
