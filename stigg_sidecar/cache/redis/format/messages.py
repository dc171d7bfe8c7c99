"""The pub/sub payloads: a peer's change notification and a fetch-lock holder's outcome."""

from __future__ import annotations

import json
from typing import Any

from stigg_sidecar.cache.redis.format.encode import dumps


def encode_change(cache_key: str, instance: str, kind: str) -> str:
    """A peer notification: `kind` is "entry", "usage" or "purge"."""
    return dumps({"key": cache_key, "instance": instance, "kind": kind})


def decode_change(text: Any) -> tuple[str, str, str] | None:
    """(key, instance, kind) of a peer notification, or None when it is not one."""
    try:
        message = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(message, dict):
        return None
    fields = message.get("key"), message.get("instance"), message.get("kind")
    if not all(isinstance(f, str) for f in fields):
        return None
    return fields  # type: ignore[return-value]


def encode_fetch_result(error: str | None) -> str:
    """What the fetch-lock holder publishes: `{}` on success, `{"error": msg}` on failure."""
    return "{}" if error is None else dumps({"error": error})


def fetch_succeeded(text: Any) -> bool:
    """Whether a fetch-channel message reports success (`{}`; anything with "error" is failure)."""
    try:
        message = json.loads(text)
    except (TypeError, ValueError):
        return False
    return isinstance(message, dict) and message.get("error") is None
