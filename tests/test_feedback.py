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
from serving.dispatch.app import create_app
from serving.dispatch.decision_log import OUTCOME_KIND as LOGGED_OUTCOME_KIND
from serving.dispatch.dispatch_config import DispatcherConfig
from serving.dispatch.inbound import DispatchServerConfig
from tests.conftest import POOL_YAML, synthetic_rows, tiny_config, write_jsonl
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
        # One more answer, not scored yet: left out of training and counted as such.
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "hello cat"}])
    finally:
        server.should_exit = True

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(line.get("kind") == OUTCOME_KIND for line in lines) == 540
    rows, report = read_logs([log])
    assert len(rows) == 540 and report.not_trainable["no outcome reported yet"] == 1
    scored = {row.prompt_id: row.score for row in rows}
    assert scored == {o["request_id"]: o["score"] for o in outcomes}

    result = _train(["--logs", str(log), "--pool", str(pool), "--out", str(deployed), "--init-from", str(deployed),
                     "--config", str(config), "--model-version", "v2", "--force"])
    assert result.exit_code == 0, result.output
    assert "promoted v2" in result.output
    assert classifier.load(deployed).model_version == "v2"
    server, base = _dispatcher(deployed, upstreams, tmp_path / "after.jsonl", monkeypatch)
    try:
        raw = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0).chat.completions.with_raw_response \
            .create(model="promptier", messages=[{"role": "user", "content": "prove the theorem lemma"}])
        assert raw.parse().choices[0].message.content and raw.headers["x-promptier-reason"] == "classified"
    finally:
        server.should_exit = True
    assert json.loads((tmp_path / "after.jsonl").read_text().splitlines()[0])["model"] is not None
