"""Test fixtures: the sidecar as a real process, and gRPC calls as Deferreds.

Everything binds 127.0.0.1 with port 0; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
_GRPC_LINE = re.compile(r"gRPC listening on [^ ]+:(\d+)")
_HTTP_LINE = re.compile(r"HTTP listening on [^ ]+:(\d+)")
_RUNNING_LINE = re.compile(r"stigg-sidecar running")


def base_env(**overrides: str) -> dict[str, str]:
    """A clean environment for a sidecar process: loopback, free ports, no inherited settings."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), BIND_ADDRESS="127.0.0.1", PORT="0", HTTP_PORT="0", PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def twistd_command(plugin: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", plugin, *args]


def run_twistd(plugin: str, env: Mapping[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run twistd to completion (for start-up failures and --help), bounded by `timeout`."""
    return subprocess.run(
        twistd_command(plugin, *args), env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class DrainedProcess:
    """A child process whose combined output a thread drains for its whole life, kept in `output`.

    Reading a buffered text pipe behind a selector misses lines already read ahead, and an
    undrained pipe stalls the child."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path = ROOT) -> None:
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _collect(self) -> None:
        """Move the lines read so far into `output`."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.output.append(line)

    def wait_for(self, pattern: re.Pattern | str, timeout: float) -> re.Match:
        """Read lines until one matches `pattern`; fail after `timeout` seconds or on exit."""
        if isinstance(pattern, str):
            pattern = re.compile(pattern)
        for line in self.output:
            if (m := pattern.search(line)) is not None:
                return m
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if (m := pattern.search(line)) is not None:
                return m
        self._waited_in_vain()
        raise AssertionError(f"no {pattern.pattern!r} within {timeout}s; output:\n{self.text}")

    def _waited_in_vain(self) -> None:
        """What `wait_for` does before failing."""

    @property
    def text(self) -> str:
        return "".join(self.output)


class SidecarProcess(DrainedProcess):
    """`twistd -n stigg-sidecar` as a child process; ports read from its log."""

    def __init__(self, env: Mapping[str, str], *args: str, timeout: float = 30) -> None:
        super().__init__(twistd_command("stigg-sidecar", *args), env)
        self.wait_for(_RUNNING_LINE, timeout)
        self.grpc_port = int(self.wait_for(_GRPC_LINE, 0).group(1))
        http = next((m for m in map(_HTTP_LINE.search, self.output) if m), None)
        self.http_port = int(http.group(1)) if http else None

    def _waited_in_vain(self) -> None:
        self.kill()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process, wait for it to exit and collect the rest of its output."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        self._collect()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        self._collect()


def run_async(coroutine: Any, timeout: float = 30) -> Any:
    """Run an asyncio coroutine (the official client is asyncio) to completion, bounded."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def until(predicate, timeout: float, what: str) -> None:
    """Wait on the global reactor, polling every 50 ms, until `predicate()` holds; fail naming
    `what` after `timeout` seconds."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await deferLater(reactor, 0.05, lambda: None)


def sidecar_with_stub(testcase, env: Mapping[str, str]) -> SidecarProcess:
    """A sidecar process with a SidecarService stub on `.stub`, both cleaned up with `testcase`."""
    import grpc

    from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

    process = SidecarProcess(env)
    testcase.addCleanup(process.kill)
    channel = grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}")
    testcase.addCleanup(channel.close)
    process.stub = SidecarServiceStub(channel)  # type: ignore[attr-defined]
    return process


async def until_ready(process: SidecarProcess, timeout: float = 20) -> None:
    """Wait until the process's /readyz answers 200."""
    import urllib.request

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{process.http_port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    await until(up, timeout, "readiness")


def grpc_deferred(reactor, future) -> Deferred:
    """A grpc Future as a Deferred fired on the reactor thread: lets in-reactor tests call gRPC
    without blocking the reactor that the sidecar's cache runs on."""
    d: Deferred = Deferred()

    def done(f):
        try:
            result = f.result()
        except Exception as e:  # grpc.RpcError included
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)

    future.add_done_callback(done)
    return d


_SHARED: dict[str, SidecarProcess] = {}


def shared_sidecar(name: str, env: Mapping[str, str]) -> SidecarProcess:
    """One sidecar process per name for the whole test run (trial has no setUpClass), stopped at exit."""
    if name not in _SHARED:
        import atexit

        process = SidecarProcess(env)
        _SHARED[name] = process
        atexit.register(process.stop)
    return _SHARED[name]


def http_client(testcase, reactor):
    """A treq client whose connections are closed when the test ends (trial checks for leftovers)."""
    from treq.client import HTTPClient
    from twisted.internet.task import deferLater
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)

    def close():
        d = pool.closeCachedConnections()
        # let the server side see the close before trial inspects the reactor
        d.addCallback(lambda _: deferLater(reactor, 0.01, lambda: None))
        return d

    testcase.addCleanup(close)
    return HTTPClient(Agent(reactor, pool=pool))


class OnlineHarness:
    """An emulator and an online sidecar, both in this process's reactor on 127.0.0.1:0, and a
    grpcio client whose calls return Deferreds (so the reactor keeps serving the sidecar)."""

    def __init__(self, testcase, reactor) -> None:
        self.testcase = testcase
        self.reactor = reactor

    async def start(
        self,
        data: dict | None,
        api_key: str = "test-key",
        seed: int | None = None,
        emulator=None,
        realtime: bool = False,
        **settings: str,
    ):
        """Start an emulator seeded with `data` (or share `emulator`) and a sidecar against it;
        `realtime` turns the WebSocket on."""
        from random import Random

        import grpc

        from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
        from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
        from stigg_sidecar.process.assembly import assemble
        from stigg_sidecar.settings import load_settings

        if emulator is None:
            emulator = await start_emulator(self.reactor, data, random=Random(seed) if seed is not None else None)
            self.testcase.addCleanup(stop_emulator, emulator)
        self.emulator = emulator
        env = {
            "SERVER_API_KEY": api_key,
            "API_URL": self.emulator.url,
            "EDGE_API_URL": self.emulator.url,
            "WS_ENABLED": "1" if realtime else "0",
            "WS_URL": self.emulator.url.replace("http://", "ws://"),
            "BIND_ADDRESS": "127.0.0.1",
            "PORT": "0",
            "HTTP_PORT": "0",
            "SHUTDOWN_GRACE_SECS": "0.5",
            "ENTITLEMENTS_TIMEOUT_MS": "2000",
        }
        env.update(settings)
        self.settings = load_settings(env)
        assembled = assemble(self.settings, self.reactor)
        self.sidecar = assembled.service
        self.parts = assembled.parts
        self.sidecar.privilegedStartService()
        self.sidecar.startService()
        self.testcase.addCleanup(self.sidecar.stopService)
        self.grpc_port = self.parts.grpc.port
        self.http_port = self.parts.http.port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.testcase.addCleanup(self.channel.close)
        self.stub = SidecarServiceStub(self.channel)
        self.http = http_client(self.testcase, self.reactor)
        return self

    def call(self, method: str, request, timeout: float = 10) -> Deferred:
        return self.call_stub(getattr(self.stub, method), request, timeout)

    def call_stub(self, multicallable, request, timeout: float = 10) -> Deferred:
        return grpc_deferred(self.reactor, multicallable.future(request, timeout=timeout))

    async def admin(self, verb: str, path: str, body=None):
        import json

        response = await self.http.request(
            verb, f"{self.emulator.url}/_emulator/{path}", data=None if body is None else json.dumps(body).encode()
        )
        text = await response.text()
        return response.code, (json.loads(text) if text else None)

    async def readiness(self):
        response = await self.http.get(f"http://127.0.0.1:{self.http_port}/{self.settings.ready_endpoint_url}")
        import json

        return response.code, json.loads(await response.text())

    async def wait_until(self, predicate, timeout: float = 10, interval: float = 0.05):
        """Poll an async predicate until true; fail after `timeout` seconds (reactor time)."""
        from twisted.internet.task import deferLater

        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            if await predicate():
                return
            await deferLater(self.reactor, interval, lambda: None)
        raise AssertionError(f"condition not met within {timeout}s")

    async def requests(self) -> dict:
        return (await self.admin("GET", "requests"))[1]

    async def faults(self, **faults):
        code, body = await self.admin("POST", "faults", faults)
        assert code == 200, body
