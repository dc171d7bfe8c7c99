"""A scrape storm cannot starve the sidecar: /metrics is rendered at most once per
METRICS_MAX_AGE_MS and served as cached bytes, so liveness probes keep answering within their
timeout while 400 clients scrape as fast as they can (issue 20, finding 5).

A real sidecar process; the storm is h2load (Debian `nghttp2-client`) over HTTP/1.1 on loopback.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

from twisted.trial.unittest import TestCase

from tests.fixtures.processes import SidecarProcess, base_env
from tests.fixtures.tools import require_tool

SCRAPERS = 400
PROBES = 16
PROBE_TIMEOUT = 1.0  # Kubernetes' default timeoutSeconds
FAILURE_THRESHOLD = 3  # and failureThreshold


class ScrapeStormTests(TestCase):
    timeout = 120

    def test_probes_answer_within_their_timeout_under_400_concurrent_scrapers(self):
        require_tool("h2load")
        sidecar = SidecarProcess(base_env(OFFLINE="1"))
        self.addCleanup(sidecar.kill)
        base = f"http://127.0.0.1:{sidecar.http_port}"
        storm = subprocess.Popen(
            ["h2load", "--h1", "-c", str(SCRAPERS), "-D", "12", "-T", "10", f"{base}/metrics"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

        def stop_storm() -> None:
            if storm.poll() is None:
                storm.kill()

        self.addCleanup(stop_storm)
        time.sleep(2)  # every scraper connected and scraping
        failed: list[str] = []
        streak = longest = 0  # consecutive failed probes
        for i in range(PROBES):
            before = len(failed)
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"{base}/livez", timeout=PROBE_TIMEOUT) as response:
                    response.read()
                    if response.status != 200:
                        failed.append(f"probe {i}: {response.status}")
            except OSError as e:
                failed.append(f"probe {i}: {e} after {time.monotonic() - started:.2f}s")
            streak = streak + 1 if len(failed) > before else 0
            longest = max(longest, streak)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
        out, _ = storm.communicate(timeout=60)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        self.assertIsNotNone(done, out)
        assert done is not None
        self.assertGreater(int(done.group(2)), SCRAPERS, out)  # the storm did scrape
        # Kubernetes restarts a pod after 3 failed probes in a row (failureThreshold); one late
        # probe on a machine loaded by other tests is tolerated, a streak is not (unfixed: 11 of 16).
        self.assertLess(longest, FAILURE_THRESHOLD, failed)
        self.assertLessEqual(len(failed), 1, failed)
