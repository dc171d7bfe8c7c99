"""NativeLines: grpc-core's glog lines as log events, a repeated message folded into a count."""

from __future__ import annotations

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.process.native_output import NativeLines


class NativeLinesTests(SynchronousTestCase):
    def setUp(self):
        self.now = 0.0
        self.events: list[tuple] = []
        self.lines = NativeLines(lambda level, fmt, **kw: self.events.append((level, kw)), clock=lambda: self.now)

    def test_severity_and_message_are_read_from_the_glog_prefix(self):
        self.lines.line("E1205 22:38:56.634854   13025 posix_engine_listener.cc:164] File descriptor limit reached. Retrying.\n")
        self.lines.line("I1205 22:38:57.000000   13025 chttp2_server.cc:1] accepted\n")
        self.assertEqual([(level, kw["message"], kw["where"]) for level, kw in self.events], [
            (LogLevel.error, "File descriptor limit reached. Retrying.", "posix_engine_listener.cc:164"),
            (LogLevel.debug, "accepted", "chttp2_server.cc:1"),
        ])

    def test_a_message_repeated_within_the_interval_is_counted_not_logged(self):
        line = "E1205 22:38:56.634854   13025 posix_engine_listener.cc:164] File descriptor limit reached. Retrying."
        for _ in range(30):
            self.lines.line(line)
            self.now += 1.0
        self.now += 60.0
        self.lines.line(line)
        self.assertEqual([kw["more"] for _, kw in self.events], ["", " (29 more times since)"])

    def test_other_output_is_a_warning_as_it_came(self):
        self.lines.line("something else entirely\n")
        self.assertEqual(self.events, [(LogLevel.warn, {"message": "something else entirely", "where": "", "more": ""})])
