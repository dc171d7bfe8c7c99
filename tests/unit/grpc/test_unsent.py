"""UnsentAnswers: which calls a sweep cancels, on a fake clock with stand-in call contexts.

The real thing (grpc-core cancelling calls of connections that never read, and the memory coming
back) is tests/process/test_unread_calls_keep_no_memory.py.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.grpc.unsent import TRIM_AFTER, UnsentAnswers


class Context:
    """What UnsentAnswers uses of a grpc.ServicerContext: add_callback (run by `end`) and cancel."""

    def __init__(self, over: bool = False) -> None:
        self.callbacks: list[Any] = []
        self.over = over
        self.cancels = 0

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


class UnsentAnswersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.trims = 0

        def trim() -> None:
            self.trims += 1

        self.unsent = UnsentAnswers(grace=1.0, clock=self.clock, trim=trim, background=False)
        self.handler = self.unsent.wrap("Method", lambda request, context: f"answer to {request}")

    def answer(self, context: Context, request: str = "r") -> None:
        self.assertEqual(self.handler(request, context), f"answer to {request}")

    def test_an_answer_taken_in_time_is_never_cancelled(self):
        context = Context()
        self.answer(context)
        self.assertEqual(len(self.unsent), 1)
        context.end()  # grpc-core sent it
        self.clock.now += 10
        self.assertEqual(self.unsent.sweep(), 0)
        self.assertEqual((context.cancels, len(self.unsent), self.unsent.cancelled), (0, 0, 0))

    def test_an_answer_unsent_past_the_grace_is_cancelled_once(self):
        old, young = Context(), Context()
        self.answer(old)
        self.clock.now += 0.6
        self.answer(young)
        self.clock.now += 0.5  # old waited 1.1 s, young 0.5 s
        self.assertEqual(self.unsent.sweep(), 1)
        self.assertEqual((old.cancels, young.cancels), (1, 0))
        self.clock.now += 0.6
        self.assertEqual(self.unsent.sweep(), 1)
        self.assertEqual((old.cancels, young.cancels, self.unsent.cancelled, len(self.unsent)), (1, 1, 2, 0))
        old.end()  # grpc-core's end of a cancelled call forgets nothing twice
        self.assertEqual(self.unsent.sweep(), 0)

    def test_a_call_already_over_is_not_kept(self):
        self.answer(Context(over=True))
        self.assertEqual(len(self.unsent), 0)

    def test_a_failed_handler_is_not_watched(self):
        def refuse(request, context):
            raise ValueError("refused")

        handler = self.unsent.wrap("Method", refuse)
        with self.assertRaises(ValueError):
            handler("r", Context())
        self.assertEqual(len(self.unsent), 0)

    def test_memory_is_given_back_after_a_large_sweep_only(self):
        contexts = [Context() for _ in range(TRIM_AFTER)]
        self.answer(contexts[0])
        self.clock.now += 2
        self.unsent.sweep()
        self.assertEqual(self.trims, 0)
        for context in contexts[1:]:
            self.answer(context)
        self.answer(Context())
        self.clock.now += 2
        self.assertEqual(self.unsent.sweep(), TRIM_AFTER)
        self.assertEqual(self.trims, 1)
