"""MalformedEntitlements: the entitlements Stigg sent malformed, counted and logged (reactor only).

Each is left out of its entry and answered by fallbacks (see `upstream.wire.entry_from_state`);
this says so once per customer per interval, naming at most a few problems, and counts them all
for `sidecar_upstream_malformed_entitlements_total`.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.quoting import clipped, quoted

log = Logger()

# Logged once per customer per interval (seconds), for at most this many customers remembered at
# once, naming at most this many items per line.
_LOG_INTERVAL = 60.0
_LOG_KEYS = 10_000
_LOG_ITEMS = 5


class MalformedEntitlements:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.count = 0
        self._logged: dict[str, float] = {}

    def seen(self, entry: CustomerEntry, throttled: bool = True) -> None:
        """Count the entitlements Stigg sent malformed in `entry` and say which and why: once per
        customer per interval, or every time when not `throttled` (a reload is someone asking
        what Stigg has)."""
        if not entry.malformed:
            return
        self.count += len(entry.malformed)
        key, now = entry.key, self._clock.seconds()
        logged = self._logged
        if throttled and logged.get(key, -math.inf) > now:
            return
        if len(logged) >= _LOG_KEYS:
            logged.clear()  # bounded: at worst a customer is logged again early
        logged[key] = now + _LOG_INTERVAL
        problems = "; ".join(clipped(m.problem) for m in entry.malformed[:_LOG_ITEMS])
        more = len(entry.malformed) - _LOG_ITEMS
        log.warn(
            "Stigg sent {n} malformed entitlement(s) for {customer}: {problems}{more}. Reads of those answer"
            " fallbacks; the customer's other entitlements are Stigg's data",
            n=len(entry.malformed),
            customer=quoted(entry.customer_id),
            problems=problems,
            more=f" (and {more} more)" if more > 0 else "",
        )
