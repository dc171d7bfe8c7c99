"""TokenInterceptor: every gRPC call but health checks must carry a caller's token.

Callers send `authorization: Bearer TOKEN` metadata. No token, or one no caller has, is
UNAUTHENTICATED; a read-scoped token on a write (ReportUsage, ReportUsageBulk, ReportEvents,
ReloadEntitlements) is PERMISSION_DENIED. grpc.health.v1 stays open for probes; reflection, like
every other method, needs a token (any scope). The interceptor is only installed when
CALLER_TOKENS_FILE is set: without it a call pays nothing.

Owns the method scopes and the refusal texts; the tokens themselves are `callers.CallerTokens`'.
Runs on grpcio's serving thread before a handler is chosen, so a refused call never reaches the
handler pool. Refusals are counted by caller name (bounded: names come from the file) and logged
with the caller's name, at most once a minute per caller (once a minute in all for calls with no
valid token), never with a token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from twisted.logger import Logger

from stigg_sidecar.grpc.callers import CallerTokens

log = Logger()

HEALTH_PREFIX = "/grpc.health.v1.Health/"
WRITE_METHODS = frozenset(
    f"/stigg.sidecar.v1.SidecarService/{name}"
    for name in ("ReportUsage", "ReportUsageBulk", "ReportEvents", "ReloadEntitlements")
)
# The `caller` label of calls without a valid token (caller names cannot contain parentheses).
NO_CALLER = "(none)"
OK, UNAUTHENTICATED, PERMISSION_DENIED = "ok", "unauthenticated", "permission_denied"
REFUSAL_LOG_INTERVAL_SECS = 60.0

MISSING = "missing caller token: send metadata 'authorization: Bearer <token>'"
MALFORMED = "malformed authorization metadata: expected 'Bearer <token>'"
UNKNOWN = "unknown caller token"


def _method_name(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


def _bearer(metadata: Any) -> str | None:
    """The token of the `authorization` metadata: None when absent, "" when not `Bearer <token>`."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                return ""
            scheme, _, token = value.strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else ""
    return None


def _refusal(
    code: grpc.StatusCode, details: str, request_streaming: bool, response_streaming: bool
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the refused method's kind that ends the call with `code` and `details`."""

    def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        tokens: CallerTokens,
        on_call: Callable[[str, str], None] = lambda caller, outcome: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tokens
        self._on_call = on_call
        self._clock = clock
        self._refusals: dict[tuple, grpc.RpcMethodHandler] = {}
        self._last_logged: dict[str, float] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        caller = self._tokens.find(token) if token else None
        if caller is None:
            details = MISSING if token is None else MALFORMED if token == "" else UNKNOWN
            self._on_call(NO_CALLER, UNAUTHENTICATED)
            self._log_refusal(NO_CALLER, "refused {method}: {details}", method=_method_name(method), details=details)
            return self._refuse(continuation, handler_call_details, grpc.StatusCode.UNAUTHENTICATED, details)
        if method in WRITE_METHODS and not caller.may_write:
            details = f"caller {caller.name} has a read token; {_method_name(method)} needs a write token"
            self._on_call(caller.name, PERMISSION_DENIED)
            self._log_refusal(caller.name, "refused {method} to caller {caller}: its token is read-only",
                              method=_method_name(method), caller=caller.name)
            return self._refuse(continuation, handler_call_details, grpc.StatusCode.PERMISSION_DENIED, details)
        self._on_call(caller.name, OK)
        return continuation(handler_call_details)

    def _refuse(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
        code: grpc.StatusCode,
        text: str,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = continuation(details)  # only to learn the method's kind; it is not called
        request_streaming = bool(handler and handler.request_streaming)
        response_streaming = bool(handler and handler.response_streaming)
        key = (code, text, request_streaming, response_streaming)
        refusal = self._refusals.get(key)
        if refusal is None:
            if len(self._refusals) > 1000:  # texts carry caller and method names: bounded, but be sure
                self._refusals.clear()
            refusal = self._refusals[key] = _refusal(code, text, request_streaming, response_streaming)
        return refusal

    def _log_refusal(self, who: str, format: str, **fields: str) -> None:
        # Anyone reaching the port can make refusals; the log gets one a minute per caller.
        now = self._clock()
        last = self._last_logged.get(who)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_SECS:
            log.debug(format, **fields)
            return
        self._last_logged[who] = now
        log.warn(format + " (more refusals for the next minute are logged at debug)", **fields)
