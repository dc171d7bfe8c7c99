"""Cold start and idle memory: time from spawning `twistd -n stigg-sidecar` until /readyz answers
200, and the resident memory of the idle process (OFFLINE, no network).

    python -m bench.startup [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_run() -> tuple[float, float]:
    http_port = free_port()
    env = dict(os.environ, OFFLINE="1", BIND_ADDRESS="127.0.0.1", PORT=str(free_port()), HTTP_PORT=str(http_port),
               PYTHONPATH=str(ROOT), LOG_LEVEL="warn")
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", TWISTD, "-n", "--pidfile=", "stigg-sidecar"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
    try:
        while time.monotonic() - started < 30:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.01)
        else:
            raise RuntimeError("not ready within 30 s")
        ready = time.monotonic() - started
        time.sleep(2)  # idle
        return ready, rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    runs = [one_run() for _ in range(parser.parse_args().runs)]
    ready = [r for r, _ in runs]
    rss = [m for _, m in runs]
    print(f"time to ready: min {min(ready):.3f}s median {statistics.median(ready):.3f}s max {max(ready):.3f}s")
    print(f"idle RSS (offline): min {min(rss):.1f} MiB median {statistics.median(rss):.1f} MiB max {max(rss):.1f} MiB")


if __name__ == "__main__":
    main()
