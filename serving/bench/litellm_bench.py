"""`promptier litellm-bench`: the latency Promptier's LiteLLM callback adds to a request through a LiteLLM proxy.

On loopback: an upstream that answers at once, and a real LiteLLM proxy (its own `litellm` command) whose three
model groups all point at it, with `serving.litellm_router.hook` embedded. Requests for the router model
(classified, then rewritten to a group) alternate with the same requests pinned to a group (the hook lets them
through untouched), one at a time, so the difference between the two is what the callback adds. The callback's
own view, `x-promptier-classifier-ms`, is reported beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from classifier.bench import write_report
from classifier.signals import exit_deferred, sigterm_as_exit
from serving.bench.dispatch_bench import LOAD_PROMPT, refuse_failed_answer, start_upstream
from serving.bench.ports import free_port
from serving.bench.report_path import check_report_path
from serving.bench.soak_processes import answers_http, stop_process, wait_started
from serving.litellm_router import CONFIG_ENV

MASTER_KEY = "sk-promptier-bench"


class LiteLLMProxy:
    """A `litellm --config` process on a free loopback port, with the Promptier config in its environment."""

    def __init__(self, directory: Path, litellm_config: dict, promptier_config: Path) -> None:
        self.port = free_port()
        path = directory / "litellm.yaml"
        path.write_text(yaml.safe_dump(litellm_config), encoding="utf-8")
        script = shutil.which("litellm", path=str(Path(sys.executable).parent)) or shutil.which("litellm")
        if script is None:
            raise RuntimeError("the `litellm` command is not installed: pip install 'promptier[litellm]'")
        # LiteLLM's own settings from the caller's environment would change what is measured or tested.
        env = {key: value for key, value in os.environ.items() if not key.startswith(("LITELLM_", "DATABASE_URL"))}
        env.update({CONFIG_ENV: str(promptier_config), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    "LITELLM_LOG": "WARNING", "PYTHONUNBUFFERED": "1"})
        self.output = directory / "litellm.out"
        with self.output.open("w") as output:
            self.process = subprocess.Popen([script, "--config", str(path), "--host", "127.0.0.1", "--port",
                                             str(self.port)], cwd=directory, stdout=output,
                                            stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 4000) -> str:
        """The end of the proxy's output (stdout and stderr)."""
        return self.output.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the proxy answers its liveness probe. Raises RuntimeError, with its output, if it exits
        or does not answer in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the LiteLLM proxy exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health/liveliness", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the LiteLLM proxy did not answer within {timeout_s:g} s:\n{self.tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _timed(client: httpx.Client, url: str, body: dict) -> tuple[float, httpx.Response]:
    """Milliseconds to the whole response, and the response.

    Raises:
        RuntimeError: the answer is not a 2xx (the proxy's own error says why).
    """
    start = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = (time.perf_counter() - start) * 1000
    refuse_failed_answer(response)
    return elapsed, response


def _measure(proxy_url: str, count: int) -> dict:
    routed_body = {"model": "promptier", "messages": [{"role": "user", "content": LOAD_PROMPT}]}
    pinned_body = {**routed_body, "model": "small"}
    url = f"{proxy_url}/v1/chat/completions"
    pinned: list[float] = []
    routed: list[float] = []
    in_hook: list[float] = []
    fell_back = 0
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        for index in range(count + 20):  # the first 20 pairs warm up both paths, and are not counted
            # Alternating which goes first, so that a change in the machine's load shows in both series.
            order = [(pinned_body, pinned), (routed_body, routed)]
            for body, samples in order if index % 2 == 0 else order[::-1]:
                elapsed, response = _timed(client, url, body)
                if index < 20:
                    continue
                samples.append(elapsed)
                if body is routed_body:
                    if response.headers.get("x-promptier-reason") != "classified":
                        fell_back += 1
                    in_hook_ms = response.headers.get("x-promptier-classifier-ms")
                    if in_hook_ms is None:  # the proxy ran without the callback's headers: nothing to report
                        raise RuntimeError("a routed request came back without x-promptier-classifier-ms: did the "
                                           f"proxy load the callback? Headers: {dict(response.headers)}")
                    in_hook.append(float(in_hook_ms))

    def percentiles(values: list[float]) -> dict[str, float]:
        return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
                "p99_ms": float(np.percentile(values, 99))}

    report: dict = {"pinned": percentiles(pinned), "routed": percentiles(routed), "classifier": percentiles(in_hook),
                    "fell_back": fell_back}
    report["added"] = {key: report["routed"][key] - report["pinned"][key] for key in report["pinned"]}
    return report


def main(model: str | None, out: Path, count: int) -> dict:
    """Start the upstream and the proxy, measure `count` pairs of requests, write `out` and print a table."""
    check_report_path(out)
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    groups = {tier: tier for tier in ("small", "medium", "large")}
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="promptier-litellm-bench-") as scratch:
        directory = Path(scratch)
        # A deadline far above the classifier's time: this measures its cost, not how often a deadline is met.
        classifier = {"embedded": True, "timeout_ms": 1000, **({"model": model} if model else {})}
        promptier_config = directory / "promptier.yaml"
        promptier_config.write_text(json.dumps({"tiers": groups, "fallback_tier": "large",
                                                "classifier": classifier}))
        litellm_config = {
            "model_list": [{"model_name": group, "litellm_params": {
                "model": f"openai/{tier}-model", "api_base": upstream_url, "api_key": "sk-upstream"}}
                for tier, group in groups.items()],
            "router_settings": {"model_group_alias": {"promptier": "large"}},
            "litellm_settings": {"callbacks": ["serving.litellm_router.hook"]},
            "general_settings": {"master_key": MASTER_KEY},
        }
        upstream: subprocess.Popen | None = None
        proxy: LiteLLMProxy | None = None
        try:
            with exit_deferred():  # a SIGTERM while they start still stops them
                upstream = start_upstream(upstream_port, directory)
            with exit_deferred():
                proxy = LiteLLMProxy(directory, litellm_config, promptier_config)
            wait_started(upstream, "upstream", directory, answers_http(f"{upstream_url.removesuffix('/v1')}/docs"))
            proxy.wait_ready(300)
            report = {"requests": count, "prompt_chars": len(LOAD_PROMPT), **_measure(proxy.url, count)}
        finally:
            if proxy is not None:
                proxy.stop()
            if upstream is not None:
                stop_process(upstream)
    write_report(out, report)
    print("| requests through the LiteLLM proxy | p50 | p90 | p99 |\n|---|---|---|---|")
    for key, label in (("pinned", "pinned to a group (hook passes)"), ("routed", "router model (classified)"),
                       ("added", "added by the callback"), ("classifier", "x-promptier-classifier-ms")):
        row = report[key]
        print(f"| {label} | {row['p50_ms']:.2f} ms | {row['p90_ms']:.2f} ms | {row['p99_ms']:.2f} ms |")
    print(f"\n{report['fell_back']} of {count} routed requests fell back (classifier deadline 1 s)\nwrote {out}")
    return report
