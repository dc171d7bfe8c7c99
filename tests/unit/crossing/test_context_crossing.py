"""The crossing carries the caller's context: what a handler thread set in a `ContextVar` (the
current trace span is one) is what `fn` sees on the reactor, and what the inlineCallbacks it
starts see after their yields; the reactor's own context is left as it was."""

from __future__ import annotations

import contextvars

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from stigg_sidecar.crossing.wait import call_on_reactor
from tests.fixtures.reactor import reactor

caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


class ContextCrossingTests(TestCase):
    async def test_fn_and_what_it_starts_run_in_the_callers_context(self):
        seen: list[str] = []

        @inlineCallbacks
        def on_reactor(tag: str):
            seen.append(caller.get())
            yield deferLater(reactor, 0.01, lambda: None)
            seen.append(caller.get())
            return tag

        def handler(tag: str) -> str:
            caller.set(tag)
            return call_on_reactor(reactor, on_reactor, tag, timeout=5)

        results = [await threads.deferToThread(handler, tag) for tag in ("first", "second")]
        self.assertEqual(results, ["first", "second"])
        self.assertEqual(seen, ["first", "first", "second", "second"])
        self.assertEqual(caller.get(), "none")  # the reactor's own context is untouched
