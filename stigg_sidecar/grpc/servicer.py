"""The twelve RPCs of stigg.sidecar.v1.SidecarService.

Runs on grpcio's handler threads, on requests `intake` has already parsed and held to the input
limits (it is the only validator: nothing here checks a field again). Asks the EntitlementSource
for an immutable entry (one peek of the cache per read; a miss then waits for the fetch), decides
with the pure rules and converts the decision. Reads never fail: anything unexpected answers the
fallback. Writes go to the Writer and fail with a precise status. Never mutates shared state: that
is the reactor's job, behind the source/writer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from twisted.logger import Logger

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceServicer
from stigg_sidecar.contracts import EntitlementSource, EventReport, ReloadFailed, UsageReport, WriteError, Writer
from stigg_sidecar.entitlements.decide import (
    Decision,
    decide_credit,
    decide_feature,
    fallback_decision,
    fallback_state,
    state_v1,
    state_v2,
)
from stigg_sidecar.entitlements.fallback import FallbackValues
from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.grpc import convert
from stigg_sidecar.quoting import clipped, quoted

log = Logger()
R = TypeVar("R")
M = TypeVar("M", bound=Message)

# Distinct requests whose answers are memoized per cache entry (bounds the memo's memory).
_MEMO_LIMIT = 16
# An entry's memo dict holding its first answer, and what each later answer adds to the dict on
# average as it grows to _MEMO_LIMIT items (its resizes), charged to the cache's byte budget
# with the key and the answer themselves (see `_typed`).
_MEMO_DICT_BYTES = sys.getsizeof({0: 0})
_MEMO_SLOT_BYTES = (sys.getsizeof(dict.fromkeys(range(_MEMO_LIMIT))) - _MEMO_DICT_BYTES) // (_MEMO_LIMIT - 1)

# The longest status detail sent (messages quote input through stigg_sidecar.quoting already).
_MAX_DETAILS = 1000

# Time kept back from the caller's deadline so that a wait that ends unanswered still leaves room
# to build and deliver the fallback: a tenth of what remains, within these bounds. A fixed 20 ms
# was overrun on a CPU-starved machine (a woken thread waits for a core and the GIL, and many
# reads with the same deadline wake together), turning fallbacks into DEADLINE_EXCEEDED.
_DEADLINE_MARGIN_SHARE = 0.1
_DEADLINE_MARGIN_MIN = 0.05
_DEADLINE_MARGIN_MAX = 0.5

def _optional_id(message: Any, name: str) -> str | None:
    """An `optional string` field; unset and empty both mean absent."""
    if not message.HasField(name):
        return None
    return getattr(message, name) or None


def _requested_usage(options: Any) -> float | None:
    """`options.requested_usage` when set (intake has held it finite)."""
    if options is not None and options.HasField("requested_usage"):
        return options.requested_usage
    return None


def _generic_kind(requested_usage: float | None, requested_values: tuple[str, ...], fb: FallbackValues | None) -> str:
    """The type a generic check answers when there is no data: from the request's shape (Stigg's rule)."""
    if requested_values:
        return "enum"
    if requested_usage is not None:
        return "metered"
    return fb.kind() if fb is not None else "boolean"


def _memo_window(kind: str | None, decision: Decision, now: int) -> tuple[int | None, int | None]:
    """When a memoized answer holds, `[since, until)` in epoch ms, or (None, None): always. A metered
    answer holds within its usage period: not past its end (roll-over), and not before its start
    or the moment it was computed (a clock corrected backwards)."""
    if kind != "metered" or decision.usage_period_end is None:
        return None, None
    start = decision.usage_period_start
    return (now if start is None else min(now, start)), decision.usage_period_end


def _memo_holds(memoized: tuple[bytes, int | None, int | None], now: int) -> bool:
    since, until = memoized[1], memoized[2]
    return since is None or until is None or since <= now < until


class SidecarServicer(SidecarServiceServicer):
    def __init__(
        self,
        source: EntitlementSource,
        writer: Writer,
        fallbacks: Mapping[str, FallbackValues],
        read_timeout: float,
        write_timeout: float,
        on_fallback: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._on_fallback = on_fallback
        self._source = source
        self._writer = writer
        self._fallbacks = fallbacks
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout

    # -- plumbing -------------------------------------------------------------------------------

    def _budget(self, context: grpc.ServicerContext, limit: float) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return limit
        margin = min(_DEADLINE_MARGIN_MAX, max(_DEADLINE_MARGIN_MIN, remaining * _DEADLINE_MARGIN_SHARE))
        return max(0.0, min(limit, remaining - margin))

    def _fallback_for(self, feature_id: str, options: Any) -> FallbackValues | None:
        if options is not None and options.HasField("fallback"):
            return convert.fallback_values(options.fallback)
        return self._fallbacks.get(feature_id)

    def _read(self, answer: Callable[[], R], fallback: Callable[[], R]) -> R:
        """Run a read; anything unexpected answers the fallback (and logs why)."""
        try:
            return answer()
        except Exception:
            return self._failed(fallback)

    def _failed(self, fallback: Callable[[], R]) -> R:
        log.failure("Read failed; answering the fallback")
        self._on_fallback("error")
        return fallback()

    def _counted(self, decision: Decision) -> Decision:
        if decision.is_fallback:
            self._on_fallback(decision.reason or "granted")
        return decision

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        # Bounded whatever it quotes: a long status detail would pass the client's metadata limit
        # and reach the caller as RESOURCE_EXHAUSTED instead of this error.
        context.abort(code, clipped(message, _MAX_DETAILS))
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _lookup(self, context: grpc.ServicerContext, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        """After a peek missed: wait (within the caller's deadline) for the fetch; None: fallback."""
        return self._source.lookup(customer_id, resource_id, self._budget(context, self._read_timeout))

    def _entry(self, context: grpc.ServicerContext, customer_id: str, resource_id: str | None) -> CustomerEntry | None:
        # One peek; the deadline is read only for a miss.
        entry = self._source.peek(customer_id, resource_id)
        if entry is not None:
            return entry
        return self._lookup(context, customer_id, resource_id)

    def _feature_decision(
        self,
        context: grpc.ServicerContext,
        request: Any,
        kind: str | None,
        requested_usage: float | None = None,
        requested_values: tuple[str, ...] = (),
    ) -> Decision:
        feature_id = request.feature_id
        options = request.options if request.HasField("options") else None
        fb = self._fallback_for(feature_id, options)
        entry = self._entry(context, request.customer_id, _optional_id(request, "resource_id"))
        if entry is None:
            fallback_kind = kind or _generic_kind(requested_usage, requested_values, fb)
            return self._counted(fallback_decision(fallback_kind, feature_id, fb, requested_usage, requested_values))
        now = self._source.now_ms()
        return self._counted(decide_feature(entry, feature_id, kind, requested_usage, requested_values, fb, now))

    def _typed(
        self,
        context: grpc.ServicerContext,
        request: Any,
        raw: bytes | None,
        kind: str,
        build: Callable[[Decision], M],
        requested_usage: float | None = None,
        requested_values: tuple[str, ...] = (),
    ) -> M | bytes:
        """A typed check. Its answer from a cached entry is memoized on that entry, serialized
        (intake's handler sends bytes as they are), keyed by the request's bytes as they came
        off the wire (`raw`, from intake; a request passed without them is serialized for the
        key): entries are immutable and replaced whole, so a new entry starts with an empty memo.
        A metered answer is reused only within its usage period (not past a roll-over, nor after
        the clock went back before it). A memoized answer costs ~150 bytes where the message
        object cost ~900, and is never serialized again."""
        memo_key = (kind, request.SerializeToString() if raw is None else raw)
        source = self._source
        try:
            customer_id = request.customer_id
            resource_id = request.resource_id or None  # unset reads as empty, and empty means absent
            entry = source.peek(customer_id, resource_id)
            if entry is None:
                entry = self._lookup(context, customer_id, resource_id)
            else:
                # The fast path, most calls: cached, and this request's answer memoized. Nothing
                # is built for it (no closures, no decision).
                memo = entry.memo
                if memo is not None:
                    memoized = memo.get(memo_key)
                    if memoized is not None and _memo_holds(memoized, source.now_ms()):
                        return memoized[0]
            return self._answer_typed(entry, request, memo_key, kind, build, requested_usage, requested_values)
        except Exception:
            def fallback() -> M:
                feature_id = request.feature_id
                fb = self._fallback_for(feature_id, request.options if request.HasField("options") else None)
                return build(fallback_decision(kind, feature_id, fb, requested_usage, requested_values))

            return self._failed(fallback)

    def _answer_typed(
        self,
        entry: CustomerEntry | None,
        request: Any,
        memo_key: tuple[str, bytes],
        kind: str,
        build: Callable[[Decision], M],
        requested_usage: float | None,
        requested_values: tuple[str, ...],
    ) -> M | bytes:
        """Decide a typed check (a fallback when `entry` is None), memoizing a cached answer."""
        feature_id = request.feature_id
        fb = self._fallback_for(feature_id, request.options if request.HasField("options") else None)
        if entry is None:
            return build(self._counted(fallback_decision(kind, feature_id, fb, requested_usage, requested_values)))
        now = self._source.now_ms()
        memo = entry.memo
        if memo is not None:
            memoized = memo.get(memo_key)
            if memoized is not None and _memo_holds(memoized, now):
                return memoized[0]
        decision = self._counted(decide_feature(entry, feature_id, kind, requested_usage, requested_values, fb, now))
        response = build(decision)
        if decision.is_fallback or (memo is not None and len(memo) >= _MEMO_LIMIT):
            return response
        wire = response.SerializeToString()
        value = (wire, *_memo_window(kind, decision, now))
        charge = sum(map(sys.getsizeof, (memo_key, memo_key[1], value, wire)))
        if memo is None:
            # The entry's first memoized answer: the memo itself is charged with it. Two
            # threads racing here each set a memo; the loser's answer is recomputed later.
            memo = {}
            object.__setattr__(entry, "memo", memo)
            charge += _MEMO_DICT_BYTES
        else:
            charge += _MEMO_SLOT_BYTES
        memo[memo_key] = value
        self._source.memo_grew(entry, charge)
        return wire

    # -- typed checks: `raw` is the request's bytes as they arrived (intake passes them) ----------

    def GetBooleanEntitlement(self, request: pb.GetBooleanEntitlementRequest, context: grpc.ServicerContext,
                              raw: bytes | None = None) -> pb.GetBooleanEntitlementResponse | bytes:
        return self._typed(context, request, raw, "boolean", convert.boolean_response)

    def GetNumericEntitlement(self, request: pb.GetNumericEntitlementRequest, context: grpc.ServicerContext,
                              raw: bytes | None = None) -> pb.GetNumericEntitlementResponse | bytes:
        return self._typed(context, request, raw, "numeric", convert.numeric_response)

    def GetMeteredEntitlement(self, request: pb.GetMeteredEntitlementRequest, context: grpc.ServicerContext,
                              raw: bytes | None = None) -> pb.GetMeteredEntitlementResponse | bytes:
        requested = _requested_usage(request.options if request.HasField("options") else None)
        return self._typed(context, request, raw, "metered", convert.metered_response, requested_usage=requested)

    def GetEnumEntitlement(self, request: pb.GetEnumEntitlementRequest, context: grpc.ServicerContext,
                           raw: bytes | None = None) -> pb.GetEnumEntitlementResponse | bytes:
        values = tuple(request.options.requested_values) if request.HasField("options") else ()
        return self._typed(context, request, raw, "enum", convert.enum_response, requested_values=values)

    def GetEntitlement(self, request: pb.GetEntitlementRequest, context: grpc.ServicerContext) -> pb.GetEntitlementResponse:
        options = request.options if request.HasField("options") else None
        requested = _requested_usage(options)
        values: tuple[str, ...] = tuple(options.requested_values) if options is not None else ()

        def fallback() -> pb.GetEntitlementResponse:
            fb = self._fallback_for(request.feature_id, options)
            kind = _generic_kind(requested, values, fb)
            return convert.generic_response(fallback_decision(kind, request.feature_id, fb, requested, values))

        return self._read(
            lambda: convert.generic_response(self._feature_decision(context, request, None, requested, values)),
            fallback,
        )

    def GetEntitlementV2(self, request: pb.GetEntitlementV2Request, context: grpc.ServicerContext) -> pb.GetEntitlementV2Response:
        options = request.options if request.HasField("options") else None
        # Exactly one of the two ids is set (intake): `feature_id` whenever `currency_id` is None.
        feature_id = _optional_id(request, "feature_id")
        currency_id = _optional_id(request, "currency_id")
        requested = _requested_usage(options)
        values: tuple[str, ...] = tuple(options.requested_values) if options is not None else ()

        # Credits have no configured fallback (Stigg's creditEntitlementsFallback is not a setting).
        if currency_id is not None:
            has_own = options is not None and options.HasField("fallback")
            fb = convert.fallback_values(options.fallback) if options is not None and has_own else None
        else:
            assert feature_id is not None
            fb = self._fallback_for(feature_id, options)

        def fallback_decision_v2() -> Decision:
            if currency_id is not None:
                return fallback_decision("credit", currency_id, fb, requested)
            assert feature_id is not None
            return fallback_decision(_generic_kind(requested, values, fb), feature_id, fb, requested, values)

        def answer() -> pb.GetEntitlementV2Response:
            entry = self._entry(context, request.customer_id, _optional_id(request, "resource_id"))
            if entry is None:
                decision = fallback_decision_v2()
            elif currency_id is not None:
                decision = decide_credit(entry, currency_id, requested, fb, self._source.now_ms())
            else:
                assert feature_id is not None
                decision = decide_feature(entry, feature_id, None, requested, values, fb, self._source.now_ms())
            return pb.GetEntitlementV2Response(entitlement=convert.entitlement_v2(self._counted(decision)))

        return self._read(
            answer,
            lambda: pb.GetEntitlementV2Response(entitlement=convert.entitlement_v2(fallback_decision_v2())),
        )

    # -- whole state ----------------------------------------------------------------------------

    def _state(
        self,
        context: grpc.ServicerContext,
        request: Any,
        decide_all: Callable[[CustomerEntry, int], Sequence[Decision]],
        item: Callable[[Decision], Any],
        response_type: Callable[..., M],
    ) -> M:
        def fallback() -> M:
            return response_type(entitlements=[item(d) for d in fallback_state(self._fallbacks)])

        def answer() -> M:
            entry = self._entry(context, request.customer_id, _optional_id(request, "resource_id"))
            if entry is None:
                self._on_fallback("Unknown")
                return fallback()
            decisions = decide_all(entry, self._source.now_ms())
            return response_type(
                entitlements=[item(d) for d in decisions],
                access_denied_reason=convert.reason(entry.access_denied_reason),
            )

        return self._read(answer, fallback)

    def GetEntitlements(self, request: pb.GetEntitlementsRequest, context: grpc.ServicerContext) -> pb.GetEntitlementsResponse:
        return self._state(context, request, state_v1, convert.entitlement_v1, pb.GetEntitlementsResponse)

    def GetEntitlementsStateV2(self, request: pb.GetEntitlementsStateV2Request, context: grpc.ServicerContext) -> pb.GetEntitlementsStateV2Response:
        return self._state(context, request, state_v2, convert.entitlement_v2, pb.GetEntitlementsStateV2Response)

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, context: grpc.ServicerContext, action: Callable[[], R]) -> R:
        try:
            return action()
        except WriteError as e:
            self._abort(context, getattr(grpc.StatusCode, e.failure.value), e.message)

    @staticmethod
    def _usage(request: pb.ReportUsageRequest) -> UsageReport:
        return UsageReport(
            customer_id=request.customer_id,
            feature_id=request.feature_id,
            value=request.value,
            resource_id=_optional_id(request, "resource_id"),
            update_behavior=convert.update_behavior(request),
            dimensions=convert.dimensions(request.dimensions),
            timestamp=convert.request_timestamp(request),
        )

    def ReportUsage(self, request: pb.ReportUsageRequest, context: grpc.ServicerContext) -> pb.ReportUsageResponse:
        def action() -> pb.ReportUsageResponse:
            (ack,) = self._writer.report_usage(
                [self._usage(request)], self._budget(context, self._write_timeout), context.is_active
            )
            return convert.usage_ack(ack)

        return self._write(context, action)

    def ReportUsageBulk(self, request: pb.ReportUsageBulkRequest, context: grpc.ServicerContext) -> pb.ReportUsageBulkResponse:
        def action() -> pb.ReportUsageBulkResponse:
            usages = [self._usage(u) for u in request.usages]
            if not usages:
                return pb.ReportUsageBulkResponse()
            acks = self._writer.report_usage(usages, self._budget(context, self._write_timeout), context.is_active)
            return pb.ReportUsageBulkResponse(usages=[convert.usage_ack(a) for a in acks])

        return self._write(context, action)

    def ReportEvents(self, request: pb.ReportEventsRequest, context: grpc.ServicerContext) -> Empty:
        def action() -> Empty:
            events = [
                EventReport(
                    event_name=e.event_name,
                    customer_id=e.customer_id,
                    idempotency_key=e.idempotency_key,
                    resource_id=_optional_id(e, "resource_id"),
                    dimensions=convert.dimensions(e.dimensions),
                    timestamp=convert.request_timestamp(e),
                )
                for e in request.events
            ]
            if events:
                self._writer.report_events(events, self._budget(context, self._write_timeout), context.is_active)
            return Empty()

        return self._write(context, action)

    def ReloadEntitlements(self, request: pb.ReloadEntitlementsRequest, context: grpc.ServicerContext) -> pb.ReloadEntitlementsResponse:
        def action() -> pb.ReloadEntitlementsResponse:
            customer_id = request.customer_id
            try:
                exists = self._source.reload(customer_id, _optional_id(request, "resource_id"),
                                             self._budget(context, self._read_timeout))
            except ReloadFailed as e:
                # Stigg's contract: a reload that fails reports false rather than an error.
                log.warn("Reload of {customer} failed: {why}", customer=quoted(customer_id), why=e.message)
                exists = False
            return pb.ReloadEntitlementsResponse(entitled_entity_exists=exists)

        return self._write(context, action)
