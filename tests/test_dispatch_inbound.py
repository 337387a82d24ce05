"""Inbound request checks: keys, size, malformed bodies, requests a browser could forge, unexpected errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.dispatcher_harness import Dispatcher, dispatcher_config
from tests.fake_upstream import Upstream
from tests.grpc_server import EASY, ServerThread


@pytest.fixture
def fresh_dispatcher(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path
                     ) -> Iterator[Callable[..., Dispatcher]]:
    """Starts dispatchers with config fields of the test's own (each logs to its own file)."""
    started: list[Dispatcher] = []

    def start(**extra: object) -> Dispatcher:
        started.append(Dispatcher(dispatcher_config(fresh, grpc_classifier.target,
                                                    tmp_path / f"decisions-{len(started)}.jsonl", **extra)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def test_bad_requests_and_inbound_keys(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTIER_KEYS", "k1,k2")
    monkeypatch.setenv("SMALL_KEY", "secret-upstream-key\n")  # as read from a secret file: the line end goes
    config = dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl",
                               inbound_api_keys_env="PROMPTIER_KEYS", max_request_bytes=4096)
    config.tiers["small"].api_key_env = "SMALL_KEY"
    running = Dispatcher(config)
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").chat.completions.create(model="promptier",
                                                                    messages=[{"role": "user", "content": "hi"}])
        client = running.client(api_key="k2")
        client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": EASY}])
        assert fresh["small"].received[-1]["authorization"] == "Bearer secret-upstream-key"
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="promptier", messages=[{"role": "user", "content": "x" * 5000}])
        assert info.value.status_code == 413
        url = f"{running.base_url}/chat/completions"
        auth = {"authorization": "Bearer k1", "content-type": "application/json"}
        assert httpx.post(url, content=b"{not json", headers=auth).status_code == 400
        assert httpx.post(url, json={"model": "promptier", "messages": []}, headers=auth).status_code == 400
        assert httpx.post(url, json={"model": "promptier", "messages": "hi"}, headers=auth).status_code == 400
        assert httpx.post(url, content=b"\xff\xfe", headers=auth).status_code == 400
        assert httpx.post(url, json={"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]},
                          headers=auth).status_code == 404
        log_text = (tmp_path / "decisions.jsonl").read_text()
        assert "secret-upstream-key" not in log_text and "k2" not in log_text
        # Refused before routing: not routing decisions, so not logged, but counted where an operator looks.
        assert len(log_text.splitlines()) == 1
        metrics = httpx.get(f"http://127.0.0.1:{running.port}/metrics").text  # no trailing slash needed
        assert 'promptier_dispatch_refused_total{code="invalid_api_key",status="401"} 1.0' in metrics
        assert 'promptier_dispatch_refused_total{code="request_too_large",status="413"} 1.0' in metrics
        assert 'promptier_dispatch_refused_total{code="invalid_request_error",status="400"} 4.0' in metrics
        assert 'promptier_dispatch_refused_total{code="model_not_found",status="404"} 1.0' in metrics
    finally:
        running.stop()


def test_malformed_bodies_are_400s_that_say_why(dispatcher: Dispatcher, fresh: dict[str, Upstream]) -> None:
    url = f"{dispatcher.base_url}/chat/completions"
    start = '{"model": "promptier", "messages": [{"role": "user", "content": "hi"}], '

    def post(rest: str) -> httpx.Response:
        return httpx.post(url, content=start + rest, headers={"content-type": "application/json"}, timeout=10)

    cases = {
        '"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}": "nested too deeply",
        '"seed": ' + "7" * 5000 + "}": "number",
        '"temperature": NaN}': "NaN",
        '"temperature": 1e999}': "Out of range float",
        '"stream": "false"}': "stream must be true or false",
        '"stream": 0}': "stream must be true or false",
    }
    for rest, message in cases.items():
        reply = post(rest)
        assert reply.status_code == 400, (rest[:40], reply.status_code, reply.text[:200])
        assert message in reply.json()["error"]["message"], reply.json()
        assert "x-promptier-tier" not in reply.headers  # refused before routing: no tier was chosen
    assert not any(upstream.received for upstream in fresh.values())
    for content, message in ((5, "messages[1].content must be a string, a list of content parts or null, got int"),
                             ({"text": "hi"}, "got dict")):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
        reply = httpx.post(url, json={"model": "promptier", "messages": messages}, timeout=10)
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
        assert "x-promptier-tier" not in reply.headers
    assert not any(upstream.received for upstream in fresh.values())
    for body, message in (({"messages": [{"role": "user", "content": "hi"}]}, "model is required; use one of ["),
                          ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "model must be a string")):
        reply = httpx.post(url, json=body, timeout=10)
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
        assert reply.json()["error"]["code"] == "invalid_model"
    reply = post('"stream": null}')  # as the OpenAI API allows: not streamed
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    # A wrong path or method is answered in the same error shape, which OpenAI's SDKs read.
    unknown = httpx.post(f"{dispatcher.base_url}/completions", json={"model": "promptier", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url", unknown.text
    # A trailing slash is another path, as on OpenAI's API: no redirect built from the caller's Host header.
    slashed = httpx.post(f"{url}/", json={"model": "promptier", "messages": [{"role": "user", "content": "hi"}]})
    assert slashed.status_code == 404 and "location" not in slashed.headers, slashed.headers
    assert slashed.json()["error"]["code"] == "unknown_url"
    wrong = httpx.get(url)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed", wrong.text
    assert wrong.headers["allow"] == "POST"


def test_requests_a_browser_page_could_forge_are_refused_without_keys(
        dispatcher: Dispatcher, fresh: dict[str, Upstream], fresh_dispatcher: Callable[..., Dispatcher]) -> None:
    url = f"{dispatcher.base_url}/chat/completions"
    body = json.dumps({"model": "promptier", "messages": [{"role": "user", "content": EASY}]})
    # A cross-site form or fetch may send text/plain (or form data) with no preflight: not executed.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    assert not fresh["small"].received
    assert httpx.post(url, content=body, headers={"content-type": "Application/JSON; charset=utf-8"}).status_code == 200
    # DNS rebinding: the page's own name, resolved to the dispatcher's address, arrives as Host.
    port = dispatcher.port
    for path in ("/v1/chat/completions", "/v1/models", "/health", "/metrics/"):
        headers = {"host": f"rebind.example:{port}", "content-type": "application/json"}
        reply = httpx.request("POST" if "chat" in path else "GET", f"http://127.0.0.1:{port}{path}",
                              content=body, headers=headers)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "host_not_allowed", path
    assert len(fresh["small"].received) == 1
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'promptier_dispatch_refused_total{code="host_not_allowed",status="403"} 4.0' in metrics
    assert 'promptier_dispatch_refused_total{code="unsupported_media_type",status="415"} 4.0' in metrics
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", f"10.1.2.3:{port}",
                 "LOCALHOST."):
        assert httpx.get(f"{dispatcher.base_url}/models", headers={"host": host}).status_code == 200, host
    # A name the operator serves the dispatcher under is listed in allowed_hosts.
    listed = fresh_dispatcher(allowed_hosts=["dispatcher.internal"])
    models = f"{listed.base_url}/models"
    assert httpx.get(models, headers={"host": f"dispatcher.internal:{listed.port}"}).status_code == 200
    assert httpx.get(models, headers={"host": "rebind.example"}).status_code == 403
    anything = fresh_dispatcher(allowed_hosts=["*"])
    assert httpx.get(f"{anything.base_url}/models", headers={"host": "rebind.example"}).status_code == 200


def test_unexpected_error_is_a_json_500_and_the_dispatcher_keeps_serving(
        dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import serving.dispatch.chat

    def broken(raw: bytes) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(serving.dispatch.chat, "parse_chat", broken)
    body = {"model": "promptier", "messages": [{"role": "user", "content": EASY}]}
    with caplog.at_level("ERROR", logger="promptier.dispatcher"):
        reply = httpx.post(f"{dispatcher.base_url}/chat/completions", json=body)
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error"
    assert "secret" not in reply.text  # nothing internal leaks to the caller
    assert any("unhandled error" in record.getMessage() for record in caplog.records)  # but it is logged
    monkeypatch.undo()
    answer = dispatcher.client().chat.completions.create(model="promptier", messages=body["messages"])
    assert answer.choices[0].message.content
