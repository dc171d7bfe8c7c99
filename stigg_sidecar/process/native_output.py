"""grpc-core's own output, routed through the sidecar's log.

grpc-core (C++) logs with absl straight to file descriptor 2, in glog's format
(`E1205 22:38:56.634854   13025 posix_engine_listener.cc:164] File descriptor limit reached.`),
outside LOG_FORMAT and LOG_LEVEL. `route_native_output` points descriptor 2 at a pipe whose lines a
thread turns into log events (severity E, W, I to error, warn, debug), one per distinct message per
`_REPEAT_INTERVAL` with a count of the repeats; Python's own `sys.stderr` (and `sys.__stderr__`)
keep the original stream, so start-up errors and tracebacks are written as before. Used by twistd's process only
(`tap.makeService`), never by a sidecar built inside a test.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable

from twisted.logger import Logger, LogLevel

from stigg_sidecar.lifecycle.reactor import IReactor

log = Logger(namespace="stigg_sidecar.grpc_core")

_GLOG = re.compile(r"^([EWIF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] ?(.*)$")
_LEVELS = {"E": LogLevel.error, "F": LogLevel.critical, "W": LogLevel.warn, "I": LogLevel.debug}
# The same message again within this many seconds is counted, not logged (grpc-core retries once a second).
_REPEAT_INTERVAL = 60.0
_MAX_LINE = 2000


class NativeLines:
    """Turns lines of native output into log events, repeats folded into a count."""

    def __init__(self, emit: Callable[..., None], clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # message -> (logged at, repeats since)

    def line(self, text: str) -> None:
        text = text.rstrip("\n")[:_MAX_LINE]
        if not text.strip():
            return
        match = _GLOG.match(text)
        level, where, message = (_LEVELS[match.group(1)], match.group(2), match.group(3)) if match else (
            LogLevel.warn, "", text)
        now = self._clock()
        logged_at, repeats = self._last.get(message, (None, 0))
        if logged_at is not None and now - logged_at < _REPEAT_INTERVAL:
            self._last[message] = (logged_at, repeats + 1)
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[message] = (now, 0)
        more = f" ({repeats} more times since)" if repeats else ""
        self._emit(level, "grpc-core: {message}{more}", message=message, where=where, more=more)


def route_native_output(reactor: IReactor) -> None:
    """Point descriptor 2 at a pipe read into the log; `sys.stderr` keeps the original stream."""
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # Both: start-up errors go to sys.__stderr__ (twistd may point sys.stderr at the log).
    stream = open(original, "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stderr = stream
    sys.__stderr__ = stream  # type: ignore[misc]
    lines = NativeLines(lambda level, fmt, **kw: reactor.callFromThread(log.emit, level, fmt, **kw))

    def read() -> None:
        with open(read_end, encoding="utf-8", errors="replace") as pipe:
            for text in pipe:
                lines.line(text)

    # Started with the reactor: a daemonizing twistd forks after this (threads do not survive a
    # fork), and until then the pipe holds what grpc-core writes.
    reactor.callWhenRunning(threading.Thread(target=read, name="native-log", daemon=True).start)
