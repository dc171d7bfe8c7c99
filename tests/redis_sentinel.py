"""Test fixture: a real Redis master, its replica and a `redis-sentinel` watching them.

`SentinelGroup().start()` starts a master and a replica (`RedisServer`, 127.0.0.1, free ports)
and one Sentinel monitoring the master as `MASTER_NAME` with quorum 1, a short
`down-after-milliseconds` (1 s: short, yet long enough that a loaded machine's pauses are not
taken for a dead master) and failover timeout, so that killing the master promotes the replica
within about two seconds. `master_address()` asks the Sentinel, as a client would.

Like `redis_server.find_redis_server`, a missing `redis-sentinel` skips the test, except when
the CI environment variable is set: there it fails (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import SkipTest

from tests.redis_server import RedisError, RedisServer, _encode, _read_reply, free_port

MASTER_NAME = "sidecar-master"


def find_redis_sentinel() -> str:
    binary = shutil.which("redis-sentinel")
    if binary is not None:
        return binary
    if os.environ.get("CI"):
        raise AssertionError("redis-sentinel is not on PATH, and CI is set: install redis-sentinel")
    raise SkipTest("redis-sentinel is not on PATH (install it to run the Sentinel tests)")


class SentinelProcess:
    def __init__(
        self, master_port: int, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, password: str | None = None
    ) -> None:
        """`password` sets the Sentinel's own `requirepass` (clients then AUTH to ask it)."""
        self.binary = find_redis_sentinel()
        self.password = password
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="redis-sentinel-test-")
        self.dir = Path(self._dir.name)
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> SentinelProcess:
        config = self.dir / "sentinel.conf"  # Sentinel rewrites it: it must be its own file
        config.write_text(
            "\n".join([
                f"port {self.port}",
                "bind 127.0.0.1",
                f"dir {self.dir}",
                f"logfile {self.dir / 'sentinel.log'}",
                "daemonize no",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                *([f"requirepass {self.password}"] if self.password else []),
            ]) + "\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-sentinel exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.master_address() is not None:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-sentinel did not answer within {timeout}s: {self.log_tail()}")

    def command(self, *args: object, timeout: float = 2) -> object:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            replies = s.makefile("rb")
            if self.password:
                s.sendall(_encode(("AUTH", self.password)))
                _read_reply(replies)
            s.sendall(_encode(args))
            return _read_reply(replies)

    def master_address(self) -> tuple[str, int] | None:
        reply = self.command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return None if not reply else (str(reply[0]), int(reply[1]))  # type: ignore[index]

    def replicas_known(self) -> int:
        """Replicas the Sentinel could promote: seen, linked to the master, not down."""
        replicas = self.command("SENTINEL", "replicas", MASTER_NAME)
        ready = 0
        for fields in replicas if isinstance(replicas, list) else []:
            info = dict(zip(fields[::2], fields[1::2], strict=True))
            if info.get("flags") == "slave" and info.get("master-link-status") == "ok":
                ready += 1
        return ready

    def failover(self, timeout: float = 10) -> None:
        """`SENTINEL FAILOVER`, retried while the Sentinel has no fresh replica info yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.command("SENTINEL", "FAILOVER", MASTER_NAME)
                return
            except RedisError as e:
                if not str(e).startswith("NOGOODSLAVE") or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "sentinel.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class SentinelGroup:
    """A master, one replica of it, and a Sentinel watching them; `cleanup()` stops all three."""

    def __init__(self, sentinel_password: str | None = None) -> None:
        self.sentinel_password = sentinel_password
        self.master = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinel: SentinelProcess | None = None

    def start(self, timeout: float = 15) -> SentinelGroup:
        """Start all three, or none: a part that fails stops the ones already started (the
        caller has no group to clean up then)."""
        try:
            return self._start(timeout)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout: float) -> SentinelGroup:
        self.master.start()
        self.replica = RedisServer(
            extra_config=(f"replicaof 127.0.0.1 {self.master.port}", "replica-read-only yes")
        )
        self.replica.start()
        deadline = time.monotonic() + timeout
        while self.replica.command("INFO", "replication").find("master_link_status:up") < 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the master: " + self.replica.log_tail())
            time.sleep(0.05)
        self.sentinel = SentinelProcess(self.master.port, password=self.sentinel_password)
        self.sentinel.start()
        while self.sentinel.replicas_known() < 1:  # it learns of the replica from the master's INFO
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel did not discover the replica: " + self.sentinel.log_tail())
            time.sleep(0.05)
        return self

    def cleanup(self) -> None:
        for part in (self.sentinel, self.replica, self.master):
            if part is not None:
                part.cleanup()
