"""The gRPC classification service (`promptier serve`): the server's assembly and lifecycle (server), the
Router and Admin services (router, admin), their limits, error statuses and request parsing, worker
processes, reflection, metrics.

Imports nothing of `serving.dispatch`; callers reach it through `serving.client`.
"""
