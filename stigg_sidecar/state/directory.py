"""StateDirectory: STATE_DIR, created if missing and locked for the life of the process.

The lock is an exclusive `flock` on `STATE_DIR/lock`, taken without waiting when the sidecar is
built: a second sidecar on the same directory exits at start with one clear line instead of
sharing a spool it would corrupt or double-deliver. The kernel releases the lock when the process
ends, however it ends (kill -9 included), so a stale lock never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os


class StateDirectoryError(Exception):
    """STATE_DIR cannot be used; the message is one line naming the directory and the reason."""


class StateDirectory:
    LOCK_NAME = "lock"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock_fd: int | None = None

    def lock(self) -> StateDirectory:
        """Create the directory if missing and take its lock; raises StateDirectoryError."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.path, self.LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateDirectoryError(f"STATE_DIR {self.path} cannot be used: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirectoryError(
                f"STATE_DIR {self.path} is in use by another sidecar (pid {holder}); each sidecar needs its own"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)
