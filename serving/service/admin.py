"""The Admin service (Reload) and who may call it: a caller with the token, or without one a caller on this host."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import urllib.parse
from pathlib import Path
from typing import NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError

from classifier import PromptierError
from serving._proto.promptier.v1 import router_pb2, router_pb2_grpc
from serving.common.keys import bearer_token, header_safe
from serving.service.metrics import ServerMetrics
from serving.service.parsing import parsing_handlers
from serving.service.status import abort

log = logging.getLogger("promptier.server")

ADMIN_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
ADMIN_TOKEN_ENV = "PROMPTIER_ADMIN_TOKEN"  # read from the environment: a command line is visible in `ps`
# The longest model_dir an Admin.Reload accepts (Linux PATH_MAX).
MAX_MODEL_DIR_BYTES = 4096


class ReloadTarget(Protocol):
    """What Admin needs of a server (serving.service.server.RunningServer): its metrics and its reload
    (shared with every `--workers` process)."""

    metrics: ServerMetrics

    async def reload_and_share(self, directory: Path | None = None) -> tuple[str, str]: ...


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`) is this host."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # some gRPC versions write IPv6 brackets as %5B and %5D
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%")[0]
    else:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 caller of a dual-stack [::] listener
    return address.is_loopback


def check_admin_token(token: str | None) -> None:
    """Refuse, before anything is bound, an Admin token no call could present.

    Raises:
        PromptierError: the token has a character other than printable ASCII, which gRPC metadata cannot carry,
            or begins or ends with whitespace, which a header's value loses.
    """
    if token is not None and token != token.strip():
        # A header's value arrives without its surrounding spaces: such a token would match no call.
        raise PromptierError(f"{ADMIN_TOKEN_ENV} begins or ends with whitespace (a line end from a secret file?), "
                             "which no Admin call's header keeps: remove it")
    if token is not None and not header_safe(token):
        raise PromptierError(f"{ADMIN_TOKEN_ENV} has a character other than printable ASCII, which gRPC "
                             "metadata cannot carry: no Admin call could present it")


class AdminService(router_pb2_grpc.AdminServicer):
    """Reload swaps the model every caller is routed by, from any directory the server can read, so it
    is not open to whoever reaches the port: with a token (PROMPTIER_ADMIN_TOKEN) a call must present
    it as `authorization: Bearer <token>`; without one, only callers on this host are accepted."""

    def __init__(self, server: ReloadTarget, token: str | None = None) -> None:
        self._server = server
        self._token = token

    def _refusal(self, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        if self._token is not None:
            metadata = {key: value for key, value in context.invocation_metadata() or ()}
            # The token alone, without its scheme, is refused as documented: a header that happened to work
            # bare would stop working behind a proxy that checks the scheme.
            presented = bearer_token(str(metadata.get("authorization", "")))
            if not presented or not hmac.compare_digest(presented.encode(), self._token.encode()):
                return grpc.StatusCode.UNAUTHENTICATED, "Admin calls need the header 'authorization: Bearer <token>'"
            return None
        if not is_local_peer(context.peer()):
            return (grpc.StatusCode.PERMISSION_DENIED, "Admin calls are accepted only from this host unless the "
                    "server is started with PROMPTIER_ADMIN_TOKEN set (then with that token); SIGHUP also reloads")
        return None

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Abort (counted, logged) unless the caller may use Admin."""
        refusal = self._refusal(context)
        if refusal is not None:
            self._server.metrics.reloads.labels("denied").inc()
            log.warning(json.dumps({"event": "admin_denied", "rpc": "Reload", "peer": context.peer(),
                                    "code": refusal[0].name}))
            await abort(context, *refusal)

    async def malformed(self, method: str, context: grpc.aio.ServicerContext, error: DecodeError) -> NoReturn:
        """A request that does not parse: refused as any Admin call first, then INVALID_ARGUMENT."""
        await self._authorize(context)
        self._server.metrics.reloads.labels("invalid").inc()
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {error}")

    async def Reload(self, request: router_pb2.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> router_pb2.ReloadResponse:
        await self._authorize(context)
        problem = _model_dir_problem(request.model_dir)
        if problem is not None:
            self._server.metrics.reloads.labels("invalid").inc()
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        directory = Path(request.model_dir) if request.model_dir else None
        try:
            version, previous = await self._server.reload_and_share(directory)
        except PromptierError as error:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                        f"reload refused, old model still serving: {error}")
        except Exception:
            log.exception("unexpected error in Reload")
            self._server.metrics.reloads.labels("error").inc()
            await abort(context, grpc.StatusCode.INTERNAL, "reload failed on an internal error; the old model "
                        "is still serving")
        return router_pb2.ReloadResponse(model_version=version, previous_model_version=previous)


def _model_dir_problem(model_dir: str) -> str | None:
    """Why `model_dir` cannot name a directory (None: it can, or it is empty, meaning the start directory)."""
    if "\0" in model_dir:
        return "model_dir contains a NUL character; it must be a directory path"
    if len(model_dir.encode("utf-8")) > MAX_MODEL_DIR_BYTES:
        return f"model_dir is longer than {MAX_MODEL_DIR_BYTES} bytes; it must be a directory path"
    return None


def admin_handlers(service: AdminService) -> grpc.GenericRpcHandler:
    """The Admin methods as handlers of raw bytes; a malformed request is authorized before it is refused."""
    return parsing_handlers(ADMIN_SERVICE, {"Reload": (service.Reload, router_pb2.ReloadRequest)},
                            service.malformed)
