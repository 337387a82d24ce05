"""The checks that a dispatcher config goes with its classifier: the tiers it maps are the ones the
classifier serves, and (for `promptier dispatch --check`) the artifact loads or the service answers.

Apart from the request path: `promptier dispatch --check` loads the classifier and opens the spend store,
without importing the HTTP stack that serves requests.
"""

from __future__ import annotations

import os
from pathlib import Path

import classifier
from serving.dispatch.capabilities import describe_serves
from serving.dispatch.dispatch_config import ConfigError, DispatcherConfig
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
    return await _check_classifier(config) + capabilities + f"; {tenants}; {log}"


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
