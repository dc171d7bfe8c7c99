"""How the mirror reads one entry: the keys it asks for, and the miss rules that need Redis.

The entitlements key, its metadata and `#timestamp` (and, for a resource, the customer-level
entry's `#timestamp`: Stigg's rule §3.4 Read 3) in one script (an MGET behind a size check: a
value past `max_bytes` is a miss and never leaves Redis), then every usage key the records name in
an MGET; `format` decodes what comes back. An entry stamped past `trusted_until` (the future,
beyond a small skew) is a miss: planted, or written by a clock far ahead. A value over
OFFLOAD_BYTES is decoded by `offload` (a thread), not on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from stigg_sidecar.cache.redis.format import (
    EntryKeys,
    FormatError,
    MissingUsage,
    decode_entitlements,
    decode_entry,
    decode_timestamp,
    timestamp_key,
)
from stigg_sidecar.cache.redis.scripts import READ
from stigg_sidecar.entitlements.records import CustomerEntry

# Entitlements values larger than this (bytes) are decoded off the reactor: parsing JSON of a few
# MB holds the thread that answers every call for tens of milliseconds and more.
OFFLOAD_BYTES = 64 * 1024

Offload = Callable[..., Deferred]


@inlineCallbacks
def read_entry(
    p: Any, keys: EntryKeys, require_customer_entry: bool, unreadable: Callable[[str, FormatError], None],
    max_bytes: int = 1 << 62, trusted_until: int = 1 << 62, offload: Offload | None = None,
) -> Generator[Deferred, Any, CustomerEntry | None]:
    """The entry under `keys` through the connection `p` (two round trips at most), or None on a
    miss (see `RedisMirror.read`). An unreadable entry (too large included) is handed to
    `unreadable` and misses."""
    names = [keys.entitlements, keys.metadata, timestamp_key(keys.entitlements)]
    check_customer = bool(keys.resource_id) and require_customer_entry
    if check_customer:
        names.append(keys.customer_timestamp)
    values = yield p.eval(READ, names, [str(max_bytes)])
    if isinstance(values, int):
        unreadable(keys.entitlements, FormatError(f"{values} bytes, over the {max_bytes} read"))
        return None
    text, metadata, stamp = values[0], values[1], values[2]
    if text is None or stamp is None:
        return None
    try:
        entry_stamp = _trusted_stamp(stamp, values[3] if check_customer else None, check_customer, trusted_until)
        if entry_stamp is None:
            return None
        thread = offload if offload is not None and len(text) > OFFLOAD_BYTES else None
        if thread is not None:
            stored = yield thread(decode_entitlements, text, entry_stamp)
        else:
            stored = decode_entitlements(text, entry_stamp)
        usages = yield _usages(p, keys, stored.usage_refs)
        if thread is not None:
            return (yield thread(decode_entry, keys.customer_id, keys.resource_id, stored, metadata, stamp, usages))
        return decode_entry(keys.customer_id, keys.resource_id, stored, metadata, stamp, usages)
    except MissingUsage:
        return None
    except FormatError as e:
        unreadable(keys.entitlements, e)
        return None


def _trusted_stamp(stamp: Any, customer_stamp: Any, check_customer: bool, trusted_until: int) -> int | None:
    """The entry's `#timestamp`, or None when the read is a miss by its stamps: stamped in the
    future (not trusted; a write of Stigg's answer replaces it), or a resource whose customer-level
    entry is missing or newer."""
    entry_stamp = decode_timestamp(stamp, "#timestamp")
    if entry_stamp > trusted_until:
        return None
    if check_customer and (customer_stamp is None
                           or decode_timestamp(customer_stamp, "customer #timestamp") > entry_stamp):
        return None
    return entry_stamp


@inlineCallbacks
def _usages(p: Any, keys: EntryKeys, refs: Any) -> Generator[Deferred, Any, dict[str, tuple[Any, Any]]]:
    """Every usage key the records name, with its `#timestamp`, in one MGET."""
    if not refs:
        return {}
    names: list[str] = []
    for ref in refs:
        names.extend((f"{keys.entitlements}:{ref}", timestamp_key(f"{keys.entitlements}:{ref}")))
    values = yield p.execute_command("MGET", *names)
    return {ref: (values[2 * i], values[2 * i + 1]) for i, ref in enumerate(refs)}
