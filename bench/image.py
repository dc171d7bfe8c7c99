"""The container image: build time, size, `podman run` to ready, and `podman stop` with undelivered
spooled writes while Stigg is down.

    python -m bench.image [--runs 3] [--writes 5]

Builds the repository's Dockerfile with `buildah bud --format docker` under a fresh tag (the base
image present: pulled, or the mmdebstrap stand-in where it cannot be; the pip downloads are part of
the build), then per run: a fresh named volume, `podman run` as an orchestrator runs it (read-only
root, every capability dropped, no-new-privileges, STATE_DIR and SPOOL_WRITES on, the host's
network, the emulator on 127.0.0.1 as Stigg), the seconds until /readyz answers 200; then Stigg
down, `--writes` usage reports acknowledged from the spool, and the seconds `podman stop` (its
default 10 s timeout) takes, with the exit code. The engine's settings and storage are the test
suite's own (tests/fixtures/containers.py). The image and volumes are removed afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub
from tests.fixtures.containers import PYTHON_BASE, AdminedEmulator, Engine, free_ports, http_status, wait_until
from tests.fixtures.paths import ROOT

TAG = "localhost/stigg-sidecar-bench:image"
STATE_DIR = "/var/lib/stigg-sidecar"


def one_run(engine: Engine, emulator: AdminedEmulator, run: int, writes: int) -> tuple[float, float, str]:
    grpc_port, http_port = free_ports(2)
    name = f"stigg-sidecar-bench-{run}"
    engine.remove_containers(name)
    engine.podman("volume", "rm", "--force", name, check=False)
    engine.podman("volume", "create", name)
    try:
        started = time.monotonic()
        engine.podman(
            "run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--volume", f"{name}:{STATE_DIR}",
            "--env", f"STATE_DIR={STATE_DIR}", "--env", "SPOOL_WRITES=1", "--env", "SERVER_API_KEY=local-dev-key",
            "--env", f"API_URL={emulator.url}", "--env", f"EDGE_API_URL={emulator.url}",
            "--env", f"WS_URL={emulator.url.replace('http://', 'ws://')}", "--env", "BIND_ADDRESS=127.0.0.1",
            "--env", f"PORT={grpc_port}", "--env", f"HTTP_PORT={http_port}", TAG,
        )
        wait_until(lambda: http_status(f"http://127.0.0.1:{http_port}/readyz") == 200, 60, "ready", interval=0.01)
        ready = time.monotonic() - started
        emulator.down(True)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = SidecarServiceStub(channel)
            for _ in range(writes):
                stub.ReportUsage(pb.ReportUsageRequest(customer_id="customer-acme", feature_id="feature-api-calls", value=1), timeout=10)
        started = time.monotonic()
        engine.podman("stop", name, timeout=60)
        stopped = time.monotonic() - started
        code = engine.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        return ready, stopped, code
    finally:
        emulator.down(False)
        engine.remove_containers(name)
        engine.podman("volume", "rm", "--force", name, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writes", type=int, default=5)
    args = parser.parse_args()
    engine = Engine()
    base = engine.base_image(PYTHON_BASE)
    print(f"base {base}{' (stand-in made with mmdebstrap)' if engine.is_stand_in(base) else ''}: "
          f"{engine.image_size(base) / 1e6:.0f} MB")
    started = time.monotonic()
    engine.command(["buildah", "bud", "--format", "docker", "--tag", TAG, str(ROOT)], timeout=900)
    print(f"build {time.monotonic() - started:.1f} s, image {engine.image_size(TAG) / 1e6:.0f} MB")
    emulator = AdminedEmulator()
    try:
        readies, stops = [], []
        for run in range(args.runs):
            ready, stopped, code = one_run(engine, emulator, run, args.writes)
            readies.append(ready)
            stops.append(stopped)
            print(f"run {run + 1}: run to ready {ready:.2f} s; stop with {args.writes} undelivered {stopped:.2f} s, exit {code}")
        print(f"median: ready {statistics.median(readies):.2f} s, stop {statistics.median(stops):.2f} s")
    finally:
        emulator.stop()
        engine.podman("rmi", TAG, check=False)


if __name__ == "__main__":
    main()
