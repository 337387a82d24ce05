"""Dispatcher config loading and validation: bad fields, the example, `--check`, tiers the classifier lacks."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from classifier.errors import PromptierError
from serving.dispatch.app import create_app
from serving.dispatch.dispatch_config import ClassifierEndpoint, ConfigError, DispatcherConfig, load_dispatcher_config
from tests.dispatcher_harness import dispatcher_config
from tests.fake_upstream import Upstream
from tests.grpc_server import ServerThread


def test_config_validation(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.yaml"
    path.write_text("tiers: {small: {base_url: 'ftp://x', model: m}}\nfallback_tier: small\n")
    with pytest.raises(ConfigError, match=r"tiers.small.base_url: .*must start with http"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: large\n")
    with pytest.raises(ConfigError, match="fallback_tier 'large' is not a configured tier"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m, surprise: 1}}\nfallback_tier: small\n")
    with pytest.raises(ConfigError, match=r"tiers\.small\.surprise: Extra inputs are not permitted"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m, api_key_env: NOPE_NOT_SET}}\n"
                    "fallback_tier: small\n")
    with pytest.raises(ConfigError, match="NOPE_NOT_SET is not set"):
        load_dispatcher_config(path)
    for broken in ("", "abc\ndef"):  # refused at start, naming the variable, never the key
        os.environ["NOPE_NOT_SET"] = broken
        try:
            with pytest.raises(ConfigError, match="NOPE_NOT_SET holds an empty key, or one with a line break") as bad:
                load_dispatcher_config(path)
            assert "abc" not in str(bad.value)
        finally:
            del os.environ["NOPE_NOT_SET"]
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                    "allowed_hosts: ['dispatcher.internal:8080']\n")
    with pytest.raises(ConfigError, match=r"allowed_hosts: .*host names without scheme or port"):
        load_dispatcher_config(path)
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                    "inbound: {header_timeout_s: 0}\n")
    with pytest.raises(ConfigError, match=r"inbound\.header_timeout_s: Input should be greater than 0"):
        load_dispatcher_config(path)
    # An infinite timeout passes a positivity check and then fails every call that uses it (gRPC deadlines
    # must be finite), or never ends one: refused at start, as is a classification deadline over a minute.
    for setting, error in (("classifier: {timeout_ms: .inf}", r"classifier\.timeout_ms: Input should be less than"),
                           ("classifier: {timeout_ms: 1e12}", r"classifier\.timeout_ms: Input should be less than"),
                           ("inbound: {body_timeout_s: .inf}", r"inbound\.body_timeout_s: Input should be a finite"),
                           ("tiers: {small: {base_url: 'http://x/v1', model: m, first_byte_timeout_s: .inf}}",
                            r"tiers\.small\.first_byte_timeout_s: Input should be a finite")):
        tiers = "" if setting.startswith("tiers") else "tiers: {small: {base_url: 'http://x/v1', model: m}}\n"
        path.write_text(f"{tiers}{setting}\nfallback_tier: small\n")
        with pytest.raises(ConfigError, match=error):
            load_dispatcher_config(path)
    # A URL like the tiers' base_url, or a host without its port (gRPC would dial 443), never connects.
    for address in ("http://127.0.0.1:50051", "localhost", "127.0.0.1:50051/", "localhost:99999", "localhost:0"):
        path.write_text(f"classifier: {{address: '{address}'}}\n"
                        "tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n")
        with pytest.raises(ConfigError, match=r"classifier\.address: .*HOST:PORT \(e\.g\. 127\.0\.0\.1:50051"):
            load_dispatcher_config(path)
    for address in ("::1:50051", "fe80::1:50051"):  # gRPC reads these as other hosts, and never connects
        with pytest.raises(ValueError, match=r"an IPv6 host is written in brackets, as \[::1\]:50051"):
            ClassifierEndpoint(address=address)
    for address in ("localhost:50051", "[::1]:50051", "unix:/run/promptier.sock", "dns:///router.internal:50051"):
        assert ClassifierEndpoint(address=address).address == address
    # A log that promptier train could not read back (it reads logs by extension), or whose outcome files
    # (named after it) training would not find, is refused at start rather than written for nothing.
    for name in ("decisions.log", "decisions", "decisions.jsonl.1"):
        path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                        f"decision_log: {{path: logs/{name}}}\n")
        with pytest.raises(ConfigError, match=rf"decision_log\.path: .*must name a \.jsonl file.*'{name}'"):
            load_dispatcher_config(path)
    # Named like an outcome file, its own outcome files would never be looked for: nothing it logs would train.
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\n"
                    "decision_log: {path: logs/team.outcomes.jsonl}\n")
    with pytest.raises(ConfigError, match=r"decision_log\.path: .*reads as an outcome file"):
        load_dispatcher_config(path)


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """YAML would keep the second `research:` and drop the first's budget without a word."""
    path = tmp_path / "dispatcher.yaml"
    path.write_text("tiers: {small: {base_url: 'http://x/v1', model: m}}\nfallback_tier: small\ntenants:\n"
                    "  research: {default_mode: cost}\n  search: {default_mode: quality}\n"
                    "  research: {default_mode: balanced}\n")
    with pytest.raises(ConfigError, match=r"(?s)dispatcher\.yaml: cannot read config: .*key 'research' is "
                                          r"written twice \(first on line 4\)"):
        load_dispatcher_config(path)


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGE_API_KEY", "x")
    monkeypatch.setenv("PROMPTIER_API_KEYS", "k")
    monkeypatch.setenv("SEARCH_TEAM_KEYS", "s1,s2")
    monkeypatch.setenv("RESEARCH_TEAM_KEYS", "r1")
    example = Path(__file__).resolve().parent.parent / "serving" / "dispatch" / "dispatcher.example.yaml"
    config = load_dispatcher_config(example)
    assert config.tier_names == ["small", "medium", "large"] and config.fallback_tier == "large"
    assert config.tenant_of_key() == {"k": "default", "s1": "search", "s2": "search", "r1": "research"}


def test_dispatch_prints_its_example_config_and_asks_for_one(tmp_path: Path) -> None:
    """Where the package is installed without a checkout, `--example` is how a config is started."""
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["dispatch", "--example"])
    example = Path(__file__).resolve().parent.parent / "serving" / "dispatch" / "dispatcher.example.yaml"
    assert result.exit_code == 0 and result.output == example.read_text()
    result = CliRunner().invoke(app, ["dispatch"])
    assert result.exit_code == 2 and "promptier dispatch --example > dispatcher.yaml" in result.output


def test_check_validates_a_config_against_its_classifier_without_serving(
        fresh: dict[str, Upstream], grpc_classifier: ServerThread, trained_artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.bench.ports import free_port
    from serving.cli import app

    def check(classifier: dict, tier_names: tuple[str, ...] = ("small", "medium", "large")) -> tuple[int, str, Path]:
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(json.dumps({
            "classifier": classifier, "fallback_tier": tier_names[-1],
            "tiers": {name: {"base_url": upstream.url, "model": name}
                      for name, upstream in zip(tier_names, fresh.values(), strict=True)},
            "decision_log": {"path": str(tmp_path / "never-written" / "d.jsonl")}}))
        result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
        return result.exit_code, result.output, path

    code, output, path = check({"embedded": True, "model": str(trained_artifact)})
    assert code == 0, output
    assert "upstreams: small answers, medium answers, large answers" in output, output
    assert f"config_fingerprint {load_dispatcher_config(path).fingerprint}" in output
    assert "serves tiers ['small', 'medium', 'large']" in output
    code, output, _ = check({"address": grpc_classifier.target})
    assert code == 0 and "the gRPC service at" in output and "serves tiers" in output, output
    # Tier names the classifier does not serve: refused, whichever classifier it is.
    for classifier in ({"embedded": True, "model": str(trained_artifact)}, {"address": grpc_classifier.target}):
        code, output, _ = check(classifier, ("small", "mid", "large"))
        assert code == 2 and "but the dispatcher config maps ['small', 'mid', 'large']" in output, output
    # A service that does not answer cannot be asked: the file is still checked, and the output says so.
    code, output, _ = check({"address": f"127.0.0.1:{free_port()}"})
    assert code == 0 and "did not answer" in output, output
    assert not (tmp_path / "never-written").exists()  # a check serves nothing and writes no log


def test_tiers_that_differ_from_the_classifier_are_refused_at_start(fresh: dict[str, Upstream],
                                                                    grpc_classifier: ServerThread,
                                                                    tmp_path: Path) -> None:
    from serving.dispatch.dispatcher import Dispatcher as DispatcherCore

    renamed = {"small": fresh["small"], "mid": fresh["medium"], "large": fresh["large"]}
    core = DispatcherCore(dispatcher_config(renamed, grpc_classifier.target, tmp_path / "decisions.jsonl"))

    async def start_and_close() -> None:
        try:
            await core.start()
        finally:
            await core.close()

    with pytest.raises(ConfigError, match=r"serves tiers \['small', 'medium', 'large'\].*maps \['small', 'mid', "):
        asyncio.run(start_and_close())


def test_embedded_classifier_config_and_bad_artifact(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only with embedded: true"):
        ClassifierEndpoint(model=tmp_path)
    with pytest.raises(ValueError, match="only to the gRPC service"):
        ClassifierEndpoint(embedded=True, connections=4)
    config = DispatcherConfig.model_validate({
        "classifier": {"embedded": True, "model": str(tmp_path / "missing")},
        "tiers": {"small": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}, "fallback_tier": "small",
        "decision_log": {"path": str(tmp_path / "d.jsonl")}})
    with pytest.raises(PromptierError):  # refused before any port opens
        create_app(config)


def test_an_embedded_model_whose_tiers_differ_is_refused_before_any_port_opens(tmp_path: Path) -> None:
    # Its tiers are known once it has loaded: refused as a bad artifact is, so that a worker started by a
    # SIGHUP logs worker_cannot_start with the reason instead of failing later in its start-up.
    config = DispatcherConfig.model_validate({
        "classifier": {"embedded": True},  # the shipped model: small, medium, large
        "tiers": {name: {"base_url": "http://127.0.0.1:9/v1", "model": "m"} for name in ("small", "mid", "large")},
        "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}})
    with pytest.raises(ConfigError, match=r"serves tiers \['small', 'medium', 'large'\].*maps \['small', 'mid', "):
        create_app(config)
    assert not (tmp_path / "d.jsonl").exists()


def test_check_refuses_a_decision_log_that_a_worker_could_not_open(shipped_artifact: Path, tmp_path: Path) -> None:
    """What `--check` passes, a SIGHUP's replacement worker must be able to start with: it opens the
    decision log for appending, so a check that passed a log it cannot open would let the edit be
    refused (and the next crash stop the dispatcher)."""
    from typer.testing import CliRunner

    from serving.cli import app

    def check(log_path: Path) -> tuple[int, str]:
        path = tmp_path / "dispatcher.yaml"
        path.write_text(json.dumps({
            "classifier": {"embedded": True, "model": str(shipped_artifact)}, "fallback_tier": "large",
            "tiers": {name: {"base_url": "http://127.0.0.1:9/v1", "model": name}
                      for name in ("small", "medium", "large")},
            "decision_log": {"path": str(log_path)}}))
        result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
        return result.exit_code, result.output

    (tmp_path / "a-file").write_text("not a folder")
    code, output = check(tmp_path / "a-file" / "logs" / "d.jsonl")
    assert code == 2 and "decision_log.path" in output and "is a file, not a folder" in output, output
    (tmp_path / "a-folder.jsonl").mkdir()
    code, output = check(tmp_path / "a-folder.jsonl")
    assert code == 2 and "decision_log.path" in output and "not a file" in output, output
    code, output = check(tmp_path / "logs" / "d.jsonl")
    assert code == 0 and "decision log" in output and "will be created" in output, output
    assert not (tmp_path / "logs").exists()  # a check writes nothing


def test_check_says_which_upstream_cannot_be_reached_has_no_v1_or_refuses_its_key(
        fresh: dict[str, Upstream], trained_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mistakes in a tier's address or key showed only as the first requests' failures."""
    from typer.testing import CliRunner

    from serving.bench.ports import free_port
    from serving.cli import app

    monkeypatch.setenv("LARGE_KEY", "wrong-key")
    fresh["large"].behaviour = "401"
    path = tmp_path / "dispatcher.yaml"
    path.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(trained_artifact)}, "fallback_tier": "large",
        "tiers": {"small": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "s"},
                  "medium": {"base_url": fresh["medium"].url.removesuffix("/v1"), "model": "m"},
                  "large": {"base_url": fresh["large"].url, "model": "l", "api_key_env": "LARGE_KEY"}},
        "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
    result = CliRunner().invoke(app, ["dispatch", "--config", str(path), "--check"])
    assert result.exit_code == 0, result.output  # said, not refused: an upstream may be down for a while
    assert "small not reachable at http://127.0.0.1:" in result.output
    assert "medium has no " in result.output and "is /v1 missing from its base_url?" in result.output
    assert "large refused its key (HTTP 401): check LARGE_KEY" in result.output
    assert "wrong-key" not in result.output


def test_check_finds_the_bench_stand_in_upstream_answering() -> None:
    """The stand-in serving/README.md offers before any model is up: `--check` asks each tier's upstream
    for its model list, and a stand-in without one was reported as a problem on every tier."""
    import httpx
    import uvicorn

    from serving.bench.dispatch_bench import echo_upstream
    from serving.dispatch.config_check import check_upstreams
    from tests.fake_upstream import run_uvicorn

    server = uvicorn.Server(uvicorn.Config(echo_upstream(), host="127.0.0.1", port=0, log_level="error"))
    port = run_uvicorn(server)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        listed = httpx.get(f"{base_url}/models", timeout=10)
        assert listed.status_code == 200
        assert listed.json()["object"] == "list"
        assert [model["object"] for model in listed.json()["data"]] == ["model"]
        config = DispatcherConfig.model_validate({
            "tiers": {name: {"base_url": base_url, "model": f"{name}-model"} for name in ("small", "large")},
            "fallback_tier": "large"})
        assert asyncio.run(check_upstreams(config)) == "small answers, large answers"
    finally:
        server.should_exit = True
