"""The emulator data file's building blocks: `DataError`, the GraphQL DateTime format, and the
readers that check one field of a JSON object, each naming the offending place
(``customers.acme.entitlements[2].feature.featureType: must be one of ...``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class DataError(ValueError):
    """Data that does not describe valid Stigg state; ``str()`` names the place and the problem."""


# -- timestamps -----------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """GraphQL DateTime as Stigg sends it: UTC, milliseconds, ``Z``."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_timestamp(value: str) -> datetime:
    """An ISO-8601 timestamp with a timezone (``Z`` or an offset); raises ValueError otherwise."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no timezone")
    return moment.astimezone(UTC)


def timestamp_from_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


# -- field readers --------------------------------------------------------------------------------


def child_place(place: str, key: str) -> str:
    step = key if _IDENTIFIER.match(key) else json.dumps(key)
    return f"{place}.{step}" if place else step


def as_object(value: object, place: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{place}: must be an object")
    return value


def check_keys(obj: Mapping[str, Any], allowed: Iterable[str], place: str) -> None:
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise DataError(f"{child_place(place, key)}: unknown field{hint}")


def check_typename(obj: Mapping[str, Any], expected: str, place: str) -> None:
    if obj.get("__typename", expected) != expected:
        raise DataError(f"{child_place(place, '__typename')}: must be {expected}")


def is_missing(obj: Mapping[str, Any], key: str, place: str, required: bool) -> bool:
    if obj.get(key) is None:
        if required:
            raise DataError(f"{child_place(place, key)}: required")
        return True
    return False


def string_field(obj: Mapping[str, Any], key: str, place: str, *, required: bool = False) -> Any:
    if is_missing(obj, key, place, required):
        return None
    value = obj[key]
    if not isinstance(value, str) or (required and not value):
        raise DataError(f"{child_place(place, key)}: must be a{' non-empty' if required else ''} string")
    return value


def number_field(obj: Mapping[str, Any], key: str, place: str, *, required: bool = False) -> Any:
    if is_missing(obj, key, place, required):
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{child_place(place, key)}: must be a finite number")
    return value


def boolean_field(obj: Mapping[str, Any], key: str, place: str, *, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DataError(f"{child_place(place, key)}: must be true or false")
    return value


def enum_field(
    obj: Mapping[str, Any],
    key: str,
    choices: tuple[str, ...],
    place: str,
    *,
    required: bool = False,
) -> Any:
    if is_missing(obj, key, place, required):
        return None
    if obj[key] not in choices:
        raise DataError(f"{child_place(place, key)}: must be one of {', '.join(choices)}")
    return obj[key]


def string_list_field(obj: Mapping[str, Any], key: str, place: str) -> list[str] | None:
    if is_missing(obj, key, place, False):
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{child_place(place, key)}: must be a list of strings")
    return list(value)


def timestamp_field(obj: Mapping[str, Any], key: str, place: str) -> str | None:
    if is_missing(obj, key, place, False):
        return None
    value = obj[key]
    try:
        if not isinstance(value, str):
            raise ValueError
        return format_timestamp(parse_timestamp(value))
    except ValueError:
        raise DataError(
            f"{child_place(place, key)}: must be an ISO-8601 timestamp with a timezone, "
            "e.g. 2025-01-31T00:00:00.000Z"
        ) from None
