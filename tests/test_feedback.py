"""The feedback loop end to end: answers routed through a real dispatcher (openai SDK), their outcomes
reported back, the decision log joined with them by `promptier train`, a model continued on it with
`--init-from`, and the new artifact serving."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from typer.testing import CliRunner

import classifier
from classifier.decision_files import outcome_log_path
from serving.dispatch.app import create_app
from serving.dispatch.decision_log import OUTCOME_KIND as LOGGED_OUTCOME_KIND
from serving.dispatch.dispatch_config import DispatcherConfig
from serving.dispatch.inbound import DispatchServerConfig
from tests.conftest import POOL_YAML, synthetic_rows, tiny_config, write_jsonl
from tests.dispatcher_harness import Dispatcher
from tests.fake_upstream import Upstream, run_uvicorn
from training.data import OUTCOME_KIND, read_logs
from training.synthetic import EASY, HARD, MEDIUM

pytestmark = pytest.mark.slow
TIERS = ("small", "medium", "large")
KEY = "sk-feedback-test"


def _dispatcher(model: Path, upstreams: dict[str, Upstream], log: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[uvicorn.Server, str]:
    monkeypatch.setenv("FEEDBACK_TEST_KEYS", KEY)
    config = DispatcherConfig.model_validate({
        "classifier": {"embedded": True, "model": str(model), "timeout_ms": 5000},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in upstreams.items()},
        "fallback_tier": "large", "inbound_api_keys_env": "FEEDBACK_TEST_KEYS",
        "decision_log": {"path": str(log), "store_prompts": True}})
    server = uvicorn.Server(DispatchServerConfig(create_app(config), host="127.0.0.1", port=0, log_level="error"))
    return server, f"http://127.0.0.1:{run_uvicorn(server)}"


def _train(args: list[str]):  # type: ignore[no-untyped-def]
    from training.cli import app

    return CliRunner().invoke(app, ["train", *args])


def _prompts(count: int) -> list[tuple[str, int]]:
    """Prompts whose difficulty is in their words (as the synthetic logs'), with it: 0 easy .. 2 hard."""
    rng = random.Random(5)
    return [(" ".join(rng.choice((EASY, MEDIUM, HARD)[i % 3]) for _ in range(rng.randint(3, 9))) + f" q{i}", i % 3)
            for i in range(count)]


def test_outcomes_reported_to_the_dispatcher_train_the_next_model(
        tmp_path: Path, tiny_backbone: Path, upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    assert OUTCOME_KIND == LOGGED_OUTCOME_KIND  # the two sides of the log agree on what an outcome line is
    pool = tmp_path / "pool.yaml"
    pool_data = yaml.safe_load(POOL_YAML)
    pool_data["sources"]["dispatcher"] = {name: f"{name}-upstream-model" for name in TIERS}
    pool.write_text(yaml.safe_dump(pool_data))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_backbone).model_dump()))
    deployed = tmp_path / "deployed"
    result = _train(["--logs", str(write_jsonl(tmp_path / "old.jsonl", synthetic_rows(540, seed=3))),
                     "--pool", str(pool), "--out", str(deployed), "--config", str(config), "--model-version", "v1"])
    assert result.exit_code == 0, result.output

    log = tmp_path / "decisions.jsonl"
    server, base = _dispatcher(deployed, upstreams, log, monkeypatch)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        answered: dict[str, tuple[str, int]] = {}
        for prompt, level in _prompts(540):
            raw = client.chat.completions.with_raw_response.create(
                model="promptier", messages=[{"role": "user", "content": prompt}])
            answered[raw.headers["x-promptier-request-id"]] = (raw.headers["x-promptier-tier"], level)
        assert len(answered) == 540  # one id per answer

        # The gateway's judge: an answer served well when its tier was capable enough for the prompt.
        outcomes = [{"request_id": request_id, "score": float(TIERS.index(tier) >= level), "judge": "rule"}
                    for request_id, (tier, level) in answered.items()]
        headers = {"authorization": f"Bearer {KEY}"}
        first = httpx.post(f"{base}/v1/promptier/outcomes", json=outcomes[0], headers=headers)
        assert (first.status_code, first.json()) == (202, {"accepted": 1})
        rest = httpx.post(f"{base}/v1/promptier/outcomes", json={"outcomes": outcomes[1:]}, headers=headers)
        assert (rest.status_code, rest.json()) == (202, {"accepted": 539})
        # Refused whole, with the place named: nothing of a bad batch is written.
        bad = httpx.post(f"{base}/v1/promptier/outcomes", headers=headers,
                         json={"outcomes": [outcomes[0], {"request_id": outcomes[1]["request_id"], "score": 1.5}]})
        assert bad.status_code == 400 and "outcomes.1.score" in bad.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/promptier/outcomes", json=outcomes[0]).status_code == 401
        assert httpx.post(f"{base}/v1/promptier/outcomes", headers=headers,
                          json={"request_id": "not-an-id", "score": 1}).status_code == 400
        for loose in ("0.5", True):  # a number only: training would read neither as one
            assert httpx.post(f"{base}/v1/promptier/outcomes", headers=headers,
                              json={"request_id": outcomes[0]["request_id"], "score": loose}).status_code == 400
        # One more answer, not scored yet: left out of training and counted as such.
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "hello cat"}])
        # Scores for requests this log does not hold (another worker's, say): accepted, and counted as such.
        orphans = [{"request_id": f"dispatcher:{i:032x}", "score": 1.0} for i in range(3)]
        reported = httpx.post(f"{base}/v1/promptier/outcomes", json={"outcomes": orphans}, headers=headers)
        assert reported.status_code == 202
    finally:
        server.should_exit = True

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert not any(line.get("kind") == OUTCOME_KIND for line in lines)  # outcomes are kept beside the log
    reported = [json.loads(line) for line in (tmp_path / "decisions.outcomes.default.jsonl").read_text().splitlines()]
    assert len(reported) == 543 and {line["kind"] for line in reported} == {OUTCOME_KIND}
    rows, report = read_logs([log])  # the log alone: its outcome files are read with it
    assert len(rows) == 540 and report.not_trainable["no outcome reported yet"] == 1
    assert report.not_trainable["outcome reported for a request not in these logs"] == 3
    scored = {row.prompt_id: row.score for row in rows}
    assert scored == {o["request_id"]: o["score"] for o in outcomes}

    # Alone, the log knows one tier per prompt: no threshold can be chosen on it (it would pick 0, every
    # prompt to the cheapest tier), so training says so before it starts.
    alone = _train(["--logs", str(log), "--pool", str(pool), "--out", str(deployed), "--init-from", str(deployed),
                    "--config", str(config), "--model-version", "v2"])
    assert alone.exit_code == 2 and "outcomes on two tiers or more" in alone.output, alone.output
    assert classifier.load(deployed).model_version == "v1"
    scored_on_every_tier = write_jsonl(tmp_path / "judged.jsonl", synthetic_rows(300, seed=4))
    result = _train(["--logs", str(log), "--logs", str(scored_on_every_tier), "--pool", str(pool), "--out",
                     str(deployed), "--init-from", str(deployed), "--config", str(config), "--model-version", "v2",
                     "--force"])
    assert result.exit_code == 0, result.output
    assert "promoted v2" in result.output
    assert classifier.load(deployed).model_version == "v2"
    server, base = _dispatcher(deployed, upstreams, tmp_path / "after.jsonl", monkeypatch)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        tiers = [client.chat.completions.with_raw_response.create(
                     model="promptier", messages=[{"role": "user", "content": text}]).headers["x-promptier-tier"]
                 for text in ("hello cat", "prove the theorem lemma eigenvalue integral")]
        assert tiers == ["small", "large"]  # it still routes by difficulty
    finally:
        server.should_exit = True
    assert json.loads((tmp_path / "after.jsonl").read_text().splitlines()[0])["model"] is not None


def test_an_outcome_for_an_id_with_anything_after_it_is_refused_not_lost(dispatcher: Dispatcher,
                                                                        tmp_path: Path) -> None:
    """An id read with its line end (a header saved to a file, `readline()`) joins no request line: were it
    accepted, the score would be lost behind a 202. Refused, the caller learns to strip it."""
    client = dispatcher.client()
    answer = client.chat.completions.with_raw_response.create(
        model="promptier/tier/small", messages=[{"role": "user", "content": "hello"}])
    request_id = answer.headers["x-promptier-request-id"]
    url = f"{dispatcher.base_url}/promptier/outcomes"
    for trailing in ("\n", "\r\n", " "):
        refused = httpx.post(url, json={"request_id": request_id + trailing, "score": 1.0})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_outcome", refused.text
    both = httpx.post(url, json={"request_id": request_id, "score": 1.0, "outcomes": [{"request_id": request_id,
                                                                                       "score": 0.0}]})
    assert both.status_code == 400 and "one outcome (request_id, score) or a batch of them (outcomes), not both" \
        in both.json()["error"]["message"], both.text
    assert not (tmp_path / "decisions.outcomes.default.jsonl").exists()  # nothing of them was written
    accepted = httpx.post(url, json={"request_id": request_id, "score": 1.0})
    assert (accepted.status_code, accepted.json()) == (202, {"accepted": 1})
    rows, _ = read_logs([tmp_path / "decisions.jsonl"])
    assert [(row.prompt_id, row.score) for row in rows] == [(request_id, 1.0)]


def test_an_outcome_joins_only_a_request_of_the_tenant_whose_key_reported_it(tmp_path: Path) -> None:
    """One tenant's key cannot score another's answers: such an outcome trains nothing, and is counted."""
    def request(number: int, tenant: str) -> dict:
        return {"schema_version": 8, "prompt_id": f"dispatcher:{number:032x}", "prompt": f"question {number}",
                "model": "small-upstream-model", "score": None, "cost_usd": 0.001, "source": "dispatcher",
                "category": "", "tier": "small", "routed_tier": "small", "tenant": tenant}

    def outcome(number: int, score: float, tenant: str | None) -> dict:
        line = {"schema_version": 8, "kind": OUTCOME_KIND, "prompt_id": f"dispatcher:{number:032x}",
                "score": score, "judge": None, "time": "2026-12-02T00:00:00Z"}
        # No tenant: a line written before outcome lines named one, which joins any tenant's request.
        return {**line, "tenant": tenant} if tenant is not None else {**line, "schema_version": 7}

    lines = [request(1, "search"), request(2, "search"), request(3, "default"),
             outcome(1, 1.0, "search"), outcome(1, 0.0, "research"),  # research's score for search's answer
             outcome(2, 0.0, "research"), outcome(3, 1.0, None)]
    log = write_jsonl(tmp_path / "decisions.jsonl", lines)
    rows, report = read_logs([log])
    assert {row.prompt_id[-1]: row.score for row in rows} == {"1": 1.0, "3": 1.0}
    assert report.not_trainable["outcome reported with another tenant's key"] == 1


def test_only_answered_requests_train_and_outcomes_survive_a_compact_rewrite(tmp_path: Path) -> None:
    """A gateway scoring failed calls 0 taught that a tier cannot answer a prompt it was never asked to
    answer: an upstream's 429, a caller gone (499) or a broken stream (599) trains nothing, and is counted.
    A log rewritten compactly (a log shipper, jq -c) keeps its outcomes, and so does a log whose name has
    glob characters in it."""
    def request(number: int, status: int) -> dict:
        return {"schema_version": 11, "prompt_id": f"dispatcher:{number:032x}", "prompt": f"question {number}",
                "model": "small-upstream-model", "score": None, "cost_usd": 0.001, "source": "dispatcher",
                "category": "", "tier": "small", "routed_tier": "small", "tenant": "default", "status": status}

    statuses = {1: 200, 2: 429, 3: 499, 4: 599, 5: 400}
    requests = [request(number, status) for number, status in statuses.items()]
    outcomes = [{"schema_version": 11, "kind": OUTCOME_KIND, "prompt_id": f"dispatcher:{number:032x}", "score": 0.0,
                 "judge": None, "time": "2026-12-04T00:00:00Z", "tenant": "default"} for number in statuses]
    log = tmp_path / "decisions[1].jsonl"
    log.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in requests))
    outcome_log = outcome_log_path(log, "default")
    outcome_log.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in outcomes))
    rows, report = read_logs([log])
    assert [(row.prompt_id[-1], row.score) for row in rows] == [("1", 0.0)]
    assert report.not_trainable["not an answer (the call ended with a status other than 2xx)"] == 4


def test_a_decision_log_gives_its_prompts_as_unlabeled_or_parity_prompts(tmp_path: Path) -> None:
    """`promptier export --prompts` and `--unlabeled` read the request lines and pass over outcome lines."""
    from training.errors import DataError
    from training.inputs import read_unlabeled

    log = write_jsonl(tmp_path / "decisions.jsonl", [
        {"schema_version": 8, "prompt_id": "dispatcher:" + "1" * 32, "prompt": "first question"},
        {"schema_version": 8, "kind": OUTCOME_KIND, "prompt_id": "dispatcher:" + "1" * 32, "score": 1.0},
        {"schema_version": 8, "prompt_id": "dispatcher:" + "2" * 32, "prompt": "second question"}])
    assert read_unlabeled([log]) == ["first question", "second question"]
    with pytest.raises(DataError, match="missing or empty prompt"):  # a request line without its text still is
        read_unlabeled([write_jsonl(tmp_path / "bare.jsonl", [{"prompt_id": "x", "prompt": None}])])


def test_a_batch_of_outcomes_the_disk_cannot_take_is_refused_whole_and_the_next_one_kept(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path) -> None:
    """A full disk (here a file-size limit) in the middle of a batch left part of it written behind a 500,
    and a cut line that the next outcome ran on from, which no reader could parse. The batch is now one
    write, cut back when it falls short: a 503 says none was kept, so the judge can send it again."""
    from tests.dispatcher_harness import dispatch_with_file_limit

    log = tmp_path / "decisions.jsonl"
    dispatcher, port = dispatch_with_file_limit(fresh, trained_artifact, log, 64 * 1024)  # bytes a file may take
    url = f"http://127.0.0.1:{port}/v1/promptier/outcomes"

    def outcomes(count: int, first: int) -> list[dict]:
        return [{"request_id": f"dispatcher:{first + i:032x}", "score": 1.0, "judge": "a judge of some length"}
                for i in range(count)]

    try:
        assert httpx.post(url, json={"outcomes": outcomes(200, 0)}).status_code == 202  # about 30 KiB
        written = (tmp_path / "decisions.outcomes.default.jsonl").read_bytes()
        too_many = httpx.post(url, json={"outcomes": outcomes(400, 200)})  # past the limit part way
        assert too_many.status_code == 503, too_many.text
        assert too_many.json()["error"]["code"] == "outcomes_not_written"
        assert "none of them was kept: send them again" in too_many.json()["error"]["message"]
        assert (tmp_path / "decisions.outcomes.default.jsonl").read_bytes() == written  # nothing of it left
        assert httpx.post(url, json={"outcomes": outcomes(10, 600)}).status_code == 202  # still serving
    finally:
        dispatcher.terminate()
        _, stderr = dispatcher.communicate(timeout=30)
    lines = (tmp_path / "decisions.outcomes.default.jsonl").read_text().splitlines()
    ids = [json.loads(line)["prompt_id"] for line in lines]  # every line whole
    assert ids == [o["request_id"] for o in outcomes(200, 0) + outcomes(10, 600)]
    assert '"event": "outcomes_not_written"' in stderr
