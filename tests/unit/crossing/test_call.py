"""The handler pool's `Call`: a Future's interface without locks. Its outcome and callbacks are
those of a Future, each callback runs exactly once however threads race to end the call and to
add callbacks, and a call is either run or cancelled, never both."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.crossing.pool import Call, HandlerPool

WAIT = 10.0


class CallTests(SynchronousTestCase):
    def test_result_exception_and_state_as_a_future_has_them(self):
        ok = Call(lambda a, b=0: a + b, (2,), {"b": 3})
        self.assertEqual((ok.done(), ok.running(), ok.cancelled()), (False, False, False))
        ok.run()
        self.assertEqual((ok.done(), ok.result(0), ok.exception(0)), (True, 5, None))
        failed = Call(lambda: 1 / 0, (), {})
        failed.run()
        self.assertIsInstance(failed.exception(0), ZeroDivisionError)
        self.assertRaises(ZeroDivisionError, failed.result, 0)

    def test_an_unfinished_result_times_out(self):
        self.assertRaises(TimeoutError, Call(lambda: None, (), {}).result, 0.01)

    def test_callbacks_run_once_in_order_added_before_or_after_the_end(self):
        seen: list[str] = []
        call = Call(lambda: "answer", (), {})
        call.add_done_callback(lambda c: seen.append(f"first {c.result(0)}"))
        call.add_done_callback(lambda c: seen.append("second"))
        call.run()
        call.add_done_callback(lambda c: seen.append("after"))
        self.assertEqual(seen, ["first answer", "second", "after"])

    def test_a_failing_callback_is_logged_and_the_others_still_run(self):
        seen: list[int] = []
        call = Call(lambda: None, (), {})
        call.add_done_callback(lambda c: 1 / 0)
        call.add_done_callback(lambda c: seen.append(1))
        with self.assertLogs("concurrent.futures", "ERROR"):
            call.run()
        self.assertEqual(seen, [1])

    def test_cancelled_before_it_runs_it_never_runs(self):
        ran: list[int] = []
        call = Call(lambda: ran.append(1), (), {})
        ended: list[bool] = []
        call.add_done_callback(lambda c: ended.append(c.cancelled()))
        self.assertTrue(call.cancel())
        call.run()
        self.assertEqual((ran, ended, call.done()), ([], [True], True))
        self.assertRaises(CancelledError, call.result, 0)

    def test_a_call_that_ran_cannot_be_cancelled(self):
        call = Call(lambda: 7, (), {})
        call.run()
        self.assertFalse(call.cancel())
        self.assertEqual(call.result(0), 7)

    def test_racing_callbacks_each_run_exactly_once(self):
        # Threads add callbacks while the call ends on another thread: each runs once.
        for _ in range(200):
            self.assertEqual(race_callbacks(8), [1] * 8)

    def test_run_and_cancel_racing_one_wins(self):
        for _ in range(200):
            ran, cancelled, done = race_run_and_cancel()
            self.assertEqual((ran + cancelled, done), (1, True))

    def test_the_pool_hands_out_calls_and_cancels_queued_ones_at_shutdown(self):
        pool = HandlerPool(1)
        gate = threading.Event()
        running = pool.submit(gate.wait, WAIT)
        queued = pool.submit(lambda: "never")
        self.assertIsInstance(queued, Call)
        pool.shutdown(wait=False, cancel_futures=True)
        gate.set()
        self.assertTrue(running.result(WAIT))
        self.assertTrue(queued.cancelled())
        pool.shutdown(wait=True)


def together(*targets) -> None:
    """Run `targets` on threads released at once; wait for all of them."""
    start = threading.Barrier(len(targets))

    def released(target):
        start.wait(WAIT)
        target()

    threads = [threading.Thread(target=released, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)


def race_callbacks(adders: int) -> list[int]:
    counts = [0] * adders
    call = Call(lambda: None, (), {})

    def add(i: int):
        return lambda: call.add_done_callback(lambda c: counts.__setitem__(i, counts[i] + 1))

    together(*(add(i) for i in range(adders)), call.run)
    return counts


def race_run_and_cancel() -> tuple[int, int, bool]:
    ran: list[int] = []
    cancelled: list[bool] = []
    call = Call(lambda: ran.append(1), (), {})
    together(lambda: cancelled.append(call.cancel()), call.run)
    return len(ran), cancelled.count(True), call.done()
