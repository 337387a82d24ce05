"""Exploration: a share of classified requests answered by a randomly drawn tier, logged with its
propensity, and training that keeps only those answers when asked to."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
import uvicorn

from serving.dispatch.app import create_app
from serving.dispatch.dispatch_config import DispatcherConfig
from serving.dispatch.exploration import draw_tier
from serving.dispatch.inbound import DispatchServerConfig
from tests.fake_upstream import Upstream, run_uvicorn
from training.data import read_logs

TIERS = ("small", "medium", "large")
KEY = "sk-exploration-test"
SHARE = 0.5


def test_drawn_tiers_come_as_often_as_their_propensity_says() -> None:
    rng = random.Random(3)
    draws = [draw_tier("medium", TIERS, 0.3, rng) for _ in range(30_000)]
    counts = Counter(draw.tier for draw in draws)
    for tier in TIERS:
        propensity = {draw.propensity for draw in draws if draw.tier == tier}
        assert len(propensity) == 1  # one value per tier, given the policy's tier
        assert counts[tier] / len(draws) == pytest.approx(propensity.pop(), abs=0.01)
    assert sum(draw.explored for draw in draws) / len(draws) == pytest.approx(0.3, abs=0.01)
    assert {(d.tier, d.propensity, d.explored) for d in (draw_tier("small", TIERS, 0.0, rng) for _ in range(50))} \
        == {("small", 1.0, False)}
    with pytest.raises(ValueError, match="not among"):
        draw_tier("huge", TIERS, 0.1, rng)
    with pytest.raises(ValueError, match="share"):
        draw_tier("small", TIERS, 1.5, rng)


def test_explored_answers_are_logged_with_propensity_and_train_alone(
        tmp_path: Path, trained_artifact: Path, upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    monkeypatch.setenv("EXPLORATION_TEST_KEYS", KEY)
    log = tmp_path / "decisions.jsonl"
    config = DispatcherConfig.model_validate({
        "classifier": {"embedded": True, "model": str(trained_artifact), "timeout_ms": 5000},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in upstreams.items()},
        "fallback_tier": "large", "inbound_api_keys_env": "EXPLORATION_TEST_KEYS", "exploration_share": SHARE,
        "decision_log": {"path": str(log), "store_prompts": True}})
    server = uvicorn.Server(DispatchServerConfig(create_app(config), host="127.0.0.1", port=0, log_level="error"))
    base = f"http://127.0.0.1:{run_uvicorn(server)}"
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        reasons = Counter()
        for i in range(120):
            raw = client.chat.completions.with_raw_response.create(
                model="promptier", messages=[{"role": "user", "content": f"question {i}: how many legs has a cat?"}])
            reasons[raw.headers["x-promptier-reason"]] += 1
        for i in range(10):  # a pinned request is never drawn
            raw = client.chat.completions.with_raw_response.create(
                model="promptier/tier/small", messages=[{"role": "user", "content": f"pinned {i}"}])
            assert raw.headers["x-promptier-tier"] == "small" and raw.headers["x-promptier-reason"] == "pinned"
        requests = [json.loads(line) for line in log.read_text().splitlines()]
        outcomes = [{"request_id": line["prompt_id"], "score": 1.0} for line in requests]
        answer = httpx.post(f"{base}/v1/promptier/outcomes", json={"outcomes": outcomes},
                            headers={"authorization": f"Bearer {KEY}"})
        assert answer.status_code == 202
    finally:
        server.should_exit = True

    # Half of the classified requests drawn (binomial(120, 0.5): 30-90 is beyond 5 standard deviations).
    assert 30 <= reasons["explored"] <= 90 and reasons["explored"] + reasons["classified"] == 120
    lines = [line for line in requests if line["schema_version"] >= 6]
    assert len(lines) == 130
    for line in lines:
        if line["reason"] == "pinned":
            assert line["propensity"] is None and line["explored"] is False
        elif line["explored"]:
            assert line["reason"] == "explored" and line["propensity"] in (
                pytest.approx(SHARE / 3), pytest.approx(1 - SHARE + SHARE / 3))
        else:
            assert line["reason"] == "classified" and line["propensity"] == pytest.approx(1 - SHARE + SHARE / 3)
        if line["scores"] is not None:  # the served tier's probability, wherever the draw sent the request
            assert line["confidence"] == pytest.approx(line["scores"][line["tier"]]), line
    explored = {line["prompt_id"] for line in lines if line["explored"]}
    rows, report = read_logs([log], explored_only=True)
    assert {row.prompt_id for row in rows} == explored
    assert sum(report.not_trainable.values()) == 130 - len(explored)
    everything, _ = read_logs([log])
    assert len(everything) == 130

    # An explored request whose drawn tier failed was answered by a tier nobody drew: it does not train.
    drawn = next(line for line in lines if line["explored"])
    other = next(tier for tier in ("small", "medium", "large") if tier != drawn["routed_tier"])
    moved = {**drawn, "prompt_id": "dispatcher:moved", "tier": other, "reason": "escalated",
             "failed_tiers": [drawn["routed_tier"]]}
    (outcomes,) = log.parent.glob(f"{log.stem}.outcomes.*.jsonl")  # beside the log, one file per reporting tenant
    outcome = json.loads(outcomes.read_text().splitlines()[0])
    scored = [json.dumps(line) for line in (drawn, moved, {**outcome, "prompt_id": drawn["prompt_id"]},
                                             {**outcome, "prompt_id": "dispatcher:moved"})]
    small_log = tmp_path / "moved.jsonl"
    small_log.write_text("\n".join(scored) + "\n")
    rows, report = read_logs([small_log], explored_only=True)
    assert [row.prompt_id for row in rows] == [drawn["prompt_id"]]
    assert report.not_trainable == {"explored, but the drawn tier's upstream failed": 1}
