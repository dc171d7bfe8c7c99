"""A wall clock that steps freezes nothing and fools no decision: `twistd -n stigg-sidecar` run
under libfaketime (the wall clock stepped while the process runs, the monotonic clock untouched),
against the emulator on the true clock (issue 20, finding 12).

- Stepped back two hours: the poller keeps polling, and a breaker opened during an outage still
  probes, so cold reads answer Stigg's data soon after it returns.
- Forty days ahead: a metered check answers the usage Stigg has (its period has not ended by
  Stigg's clock), before and after the clock is corrected; the skew is a metric and a warning.
- Two hours behind: a period Stigg has reset by its own clock is rolled over here too.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar._proto import sidecar_pb2 as pb
from stigg_sidecar.emulator.data import parse_customer
from stigg_sidecar.emulator.testing import start_emulator, stop_emulator
from tests.fixtures import data
from tests.fixtures.clients import grpc_deferred
from tests.fixtures.polling import until
from tests.fixtures.processes import base_env, sidecar_with_stub, until_ready

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
KEY = "clock-test-key"
EDGE = "/v1/c/{customerId}/entitlements-state.json"


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def metered_with_period(limit: float, usage: float, anchor: datetime.datetime, period: str,
                        length: datetime.timedelta) -> dict:
    """A metered entitlement whose usage period started at `anchor` and lasts `length`."""
    return data.metered(
        "api-calls", limit, usage,
        usagePeriodAnchor=_iso(anchor), usagePeriodStart=_iso(anchor), usagePeriodEnd=_iso(anchor + length),
        resetPeriod=period,
    )


class ClockStepTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(LIBFAKETIME):
            self.fail(f"{LIBFAKETIME} is missing: install Debian's faketime")
        self.offset_file = os.path.join(tempfile.mkdtemp(), "faketime")
        self.step("+0")

    def step(self, offset: str) -> None:
        """Move the sidecar's wall clock to `offset` from the true time ("-2h", "+40d", "+0")."""
        with open(self.offset_file + ".new", "w") as f:
            f.write(offset + "\n")
        os.replace(self.offset_file + ".new", self.offset_file)

    async def start(self, customers: dict, **settings: str):
        self.emulator = await start_emulator(reactor, {"apiKeys": [KEY], "customers": customers})
        self.addCleanup(stop_emulator, self.emulator)
        env = base_env(
            SERVER_API_KEY=KEY,
            API_URL=self.emulator.url,
            EDGE_API_URL=self.emulator.url,
            WS_URL=self.emulator.url.replace("http://", "ws://"),
            WS_ENABLED="0",
            ENTITLEMENTS_TIMEOUT_MS="3000",
            METRICS_MAX_AGE_MS="0",
            LD_PRELOAD=LIBFAKETIME,
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            FAKETIME_TIMESTAMP_FILE=self.offset_file,
            FAKETIME_NO_CACHE="1",
        )
        env.update(settings)
        self.sidecar = sidecar_with_stub(self, env)
        await until_ready(self.sidecar)
        return self.sidecar

    def metered(self, customer: str, requested: float = 1) -> Deferred[Any]:
        request = pb.GetMeteredEntitlementRequest(
            customer_id=customer, feature_id="api-calls", options=pb.MeteredEntitlementOptions(requested_usage=requested)
        )
        return grpc_deferred(reactor, self.sidecar.stub.GetMeteredEntitlement.future(request, timeout=5))

    def boolean(self, customer: str) -> Deferred[Any]:
        request = pb.GetBooleanEntitlementRequest(customer_id=customer, feature_id="sso")
        return grpc_deferred(reactor, self.sidecar.stub.GetBooleanEntitlement.future(request, timeout=5))

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecar.http_port}/metrics", timeout=5) as r:
            page = r.read().decode()
        m = re.search(rf"^{name} (\S+)$", page, re.M)
        return float(m.group(1)) if m else None

    async def test_a_step_back_does_not_freeze_the_poller(self):
        await self.start({"acme": data.ACME}, POLL_INTERVAL_SECS="1")
        answer = await self.boolean("acme")
        self.assertFalse(answer.is_fallback)
        self.step("-2h")
        await deferLater(reactor, 0.5, lambda: None)  # a poll already due may still go
        self.emulator.state.reset_request_counts()
        # Every second a refresh of the one cached customer: two within eight seconds on a loaded machine.
        try:
            await until(lambda: self.emulator.state.request_counts().get(EDGE, 0) >= 2, 8, "polls after the step back")
        except AssertionError:
            self.sidecar.kill()
            self.fail(f"polls after the step back: {self.emulator.state.request_counts()}; log:\n{self.sidecar.text}")

    async def test_an_open_breaker_still_probes_after_a_step_back(self):
        customers = {f"cold-{i}": data.ACME for i in range(20)}
        await self.start(customers, POLL_INTERVAL_SECS="3600")
        self.emulator.state.faults.update({"down": True})
        for i in range(6):  # five failures in a row open the Edge breaker
            answer = await self.boolean(f"cold-{i}")
            self.assertTrue(answer.is_fallback)
        self.step("-2h")
        self.emulator.state.faults.update({"down": False})
        started = reactor.seconds()
        served: list[float] = []

        async def real_answer() -> bool:
            answer = await self.boolean(f"cold-{10 + len(served) % 10}")
            served.append(reactor.seconds() - started)
            return not answer.is_fallback

        # The breaker's first probe is due within its initial backoff (at most a second); a
        # clock on the wall would have it due two hours from now.
        await until(real_answer, 10, "a cold read answering Stigg's data after the step back", interval=0.2)

    async def test_forty_days_ahead_answers_stiggs_usage_before_and_after_the_correction(self):
        now = datetime.datetime.now(datetime.UTC)
        # A monthly period that started ten days ago: 100 of 150 used, by Stigg's clock.
        item = metered_with_period(150, 100, now - datetime.timedelta(days=10), "MONTH", datetime.timedelta(days=28))
        self.step("+40d")
        await self.start({"ahead": data.customer(item)})
        answer = await self.metered("ahead")
        self.assertFalse(answer.is_fallback)
        self.assertEqual((answer.entitlement.current_usage, answer.has_access), (100, True))
        skew = self.metric("sidecar_clock_skew_seconds")
        self.assertIsNotNone(skew)
        assert skew is not None
        self.assertLess(abs(skew - 40 * 86400), 30)
        self.sidecar.wait_for(r"The local clock is 40.0 days ahead of Stigg's", 5)
        self.step("+0")
        await deferLater(reactor, 0.2, lambda: None)
        answer = await self.metered("ahead")
        self.assertEqual((answer.entitlement.current_usage, answer.has_access), (100, True))
        await until(lambda: abs(self.metric("sidecar_clock_skew_seconds") or 1e9) < 5, 10, "the skew back near zero")

    async def test_two_hours_behind_a_period_stigg_reset_is_rolled_over(self):
        self.step("-2h")
        await self.start({"behind": data.ACME}, POLL_INTERVAL_SECS="3600")
        # An hourly period that ends four seconds from now by Stigg's clock, its limit used up
        # (set once the sidecar is up, however long its start took).
        now = datetime.datetime.now(datetime.UTC)
        item = metered_with_period(10, 10, now + datetime.timedelta(seconds=4) - datetime.timedelta(hours=1), "HOUR",
                                   datetime.timedelta(hours=1))
        self.emulator.state.replace("behind", None, parse_customer(data.customer(item)).state)
        answer = await self.metered("behind")
        self.assertEqual((answer.entitlement.current_usage, answer.has_access), (10, False))
        await deferLater(reactor, 5, lambda: None)  # Stigg's period has ended
        answer = await self.metered("behind")  # from the cache: nothing told this sidecar
        self.assertFalse(answer.is_fallback)
        self.assertEqual((answer.entitlement.current_usage, answer.has_access), (0, True))
