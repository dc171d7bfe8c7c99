"""Stigg's Redis names for one entry: keys, `#timestamp` siblings, the fetch lock and its channel,
the peer changes channel; and the errors a read of the format raises (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

from stigg_sidecar.entitlements.records import cache_key

TIMESTAMP_SUFFIX = "#timestamp"
FEATURE = "FEATURE"
CREDIT = "CREDIT"

_FETCH = "refetchEntityEntitlementsAfterCacheMiss"


class FormatError(ValueError):
    """A stored value cannot be read (not JSON, or not Stigg's shape); the message names the
    place. The read is a miss."""


class LegacyFormat(FormatError):
    """The entitlements key holds this project's earlier `{"v": 1, ...}` envelope: a miss, and
    the refetch's write replaces it."""


class MissingUsage(LookupError):
    """A usage-tracked record's usage key (or its `#timestamp`) is missing: the read is a miss."""



def timestamp_key(key: str) -> str:
    return key + TIMESTAMP_SUFFIX


def usage_ref(kind: str, ref_id: str) -> str:
    """The suffix of a usage key: `f_{featureId}` or `credit_{currencyId}`."""
    if kind == FEATURE:
        return f"f_{ref_id}"
    if kind == CREDIT:
        return f"credit_{ref_id}"
    raise ValueError(f"unknown usage kind {kind!r} (FEATURE or CREDIT)")


def changes_channel(prefix: str) -> str:
    """The pub/sub channel on which sidecars announce the entries they changed."""
    return f"{prefix}:sidecar:changes"


@dataclass(frozen=True, slots=True)
class EntryKeys:
    """Every Redis name that belongs to one customer (or customer+resource) entry."""

    prefix: str
    customer_id: str
    resource_id: str | None = None

    @property
    def cache_key(self) -> str:
        return cache_key(self.customer_id, self.resource_id)

    @property
    def entitlements(self) -> str:
        return f"{self.prefix}:{self.cache_key}"

    @property
    def metadata(self) -> str:
        return f"{self.entitlements}:metadata"

    def usage(self, kind: str, ref_id: str) -> str:
        return f"{self.entitlements}:{usage_ref(kind, ref_id)}"

    @property
    def customer_timestamp(self) -> str:
        """The `#timestamp` of the customer-level entry (Stigg's "global" entry)."""
        return timestamp_key(f"{self.prefix}:{cache_key(self.customer_id, None)}")

    @property
    def _entity(self) -> str:
        return f"{self.customer_id}:{self.resource_id}" if self.resource_id else self.customer_id

    @property
    def fetch_lock(self) -> str:
        return f"{self.prefix}:{_FETCH}-{self._entity}"

    @property
    def fetch_channel(self) -> str:
        return f"{self.prefix}:{_FETCH}:{self._entity}"

