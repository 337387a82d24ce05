"""The gRPC classification service (`promptier serve`): server, worker processes, reflection, metrics.

Imports nothing of `serving.dispatch`; callers reach it through `serving.client`.
"""
