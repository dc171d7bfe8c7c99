"""The README's Quick start, run as typed in a clean clone: `scripts/run` (ports moved off the
defaults through PORT, HTTP_PORT and EMULATOR_PORT, as the README says), its CLI commands, and the
official client's snippet; then SIGTERM (and SIGINT) to scripts/run's own PID stops both children.

The clone is of the repository's HEAD commit (uncommitted changes are not in it), cleaned with
`git clean -ffdx` before each run but for `.venv`: the first run on a machine installs the locked
dependencies (about a minute, as for a user); later runs find `.venv` up to date, which
`scripts/venv` checks against the lock and the sources, as it does for a user's second run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.paths import ROOT
from tests.fixtures.processes import DrainedProcess

FIRST_START_TIMEOUT = 300  # a cold install on a loaded two-core machine
COMMAND_TIMEOUT = 60


def clone_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "stigg-sidecar-tests" / f"quickstart-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=120).stdout


class _Clone:
    """The clean clone of HEAD, made once per test run."""

    path: Path | None = None

    @classmethod
    def get(cls) -> Path:
        if cls.path is None:
            path = clone_dir()
            if not (path / ".git").is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["rm", "-rf", str(path)], check=True, timeout=120)
                git("clone", "-q", "--no-hardlinks", str(ROOT), str(path), cwd=path.parent)
            git("fetch", "-q", str(ROOT), "HEAD", cwd=path)
            git("checkout", "-q", "--force", "--detach", "FETCH_HEAD", cwd=path)
            git("clean", "-q", "-ffdx", "-e", ".venv", cwd=path)
            cls.path = path
        return cls.path


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def quick_start_blocks(language: str = "sh") -> list[list[str]]:
    """The ```sh blocks of the README's Quick start, as lists of command lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    return [
        [line for line in block.splitlines() if line.strip()]
        for block in re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    ]


def client_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Calling it from Stigg's official Python client", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class RunningScript(DrainedProcess):
    """`scripts/run` started as the README says, its output drained by a thread."""

    def __init__(self, clone: Path, line: str, env: dict[str, str]) -> None:
        # `bash -c` with one simple command execs it: this PID is scripts/run's own shell.
        super().__init__(["bash", "-c", line], env, cwd=clone)

    def finish(self, timeout: float) -> int:
        returncode = self.process.wait(timeout=timeout)
        while (line := self._lines.get(timeout=10)) is not None:
            self.output.append(line)
        return returncode

    def kill_all(self) -> None:
        for pid in children_of(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def hold_clone_lock(testcase: SynchronousTestCase, timeout: float = 900) -> None:
    """One quick start at a time per clone (trial's workers would otherwise share its .venv)."""
    path = clone_dir().with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "w")
    testcase.addCleanup(lock.close)  # closing releases the lock
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} stayed locked for {timeout}s") from None
            time.sleep(0.5)


class QuickStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        hold_clone_lock(self)
        self.clone = _Clone.get()
        self.port, self.http_port, self.emulator_port = free_ports(3)
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        self.env.update(
            PORT=str(self.port), HTTP_PORT=str(self.http_port), EMULATOR_PORT=str(self.emulator_port),
            BIND_ADDRESS="127.0.0.1", PYTHONUNBUFFERED="1",
        )

    def start(self) -> RunningScript:
        blocks = quick_start_blocks()
        self.assertEqual(blocks[0], ["scripts/run"])
        script = RunningScript(self.clone, blocks[0][0], self.env)
        self.addCleanup(script.kill_all)
        script.wait_for(r"\] Ready$", FIRST_START_TIMEOUT)
        return script

    def stop_with(self, script: RunningScript, sig: int) -> None:
        children = children_of(script.process.pid)
        self.assertEqual(len(children), 2, f"the emulator and the sidecar: {children}\n{script.text}")
        os.kill(script.process.pid, sig)  # the script's PID only, as an IDE or a supervisor does
        self.assertEqual(script.finish(COMMAND_TIMEOUT), 0, script.text)
        self.assertEqual([pid for pid in children if alive(pid)], [], script.text)
        self.assertIn("gRPC stopped", script.text)  # the sidecar drained and stopped cleanly
        # ... before the emulator stopped: no warning about its upstream going away while stopping.
        self.assertNotIn("Real-time updates disconnected", script.text)
        # One signal each: a second one during the drain would end twistd as killed by it.
        self.assertEqual(script.text.count("] Received SIG"), 2, script.text)

    def test_quick_start_as_typed_then_sigterm_stops_both(self):
        script = self.start()
        self.assertIn(f"gRPC listening on 127.0.0.1:{self.port}", script.text)
        self.assertIn(f"HTTP listening on 127.0.0.1:{self.http_port}", script.text)

        # The CLI commands, as typed, after the README's `export` for moved ports.
        cli_env = dict(
            self.env, STIGG_SIDECAR_TARGET=f"localhost:{self.port}", STIGG_SIDECAR_HTTP=f"localhost:{self.http_port}"
        )
        commands = quick_start_blocks()[1]
        self.assertTrue(all(line.startswith(".venv/bin/stigg-sidecar-cli ") for line in commands), commands)
        outputs = []
        for line in commands:
            result = subprocess.run(
                ["bash", "-c", line], cwd=self.clone, env=cli_env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
            )
            self.assertEqual((result.returncode, result.stderr), (0, ""), f"{line}\n{result.stdout}")
            outputs.append(result.stdout)
        text = "\n".join(outputs)
        self.assertIn("SERVING", text)
        self.assertIn("ACCESS GRANTED", text)
        self.assertIn("USAGE REPORTED", text)

        # The official client's snippet, with the SDK the test environment has installed.
        snippet = subprocess.run(
            [sys.executable, "-c", client_snippet()], env=dict(self.env, PYTHONPATH=""),
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )
        self.assertEqual(snippet.returncode, 0, snippet.stderr)
        self.assertRegex(snippet.stdout, r"^True \d+(\.0)? \d+(\.0)?\n$")

        self.stop_with(script, signal.SIGTERM)
        # Nothing the scripts made shows in git status (.venv is ignored).
        self.assertEqual(git("status", "--porcelain", cwd=self.clone), "")

    def test_sigint_to_the_script_stops_both(self):
        self.stop_with(self.start(), signal.SIGINT)

    def test_a_taken_port_stops_both_with_one_line(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", self.port))
            taken.listen()
            script = RunningScript(self.clone, quick_start_blocks()[0][0], self.env)
            self.addCleanup(script.kill_all)
            returncode = script.finish(FIRST_START_TIMEOUT)
        self.assertNotEqual(returncode, 0)
        self.assertIn(f"stigg-sidecar: PORT: 127.0.0.1:{self.port} is already in use\n", script.text)
        self.assertNotIn("Traceback", script.text)

    def test_a_taken_emulator_port_says_so_and_starts_no_sidecar(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", self.emulator_port))
            taken.listen()
            script = RunningScript(self.clone, quick_start_blocks()[0][0], self.env)
            self.addCleanup(script.kill_all)
            returncode = script.finish(FIRST_START_TIMEOUT)
        self.assertNotEqual(returncode, 0)
        self.assertIn(f"scripts/run: the emulator did not start (is EMULATOR_PORT {self.emulator_port} taken?)\n", script.text)
        self.assertNotIn("stigg-sidecar 0.", script.text)  # the sidecar was never started
        self.assertNotIn("Traceback", script.text)
