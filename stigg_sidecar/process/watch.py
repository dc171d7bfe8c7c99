"""FileWatcher: notice that files were replaced or rewritten, by polling them on the reactor.

Owns one LoopingCall on an injected clock that stats a few paths every `interval` seconds and calls
`on_change()` once per poll when any path's identity (device, inode, size, modification time; or
its absence) differs from the last poll. Follows symbolic links, so a Kubernetes Secret volume's
atomic `..data` swap counts as a change of every file in it. Never reads the files: what a change
means (re-reading, validating, keeping the last good content) is `on_change`'s business.

Polling rather than inotify: it works on every filesystem (Secret volumes, bind mounts, overlay),
costs a few stat calls a second, and a test drives it with `twisted.internet.task.Clock`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

# How often watched files are looked at: a rotated certificate or a changed token file is in use
# within about this long.
WATCH_INTERVAL_SECS = 1.0

Identity = tuple[int, int, int, int] | None


def identity(path: str) -> Identity:
    """What distinguishes one version of the file at `path` from the next (None: cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatcher(Service):
    """Call `on_change()` on the reactor when any of `paths` changes; poll every `interval` seconds.

    The files' identities are taken at construction, so build the watcher before reading the files
    the first time: a change in between is then noticed at the first poll.
    """

    def __init__(
        self,
        clock: IReactorTime,
        paths: Sequence[str],
        on_change: Callable[[], object],
        interval: float = WATCH_INTERVAL_SECS,
        name: str | None = None,
    ) -> None:
        self._paths = tuple(paths)
        self._on_change = on_change
        self._interval = interval
        self._seen = self._identities()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        if name is not None:
            self.name = name

    def _identities(self) -> tuple[Identity, ...]:
        return tuple(identity(path) for path in self._paths)

    def poll(self) -> bool:
        """Look at the files now; True (after calling `on_change`) when they changed."""
        seen = self._identities()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            self._on_change()
        except Exception:
            # on_change keeps its last good state and logs; this is a backstop so one bad change
            # never stops the watching.
            log.failure("reacting to a change of {paths} failed", paths=", ".join(self._paths))
        return True

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
