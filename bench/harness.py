"""What the benchmarks share: their child processes (the emulator, the sidecar, the bare server,
the Node reference, i.e. Stigg's Node SDK behind grpc-js in bench/node, and the fast upstream),
the read driver, and readings of a process (RSS, CPU, the sidecar's metrics).

Owns starting each child as a real process (twistd or python, pinned to a core with taskset),
waiting for it to be ready under a deadline, reading its RSS, and stopping it: SIGTERM, a bounded
wait, then SIGKILL of its whole process group. `Children` stops everything it started on any exit,
including Ctrl-C and SIGTERM. Never touches a process it did not start.

Run the benchmarks from the repository root as modules (`python -m bench.grpc_load`): the
repository is then on `sys.path`, and `Children` hands it to every child as PYTHONPATH.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.seed import customer_id
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
START_TIMEOUT = 60.0  # seconds for a child to become ready (100k customers load slowly)
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL


class BenchError(RuntimeError):
    """Something the benchmark cannot go on from: a child failed, or an answer was wrong."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a child binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU-seconds `pid` has used (user + system), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def metrics(http_port: int, timeout: float = 10) -> dict[str, float]:
    """The sidecar's unlabelled Prometheus samples (name -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def wait_until(check: Callable[[], bool], timeout: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.popen.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.popen.returncode} while {what}:\n{child.tail()}")
        if check():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f}s {what}" + (f":\n{child.tail()}" if child else ""))


class Child:
    """One started process, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.stopped = False  # by us
        # Own session: a Ctrl-C at the terminal reaches only us, and we stop children in order.
        self.popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> None:
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        self._log.close()


class Children:
    """Context manager: every child started through it is stopped on exit, newest first."""

    def __init__(self) -> None:
        self._children: list[Child] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="stigg-bench-"))
        self.keep = False  # keep workdir (child logs, data, h2load logs) for a look afterwards

    def __enter__(self) -> Children:
        # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally clauses run; SIGINT is set
        # explicitly because a shell's background job starts with it ignored.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self._children):
            try:
                child.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: stopping {child.name}: {e!r}", file=sys.stderr)
        if self.keep or exc[0] is not None:
            print(f"(logs kept in {self.workdir})", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """`SIDECAR_SOURCE=DIR` in `env`: the child runs the code of another checkout (an A/B of
        two trees in one run, e.g. `grpc_load --variant 'before:SIDECAR_SOURCE=../main'`)."""
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = str(Path(child_env.pop("SIDECAR_SOURCE", REPO)).resolve())
        same = sum(1 for c in self._children if c.name == name)
        child = Child(name, argv, child_env, self.workdir / (f"{name}-{same}.log" if same else f"{name}.log"))
        self._children.append(child)
        return child

    def exited(self) -> str:
        """A line per child that has exited on its own (with its last output), or ""."""
        lines = []
        for child in self._children:
            code = child.popen.poll()
            if code is not None and not child.stopped:
                lines.append(f"{child.name} (pid {child.pid}) exited with {code}; last output:\n{child.tail(10)}")
        return "\n".join(lines)

    def path(self, name: str) -> Path:
        return self.workdir / name


def run_with_children(bench: Callable[..., int], *args: Any) -> int:
    """`bench(children, *args)` inside a Children context: on a BenchError the logs are kept and
    the reason printed (exit 1); Ctrl-C or SIGTERM stops the children (exit 130)."""
    with Children() as children:
        try:
            return bench(children, *args)
        except BenchError as e:
            children.keep = True
            print(f"\nABORTED: {e}", file=sys.stderr)
            if children.exited():
                print(children.exited(), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the children", file=sys.stderr)
            return 130


def exit_status(main: Callable[[], int]) -> int:
    """Run a benchmark's `main`: its status, 2 on a BenchError, 130 when interrupted."""
    try:
        return main()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _twistd() -> str:
    return str(Path(sys.executable).with_name("twistd"))


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)


# -- emulator ---------------------------------------------------------------------------------


def write_emulator_data(path: Path, customers: Mapping[str, Iterable[dict]]) -> None:
    """A data file with `customers` (id -> entitlements, in the emulator's compact form)."""
    data = {
        "apiKeys": [API_KEY],
        "customers": {cid: {"accessDeniedReason": None, "entitlements": list(ents)} for cid, ents in customers.items()},
    }
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))


def start_emulator(
    children: Children, data_path: Path, cpu: int | None, timeout: float = START_TIMEOUT
) -> tuple[Child, str]:
    """Start the emulator on a port it picks; return it and its base URL."""
    argv = pinned(cpu, [_twistd(), "-n", "--pidfile=", "stigg-emulator", "--port", "0", "--data", str(data_path)])
    child = children.start("emulator", argv)
    url: list[str] = []

    def listening() -> bool:
        for line in child.output().splitlines():
            if "stigg-emulator listening on " in line:
                url.append(line.rsplit(" ", 1)[1].strip())
                return True
        return False

    wait_until(listening, timeout, "waiting for the emulator to listen", child)
    return child, url[0]


# -- sidecar ----------------------------------------------------------------------------------


class Sidecar:
    """A started `twistd stigg-sidecar` and its ports."""

    def __init__(self, child: Child, grpc_port: int, http_port: int) -> None:
        self.child = child
        self.grpc_port = grpc_port
        self.http_port = http_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_sidecar(
    children: Children,
    cpu: int | None,
    api_url: str | None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> Sidecar:
    """Start the sidecar on free ports chosen here (LOG_LEVEL=warn hides its port lines) and wait
    for /readyz. `api_url=None` starts it OFFLINE."""
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STIGG_", "SERVER_API_KEY", "API_URL", "EDGE_", "WS_", "REDIS_", "OFFLINE", "CACHE_"))
    }
    env.update(
        PORT=str(grpc_port),
        HTTP_PORT=str(http_port),
        BIND_ADDRESS="127.0.0.1",
        WS_ENABLED="0",
        LOG_LEVEL="warn",
    )
    if api_url is None:
        env["OFFLINE"] = "1"
    else:
        env.update(SERVER_API_KEY=API_KEY, API_URL=api_url, EDGE_API_URL=api_url)
    env.update(extra_env or {})
    child = children.start("sidecar", pinned(cpu, [_twistd(), "-n", "--pidfile=", "stigg-sidecar"]), env)
    wait_until(lambda: _ready(http_port), timeout, "waiting for the sidecar's /readyz", child)
    return Sidecar(child, grpc_port, http_port)


# -- bare grpcio server -----------------------------------------------------------------------


def start_bare_server(
    children: Children, cpu: int | None, responses: Mapping[str, Path], timeout: float = START_TIMEOUT
) -> tuple[Child, int]:
    """Start `python -m bench.bare_server` answering the given serialized responses; return it and its port."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_server", "--port", str(port)]
    for method, path in responses.items():
        argv += ["--response", f"{method}={path}"]
    child = children.start("bare-server", pinned(cpu, argv))

    def listening() -> bool:
        return "bare gRPC listening on" in child.output()

    wait_until(listening, timeout, "waiting for the bare server to listen", child)
    return child, port


# -- Node reference: Stigg's Node SDK behind grpc-js (bench/node) -----------------------------

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_INSTALL_TIMEOUT = 600.0


def _installed_as_locked() -> bool:
    """Every package of bench/node/package-lock.json is in node_modules at its locked version."""
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    for where, locked in lock.get("packages", {}).items():
        if not where or locked.get("optional") or locked.get("dev"):
            continue
        try:
            installed = json.loads((NODE_DIR / where / "package.json").read_text())
        except (OSError, ValueError):
            return False
        if str(installed.get("version")).lstrip("v") != str(locked.get("version")).lstrip("v"):
            return False  # (redlock's own package.json says "v5.0.0-beta2", its lock entry not)
    return True


def ensure_node_reference() -> None:
    """bench/node's packages installed exactly as locked: `npm ci` when any is missing or differs.

    Raises BenchError naming what to install if node or npm is not on PATH."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        raise BenchError(
            f"the Node reference needs {' and '.join(missing)} on PATH "
            "(Debian: apt-get install nodejs npm); or run with --no-node"
        )
    if _installed_as_locked():
        return
    print(f"installing the Node reference's packages: npm ci in {NODE_DIR}", flush=True)
    try:
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=NODE_INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"npm ci in {NODE_DIR} took over {NODE_INSTALL_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"npm ci in {NODE_DIR} failed ({done.returncode}):\n{done.stdout[-3000:]}")


class NodeReference:
    """A started bench/node/server.js: Stigg's Node SDK 3.95.0 answering the sidecar's gRPC API."""

    def __init__(self, child: Child, grpc_port: int, stats_port: int) -> None:
        self.child = child
        self.grpc_port = grpc_port
        self.stats_port = stats_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stats(self, timeout: float = 10) -> dict[str, float]:
        """The SDK's cache entries and its hit/miss counts since start, and the heap in use."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats", timeout=timeout) as r:
            return json.loads(r.read())


def _printed_address(child: Child, prefix: str) -> str | None:
    for line in child.output().splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def start_node_reference(
    children: Children,
    cpu: int | None,
    api_url: str,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> NodeReference:
    """Start bench/node/server.js against `api_url` (installing its packages first if needed) and
    wait until the SDK has initialized and gRPC listens; ports are picked by the server itself."""
    ensure_node_reference()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STIGG_", "NODE_OPTIONS"))}
    env.update(
        STIGG_API_KEY=API_KEY,
        STIGG_API_URL=api_url,
        PORT="0",
        STATS_PORT="0",
        BIND_ADDRESS="127.0.0.1",
        NODE_ENV="production",
    )
    env.update(extra_env or {})
    child = children.start("node-reference", pinned(cpu, ["node", str(NODE_DIR / "server.js")]), env)
    wait_until(
        lambda: _printed_address(child, "node reference listening on ") is not None,
        timeout,
        "waiting for the Node reference to listen",
        child,
    )
    grpc_address = _printed_address(child, "node reference listening on ") or ""
    stats_address = _printed_address(child, "node reference stats on ") or ""
    stats_port = int(stats_address.rsplit(":", 1)[1].split("/", 1)[0])
    return NodeReference(child, int(grpc_address.rsplit(":", 1)[1]), stats_port)


def start_fast_upstream(
    children: Children, cpu: int | None, responses: Path, timeout: float = START_TIMEOUT
) -> tuple[Child, str]:
    """Start bench/node/upstream.js serving the recorded answers in `responses`; return it and its
    base URL."""
    ensure_node_reference()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_OPTIONS")}
    env.update(RESPONSES=str(responses), PORT="0", BIND_ADDRESS="127.0.0.1", NODE_ENV="production")
    child = children.start("fast-upstream", pinned(cpu, ["node", str(NODE_DIR / "upstream.js")]), env)
    prefix = "fast upstream listening on "
    wait_until(lambda: _printed_address(child, prefix) is not None, timeout, "waiting for the upstream", child)
    return child, _printed_address(child, prefix) or ""


# -- the read driver --------------------------------------------------------------------------


class Reads:
    """GetBooleanEntitlement(feature-bool-0) for seeded customers, at most `concurrency` calls in
    flight on one stub, each bounded by `call_timeout`; with `report_every` N, also a ReportUsage
    of feature-api-calls for every Nth customer, in the same flight.

    Counts granted answers, fallbacks, RPC errors and usage reports (`reported`,
    `report_errors`, counted, never wrong: an outage refuses them). A denied answer without a
    fallback is wrong; so is a fallback with `fallbacks_wrong`, and an RPC error with
    `rpc_errors_wrong`. A wrong answer (kept in `errors`) aborts the run with a BenchError, as does
    a run past its timeout. Counts add up over several `run`s of one object."""

    def __init__(
        self,
        stub: SidecarServiceStub,
        concurrency: int,
        call_timeout: float,
        *,
        fallbacks_wrong: bool = False,
        rpc_errors_wrong: bool = True,
        report_every: int = 0,
        progress_every: int = 0,
    ) -> None:
        self._stub = stub
        self._slots = threading.Semaphore(concurrency)
        self._call_timeout = call_timeout
        self._fallbacks_wrong = fallbacks_wrong
        self._rpc_errors_wrong = rpc_errors_wrong
        self._report_every = report_every
        self._progress_every = progress_every
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Event()
        self._timeout = 0.0
        self.started = 0.0  # when the latest run made its first call
        self.answered = self.granted = self.fallbacks = self.rpc_errors = 0
        self.reported = self.report_errors = 0
        self.errors: list[str] = []

    def run(self, first: int, last: int, timeout: float, what: str = "the reads") -> float:
        """Read customers `first` .. `last - 1`; the seconds from the first call to the last answer."""
        started = self.started = time.monotonic()
        deadline = started + timeout
        self._timeout = timeout
        self._idle.clear()
        for i in range(first, last):
            request = pb.GetBooleanEntitlementRequest(customer_id=customer_id(i), feature_id="feature-bool-0")
            self._call(self._stub.GetBooleanEntitlement, request, functools.partial(self._read_done, i), deadline, what)
            if self._report_every and i % self._report_every == 0:
                report = pb.ReportUsageRequest(customer_id=customer_id(i), feature_id="feature-api-calls", value=1)
                self._call(self._stub.ReportUsage, report, self._report_done, deadline, what)
        with self._lock:
            if self._pending == 0:
                self._idle.set()
        if not self._idle.wait(max(0.0, deadline - time.monotonic())) or self.errors:
            raise BenchError(self._why(what))
        return time.monotonic() - started

    def _call(self, method: Any, request: Any, done: Callable[[grpc.Future], None], deadline: float, what: str) -> None:
        while not self._slots.acquire(timeout=1):
            if time.monotonic() > deadline or self.errors:
                raise BenchError(self._why(what))
        if self.errors:
            raise BenchError(self._why(what))
        with self._lock:
            self._pending += 1
            self._idle.clear()
        method.future(request, timeout=self._call_timeout).add_done_callback(done)

    def _why(self, what: str) -> str:
        if self.errors:
            return f"{len(self.errors)} errors or wrong answers in {what}, first: {self.errors[0]}"
        return f"{what} did not finish within {self._timeout:.0f}s ({self.answered:,} answered)"

    def _read_done(self, i: int, future: grpc.Future) -> None:
        wrong = None
        granted = fallback = rpc_error = 0
        try:
            r = future.result()
            if r.is_fallback:
                fallback = 1
                if self._fallbacks_wrong:
                    wrong = f"{customer_id(i)}: a fallback: {r}"
            elif r.has_access:
                granted = 1
            else:
                wrong = f"{customer_id(i)}: denied without a fallback: {r}"
        except grpc.RpcError as e:
            rpc_error = 1
            if self._rpc_errors_wrong:
                wrong = f"{customer_id(i)}: {e.code()} {e.details()}"
        with self._lock:
            self.granted += granted
            self.fallbacks += fallback
            self.rpc_errors += rpc_error
            self.answered += 1
            answered = self.answered
            if wrong is not None:
                self.errors.append(wrong)
        if self._progress_every and answered % self._progress_every == 0:
            print(f"  answered {answered:,}", flush=True)
        self._finish()

    def _report_done(self, future: grpc.Future) -> None:
        try:
            future.result()
            reported = 1
        except grpc.RpcError:
            reported = 0
        with self._lock:
            self.reported += reported
            self.report_errors += 1 - reported
        self._finish()

    def _finish(self) -> None:
        self._slots.release()
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()
