"""StiggApi: the sidecar's HTTP client for Stigg's Edge and GraphQL APIs, on treq.

Owns the identification headers, one persistent connection pool per upstream host, the time
budget of each call and its retries (jittered, capped exponential backoff for connection errors,
429 and 5xx; Retry-After honoured; mutations only when they carry an idempotency key), and the
classification of every failure into an `UpstreamError`. What the requests and answers look
like is `wire`'s; this module knows nothing of the cache. Runs on the reactor only. Never puts the API key into an error or a log line.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

import stigg_sidecar
from stigg_sidecar import spans
from stigg_sidecar.contracts import EventReport, UsageReport, measurement_id
from stigg_sidecar.lifecycle.reactor import IReactor
from stigg_sidecar.upstream import operations, wire
from stigg_sidecar.upstream.breaker import BreakerOpen, BreakerPolicy, CircuitBreaker
from stigg_sidecar.upstream.errors import Problem, UpstreamError
from stigg_sidecar.upstream.recovery import StiggRecovery
from stigg_sidecar.upstream.stigg_time import StiggClock

log = Logger()

_PROCESS_TIMESTAMP = str(int(time.time() * 1000))
# The longest Edge URL sent. Servers and proxies refuse longer request lines (8 KiB is common;
# Twisted's is 16 KiB) by closing the connection, which would look like a network error and be
# retried in vain: such a request fails at once instead. Ids within the sidecar's input limits
# stay far below it.
MAX_URL_LENGTH = 8192
_CONNECTION_ERRORS = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionClosed,
    error.DNSLookupError,
    ResponseFailed,
    ResponseNeverReceived,
)


# A timeout counts towards opening a breaker only when the attempt had at least this long: a
# caller's own short deadline says nothing about Stigg.
_MIN_TIMEOUT_COUNTED = 1.0


DEFAULT_BREAKER = BreakerPolicy()


# A socket that could not even be made: the process is out of descriptors (or buffers), not Stigg.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _is_local(e: BaseException) -> bool:
    """Whether an attempt failed inside this process, before anything reached the network."""
    if isinstance(e, error.ConnectBindError):  # Twisted's name for "socket() or bind() failed"
        return True
    os_error = getattr(e, "osError", None)
    return (isinstance(e, OSError) and e.errno in _LOCAL_ERRNOS) or os_error in _LOCAL_ERRNOS


def _means_down(error: UpstreamError, attempt_timeout: float) -> bool:
    """Whether a failed attempt says the upstream is down (rather than that it answered "no")."""
    if error.problem is Problem.TIMED_OUT:
        return attempt_timeout >= _MIN_TIMEOUT_COUNTED
    return error.retryable


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before retry n (1-based): random(0.5..1) * min(max_delay, initial * factor**(n-1))."""

    max_attempts: int = 5
    initial: float = 0.1
    factor: float = 2.0
    max_delay: float = 2.0

    def delay(self, attempt: int, rng: Callable[[], float]) -> float:
        return (0.5 + rng() / 2) * min(self.max_delay, self.initial * self.factor ** (attempt - 1))


def identification_headers(api_key: str) -> dict[str, str]:
    """Stigg's SDK identification headers (STIGG_REFERENCE 2.1), naming this sidecar."""
    hostname = socket.gethostname()
    pid = str(os.getpid())
    return {
        "X-API-KEY": api_key,
        "source": "SIDECAR",
        "X-SDK-INSTANCE-ID": measurement_id(),
        "X-SDK-OS-PROCESS-HOSTNAME": hostname,
        "X-SDK-OS-PROCESS-ID": pid,
        "X-SDK-OS-PROCESS-TIMESTAMP": _PROCESS_TIMESTAMP,
        "X-SDK-OS-PROCESS-FINGERPRINT": hashlib.md5((hostname + pid + _PROCESS_TIMESTAMP).encode()).hexdigest(),
    }


def _treq_headers(*parts: Mapping[str, str]) -> dict[bytes | str, bytes | str]:
    """The parts merged (a later part wins) into the header mapping type treq declares."""
    merged: dict[bytes | str, bytes | str] = {}
    for part in parts:
        for name, value in part.items():
            merged[name] = value
    return merged


def _http_failure(status: int, retry_after: float | None) -> UpstreamError:
    """Only 401 means the key is wrong (Stigg's own rule): a 403 can come from a proxy or CDN."""
    if status == 401:
        return UpstreamError(Problem.KEY_REJECTED, "Stigg rejected the API key")
    if status == 429:
        return UpstreamError(Problem.RATE_LIMITED, "Stigg rate limit (HTTP 429)", True, retry_after)
    if status >= 500 or status == 403:
        return UpstreamError(Problem.UNAVAILABLE, f"Stigg answered HTTP {status}", True, retry_after)
    if 300 <= status < 400:
        # Never followed: the API key header would go wherever the redirect points.
        return UpstreamError(Problem.UNAVAILABLE, f"Stigg answered a redirect (HTTP {status}); check the API URLs")
    return UpstreamError(Problem.UNAVAILABLE, f"Stigg answered HTTP {status}; check the API URLs")


def _retry_after(headers: Headers) -> float | None:
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    try:
        return max(0.0, float(values[0]))
    except ValueError:
        return None


def traced_url(url: str) -> str:
    """`url` as a span attribute: without user and password (were any configured in it)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _with_resource(path: str, resource_id: str | None) -> str:
    return f"{path}?{urlencode({'resourceId': resource_id})}" if resource_id else path


class _ClosablePool(HTTPConnectionPool):
    """A connection pool that, once closed, caches nothing: a connection that finishes its
    request after `close` is closed at once instead of idling in the pool (for
    `cachedConnectionTimeout`, 240 s, with a timer that outlives the sidecar's stop)."""

    closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed:
            connection.abort()
            return
        super()._putConnection(key, connection)

    def close(self) -> Deferred:
        """Close the cached connections; fires when they are closed."""
        self.closed = True
        return self.closeCachedConnections()


class StiggApi:
    def __init__(
        self,
        reactor: IReactor,
        api_key: str,
        api_url: str,
        edge_api_url: str,
        edge_enabled: bool,
        retry: RetryPolicy = RetryPolicy(),
        rng: Callable[[], float] = random.random,
        breaker: BreakerPolicy = DEFAULT_BREAKER,
        on_attempt: Callable[[str, str, float], None] | None = None,
        recovery: StiggRecovery | None = None,
        stigg_clock: StiggClock | None = None,
    ) -> None:
        self._reactor = reactor
        self._api_url = api_url.rstrip("/")
        self._edge_url = edge_api_url.rstrip("/")
        self.edge_enabled = edge_enabled
        self._retry = retry
        self._rng = rng
        self._headers = identification_headers(api_key)
        self._pools: list[_ClosablePool] = []
        self._pauses: set[Deferred] = set()
        # One per attempt in flight, fired when it settles -> what cuts the attempt short.
        self._attempts: dict[Deferred, Callable[[], None]] = {}
        self._closed = False
        self._graphql = self._client()
        self._edge = self._client()
        # Outage memory, one per upstream: Edge can be down while GraphQL answers, and vice versa.
        self.breakers = {
            "edge": CircuitBreaker("Edge API", reactor, breaker, rng),
            "graphql": CircuitBreaker("GraphQL API", reactor, breaker, rng),
        }
        self._on_attempt = on_attempt  # endpoint, outcome, seconds
        # Stigg acknowledging the real-time socket closes every breaker at once.
        self.recovery = recovery if recovery is not None else StiggRecovery(reactor)
        self.recovery.subscribe(self._close_breakers)
        # Every response's Date: how far the local clock is from Stigg's.
        self.stigg_clock = stigg_clock if stigg_clock is not None else StiggClock()

    def _client(self) -> HTTPClient:
        pool = _ClosablePool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = 32
        pool.retryAutomatically = False  # retries are ours, within the budget
        self._pools.append(pool)
        return HTTPClient(Agent(self._reactor, pool=pool, connectTimeout=10))

    def _close_breakers(self, source: str) -> None:
        if source == "socket":
            for breaker in self.breakers.values():
                breaker.close("the real-time socket is connected")

    def socket_headers(self) -> dict[str, Any]:
        """The identification headers as the WebSocket's connection_init carries them (pid and
        timestamp as JSON numbers, names as sent over HTTP)."""
        headers: dict[str, Any] = dict(self._headers)
        headers["X-SDK-OS-PROCESS-ID"] = int(headers["X-SDK-OS-PROCESS-ID"])
        headers["X-SDK-OS-PROCESS-TIMESTAMP"] = int(headers["X-SDK-OS-PROCESS-TIMESTAMP"])
        return headers

    @inlineCallbacks
    def close(self, within: float | None = None) -> Generator[Deferred[Any], Any, None]:
        """Stop retrying (pending calls fail with their last error) and close the pools.

        Fires once every connection is closed: an attempt in flight keeps its connection until it
        settles (bounded by its own timeout, and by `within` seconds when given: the stop's
        budget, past which it is cut short as a timeout), and that connection would otherwise go
        back to the pool and idle there after the sidecar stopped; so the pools close after the
        attempts.
        """
        self._closed = True  # an attempt still in flight fails with its error, no new pause
        for pause in list(self._pauses):
            pause.cancel()
        cut = None
        if within is not None and self._attempts:
            cut = self._reactor.callLater(within, lambda: [expire() for expire in list(self._attempts.values())])
        yield defer.gatherResults(list(self._attempts))  # each settles within its own timeout
        if cut is not None and cut.active():
            cut.cancel()
        yield defer.gatherResults([p.close() for p in self._pools])

    # -- transport --------------------------------------------------------------------------------

    @inlineCallbacks
    def _once(  # noqa: C901 - one attempt's whole life: send, body, timer, and each way it can end
        self, endpoint: str, send: Callable[[float], Deferred], timeout: float,
        target: tuple[str, str] = ("POST", ""), attempt: int = 1,
    ) -> Generator[Deferred[Any], Any, Any]:
        """One attempt: send, read the JSON body, classify. Bounded by `timeout` seconds.

        One timer covers the request and the body; when it fires it cancels whichever is
        pending, and the attempt fails as a timeout whatever error the cancellation surfaces as.
        The attempt is a CLIENT span (`target`: method and URL; never a header, so never the key).
        """
        method, url = target
        span = spans.tracer.start_span(f"{method} {endpoint}", kind=spans.SpanKind.CLIENT)
        if span.is_recording():
            parts = urlsplit(url)
            span.set_attributes({
                "http.request.method": method, "url.full": traced_url(url), "server.address": parts.hostname or "",
                "stigg.operation": endpoint,
            })
            if parts.port is not None:
                span.set_attribute("server.port", parts.port)
            if attempt > 1:
                span.set_attribute("http.request.resend_count", attempt - 1)
        started = self._reactor.seconds()
        outcome = "error"
        pending: list[Deferred] = []
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            for d in pending:
                d.cancel()

        settled: Deferred = Deferred()
        self._attempts[settled] = expire
        timer = self._reactor.callLater(timeout, expire)
        try:
            pending[:] = [send(timeout)]
            response = yield pending[0]
            self.stigg_clock.observe((response.headers.getRawHeaders(b"date") or [None])[0])
            span.set_attribute("http.response.status_code", response.code)
            pending[:] = [response.content()]
            body = yield pending[0]
            if response.code != 200:
                outcome = str(response.code)
                raise _http_failure(response.code, _retry_after(response.headers))
            try:
                data = wire.answer_data(body)
            except wire.BadAnswer as e:
                outcome = e.outcome
                raise e.error from None
            outcome = "ok"
            return data
        except UpstreamError as e:
            spans.failed(span, e)
            raise
        except Exception as e:
            spans.failed(span, e)
            if expired:
                outcome = "timeout"
                raise UpstreamError(Problem.TIMED_OUT, f"Stigg did not answer within {timeout:.3g}s") from None
            if _is_local(e):
                outcome = "local"
                raise UpstreamError(Problem.UNAVAILABLE, "not sent: the sidecar is out of file descriptors "
                                    "(too many open connections)", True, local=True) from None
            if isinstance(e, _CONNECTION_ERRORS):
                outcome = "unreachable"
                raise UpstreamError(Problem.UNAVAILABLE, f"Stigg is unreachable ({type(e).__name__})", True) from None
            raise
        finally:
            span.set_attribute("stigg.outcome", outcome)
            span.end()
            if timer.active():
                timer.cancel()
            self._attempts.pop(settled, None)
            settled.callback(None)
            if self._on_attempt is not None:
                self._on_attempt(endpoint, outcome, self._reactor.seconds() - started)

    @inlineCallbacks
    def _call(
        self, endpoint: str, send: Callable[[float], Deferred], timeout: float, upstream: str,
        retryable: bool = True, target: tuple[str, str] = ("POST", ""),
    ) -> Generator[Deferred[Any], Any, Any]:
        """Attempts with backoff until success, a final failure, or the budget is spent; each
        attempt admitted by `breaker` (an open one refuses at once, or admits this as its probe,
        which is not retried: the breaker's backoff is the retry)."""
        breaker = self.breakers[upstream]
        deadline = self._reactor.seconds() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                raise UpstreamError(Problem.TIMED_OUT, f"Stigg did not answer within {timeout:.3g}s")
            try:
                ticket = breaker.admit()
            except BreakerOpen as e:
                raise UpstreamError(Problem.UNAVAILABLE, e.message, fast_failed=True) from None
            try:
                result = yield self._once(endpoint, send, remaining, target, attempt)
            except UpstreamError as e:
                if e.local:
                    breaker.abandoned(ticket)  # nothing reached Stigg: neither up nor down
                elif _means_down(e, remaining):
                    breaker.failed(ticket, e.message)
                    self.recovery.failed()
                else:
                    breaker.succeeded(ticket)  # Stigg answered, if only to refuse
                    self.recovery.answered(upstream)
                if ticket.probe or not (retryable and e.retryable) or attempt >= self._retry.max_attempts or self._closed:
                    raise
                delay = max(self._retry.delay(attempt, self._rng), e.retry_after or 0.0)
                if self._reactor.seconds() + delay >= deadline:
                    raise
                log.debug("Retrying {endpoint} in {delay:.3f}s: {why}", endpoint=endpoint, delay=delay, why=e.message)
                pause = deferLater(self._reactor, delay, lambda: None)
                self._pauses.add(pause)
                try:
                    yield pause
                except defer.CancelledError:
                    raise e from None  # closing: the last failure stands
                finally:
                    self._pauses.discard(pause)
            except BaseException:
                breaker.abandoned(ticket)
                raise
            else:
                breaker.succeeded(ticket)
                self.recovery.answered(upstream)
                return result

    def _edge_get(self, endpoint: str, path: str, timeout: float) -> Deferred:
        url = f"{self._edge_url}{path}"
        if len(url) > MAX_URL_LENGTH:
            return defer.fail(UpstreamError(
                Problem.REFUSED, f"the Edge API URL would be {len(url)} characters (at most {MAX_URL_LENGTH})"
            ))
        headers = _treq_headers(self._headers, {"X-API-VERSION": "1", "accept": "application/json"})

        def send(t: float) -> Deferred:
            return self._edge.get(url, headers=headers, allow_redirects=False)

        return self._call(endpoint, send, timeout, "edge", target=("GET", url))

    def _graphql_post(
        self, operation: str, query: str, variables: Mapping[str, Any], timeout: float, retryable: bool = True
    ) -> Deferred:
        body = wire.graphql_request(operation, query, variables)
        headers = _treq_headers(
            self._headers,
            {
                "content-type": "application/json",
                "accept": "*/*",
                "x-graphql-operation-name": operation,
                "apollographql-client-name": "stigg-sidecar",
                "apollographql-client-version": stigg_sidecar.__version__,
            },
        )
        url = f"{self._api_url}/graphql"

        def send(t: float) -> Deferred:
            return self._graphql.post(url, data=body, headers=headers, allow_redirects=False)

        return self._call(operation, send, timeout, "graphql", retryable, target=("POST", url))

    # -- operations -------------------------------------------------------------------------------

    @inlineCallbacks
    def fetch_state(
        self, customer_id: str, resource_id: str | None, timeout: float, use_edge: bool | None = None
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """The customer's `entitlementsState` object, from Edge or GraphQL."""
        if self.edge_enabled if use_edge is None else use_edge:
            path = _with_resource(f"/v1/c/{quote(customer_id, safe='')}/entitlements-state.json", resource_id)
            data = yield self._edge_get("/v1/c/{customerId}/entitlements-state.json", path, timeout)
        else:
            query = {"customerId": customer_id, "resourceId": resource_id}
            data = yield self._graphql_post(
                "GetEntitlementsState", operations.GET_ENTITLEMENTS_STATE, {"query": query}, timeout
            )
        return wire.entitlements_state(data)

    def validate_key(self, timeout: float) -> Deferred:
        """Succeeds when Stigg accepts the key (the SDK-configuration endpoint, as Stigg's SDK does)."""
        if self.edge_enabled:
            return self._edge_get(
                "/v1/config/server-sdk-configuration.json", "/v1/config/server-sdk-configuration.json", timeout
            )
        return self._graphql_post("GetSdkConfiguration", operations.GET_SDK_CONFIGURATION, {}, timeout)

    @inlineCallbacks
    def report_usage(
        self, usages: Sequence[UsageReport], timeout: float, keys: Sequence[str] | None = None
    ) -> Generator[Deferred[Any], Any, list[wire.UsageResult]]:
        """Stigg's results (`UsageResult`: the acknowledgement and the usage changes), one per
        usage, in order.

        Each usage carries an idempotency key (from `keys`, else a fresh one) so a retry after a
        lost answer cannot count twice.
        """
        if keys is None:
            keys = [measurement_id() for _ in usages]
        inputs = [wire.usage_input(u, key) for u, key in zip(usages, keys, strict=True)]
        if len(inputs) == 1:
            operation = "ReportUsage"
            data = yield self._graphql_post(operation, operations.REPORT_USAGE, {"input": inputs[0]}, timeout)
        else:
            operation = "ReportUsageBulk"
            data = yield self._graphql_post(operation, operations.REPORT_USAGE_BULK, {"input": {"usages": inputs}}, timeout)
        now_ms = int(time.time() * 1000)
        results = wire.usage_results(data, operation, len(usages))
        return [wire.usage_result(u, r, now_ms) for u, r in zip(usages, results, strict=True)]

    @inlineCallbacks
    def report_events(self, events: Sequence[EventReport], timeout: float) -> Generator[Deferred[Any], Any, None]:
        variables = {"input": {"usageEvents": [wire.event_input(e) for e in events]}}
        yield self._graphql_post("ReportEvent", operations.REPORT_EVENT, variables, timeout)
