"""Propagation benchmark: from an admin change in Stigg to the changed gRPC answer.

    python -m bench.propagation [--modes socket,poller] [--changes 200] [--poll-interval 1]
                                [--probe-interval-ms 1] [--gap SECS] [--no-pin]

Starts the emulator and, per mode, a real `twistd stigg-sidecar` process against it:

- socket: WS_ENABLED=1; the run waits until the emulator shows 1 socket holding 3 subscriptions,
  so every change is pushed as entitlementsUpdatedV2;
- poller: WS_ENABLED=0, POLL_INTERVAL_SECS=--poll-interval; changes arrive by refetching.

Warms the customer (a non-fallback answer with the expected access) and then, for each change,
after a random pause (up to --gap; by default one poll interval in poller mode, so that changes
do not phase-lock to the poll loop), flips feature-sso for that customer with
`PUT /_emulator/customers/{id}` (alternating between the entitlements with and without it) and,
without waiting for the PUT's answer (the emulator pushes before it answers), polls
GetBooleanEntitlement over gRPC every --probe-interval-ms until the answer flips. Latency runs
from just before the PUT was sent to the first flipped answer; a second figure runs from when
the PUT's answer arrived (negative: the answer flipped first). A change not seen within the
bound counts as lost; the run resynchronises and goes on.

Prints per mode: n, min, p50, p90, p99, max (from PUT sent), p50/p99 from PUT returned, lost
changes and any fallback answers seen while probing. The sidecar is pinned to core 0, the
emulator and this script to core 1 (--no-pin to leave scheduling alone). Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import select
import shlex
import socket
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from bench.harness import (
    BenchError,
    Children,
    exit_status,
    start_emulator,
    start_sidecar,
    wait_until,
    write_emulator_data,
)
from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar._proto.sidecar_pb2_grpc import SidecarServiceStub

SIDECAR_CPU = 0
OTHER_CPU = 1  # emulator and this script
CUSTOMER = "propagation-customer"
FEATURE = "feature-sso"
CALL_TIMEOUT = 2.0


def _feature(ref: str, ftype: str = "BOOLEAN") -> dict:
    return {"refId": ref, "displayName": ref, "featureType": ftype, "meterType": "None"}


def entitlements(with_sso: bool) -> list[dict]:
    """The customer's entitlements: always feature-other, feature-sso only when `with_sso`."""
    items = [{"isGranted": True, "feature": _feature("feature-other")}]
    if with_sso:
        items.insert(0, {"isGranted": True, "feature": _feature(FEATURE)})
    return items


class Admin:
    """The emulator's admin API over one persistent HTTP/1.1 connection (reopened on error)."""

    _customer_path = f"/_emulator/customers/{CUSTOMER}"

    def __init__(self, url: str) -> None:
        self.url = url
        self.host_port = url.split("://", 1)[1].rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def request(self, verb: str, path: str, body: object = None, timeout: float = 10) -> object:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host_port, timeout=timeout)
            try:
                self._conn.request(verb, path, body=data, headers={"Content-Type": "application/json"})
                response = self._conn.getresponse()
                text = response.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise BenchError(f"{verb} {path} answered {response.status}: {text[:300]!r}")
            return json.loads(text) if text else None
        raise AssertionError("unreachable")

    @staticmethod
    def _customer(with_sso: bool) -> dict:
        return {"accessDeniedReason": None, "entitlements": entitlements(with_sso)}

    def put_customer(self, with_sso: bool) -> None:
        self.request("PUT", self._customer_path, self._customer(with_sso))

    def send_put(self, with_sso: bool, timeout: float = 10) -> float:
        """Send the PUT without waiting for its answer (`answered`, `finish`); returns the
        monotonic time just before the request went out."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host_port, timeout=timeout)
            self._conn.connect()  # connected before the clock starts
        body = json.dumps(self._customer(with_sso)).encode()
        sent = time.monotonic()
        try:
            self._conn.request("PUT", self._customer_path, body=body, headers={"Content-Type": "application/json"})
        except (OSError, http.client.HTTPException):
            self._conn.close()  # a kept-alive connection the server closed: once more on a new one
            self._conn = http.client.HTTPConnection(self.host_port, timeout=timeout)
            self._conn.connect()
            sent = time.monotonic()
            self._conn.request("PUT", self._customer_path, body=body, headers={"Content-Type": "application/json"})
        return sent

    def answered(self) -> bool:
        """The answer to the PUT in flight has (started to) come back."""
        assert self._conn is not None and self._conn.sock is not None
        return bool(select.select([self._conn.sock], [], [], 0)[0])

    def finish(self) -> None:
        """Read the answer to the PUT in flight; it must be 200."""
        assert self._conn is not None
        response = self._conn.getresponse()
        text = response.read()
        if response.status != 200:
            raise BenchError(f"PUT {self._customer_path} answered {response.status}: {text[:300]!r}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def sockets(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_emulator/sockets", timeout=2) as r:
        return json.loads(r.read())


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _answer(stub: SidecarServiceStub, request: pb.GetBooleanEntitlementRequest) -> bool | None:
    r = stub.GetBooleanEntitlement(request, timeout=CALL_TIMEOUT)
    return None if r.is_fallback else r.has_access


def run_mode(children: Children, emulator_url: str, mode: str, args: argparse.Namespace) -> dict:
    admin = Admin(emulator_url)
    admin.put_customer(True)  # a known starting point, whatever the previous mode left
    env = {
        "WS_URL": emulator_url.replace("http://", "ws://"),
        "WS_ENABLED": "1" if mode == "socket" else "0",
        "POLL_INTERVAL_SECS": str(args.poll_interval),
        "LOG_LEVEL": "info",
    }
    cpu = None if args.no_pin else SIDECAR_CPU
    sidecar = start_sidecar(children, cpu, emulator_url, env)
    bound = args.bound if args.bound else (10.0 if mode == "socket" else 3 * args.poll_interval + 10.0)
    try:
        if mode == "socket":
            wait_until(
                lambda: sockets(emulator_url) == {"connected": 1, "subscriptions": 3},
                30,
                "waiting for the sidecar's socket and its 3 subscriptions",
                sidecar.child,
            )
        channel = grpc.insecure_channel(sidecar.target)
        stub = SidecarServiceStub(channel)
        request = pb.GetBooleanEntitlementRequest(customer_id=CUSTOMER, feature_id=FEATURE)

        # Warm: the customer cached, answering from Stigg's data (not a fallback), sso granted.
        deadline = time.monotonic() + 30
        while True:
            r = stub.GetBooleanEntitlement(request, timeout=CALL_TIMEOUT)
            if not r.is_fallback and r.has_access:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{mode}: the customer did not warm within 30s; last answer:\n{r}")
            time.sleep(0.1)
        for _ in range(50):  # a few cache hits, and the gRPC channel warm
            stub.GetBooleanEntitlement(request, timeout=CALL_TIMEOUT)

        probe_sleep = args.probe_interval_ms / 1000
        from_sent: list[float] = []
        from_returned: list[float] = []
        lost = 0
        fallbacks = 0
        probes = 0
        errors = 0
        expected = True
        started = time.monotonic()
        gap = args.gap if args.gap is not None else (args.poll_interval if mode == "poller" else 0.02)
        rng = random.Random(args.seed)
        for i in range(args.changes):
            # A random pause first: a change made right after the previous one propagated would
            # land at a fixed phase of the poll loop (always ~one interval before the next poll).
            time.sleep(rng.uniform(0, gap))
            expected = not expected
            # The PUT goes out and probing starts at once: the emulator pushes the change before
            # it answers the PUT, so waiting for its answer first would hide the propagation.
            sent = admin.send_put(expected)
            returned = None
            give_up = sent + bound
            flipped_at = None
            while True:
                if returned is None and admin.answered():
                    returned = time.monotonic()
                try:
                    r = stub.GetBooleanEntitlement(request, timeout=CALL_TIMEOUT)
                except grpc.RpcError as e:
                    errors += 1
                    if errors <= 3 or errors % 100 == 0:
                        print(
                            f"  {mode}: gRPC error {errors} at change {i}: {e.code()}: {e.details()}; "
                            f"sidecar alive: {sidecar.child.popen.poll() is None}, "
                            f"port accepts: {_accepts(sidecar.grpc_port)}",
                            file=sys.stderr,
                            flush=True,
                        )
                    if sidecar.child.popen.poll() is not None or errors > 2000:
                        raise BenchError(f"{mode}: too many gRPC errors, last {e.code()}: {e.details()}") from None
                    r = None
                now = time.monotonic()
                probes += 1
                if r is not None:
                    if r.is_fallback:
                        fallbacks += 1
                    elif r.has_access == expected:
                        flipped_at = now
                        break
                if now > give_up:
                    break
                if probe_sleep > 0:
                    time.sleep(probe_sleep)
            admin.finish()
            if returned is None:  # the answer flipped before the PUT's answer was seen
                returned = time.monotonic()
            if flipped_at is None:
                lost += 1
                print(f"  {mode}: change {i} not seen within {bound:.0f}s", file=sys.stderr)
                # Resynchronise before the next flip, or its "flip" would be this stale answer.
                wait_until(
                    lambda want=expected: _answer(stub, request) == want,
                    bound,
                    f"resynchronising after lost change {i}",
                    sidecar.child,
                )
                continue
            from_sent.append(flipped_at - sent)
            from_returned.append(flipped_at - returned)  # negative: flipped before the PUT returned
            if args.progress and (i + 1) % args.progress == 0:
                print(
                    f"  {mode}: {i + 1}/{args.changes} changes, last {1000 * (flipped_at - sent):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        elapsed = time.monotonic() - started
        channel.close()
    finally:
        admin.close()
        sidecar.child.stop()
    from_sent.sort()
    from_returned.sort()
    return {
        "mode": mode,
        "n": len(from_sent),
        "lost": lost,
        "fallbacks": fallbacks,
        "grpc_errors": errors,
        "probes": probes,
        "elapsed": elapsed,
        "sent": from_sent,
        "returned": from_returned,
    }


def report(result: dict) -> None:
    ms = lambda v: f"{1000 * v:8.1f}"  # noqa: E731
    s, r = result["sent"], result["returned"]
    print(
        f"{result['mode']:<7} n={result['n']:<4} min {ms(s[0]) if s else '-'}  p50 {ms(percentile(s, 50))}"
        f"  p90 {ms(percentile(s, 90))}  p99 {ms(percentile(s, 99))}  max {ms(s[-1]) if s else '-'}   (ms from PUT sent)"
    )
    print(
        f"{'':<7} {'':<6} from PUT returned: p50 {ms(percentile(r, 50))}  p99 {ms(percentile(r, 99))}"
        f"  max {ms(r[-1]) if r else '-'};  lost {result['lost']}, fallback answers {result['fallbacks']},"
        f" gRPC errors {result['grpc_errors']}, {result['probes']} probes in {result['elapsed']:.1f}s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="socket,poller", help="comma-separated: socket, poller")
    parser.add_argument("--changes", type=int, default=200, help="changes per mode")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="POLL_INTERVAL_SECS of the poller mode")
    parser.add_argument("--probe-interval-ms", type=float, default=1.0, help="sleep between two probing calls")
    parser.add_argument(
        "--bound",
        type=float,
        default=0.0,
        help="seconds to wait for one change (default 10 socket, 3*interval+10 poller)",
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=None,
        help="random pause up to this many seconds before each change "
        "(default: the poll interval in poller mode, 0.02 in socket mode)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses")
    parser.add_argument("--progress", type=int, default=50, help="print progress every N changes (0: never)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--keep-logs", action="store_true", help="keep the child logs")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"socket", "poller"}:
        parser.error("--modes takes socket and/or poller")
    if args.changes < 1:
        parser.error("--changes must be at least 1")

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    if not args.no_pin:
        os.sched_setaffinity(0, {OTHER_CPU})
    results = []
    with Children() as children:
        children.keep = args.keep_logs
        data = children.path("emulator-data.json")
        write_emulator_data(data, {CUSTOMER: entitlements(True)})
        _, url = start_emulator(children, data, None if args.no_pin else OTHER_CPU)
        for mode in modes:
            print(
                f"-- {mode}: {args.changes} changes"
                + (f", POLL_INTERVAL_SECS={args.poll_interval:g}" if mode == "poller" else ""),
                flush=True,
            )
            result = run_mode(children, url, mode, args)
            results.append(result)
            report(result)
    print()
    print("summary (ms from PUT sent to the first flipped gRPC answer):")
    for result in results:
        report(result)
    return 0 if all(r["n"] > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(exit_status(main))
