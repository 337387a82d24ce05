"""Prometheus metrics of one gRPC server instance (own registry, so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from serving.common.batcher import BatcherMetrics


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("promptier_requests", "RPCs by method and status code", ["rpc", "code"],
                                registry=self.registry)
        self.latency = Histogram(
            "promptier_request_latency_seconds", "server-side latency by RPC", ["rpc"], registry=self.registry,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.tiers = Counter("promptier_tier_decisions", "prompts routed to each tier", ["tier"],
                             registry=self.registry)
        self.truncations = Counter("promptier_truncated_prompts", "prompts cut to the model's window",
                                   registry=self.registry)
        self.reloads = Counter("promptier_model_reloads", "model reloads by outcome", ["outcome"],
                               registry=self.registry)
        # Which model this process routes by: with `--workers`, one series per worker shows that all agree.
        self.model = Info("promptier_model", "the model this process serves", registry=self.registry)
        # Every refusal for overload is also in promptier_requests as RESOURCE_EXHAUSTED; this says why.
        self.overload = Counter("promptier_overload_refusals", "calls refused RESOURCE_EXHAUSTED for overload, "
                                "by RPC and reason", ["rpc", "reason"], registry=self.registry)
        self.batcher = BatcherMetrics(self.registry, "promptier")
