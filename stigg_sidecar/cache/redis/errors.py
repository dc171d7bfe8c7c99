"""The mirror's error policy: every failed call counted (`count`, the `errors` metric), each
kind logged once per connection, an unreadable key at most once per `FORMAT_LOG_INTERVAL`; a
call that fails is a miss or a skipped write, never an exception. Logged texts are scrubbed of
the passwords (ARCHITECTURE 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet import error as net_error
from twisted.internet.defer import TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar.cache.redis.format import FormatError, LegacyFormat

log = Logger()

FORMAT_LOG_INTERVAL = 300.0  # seconds between two log lines about the same unreadable key
_FORMAT_LOG_KEYS = 1000  # unreadable keys remembered for that, at most


class RedisErrors:
    """Counts and logs the mirror's failures; `secrets` never reach a line."""

    def __init__(self, reactor: IReactorTime, secrets: Sequence[str], timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.count = 0
        self._secrets = tuple(s for s in secrets if s)
        self._logged: set[str] = set()  # error kinds already logged since the last connect
        self._format_logged: dict[str, float] = {}  # unreadable key -> when it was last logged

    def unreadable(self, key: str, error: FormatError) -> None:
        """Count an entry that cannot be read (a miss) and log it at most once per key per
        `FORMAT_LOG_INTERVAL`: a fleet reading one bad key must not flood the log."""
        self.count += 1
        now = self.reactor.seconds()
        last = self._format_logged.get(key)
        if last is not None and now - last < FORMAT_LOG_INTERVAL:
            return
        if len(self._format_logged) >= _FORMAT_LOG_KEYS:
            self._format_logged = {k: t for k, t in self._format_logged.items() if now - t < FORMAT_LOG_INTERVAL}
        if len(self._format_logged) >= _FORMAT_LOG_KEYS:
            return  # more bad keys than worth a line each within one interval
        self._format_logged[key] = now
        if isinstance(error, LegacyFormat):
            log.warn(
                "Redis key {key} holds this sidecar's earlier format; treated as a miss, and the "
                "refetch writes it in Stigg's format",
                key=key,
            )
        else:
            log.warn(
                "Redis key {key} holds an entry this sidecar cannot read ({error}); treated as a miss",
                key=key,
                error=self.scrub(str(error)),
            )

    def failed(self, failure: Failure) -> str | None:
        """Count a failed call and log its kind once; "timeout", or the error code Redis
        answered (e.g. "READONLY"), for the mirror to act on; None otherwise."""
        self.count += 1
        if failure.check(TimeoutError, txredisapi.TimeoutError):
            self.log_once(
                "timeout",
                "Redis did not answer within {ms} ms (REDIS_TIMEOUT_MS); such reads miss and writes "
                "are skipped (counted, not logged again until it reconnects)",
                ms=int(self.timeout * 1000),
            )
            return "timeout"
        if failure.check(txredisapi.ResponseError):
            text = self.scrub(str(failure.value))
            code = text.split(" ", 1)[0] if text else "error"
            self.log_once(
                code,
                "Redis answered an error ({error}); the call was skipped (further {code} errors are "
                "counted, not logged)",
                error=text,
                code=code,
            )
            return code
        if failure.check(FormatError):
            self.log_once(
                "format",
                "Redis holds an entry this sidecar cannot read ({error}); treated as a miss",
                error=self.scrub(str(failure.value)),
            )
        elif not failure.check(txredisapi.ConnectionError, net_error.ConnectionLost, net_error.ConnectionDone):
            self.log_once(
                type(failure.value).__name__,
                "Redis call failed unexpectedly ({error}); treated as a miss",
                error=self.scrub(failure.getErrorMessage()),
            )
        return None

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced by `***`."""
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def log_once(self, kind: str, format: str, **fields: Any) -> None:
        """Log a warning for the first error of `kind` since the last (re)connect."""
        if kind not in self._logged:
            self._logged.add(kind)
            log.warn(format, **fields)

    def reconnected(self) -> None:
        """The command link is up again: each kind of error is worth a line again."""
        self._logged.clear()
