"""UnsentAnswers: which calls a sweep cancels, on a fake clock with stand-in call contexts.

The real thing (grpc-core cancelling calls of connections that never read, and the memory coming
back) is tests/process/test_unread_calls_keep_no_memory.py.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.grpc.unsent import TRIM_AFTER, UnsentAnswers


class Context:
    """What UnsentAnswers uses of a grpc.ServicerContext: peer, add_callback (run by `end`), cancel."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:50000", over: bool = False) -> None:
        self.callbacks: list[Any] = []
        self._peer = peer
        self.over = over
        self.cancels = 0

    def peer(self) -> str:
        return self._peer

    def add_callback(self, callback) -> bool:
        if self.over:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        self.over = True
        for callback in self.callbacks:
            callback()

    def cancel(self) -> None:
        self.cancels += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


STUCK, READ = "ipv4:127.0.0.1:1111", "ipv4:127.0.0.1:2222"


class UnsentAnswersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.trims = 0

        def trim() -> None:
            self.trims += 1

        self.unsent = UnsentAnswers(grace=1.0, per_connection=2, clock=self.clock, trim=trim, background=False)
        self.handler = self.unsent.wrap("Method", lambda request, context: f"answer to {request}")

    def answer(self, *contexts: Context) -> None:
        for context in contexts:
            self.assertEqual(self.handler("r", cast(grpc.ServicerContext, context)), "answer to r")

    def test_answers_taken_in_time_are_never_cancelled(self):
        contexts = [Context() for _ in range(5)]
        self.answer(*contexts)
        self.assertEqual(len(self.unsent), 5)
        for context in contexts:
            context.end()  # grpc-core sent it
        self.clock.now += 10
        self.assertEqual(self.unsent.sweep(), 0)
        self.assertEqual(([c.cancels for c in contexts], len(self.unsent), self.unsent.cancelled), ([0] * 5, 0, 0))

    def test_a_connection_past_its_unsent_answers_has_the_old_ones_cancelled_once(self):
        old = [Context(STUCK) for _ in range(3)]
        self.answer(*old)
        self.clock.now += 0.6
        young = [Context(STUCK) for _ in range(3)]
        self.answer(*young)
        self.clock.now += 0.5  # old waited 1.1 s, young 0.5 s
        self.assertEqual(self.unsent.sweep(), 3)
        self.assertEqual(([c.cancels for c in old], [c.cancels for c in young]), ([1] * 3, [0] * 3))
        self.clock.now += 0.6
        self.assertEqual(self.unsent.sweep(), 3)
        self.assertEqual(([c.cancels for c in old + young], self.unsent.cancelled, len(self.unsent)), ([1] * 6, 6, 0))
        for context in old:
            context.end()  # grpc-core's end of a cancelled call changes nothing
        self.assertEqual(self.unsent.sweep(), 0)

    def test_up_to_per_connection_unsent_answers_are_kept(self):
        # A client calling one call at a time on a slow sidecar, or one that leaves two unread.
        kept = [Context(STUCK) for _ in range(2)]
        self.answer(*kept)
        self.clock.now += 30
        self.assertEqual(self.unsent.sweep(), 0)
        self.assertEqual([c.cancels for c in kept], [0, 0])

    def test_a_connection_taking_answers_is_spared(self):
        waiting = [Context(READ) for _ in range(5)]
        self.answer(*waiting)
        self.clock.now += 1.5
        taken = Context(READ)
        self.answer(taken)
        taken.end()  # it took an answer just now: its other answers are slow, not unread
        self.assertEqual(self.unsent.sweep(), 0)
        self.clock.now += 1.1  # and then took none for longer than the grace
        self.assertEqual(self.unsent.sweep(), 5)
        self.assertEqual([c.cancels for c in waiting], [1] * 5)

    def test_each_connection_is_judged_alone(self):
        stuck = [Context(STUCK) for _ in range(3)]
        other = [Context(READ) for _ in range(2)]
        self.answer(*stuck, *other)
        self.clock.now += 2
        self.assertEqual(self.unsent.sweep(), 3)
        self.assertEqual(([c.cancels for c in stuck], [c.cancels for c in other]), ([1] * 3, [0] * 2))

    def test_a_call_already_over_is_not_kept(self):
        self.answer(Context(over=True))
        self.assertEqual(len(self.unsent), 0)

    def test_a_failed_handler_is_not_watched(self):
        def refuse(request, context):
            raise ValueError("refused")

        handler = self.unsent.wrap("Method", refuse)
        with self.assertRaises(ValueError):
            handler("r", cast(grpc.ServicerContext, Context()))
        self.assertEqual(len(self.unsent), 0)

    def test_memory_is_given_back_after_a_large_sweep_only(self):
        self.answer(*[Context(STUCK) for _ in range(3)])
        self.clock.now += 2
        self.assertEqual(self.unsent.sweep(), 3)
        self.assertEqual(self.trims, 0)
        self.answer(*[Context(STUCK) for _ in range(TRIM_AFTER)])
        self.clock.now += 2
        self.assertEqual(self.unsent.sweep(), TRIM_AFTER)
        self.assertEqual(self.trims, 1)
