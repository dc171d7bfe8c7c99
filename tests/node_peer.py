"""Test fixture: Stigg's Node server SDK 3.95.0 as a real process (tests/node/peer.js).

`install()` runs `npm ci` in tests/node once (a file lock keeps parallel trial workers from
installing twice; only the npm registry is needed). `NodePeer(reactor).start()` spawns
`node peer.js` and speaks its line protocol: `request(op, **fields)` is a Deferred of the
result, failing with `PeerError` when the SDK threw; `events` collects what `listen` asked for.

Node is required: without `node`/`npm` on PATH the test fails (CI installs Debian's nodejs and
npm), it is never skipped.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred

NODE_DIR = Path(__file__).resolve().parent / "node"
SDK_VERSION = "3.95.0"
WAIT = 20.0  # seconds any one request may take


class PeerError(Exception):
    """The Node SDK threw (or the peer died); the message carries its stack or its stderr."""


def install() -> None:
    """`npm ci` in tests/node unless the SDK at SDK_VERSION is already there."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is not on PATH: install Debian's nodejs and npm (.ci/run does)")
    with open(NODE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = NODE_DIR / "node_modules" / "@stigg" / "node-server-sdk" / "package.json"
        if installed.exists() and json.loads(installed.read_text()).get("version") == SDK_VERSION:
            return
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise AssertionError(f"npm ci failed in {NODE_DIR}:\n{result.stdout}\n{result.stderr}")


class NodePeer(protocol.ProcessProtocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._buffer = b""
        self._next_id = 0
        self._pending: dict[int, Deferred] = {}
        self._ready: Deferred = Deferred()
        self._ended: Deferred = Deferred()
        self._exited = False

    async def start(self) -> NodePeer:
        install()
        node = shutil.which("node")
        assert node is not None
        # No `path`: Twisted then uses posix_spawn, not fork (a fork of this process, which runs
        # gRPC threads, can die in gRPC's fork handlers before it execs). Node resolves the SDK
        # from the script's own directory.
        self.reactor.spawnProcess(self, node, [node, str(NODE_DIR / "peer.js")], env=None)
        try:
            await self._ready.addTimeout(WAIT, self.reactor)
        except BaseException:
            await self.stop()  # the caller never gets the peer to stop: no orphan node left behind
            raise
        return self

    def request(self, op: str, **fields: Any) -> Deferred:
        if self._exited:
            raise PeerError(f"the Node peer has exited: {self.stderr_tail()}")
        self._next_id += 1
        d: Deferred = Deferred()
        self._pending[self._next_id] = d
        line = json.dumps({"id": self._next_id, "op": op, **fields}) + "\n"
        self.transport.write(line.encode())
        return d.addTimeout(WAIT, self.reactor)

    async def stop(self) -> None:
        if self._exited:
            return
        try:
            self.transport.closeStdin()  # peer.js exits when its input ends
        except Exception:
            pass
        try:
            await self._ended.addTimeout(5, self.reactor)
        except Exception:
            self.transport.signalProcess("KILL")
            await self._ended

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr.decode(errors="replace").splitlines()[-lines:])

    # -- ProcessProtocol -------------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._line(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def _line(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            if not self._ready.called:
                self._ready.callback(message)
        elif "event" in message:
            self.events.append(message)
        else:
            d = self._pending.pop(message.get("id"), None)
            if d is None or d.called:
                return
            if message.get("ok"):
                d.callback(message["result"])
            else:
                d.errback(PeerError(message.get("error")))

    def processEnded(self, reason: Any) -> None:
        self._exited = True
        failure = PeerError(f"the Node peer exited: {self.stderr_tail()}")
        if not self._ready.called:
            self._ready.errback(failure)
        for d in self._pending.values():
            if not d.called:
                d.errback(failure)
        self._pending.clear()
        self._ended.callback(None)
