"""What the gRPC service and the dispatcher both run: the micro-batcher in front of a model (the service's,
and the dispatcher's embedded one), JSON logging, the start-up garbage-collector freeze and the check
that a port can be listened on.

Imports neither `serving.service` nor `serving.dispatch`: a change here is a change to both.
"""
