"""The checks that a dispatcher config goes with its classifier: the tiers it maps are the ones the
classifier serves, and (for `promptier dispatch --check`) the artifact loads or the service answers.

Apart from the request path: `promptier dispatch --check` loads the classifier and opens the spend store,
without importing the HTTP stack that serves requests.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

import classifier
from serving.dispatch.capabilities import describe_serves
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig, Upstream
from serving.dispatch.route_classifier import GrpcRouteClassifier
from serving.dispatch.tenants import check_tenants_and_store


def check_tier_names(served: list[str], configured: list[str], source: str) -> None:
    """Refuse a classifier whose tiers are not the config's, in the same order.

    Raises:
        ConfigError: they differ (`source` names the classifier in the message).
    """
    if served != configured:
        raise ConfigError(f"the classifier ({source}) serves tiers {served}, but the dispatcher config maps "
                          f"{configured}; they must be the same, in order")


async def check_config(config: DispatcherConfig) -> str:
    """What `promptier dispatch --check` adds to reading the file: the embedded artifact loads, or the
    gRPC service answers, and the classifier's tiers are the config's. Returns what was checked.

    Raises:
        PromptierError: the artifact does not load, or the tiers differ.
    """
    capabilities = f"; capabilities: {describe_serves({name: tier.serves for name, tier in config.tiers.items()})}"
    tenants = check_tenants_and_store(config)
    log = check_decision_log(config.decision_log.path)
    upstreams = await check_upstreams(config)
    return await _check_classifier(config) + capabilities + f"; {tenants}; {log}; upstreams: {upstreams}"


async def check_upstreams(config: DispatcherConfig) -> str:
    """Each tier's upstream asked for its model list (`GET {base_url}/models`, with the tier's key), as
    every OpenAI-compatible server answers it: a wrong host or port, a base_url without its `/v1` and a
    refused key show here rather than as the first requests' failures. Said, never refused: an upstream
    may be down while its config is checked, and a few servers have no model list."""
    import aiohttp

    async def probe(session: aiohttp.ClientSession, name: str, upstream: Upstream) -> str:
        url = f"{upstream.base_url}/models"
        key = upstream.api_key()
        headers = {"authorization": f"Bearer {key}"} if key else {}
        timeout = aiohttp.ClientTimeout(total=upstream.connect_timeout_s + 5, connect=upstream.connect_timeout_s)
        try:
            async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            return f"{name} not reachable at {url} ({type(error).__name__})"
        if status == 200:
            return f"{name} answers"
        if status in (401, 403):
            return f"{name} refused its key (HTTP {status}): check {upstream.api_key_env or 'api_key_env, unset'}"
        if status == 404 and not urlsplit(upstream.base_url).path.rstrip("/").endswith("/v1"):
            return f"{name} has no {url} (HTTP 404): is /v1 missing from its base_url?"
        return f"{name} answered HTTP {status} at {url}"

    async with aiohttp.ClientSession() as session:
        said = await asyncio.gather(*(probe(session, name, upstream) for name, upstream in config.tiers.items()))
    return ", ".join(said)


def check_decision_log(path: Path) -> str:
    """That a worker can open the decision log for appending (as it does before serving), without
    creating or writing anything. Returns what was checked.

    Raises:
        ConfigError: the log, or the folder it would be created in, cannot be written.
    """
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"decision_log.path: {path} is not a file")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"decision_log.path: {path} is not writable")
        return f"decision log {path} is writable"
    folder = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"decision_log.path: {path} cannot be created: {folder} is a file, not a folder")
    if folder is None or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"decision_log.path: {path} cannot be created: {folder} is not writable")
    return f"decision log {path} will be created"


async def _check_classifier(config: DispatcherConfig) -> str:
    if config.classifier.embedded:
        model = classifier.load(config.classifier.model)
        check_tier_names(model.tier_names, config.tier_names, f"embedded model {model.model_version}")
        return f"embedded model {model.model_version} loads and serves tiers {model.tier_names}"
    service = GrpcRouteClassifier(config.classifier.address, timeout_s=0.5, coalesce=False, connections=1)
    try:
        served = await service.served()
    finally:
        await service.close()
    if served is None:
        return (f"the gRPC service at {config.classifier.address} did not answer: its tiers are checked when "
                "it does (until then requests go to the fallback tier)")
    names = [tier.name for tier in served.tiers]
    check_tier_names(names, config.tier_names, service.describe())
    return f"the gRPC service at {config.classifier.address} serves tiers {names}"
