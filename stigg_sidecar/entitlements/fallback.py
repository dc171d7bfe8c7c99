"""Fallback values: what a read answers when Stigg's data cannot be had.

Owns the parsing of ENTITLEMENTS_FALLBACK (a JSON object featureId -> values) into immutable
`FallbackValues`. Pure: no I/O, no clock, no globals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FallbackValues:
    """One feature's fallback, in the shape of Stigg's `entitlementsFallback` values."""

    has_access: bool = False
    value: int | None = None
    usage_limit: float | None = None
    is_unlimited: bool | None = None
    enum_values: tuple[str, ...] = ()

    def kind(self) -> str:
        """The getter type these values look like, for callers that do not name one."""
        if self.enum_values:
            return "enum"
        if self.usage_limit is not None:
            return "metered"
        if self.value is not None or self.is_unlimited is not None:
            return "numeric"
        return "boolean"


_INT32_MAX = 2**31 - 1


class FallbackError(ValueError):
    """ENTITLEMENTS_FALLBACK is malformed; the message names the place."""


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise FallbackError(f"{where}: {what}")


def parse_fallback_values(where: str, raw: Any) -> FallbackValues:
    _expect(isinstance(raw, dict), where, "must be a JSON object")
    known = {"hasAccess", "value", "usageLimit", "isUnlimited", "enumValues"}
    unknown = sorted(set(raw) - known)
    _expect(not unknown, where, f"unknown key {unknown[0]!r}" if unknown else "")
    has_access = raw.get("hasAccess", False)
    _expect(isinstance(has_access, bool), f"{where}.hasAccess", "must be true or false")
    value = raw.get("value")
    if value is not None:
        _expect(
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and float(value).is_integer()
            and abs(value) <= _INT32_MAX,
            f"{where}.value",
            "must be a whole number that fits in 32 bits",
        )
        value = int(value)
    usage_limit = raw.get("usageLimit")
    if usage_limit is not None:
        _expect(
            isinstance(usage_limit, (int, float))
            and not isinstance(usage_limit, bool)
            and math.isfinite(usage_limit),
            f"{where}.usageLimit",
            "must be a finite number",
        )
        usage_limit = float(usage_limit)
    is_unlimited = raw.get("isUnlimited")
    _expect(
        is_unlimited is None or isinstance(is_unlimited, bool),
        f"{where}.isUnlimited",
        "must be true or false",
    )
    enum_values = raw.get("enumValues", [])
    _expect(
        isinstance(enum_values, list) and all(isinstance(v, str) for v in enum_values),
        f"{where}.enumValues",
        "must be a list of strings",
    )
    return FallbackValues(
        has_access=has_access,
        value=value,
        usage_limit=usage_limit,
        is_unlimited=is_unlimited,
        enum_values=tuple(enum_values),
    )


def parse_entitlements_fallback(text: str) -> Mapping[str, FallbackValues]:
    """Parse ENTITLEMENTS_FALLBACK. An empty string means no fallbacks. Errors name the place
    inside the value (`sso.value: ...`), not the setting."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise FallbackError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    # The setting's name is the caller's to add (settings prefixes every message with it).
    if not isinstance(raw, dict):
        raise FallbackError("must be a JSON object of featureId -> values")
    parsed = {}
    for feature_id, values in raw.items():
        if not feature_id:
            raise FallbackError("a feature id is empty")
        parsed[feature_id] = parse_fallback_values(feature_id, values)
    return parsed
