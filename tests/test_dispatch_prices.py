"""Costs follow the classifier's prices: a `promptier serve` that reloads a model whose manifest prices
the tiers differently moves the dispatcher's costs (and so budgets and pacing) to the new prices."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import serving.dispatch.dispatcher as dispatcher_module
from tests.dispatcher_harness import Dispatcher, dispatcher_config, read_log_once_written
from tests.fake_upstream import USAGE, Upstream
from tests.grpc_server import EASY, ServerThread

OLD_PRICE = 0.2  # the small tier's USD per Mtok, in and out, in the test model's pool


def repriced(artifact: Path, out: Path, version: str, factor: float) -> Path:
    """A copy of `artifact` as a new model version whose tiers cost `factor` times as much."""
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_version"] = version
    for tier in manifest["tiers"]:
        tier["input_usd_per_mtok"] *= factor
        tier["output_usd_per_mtok"] *= factor
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def cost(price_usd_per_mtok: float) -> float:
    return (USAGE["prompt_tokens"] + USAGE["completion_tokens"]) * price_usd_per_mtok / 1e6


@pytest.fixture
def service(trained_artifact: Path, tmp_path: Path) -> Iterator[ServerThread]:
    running = ServerThread(model_dir=repriced(trained_artifact, tmp_path / "model-1", "priced-1", 1.0))
    yield running
    running.stop()


def test_a_reloaded_models_prices_apply_from_its_first_decision(service: ServerThread, fresh: dict[str, Upstream],
                                                                 tmp_path: Path) -> None:
    running = Dispatcher(dispatcher_config(fresh, service.target, tmp_path / "decisions.jsonl"))
    try:
        client = running.client(timeout=60)
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        assert service.running is not None
        service.call(service.running.reload(repriced(service.running.holder.directory or Path(),
                                                     tmp_path / "model-2", "priced-2", 10.0)))
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        entries = read_log_once_written(tmp_path, 2)
    finally:
        running.stop()
    assert [(entry["tier"], entry["model_version"]) for entry in entries] == [("small", "priced-1"),
                                                                              ("small", "priced-2")]
    assert [entry["cost_usd"] for entry in entries] == pytest.approx([cost(OLD_PRICE), cost(10 * OLD_PRICE)])


def test_pinned_traffic_moves_to_new_prices_by_the_periodic_read(service: ServerThread, fresh: dict[str, Upstream],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """A pinned request consults no model, so only the dispatcher's periodic read of the prices sees that
    the service now serves another model."""
    monkeypatch.setattr(dispatcher_module, "PRICES_REFRESH_S", 0.1)
    running = Dispatcher(dispatcher_config(fresh, service.target, tmp_path / "decisions.jsonl"))
    try:
        client = running.client(timeout=60)
        pinned = {"model": "promptier/tier/small", "messages": [{"role": "user", "content": EASY}]}
        client.chat.completions.create(**pinned)  # type: ignore[call-overload]
        assert service.running is not None
        service.call(service.running.reload(repriced(service.running.holder.directory or Path(),
                                                     tmp_path / "model-2", "priced-2", 10.0)))
        for attempt in range(600):  # the read comes within a tenth of a second; a busy machine may be slower
            client.chat.completions.create(**pinned)  # type: ignore[call-overload]
            if read_log_once_written(tmp_path, attempt + 2)[-1]["cost_usd"] == pytest.approx(cost(10 * OLD_PRICE)):
                break
        else:
            raise AssertionError("the dispatcher never read the reloaded model's prices")
        entries = read_log_once_written(tmp_path, attempt + 2)
    finally:
        running.stop()
    assert entries[0]["cost_usd"] == pytest.approx(cost(OLD_PRICE))
    assert all(entry["reason"] == "pinned" and entry["model_version"] is None for entry in entries)
