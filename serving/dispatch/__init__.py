"""The OpenAI-compatible dispatcher (`promptier dispatch`) in front of the tiers' upstreams: config, inbound
limits, classification (gRPC or embedded), tenants and budgets, decision log, outcomes, savings page, and the
budget simulator (`promptier budget-sim`) that replays its pacing.

Imports nothing of `serving.service`: it reaches the service through `serving.client`.
"""
