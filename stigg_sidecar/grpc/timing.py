"""Counting and timing every unary call where its handler is registered, not in an interceptor.

grpcio runs its interceptor pipeline (a few Python calls, on the serving thread that every call
shares) for each call whenever any interceptor is installed; with the metrics registered here
instead, a sidecar without tracing or caller tokens has no interceptor at all. `TimedServer`
stands in for the `grpc.Server` a registration function is handed: each unary-unary handler it
adds is wrapped once, at start, by `timed(method, behaviour)` (the method's short name, e.g.
"GetBooleanEntitlement"). Interceptors still run first: a call they refuse never reaches a wrapped
handler (as it never reached the metrics interceptor, the innermost one, before). Streaming
handlers pass through as they are. Knows nothing of what is counted (ops/metrics does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Timed = Callable[[str, Behaviour], Behaviour]


def timed_handler(handler: grpc.RpcMethodHandler, method: str, timed: Timed) -> grpc.RpcMethodHandler:
    """`handler` with its unary-unary behaviour wrapped; any other handler unchanged."""
    if handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        timed(method, handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _TimedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose answers are wrapped, each method's once."""

    def __init__(self, inner: grpc.GenericRpcHandler, timed: Timed) -> None:
        self._inner = inner
        self._timed = timed
        self._handlers: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        try:
            return self._handlers[method]
        except KeyError:
            handler = self._inner.service(handler_call_details)
            if handler is not None:
                handler = timed_handler(handler, _short(method), self._timed)
            if len(self._handlers) < 1000:  # names a client sends: only the services' own are kept
                self._handlers[method] = handler
            return handler


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


class TimedServer:
    """The server a registration function sees: what it registers is wrapped by `timed`."""

    def __init__(self, server: grpc.Server, timed: Timed) -> None:
        self._server = server
        self._timed = timed

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TimedGeneric(h, self._timed) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: timed_handler(h, name, self._timed) for name, h in method_handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
