"""`twistd stigg-sidecar` without -n daemonizes: its log goes to `twistd.log` in the directory it
was started from (as twistd's own would), or to `--logfile`; with -n and `--logfile` too. The last
line says the sidecar stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.fixtures.polling import until
from tests.fixtures.processes import base_env, twistd_command

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class DaemonLogTests(TestCase):
    timeout = 60

    def setUp(self):
        self.directory = Path(tempfile.mkdtemp())

    async def daemon(self, *twistd_options: str) -> int:
        """Start a daemonized offline sidecar; its pid."""
        pidfile = self.directory / "sidecar.pid"
        started = subprocess.run(
            [sys.executable, "-c", _TWISTD, f"--pidfile={pidfile}", *twistd_options, "stigg-sidecar", "--offline"],
            env=base_env(), cwd=self.directory, capture_output=True, text=True, timeout=30,
        )
        self.assertEqual((started.returncode, started.stdout, started.stderr), (0, "", ""))
        await until(pidfile.exists, 20, "the daemon's pid file")
        pid = int(pidfile.read_text())
        self.addCleanup(lambda: _kill(pid))
        return pid

    async def stop(self, pid: int, log: Path) -> str:
        os.kill(pid, signal.SIGTERM)
        await until(lambda: "stigg-sidecar stopped" in log.read_text(), 20, "the stopped line")
        return log.read_text()

    async def test_without_n_the_log_goes_to_twistd_log(self):
        pid = await self.daemon()
        log = self.directory / "twistd.log"
        await until(lambda: log.exists() and "stigg-sidecar running" in log.read_text(), 20, "running in twistd.log")
        text = await self.stop(pid, log)
        self.assertIn("gRPC listening on 127.0.0.1:", text)
        self.assertIn("stigg-sidecar stopped in", text.strip().splitlines()[-1])

    async def test_logfile_is_honoured(self):
        log = self.directory / "sidecar.log"
        pid = await self.daemon(f"--logfile={log}")
        await until(lambda: log.exists() and "stigg-sidecar running" in log.read_text(), 20, "running in --logfile")
        await self.stop(pid, log)
        self.assertFalse((self.directory / "twistd.log").exists())

    def test_a_logfile_that_cannot_be_opened_is_one_line(self):
        result = subprocess.run(
            twistd_command("stigg-sidecar", "--offline", options=("--logfile=/nonexistent/dir/x.log",)),
            env=base_env(), capture_output=True, text=True, timeout=30,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(),
                         ["stigg-sidecar: --logfile: /nonexistent/dir/x.log: No such file or directory"])


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
