"""Typed reads of decoded JSON, shared by every JSON boundary (Stigg's API, its Redis format).

`FieldReader` reads optional fields and raises the boundary's own error naming the place;
`parse_time` reads Stigg's instants; `freeze_json`/`thaw_json` keep free-form JSON read-only in a
cached record and give it back. Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from stigg_sidecar.entitlements.tracking import untrack as _untrack

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


class FieldReader:
    """Typed reads of a decoded JSON object's optional fields; a bad value raises `error` with a
    message naming the place (`<where>.<key>: must be ...`). Shared by every JSON boundary."""

    def __init__(self, error: type[Exception]) -> None:
        self._error = error

    def string(self, obj: Mapping[str, Any], key: str, where: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self._error(f"{where}.{key}: must be a string or null")
        return value

    def flag(self, obj: Mapping[str, Any], key: str, where: str) -> bool:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._error(f"{where}.{key}: must be true, false or null")
        return bool(value)

    def number(self, obj: Mapping[str, Any], key: str, where: str) -> float | None:
        value = obj.get(key)
        if value is None:
            return None
        number = finite(value)
        if number is None:
            raise self._error(f"{where}.{key}: must be a finite number or null")
        return number

    def strings(self, obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._error(f"{where}.{key}: must be a list of strings or null")
        return tuple(value)

    def time(self, obj: Mapping[str, Any], key: str, where: str) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        parsed = parse_time(value)
        if parsed is None:
            raise self._error(f"{where}.{key}: must be an ISO-8601 date-time or null")
        return parsed




def parse_time(value: Any) -> int | None:
    """An ISO-8601 string (naive means UTC) or a number of epoch ms, as epoch ms; else None."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - _EPOCH) // _ONE_MS
    number = finite(value)
    return None if number is None else int(number)


def finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (booleans, NaN, 1e999, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def freeze_json(value: Any) -> Any:
    """A read-only copy of parsed JSON: objects become read-only mappings, lists tuples."""
    if isinstance(value, Mapping):
        # The proxy stays tracked: its type's deallocation expects it to be (see gcpolicy.untrack).
        inner = {str(k): freeze_json(v) for k, v in value.items()}
        _untrack(inner)
        return MappingProxyType(inner)
    if isinstance(value, (list, tuple)):
        frozen = tuple(freeze_json(v) for v in value)
        _untrack(frozen)
        return frozen
    return value


def thaw_json(value: Any) -> Any:
    """Plain dicts and lists again (e.g. for a protobuf Struct), from `freeze_json`'s output."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(v) for v in value]
    return value


# --------------------------------------------------------------------------- changes
