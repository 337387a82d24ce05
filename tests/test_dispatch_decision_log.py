"""The decision log: rotation, writers in several processes, odd text, and its rows as training input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classifier.conversation import render_conversation
from serving.dispatch.decision_log import MIN_MESSAGE_CHARS, cut_messages
from tests.dispatcher_harness import Dispatcher, read_log
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, HARD, ServerThread


def test_decision_log_with_scores_is_training_input(dispatcher: Dispatcher, tmp_path: Path) -> None:
    # The loop the dispatcher exists for: route, have a judge fill in `score`, train on the result.
    from training.data import read_logs
    from training.labels import build_table
    from training.pool import Pool

    client = dispatcher.client()
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    client.chat.completions.create(model="promptier/tier/large", messages=[{"role": "user", "content": EASY}])
    conversation = [("system", "Be brief."), ("user", EASY), ("assistant", "Done."), ("user", HARD)]
    client.chat.completions.create(model="promptier/quality",
                                   messages=[{"role": role, "content": text} for role, text in conversation])
    client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "not judged yet"}])
    logged = read_log(tmp_path)
    # For a judge, a conversation is also kept as it was, in order; a single message is the prompt itself.
    assert logged[2]["messages"] == [{"role": role, "content": text} for role, text in conversation]
    assert logged[0]["messages"] is None
    judged = tmp_path / "judged.jsonl"
    scores = [0.0, 1.0, 1.0, None]  # the small model failed the easy prompt; the last row awaits its judge
    judged.write_text("".join(json.dumps({**entry, "score": score}) + "\n"
                              for entry, score in zip(read_log(tmp_path), scores, strict=True)))
    rows, skipped = read_logs([judged])
    # The row without a score is waiting for one: left out and counted, not an invalid row.
    assert skipped.total == 0 and skipped.not_trainable == {"no outcome reported yet": 1}
    assert "1 x no outcome reported yet" in skipped.summary()
    pool = Pool.model_validate({
        "tiers": [{"name": name, "usd_per_mtok": {"input": 1, "output": 1}} for name in ("small", "medium", "large")],
        "sources": {"dispatcher": {name: f"{name}-upstream-model" for name in ("small", "medium", "large")}}})
    table, unused = build_table(rows, pool)
    # A conversation is logged as the text the classifier read, so training sees what serving sees.
    assert not unused and table.prompts == [EASY, render_conversation(conversation)]
    easy, hard = table.targets
    assert easy[0] == 0.0 and easy[2] == 1.0 and np.isnan(easy[1])  # unrouted tiers stay unknown, not failures
    assert hard[2] == 1.0 and np.isnan(hard[:2]).all()


def test_decision_log_rotates_by_size_and_loses_no_line(tmp_path: Path) -> None:
    from serving.dispatch.decision_log import DecisionLog
    from serving.dispatch.dispatch_config import DecisionLogConfig

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=1024, backups=50))
    for index in range(60):
        log.write({"prompt_id": f"p{index}", "padding": "x" * 60})
    log.close()
    files = [path, *sorted(tmp_path.glob("decisions.jsonl.*"))]
    assert len(files) > 3
    assert all(file.stat().st_size <= 1024 for file in files)
    ids = {json.loads(line)["prompt_id"] for file in files for line in file.read_text().splitlines()}
    assert ids == {f"p{index}" for index in range(60)}
    # Reopening an existing log keeps counting from its current size.
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=1024, backups=50))
    for index in range(20):
        log.write({"prompt_id": f"q{index}", "padding": "x" * 60})
    log.close()
    assert all(file.stat().st_size <= 1024 for file in [path, *tmp_path.glob("decisions.jsonl.*")])


def test_decision_log_keeps_a_lone_surrogate_as_an_escape(tmp_path: Path) -> None:
    from serving.dispatch.decision_log import DecisionLog
    from serving.dispatch.dispatch_config import DecisionLogConfig

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path))
    log.write({"prompt_id": "a", "prompt": "caf\u00e9 \ud800 end"})  # a JSON body may carry "\ud800"
    log.write({"prompt_id": "b", "prompt": "caf\u00e9"})
    log.close()
    lines = path.read_bytes().decode("utf-8").splitlines()  # the file stays valid UTF-8
    assert [json.loads(line)["prompt"] for line in lines] == ["caf\u00e9 \ud800 end", "caf\u00e9"]
    assert "café" in lines[1]  # non-ASCII text is written as is when it can be


def test_decision_log_shared_by_processes_loses_and_splits_no_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "decisions.jsonl"
    writer = ("import sys; from pathlib import Path; from serving.dispatch.decision_log import DecisionLog; "
              "from serving.dispatch.dispatch_config import DecisionLogConfig; "
              "log = DecisionLog(DecisionLogConfig(path=Path(sys.argv[1]), max_bytes=2048, backups=1000)); "
              "[log.write({'prompt_id': f'{sys.argv[2]}-{i}', 'padding': 'x' * 60}) for i in range(400)]; "
              "log.close()")
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(path), name]) for name in "abc"]
    assert [process.wait(60) for process in processes] == [0, 0, 0]
    files = [path, *tmp_path.glob("decisions.jsonl.*")]
    ids = [json.loads(line)["prompt_id"] for file in files for line in file.read_text().splitlines()]
    assert sorted(ids) == sorted(f"{name}-{i}" for name in "abc" for i in range(400))  # none lost, none twice
    assert len(files) > 20  # it did rotate, many times, under three writers
    line = len(json.dumps({"prompt_id": "a-100", "padding": "x" * 60})) + 1
    # Each process counts the file's real size, so a file overshoots by at most a line per writer.
    assert max(file.stat().st_size for file in files) <= 2048 + 3 * line
    assert not list(tmp_path.glob("decisions.jsonl*.lock"))  # the lock file stays out of the log's glob


def test_one_tenants_outcome_flood_rotates_only_its_own_outcome_file(tmp_path: Path) -> None:
    """Any key may report outcomes, for ids it cannot check. Kept in the log, a flood of them rotated every
    request line and every other tenant's reports out of it; each tenant's reports now have a file of
    their own beside the log, which training reads with it."""
    from serving.dispatch.decision_log import DecisionLog
    from serving.dispatch.dispatch_config import DecisionLogConfig
    from serving.dispatch.outcomes import OutcomeReport, record_outcomes
    from training.data import read_logs

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(DecisionLogConfig(path=path, max_bytes=4096, backups=1))
    ids = [f"dispatcher:{i:032x}" for i in range(4)]
    for index, request_id in enumerate(ids):
        log.write({"schema_version": 9, "prompt_id": request_id, "prompt": f"question {index}", "model": "m-7b",
                   "score": None, "source": "dispatcher", "category": "", "tier": "small", "routed_tier": "small",
                   "tenant": "search" if index < 2 else "ads"})
    record_outcomes(log, [OutcomeReport(request_id=ids[0], score=1.0), OutcomeReport(request_id=ids[1], score=0.0)],
                    "search")
    flood = [OutcomeReport(request_id=f"dispatcher:{i:032x}", score=1.0) for i in range(1000, 1000 + 1000)]
    for _ in range(5):
        record_outcomes(log, flood, "ads")
    record_outcomes(log, [OutcomeReport(request_id=ids[2], score=0.5)], "ads")
    log.close()
    assert len(path.read_text().splitlines()) == 4  # every request line is still there
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "decisions.jsonl", "decisions.outcomes.ads.jsonl", "decisions.outcomes.ads.jsonl.1",
        "decisions.outcomes.search.jsonl"]
    rows, report = read_logs([path])  # named alone, the log is read with its outcome files
    assert {row.prompt_id: row.score for row in rows} == {ids[0]: 1.0, ids[1]: 0.0, ids[2]: 0.5}
    assert report.not_trainable["no outcome reported yet"] == 1
    # The log and a backup of it named through a link to their folder: the outcome files beside both are
    # one set, each read once, not counted twice in a prompt's mean score. (The backup holds an outcome
    # line of the kind logs held before outcome files, so that a file read twice would move the mean.)
    (tmp_path / "decisions.jsonl.1").write_text(json.dumps({
        "schema_version": 8, "kind": "outcome", "prompt_id": ids[0], "score": 0.0, "tenant": "search"}) + "\n")
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)
    rows, _ = read_logs([path, tmp_path.parent / f"{tmp_path.name}-link" / "decisions.jsonl.1"])
    assert {row.prompt_id: row.score for row in rows} == {ids[0]: 0.5, ids[1]: 0.0, ids[2]: 0.5}


def test_decision_log_moved_or_deleted_by_an_operator_is_reopened(dispatcher: Dispatcher, tmp_path: Path) -> None:
    """logrotate without copytruncate renames the log (or an operator deletes it) while the dispatcher runs:
    the next line goes to a new file at the log's path, not on into the moved file or the deleted one."""
    import httpx

    client = dispatcher.client()
    path, outcomes = tmp_path / "decisions.jsonl", tmp_path / "decisions.outcomes.default.jsonl"

    def routed() -> str:
        answer = client.chat.completions.with_raw_response.create(
            model="promptier/tier/small", messages=[{"role": "user", "content": "hello"}])
        return answer.headers["x-promptier-request-id"]

    def report(request_id: str) -> None:
        reported = httpx.post(f"{dispatcher.base_url}/promptier/outcomes", json={"request_id": request_id, "score": 1})
        assert reported.status_code == 202, reported.text

    first = routed()
    report(first)
    path.rename(tmp_path / "decisions.jsonl-20270101")  # what logrotate's `create` mode does
    outcomes.rename(tmp_path / "decisions.outcomes.default.jsonl-20270101")
    second = routed()
    report(second)
    assert [line["prompt_id"] for line in read_log(tmp_path)] == [second]
    assert [json.loads(line)["prompt_id"] for line in outcomes.read_text().splitlines()] == [second]
    path.unlink()  # deleted outright: the line after it must not go to the unlinked file
    outcomes.unlink()
    third = routed()
    report(third)
    assert [line["prompt_id"] for line in read_log(tmp_path)] == [third]
    assert [json.loads(line)["prompt_id"] for line in outcomes.read_text().splitlines()] == [third]
    moved = (tmp_path / "decisions.jsonl-20270101").read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in moved] == [first]


def test_decision_log_writers_in_several_processes_each_follow_a_moved_log(tmp_path: Path) -> None:
    """Each worker process has its own descriptor on the log: every one of them notices the move."""
    from serving.dispatch.decision_log import RotatingLog

    path = tmp_path / "decisions.jsonl"
    writers = [RotatingLog(path, max_bytes=0, backups=0), RotatingLog(path, max_bytes=1 << 20, backups=2)]
    for index, writer in enumerate(writers):
        writer.write({"prompt_id": f"before-{index}"})
    path.rename(tmp_path / "decisions.jsonl.old")
    for index, writer in enumerate(writers):
        writer.write({"prompt_id": f"after-{index}"})
    for writer in writers:
        writer.close()
    assert [json.loads(line)["prompt_id"] for line in path.read_text().splitlines()] == ["after-0", "after-1"]
    old = (tmp_path / "decisions.jsonl.old").read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in old] == ["before-0", "before-1"]


def test_a_decision_log_the_disk_cannot_take_fails_no_request_and_loses_no_line(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    """A full disk (here a file-size limit) under the decision log turned answered, paid-for requests into
    500s. They are answered; each line the log cannot take goes to the process log (its prompt left out),
    and is counted."""
    import httpx

    from tests.dispatcher_harness import dispatch_with_file_limit

    log = tmp_path / "decisions.jsonl"
    # Bytes any one file of the dispatcher may grow to: its metrics files' first size, and about ten of
    # these requests' lines.
    dispatcher, port = dispatch_with_file_limit(fresh, trained_artifact, log, 64 * 1024, store_prompts=True)
    request_ids = []
    try:
        for i in range(16):
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                "model": "promptier", "messages": [{"role": "user", "content": f"{i} {EASY} " + "word " * 1200}]})
            assert reply.status_code == 200, reply.text  # answered, the log full or not
            assert reply.json()["choices"][0]["message"]["content"]
            request_ids.append(reply.headers["x-promptier-request-id"])
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics/").text
    finally:
        dispatcher.terminate()
        _, stderr = dispatcher.communicate(timeout=30)
    written = [json.loads(line)["prompt_id"] for line in log.read_text().splitlines()]  # every line whole
    diverted = [json.loads(line) for line in stderr.splitlines() if '"event": "decision_not_written"' in line]
    diverted_ids = [entry["line"]["prompt_id"] for entry in diverted]
    assert written and diverted_ids, (written, stderr[-2000:])  # the limit fell part way through
    assert sorted(written + diverted_ids) == sorted(request_ids)  # each line in one place or the other
    # Its routing and usage, not its prompt: the process log is kept by others, for other times.
    assert all("prompt" not in entry["line"] and entry["line"]["usage"] for entry in diverted)
    assert "word word" not in stderr
    assert f"promptier_dispatch_decision_log_errors_total {float(len(diverted_ids))}" in metrics


def test_huge_prompts_are_logged_by_their_head_and_tail_and_classify_as_they_were_served(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, trained_artifact: Path, tmp_path: Path) -> None:
    """A caller's 1 MB prompts, logged whole, rotated every other tenant's lines out of a 100 MB log within
    a hundred requests and filled the savings page's 4 MiB window with four of them. A line keeps the
    prompt's head and tail, what the classifier reads: a model trained on the line sees what it served."""
    import classifier
    from tests.dispatcher_harness import dispatcher_config

    log = tmp_path / "decisions.jsonl"
    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, log,
                                           decision_log={"path": str(log), "store_prompts": True,
                                                         "max_text_chars": 4096}))
    huge = f"{HARD} " + "filler words in the middle of a long paste " * 2500 + f" {EASY}"  # ~110,000 characters
    try:
        client = running.client()
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": huge}])
        conversation = [{"role": "system", "content": "Be brief. " * 3000}, {"role": "user", "content": EASY}]
        client.chat.completions.create(model="promptier", messages=conversation)  # type: ignore[arg-type]
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
    finally:
        running.stop()
    single, chat, short = read_log(tmp_path)
    assert len(single["prompt"]) <= 4096 and single["prompt"].startswith(huge[:1500])
    assert single["prompt"].endswith(huge[-1500:]) and single["text_cut_chars"] == len(huge) - 4096 + 40
    # The classifier reads the same head and tail of the logged prompt as of the one it served.
    relogged = classifier.load(trained_artifact).classify(single["prompt"])
    assert relogged.scores == pytest.approx(single["scores"]) and relogged.tier == single["tier"]
    assert sum(len(message["content"]) for message in chat["messages"]) <= 4096 + 2 * MIN_MESSAGE_CHARS
    assert chat["messages"][1]["content"] == EASY and chat["text_cut_chars"] > 0
    assert short["prompt"] == EASY and short["text_cut_chars"] is None


def test_a_conversation_of_many_messages_is_logged_within_the_bound() -> None:
    """Each message keeping its 256 characters, 7,000 of them (a 2 MB request) made a 2 MB line, and a few
    such requests pushed every other caller's lines out of the savings page's window. The middle messages
    are left out instead, and the first one after the gap says how many."""
    messages = [{"role": "user" if index % 2 else "assistant", "content": f"{index:05d}" + "x" * 251}
                for index in range(7000)]
    kept, cut = cut_messages(messages, 32768)
    assert len(kept) == 32768 // MIN_MESSAGE_CHARS == 128
    assert sum(len(message["content"]) for message in kept) <= 32768 + 40
    assert [message["content"][:5] for message in kept[:64]] == [f"{index:05d}" for index in range(64)]
    assert kept[64]["content"] == "[... 6872 messages cut ...]\n" + messages[6936]["content"]
    assert kept[64]["role"] == messages[6936]["role"] and kept[-1] == messages[-1]
    assert cut == 6872 * 256
    few = messages[:3]  # a short conversation is kept whole
    assert cut_messages(few, 32768) == (few, 0)
