"""The dispatcher on a real port in a test's process, the configs the dispatcher tests share, and
readers of what it wrote (the decision log, server-sent events).

Its fixtures (recording upstreams, a gRPC classifier, a dispatcher in front of them) are in tests/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
import uvicorn

from serving.dispatch.app import create_app
from serving.dispatch.capabilities import Serves
from serving.dispatch.dispatch_config import DispatcherConfig
from serving.dispatch.inbound import DispatchServerConfig
from tests.fake_upstream import Upstream, run_uvicorn

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAA"
                                                   "fFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="}}
# small: a text-only 7B with a short window; medium: vision and tools; large: tools and JSON, no vision.
# Nobody takes audio.
SERVES = {
    "small": Serves(images=False, audio=False, tools=False, json_output=False, context_window=2000),
    "medium": Serves(audio=False, json_output=False, context_window=4000),
    "large": Serves(images=False, audio=False),
}


def dispatcher_config(upstreams: dict[str, Upstream], classifier_address: str, log_path: Path, **extra: object
                      ) -> DispatcherConfig:
    """A dispatcher in front of `upstreams`, classifying through `classifier_address`, logging prompts."""
    # Timeouts generous enough that a healthy classifier or upstream on a busy machine never trips them: a
    # test that wants a timeout makes its upstream stall far longer (`Upstream.behaviour == "slow"`).
    return DispatcherConfig.model_validate({
        "classifier": {"address": classifier_address, "timeout_ms": 5000},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model", "first_byte_timeout_s": 5.0,
                         "read_timeout_s": 5.0} for name, u in upstreams.items()},
        "fallback_tier": "large",
        "decision_log": {"path": str(log_path), "store_prompts": True},
        **extra,
    })


def restricted(config: DispatcherConfig) -> DispatcherConfig:
    """`config` with the tiers serving only what SERVES says."""
    for name, serves in SERVES.items():
        config.tiers[name].serves = serves
    return config


def user_with_parts(*parts: dict | str) -> list[dict]:
    """One user message whose content is `parts` (a str is a text part)."""
    return [{"role": "user", "content": [part if isinstance(part, dict) else {"type": "text", "text": part}
                                         for part in parts]}]


class Dispatcher:
    """The dispatcher app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, config: DispatcherConfig) -> None:
        self.server = uvicorn.Server(DispatchServerConfig(create_app(config), host="127.0.0.1", port=0,
                                                          log_level="error"))
        self.port = run_uvicorn(self.server)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True


def wait_for_health(port: int, process: object) -> None:
    """Wait until a dispatcher started as `process` (a Popen) answers /health on `port`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the dispatcher exited"  # type: ignore[attr-defined]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the dispatcher did not come up")


def dispatch_with_file_limit(upstreams: dict[str, Upstream], model: Path, log: Path, limit_bytes: int,
                             **decision_log: object) -> tuple[subprocess.Popen, int]:
    """`promptier dispatch` in a process of its own whose files may each grow to `limit_bytes` (a file-size
    limit: a full disk, as that process sees it), embedding `model` in front of `upstreams` and logging
    to `log`; returned with its port once it answers /health. Its stderr is piped: read it after stopping
    it (`terminate()`, then `communicate()`)."""
    import resource
    import sys

    from serving.bench.ports import free_port

    config = log.with_name("dispatcher.yaml")
    config.write_text(json.dumps({
        "classifier": {"embedded": True, "model": str(model), "timeout_ms": 5000},
        "tiers": {name: {"base_url": u.url, "model": f"{name}-upstream-model"} for name, u in upstreams.items()},
        "fallback_tier": "large", "decision_log": {"path": str(log), **decision_log}}))

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "classifier.cli", "dispatch", "--config", str(config),
                                "--port", str(port)], preexec_fn=limited,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, process)
    except BaseException:
        process.kill()
        process.communicate(timeout=30)
        raise
    return process, port


def read_log(tmp_path: Path) -> list[dict]:
    """The decision log a dispatcher of `dispatcher_config` wrote at tmp_path/decisions.jsonl, parsed."""
    return [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]


def read_log_once_written(tmp_path: Path, lines: int, wait_s: float = 5.0) -> list[dict]:
    """The decision log once it has `lines` lines (or what it has after `wait_s`): streams, and requests
    whose caller left, are recorded after the response is gone."""
    deadline = time.time() + wait_s
    while time.time() < deadline and (not (tmp_path / "decisions.jsonl").exists() or len(read_log(tmp_path)) < lines):
        time.sleep(0.05)
    return read_log(tmp_path)


def data_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def streamed_events(base_url: str, model: str, content: str, timeout: float) -> tuple[list[str], str]:
    """A streamed chat completion of one user message: its `data:` payloads, and the raw text."""
    import httpx

    with httpx.stream("POST", f"{base_url}/chat/completions", timeout=timeout,
                      json={"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}
                      ) as response:
        text = "".join(response.iter_text())
    return data_events(text), text
