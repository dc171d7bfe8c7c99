"""Where request bytes enter: parsing and the input limits, before a handler does any work.

grpcio answers INTERNAL when a request deserializer raises, so SidecarService is registered here
with no deserializer: each handler receives the raw bytes, parses them itself and answers
INVALID_ARGUMENT naming the problem (the field whose string is not UTF-8, the truncated varint).
A parsed request is then held to the documented limits (README, "Input limits"): ids non-empty
where required and at most MAX_ID_BYTES, bounded repeated fields and maps, finite numbers, known
enum values, timestamps in a plausible range, exactly one of GetEntitlementV2's feature and
currency ids. Only then does the servicer see it, so a hostile request costs a parse and a few
length checks, never a lookup, an upstream call or a log line. This is the only validator: the
servicer relies on it and checks nothing again.

Owns the limits and `InvalidArgument`; never touches the cache or the upstream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.quoting import quoted

# -- the documented limits (README "Input limits") ------------------------------------------------

MAX_ID_BYTES = 1024  # customer, resource, feature, currency ids, event names, idempotency keys, dimension keys
MAX_VALUES = 100  # requested_values and fallback enum_values per request
MAX_DIMENSIONS = 100  # dimensions per usage or event
MAX_DIMENSION_TEXT_BYTES = 4096  # one dimension's string value
MAX_BATCH = 1000  # usages per ReportUsageBulk, events per ReportEvents
EARLIEST_TIMESTAMP = 0  # 1970-01-01T00:00:00Z (seconds)
LATEST_TIMESTAMP = 4102444800  # 2100-01-01T00:00:00Z (seconds), exclusive

_TIMESTAMP_RANGE = "between 1970-01-01T00:00:00Z and 2100-01-01T00:00:00Z"
# A string of at most this many characters is within MAX_ID_BYTES whatever it holds (UTF-8 uses
# at most 4 bytes a character), so the common case never encodes.
_SURELY_SHORT = MAX_ID_BYTES // 4


class InvalidArgument(Exception):
    """A request the sidecar refuses; the message names the field and is safe to show the caller."""


# -- checks ---------------------------------------------------------------------------------------


def _too_long(value: str, limit: int) -> bool:
    # More characters than bytes allowed is too long whatever the encoding: no copy of a huge id.
    return len(value) > limit or (len(value) > limit // 4 and len(value.encode("utf-8")) > limit)


def check_id(value: str, name: str, required: bool = True) -> None:
    """An id: non-empty (when `required`) and at most MAX_ID_BYTES of UTF-8."""
    if not value:
        if required:
            raise InvalidArgument(f"{name} must not be empty")
        return
    if len(value) > _SURELY_SHORT and _too_long(value, MAX_ID_BYTES):
        raise InvalidArgument(f"{name} must be at most {MAX_ID_BYTES} bytes (got {quoted(value)})")


def check_optional_id(message: Any, name: str, where: str = "") -> None:
    """An `optional string` id: unset and empty both mean absent; set, it is bounded."""
    if message.HasField(name):
        check_id(getattr(message, name), where + name, required=False)


def check_values(values: Iterable[str], name: str) -> None:
    """A repeated string of ids (requested or fallback enum values): bounded count and length."""
    items = list(values)
    if len(items) > MAX_VALUES:
        raise InvalidArgument(f"{name} must have at most {MAX_VALUES} items (got {len(items)})")
    for i, item in enumerate(items):
        check_id(item, f"{name}[{i}]", required=False)


def check_finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number")


def check_timestamp(message: Any, where: str = "") -> None:
    """The optional `timestamp`: a valid one, in a range a usage or event can plausibly carry."""
    if not message.HasField("timestamp"):
        return
    stamp = message.timestamp
    if not (EARLIEST_TIMESTAMP <= stamp.seconds < LATEST_TIMESTAMP and 0 <= stamp.nanos < 1_000_000_000):
        raise InvalidArgument(f"{where}timestamp is out of range: it must be {_TIMESTAMP_RANGE}")


def check_dimensions(dimensions: Mapping[str, pb.EventDimensionValue], name: str) -> None:
    if len(dimensions) > MAX_DIMENSIONS:
        raise InvalidArgument(f"{name} must have at most {MAX_DIMENSIONS} entries (got {len(dimensions)})")
    for key, value in dimensions.items():
        if not key:
            raise InvalidArgument(f"{name} keys must not be empty")
        if len(key) > _SURELY_SHORT and _too_long(key, MAX_ID_BYTES):
            raise InvalidArgument(f"{name} keys must be at most {MAX_ID_BYTES} bytes (got {quoted(key)})")
        which = value.WhichOneof("value")
        if which == "number_value":
            check_finite(value.number_value, f"{name}[{quoted(key)}]")
        elif which == "string_value" and _too_long(value.string_value, MAX_DIMENSION_TEXT_BYTES):
            raise InvalidArgument(f"{name}[{quoted(key)}] must be at most {MAX_DIMENSION_TEXT_BYTES} bytes")


def check_batch(items: Any, name: str) -> None:
    if len(items) > MAX_BATCH:
        raise InvalidArgument(f"{name} must have at most {MAX_BATCH} items (got {len(items)})")


def _check_options(request: Any) -> None:
    # The options messages differ per RPC; each check applies where the field exists.
    options = request.options
    fields = options.DESCRIPTOR.fields_by_name
    if "requested_usage" in fields and options.HasField("requested_usage"):
        check_finite(options.requested_usage, "options.requested_usage")
    if "requested_values" in fields:
        check_values(options.requested_values, "options.requested_values")
    if options.HasField("fallback"):
        fallback = options.fallback
        fields = fallback.DESCRIPTOR.fields_by_name
        if "usage_limit" in fields and fallback.HasField("usage_limit"):
            check_finite(fallback.usage_limit, "options.fallback.usage_limit")
        if "enum_values" in fields:
            check_values(fallback.enum_values, "options.fallback.enum_values")


def _feature_read(request: Any) -> None:
    # Every cached check passes here: the common case (ids present and surely short, no options)
    # costs three field reads, three length tests and a HasField.
    customer_id, feature_id = request.customer_id, request.feature_id
    if not (0 < len(customer_id) <= _SURELY_SHORT and 0 < len(feature_id) <= _SURELY_SHORT):
        check_id(customer_id, "customer_id")
        check_id(feature_id, "feature_id")
    if len(request.resource_id) > _SURELY_SHORT:  # (unset reads as empty, and empty means absent)
        check_id(request.resource_id, "resource_id", required=False)
    if request.HasField("options"):
        _check_options(request)


def _v2_read(request: pb.GetEntitlementV2Request) -> None:
    check_id(request.customer_id, "customer_id")
    check_optional_id(request, "feature_id")
    check_optional_id(request, "currency_id")
    check_optional_id(request, "resource_id")
    _check_options(request)
    # Set means set and non-empty (an empty optional id means absent).
    if bool(request.HasField("feature_id") and request.feature_id) == bool(
        request.HasField("currency_id") and request.currency_id
    ):
        raise InvalidArgument("exactly one of feature_id and currency_id must be set")


def _customer_read(request: Any) -> None:
    check_id(request.customer_id, "customer_id")
    if request.HasField("resource_id"):
        check_id(request.resource_id, "resource_id", required=False)


def check_usage(usage: pb.ReportUsageRequest, where: str = "") -> None:
    check_id(usage.customer_id, f"{where}customer_id")
    check_id(usage.feature_id, f"{where}feature_id")
    check_optional_id(usage, "resource_id", where)
    check_finite(usage.value, f"{where}value")
    if usage.HasField("update_behavior") and usage.update_behavior not in pb.UsageUpdateBehavior.values():
        raise InvalidArgument(
            f"{where}update_behavior {usage.update_behavior} is not a UsageUpdateBehavior"
            f" ({', '.join(f'{v}={n}' for n, v in pb.UsageUpdateBehavior.items())})"
        )
    check_dimensions(usage.dimensions, f"{where}dimensions")
    check_timestamp(usage, where)


def _usage_bulk(request: pb.ReportUsageBulkRequest) -> None:
    check_batch(request.usages, "usages")
    for i, usage in enumerate(request.usages):
        check_usage(usage, f"usages[{i}].")


def check_event(event: pb.Event, where: str) -> None:
    check_id(event.event_name, f"{where}event_name")
    check_id(event.customer_id, f"{where}customer_id")
    check_id(event.idempotency_key, f"{where}idempotency_key")
    check_optional_id(event, "resource_id", where)
    check_dimensions(event.dimensions, f"{where}dimensions")
    check_timestamp(event, where)


def _events(request: pb.ReportEventsRequest) -> None:
    check_batch(request.events, "events")
    for i, event in enumerate(request.events):
        check_event(event, f"events[{i}].")


# What each RPC's request must satisfy before its handler runs.
CHECKS: Mapping[str, Callable[[Any], None]] = {
    "GetEntitlements": _customer_read,
    "GetEntitlementsStateV2": _customer_read,
    "ReloadEntitlements": _customer_read,
    "GetEntitlement": _feature_read,
    "GetBooleanEntitlement": _feature_read,
    "GetNumericEntitlement": _feature_read,
    "GetMeteredEntitlement": _feature_read,
    "GetEnumEntitlement": _feature_read,
    "GetEntitlementV2": _v2_read,
    "ReportUsage": check_usage,
    "ReportUsageBulk": _usage_bulk,
    "ReportEvents": _events,
}


# -- malformed bytes ------------------------------------------------------------------------------


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    start = pos
    while True:
        if pos >= len(data):
            raise _Malformed(f"truncated varint ({what}) at byte {start}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"varint longer than 10 bytes ({what}) at byte {start}")


# Fields the diagnosis looks at before giving up: walking is Python, so a large request of tiny
# fields with a defect at its end must not cost more CPU than parsing it did.
_WALK_BUDGET = 10_000


class _Budget:
    def __init__(self, steps: int) -> None:
        self.left = steps


def _walk(  # noqa: C901 - one branch per wire type, as the format defines them
    data: bytes, descriptor: Descriptor, prefix: str, base: int, depth: int, budget: _Budget
) -> None:
    """Walk the wire format of `data` as a `descriptor` message; raise _Malformed at the first
    thing a parser refuses. Only runs after a parse failed, to say why."""
    if depth > 32:
        raise _Malformed(f"{prefix.rstrip('.') or 'the message'} is nested too deeply")
    pos = 0
    while pos < len(data):
        budget.left -= 1
        if budget.left < 0:
            raise _Malformed(f"not a valid protobuf encoding (the first {_WALK_BUDGET} fields look fine)")
        start = pos
        tag, pos = _varint(data, pos, "field tag")
        number, wire_type = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        name = prefix + (field.name if field is not None else f"field {number}")
        at = f"at byte {base + start}"
        if number == 0:
            raise _Malformed(f"field number 0 {at}")
        if wire_type == 0:
            _, pos = _varint(data, pos, name)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise _Malformed(f"{name} is truncated {at}")
        elif wire_type == 2:
            length, pos = _varint(data, pos, f"{name} length")
            end = pos + length
            if end > len(data):
                raise _Malformed(f"{name} claims {length} bytes but only {len(data) - pos} remain ({at})")
            payload = data[pos:end]
            if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Malformed(f"{name} is not valid UTF-8 ({at})") from None
            elif field is not None and field.message_type is not None:
                _walk(payload, field.message_type, name + ".", base + pos, depth + 1, budget)
            pos = end
        elif wire_type in (3, 4):
            raise _Malformed(f"{name} uses the group encoding (wire type {wire_type}) {at}")
        else:
            raise _Malformed(f"invalid wire type {wire_type} for {name} {at}")


def describe_malformed(data: bytes, descriptor: Descriptor) -> str:
    """Why `data` is not a `descriptor` message, for an INVALID_ARGUMENT the caller can act on."""
    try:
        _walk(bytes(data), descriptor, "", 0, 0, _Budget(_WALK_BUDGET))
        why = "not a valid protobuf encoding"
    except _Malformed as e:
        why = str(e)
    return f"the request is not a valid {descriptor.full_name}: {why}"


# -- registration ---------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, message: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


# The typed checks memoize their answers keyed by the request's bytes: their handlers are given
# the bytes as they arrived too (`behaviour(request, context, data)`), so nothing serializes the
# parsed request again to key the memo.
KEYED_BY_BYTES = frozenset(
    ("GetBooleanEntitlement", "GetNumericEntitlement", "GetMeteredEntitlement", "GetEnumEntitlement")
)


def _intake(name: str, request_type: Any, behaviour: Callable[..., Any]) -> Callable:
    parse = request_type.FromString
    check = CHECKS[name]
    with_bytes = name in KEYED_BY_BYTES

    def handle(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = parse(data)
        except DecodeError:
            _abort(context, describe_malformed(data, request_type.DESCRIPTOR))
        try:
            check(request)
        except InvalidArgument as e:
            _abort(context, str(e))
        response = behaviour(request, context, data) if with_bytes else behaviour(request, context)
        # Serialized here, so grpcio calls no serializer of ours: a memoized answer is bytes already.
        return response if response.__class__ is bytes else response.SerializeToString()

    handle.__name__ = name
    return handle


def sidecar_method_handlers(servicer: Any) -> dict[str, grpc.RpcMethodHandler]:
    """SidecarService's handlers, each taking raw bytes and answering serialized ones (see the
    module docstring): grpcio neither parses nor serializes for them."""
    service = pb.DESCRIPTOR.services_by_name["SidecarService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _intake(method.name, request_type, getattr(servicer, method.name)),
            request_deserializer=None,
            response_serializer=None,
        )
    return handlers


def add_sidecar_service(servicer: Any, server: grpc.Server) -> None:
    """Register `servicer` for stigg.sidecar.v1.SidecarService on `server` (in place of the
    generated add_SidecarServiceServicer_to_server, which would parse with grpcio)."""
    name = pb.DESCRIPTOR.services_by_name["SidecarService"].full_name
    handlers = sidecar_method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
