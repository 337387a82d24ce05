"""Unary method handlers that parse request bytes themselves, so that a malformed message gets a clear answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

_Handler = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]
# Answers a request that does not parse (it must abort): (method name, context, the parse error).
_OnMalformed = Callable[[str, grpc.aio.ServicerContext, DecodeError], Awaitable[NoReturn]]


def parsing_handlers(service: str, methods: dict[str, tuple[_Handler, type[Message]]],
                     on_malformed: _OnMalformed) -> grpc.GenericRpcHandler:
    """Unary handlers that parse requests themselves, so a malformed message (invalid UTF-8 in a
    string field, truncated bytes) is answered by `on_malformed` (INVALID_ARGUMENT) rather than by
    grpcio's UNKNOWN naming a Python exception class."""

    def parsing(name: str, method: _Handler, message_type: type[Message]) -> grpc.RpcMethodHandler:
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            try:
                request = message_type.FromString(raw)
            except DecodeError as error:
                await on_malformed(name, context, error)
            return await method(request, context)

        return grpc.unary_unary_rpc_method_handler(handler, response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(
        service, {name: parsing(name, method, message_type) for name, (method, message_type) in methods.items()})
