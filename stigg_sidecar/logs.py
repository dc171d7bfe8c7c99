"""Log output: twisted.logger events as text lines or JSON objects on stdout, filtered by level.

Owns formatting only. Secrets stay out by construction: no code passes a secret into a log event,
and settings objects hide them from repr.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from zope.interface import implementer

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
# Event keys that are twisted.logger's own bookkeeping, not fields worth printing.
_INTERNAL = {"log_logger", "log_source", "log_format", "log_flattened", "log_trace", "log_io", "log_time",
             "log_level", "log_namespace", "log_failure", "log_text", "log_system", "format", "message",
             "isError", "system", "time", "failure", "why"}


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


@implementer(ILogObserver)
class JsonLineObserver:
    """One JSON object per event: timestamp, level, namespace, message, fields."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {
            "timestamp": event.get("log_time"),
            "level": level.name if isinstance(level, type(LogLevel.info)) else str(level),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
            "fields": {k: _json_safe(v) for k, v in event.items() if k not in _INTERNAL and not k.startswith("log_")},
        }
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, default=repr) + "\n")
        self._out.flush()


@implementer(ILogObserver)
class TextLineObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            self._out.write(text)
            self._out.flush()


def make_observer(level: str, fmt: str, out: IO[str] | None = None) -> ILogObserver:
    stream = out if out is not None else sys.stdout
    base = JsonLineObserver(stream) if fmt == "json" else TextLineObserver(stream)
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])])
