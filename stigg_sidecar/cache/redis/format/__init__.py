"""Stigg's Redis format for one cache entry: the key names and the JSON under each key.

Owns the names (entry keys, `#timestamp` siblings, the fetch lock and its channel, the peer
changes channel) and the conversion between a `CustomerEntry` and the values stored in Redis,
in the shape Stigg's own SDKs share: what Node SDK 3.x writes and reads, plus the fields that
@stigg/cache-redis-store 1.29 (Node SDK 4.x, persistent-cache-service) migrates 3.x entries to,
so both generations read what this sidecar writes, and it reads what either writes.
docs/redis-format.md describes every key and field. Pure: no I/O, no clock, no logging. The
connection, the newer-wins scripts and the miss rules that need Redis live beside it in
`cache/redis/` (mirror.py, scripts.py).

One entry is stored as (STIGG_REFERENCE §3.3), with `B = {prefix}:{cache_key}`:

- `B`             {refId: {"calculatedEntitlement": {...}, "featureUsage": {...}}, ...}
- `B:metadata`    {"accessDeniedReason": ...}
- `B:f_{id}`      {"currentUsage", "usagePeriodStart", "usagePeriodEnd"} per metered feature
- `B:credit_{id}` the same shape per credit entitlement
- `<key>#timestamp`  epoch ms of the value beside it; usage times live only there.

The package is the one place of the format; its modules are `names` (keys, channels, errors),
`encode`, `decode` and `messages` (the pub/sub payloads). Import from the package.
"""

from __future__ import annotations

from stigg_sidecar.cache.redis.format.decode import (
    StoredEntitlements,
    decode_entitlements,
    decode_entry,
    decode_from,
    decode_timestamp,
)
from stigg_sidecar.cache.redis.format.encode import (
    Item,
    credit_record_key,
    dumps,
    encode_entry,
    encode_usage,
    is_usage_tracked,
)
from stigg_sidecar.cache.redis.format.messages import (
    decode_change,
    encode_change,
    encode_fetch_result,
    fetch_succeeded,
)
from stigg_sidecar.cache.redis.format.names import (
    CREDIT,
    FEATURE,
    TIMESTAMP_SUFFIX,
    EntryKeys,
    FormatError,
    LegacyFormat,
    MissingUsage,
    changes_channel,
    timestamp_key,
    usage_ref,
)

__all__ = [
    "CREDIT",
    "FEATURE",
    "TIMESTAMP_SUFFIX",
    "EntryKeys",
    "FormatError",
    "Item",
    "LegacyFormat",
    "MissingUsage",
    "StoredEntitlements",
    "changes_channel",
    "credit_record_key",
    "decode_change",
    "decode_entitlements",
    "decode_entry",
    "decode_from",
    "decode_timestamp",
    "dumps",
    "encode_change",
    "encode_entry",
    "encode_fetch_result",
    "encode_usage",
    "fetch_succeeded",
    "is_usage_tracked",
    "timestamp_key",
    "usage_ref",
]
