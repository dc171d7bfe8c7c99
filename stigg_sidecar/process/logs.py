"""Log output: twisted.logger events as text lines or JSON objects on stdout, filtered by level.

Owns formatting only. A JSON line written inside a trace span carries its `trace_id` and
`span_id` (observers run on the thread that logs, so the current span is the logging code's),
which joins the logs to the traces. Secrets stay out by construction: no code passes a secret into a log event,
and settings objects hide them from repr. Input cannot inflate a line: code quotes caller input
through stigg_sidecar.quoting, and as a backstop every string field is clipped and every line is
bounded here, so a log line never carries megabytes whatever an event holds.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from opentelemetry import trace
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

from stigg_sidecar.quoting import clipped

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
# A string field longer than this is clipped (code quotes input to ~100 characters already).
_FIELD_LIMIT = 1000
# The longest line written, tracebacks included.
_LINE_LIMIT = 32 * 1024


def _bounded(event: dict) -> dict:
    """`event` with every long string field clipped (a copy only when one is)."""
    long = [k for k, v in event.items() if isinstance(v, str) and len(v) > _FIELD_LIMIT and not k.startswith("log_")]
    if not long:
        return event
    event = dict(event)
    for k in long:
        event[k] = clipped(event[k], _FIELD_LIMIT)
    return event


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
        event = _bounded(event)
        level = event.get("log_level", LogLevel.info)
        record = {
            "timestamp": event.get("log_time"),
            "level": level.name if isinstance(level, type(LogLevel.info)) else str(level),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
            "fields": {k: _json_safe(v) for k, v in event.items() if k not in _INTERNAL and not k.startswith("log_")},
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record["trace_id"] = f"{span.trace_id:032x}"
            record["span_id"] = f"{span.span_id:016x}"
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["error"] = clipped(failure.getErrorMessage(), _FIELD_LIMIT)
            record["traceback"] = clipped(failure.getTraceback(), _LINE_LIMIT)
        # (Never cut as a whole: a cut object is not JSON. Its parts are bounded instead.)
        self._out.write(json.dumps(record, default=repr) + "\n")
        self._out.flush()


@implementer(ILogObserver)
class TextLineObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        text = formatEventAsClassicLogText(_bounded(event))
        if text:
            if len(text) > _LINE_LIMIT:
                text = clipped(text, _LINE_LIMIT) + "\n"
            self._out.write(text)
            self._out.flush()


# Library lines an operator does want at info: the signal that began a shutdown.
_LIBRARY_INFO_KEPT = ("Received SIG",)
# Libraries whose warnings are about connections the sidecar reports itself, in its own words (the
# real-time socket): autobahn's "dropping connection to peer ... with abort=True: None" says nothing more.
_LIBRARY_WARNINGS_AT_DEBUG = ("autobahn.",)


def is_library_chatter(event: dict) -> bool:
    """An info line from a library (Twisted's factories, ports, retries, twistd's banner), not
    ours, or a warning from a library in `_LIBRARY_WARNINGS_AT_DEBUG`."""
    namespace = event.get("log_namespace") or ""
    if event.get("log_level") == LogLevel.warn:
        return namespace.startswith(_LIBRARY_WARNINGS_AT_DEBUG)
    if event.get("log_level") != LogLevel.info:
        return False
    if namespace == "stigg_sidecar" or namespace.startswith("stigg_sidecar."):
        return False
    text = event.get("log_format") or ""
    return not any(str(text).startswith(kept) for kept in _LIBRARY_INFO_KEPT)


@implementer(ILogObserver)
class LibraryChatterAtDebug:
    """Passes events on, with libraries' info lines (and some libraries' warnings) lowered to debug:
    info is what an operator needs."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: dict) -> None:
        if is_library_chatter(event):
            event = dict(event, log_level=LogLevel.debug)
        self._observer(event)


def make_observer(level: str, fmt: str, out: IO[str] | None = None) -> ILogObserver:
    stream = out if out is not None else sys.stdout
    base = JsonLineObserver(stream) if fmt == "json" else TextLineObserver(stream)
    return LibraryChatterAtDebug(FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])]))
