"""FileWatcher: a change of a watched file (rewritten, replaced by a rename, swapped through a
symlink, deleted, created) calls back once per poll on the injected clock; no change, no call."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.process.watch import FileWatcher


class FileWatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.file = self.dir / "watched"
        self.file.write_text("one")
        self.clock = Clock()
        self.changes = 0
        self.watcher = FileWatcher(self.clock, [str(self.file)], self.changed, interval=1.0)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def changed(self) -> None:
        self.changes += 1

    def test_nothing_changed_nothing_called(self):
        self.clock.advance(5)
        self.assertEqual(self.changes, 0)

    def test_rewritten_in_place(self):
        self.file.write_text("two!")
        self.assertEqual(self.changes, 0)  # only polls look
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)
        self.clock.advance(3)
        self.assertEqual(self.changes, 1)

    def test_same_size_rewrite_with_a_new_mtime(self):
        self.file.write_text("two")
        os.utime(self.file, ns=(0, self.file.stat().st_mtime_ns + 1_000_000))
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)

    def test_replaced_by_a_rename(self):
        staged = self.dir / "staged"
        staged.write_text("one")  # same size, same content: a new inode all the same
        staged.replace(self.file)
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)

    def test_swapped_through_a_symlinked_directory_as_kubernetes_does(self):
        (self.dir / "v1").mkdir()
        (self.dir / "v1" / "tls.crt").write_text("one")
        (self.dir / "..data").symlink_to("v1")
        link = self.dir / "tls.crt"
        link.symlink_to(Path("..data") / "tls.crt")
        watcher = FileWatcher(self.clock, [str(link)], self.changed, interval=1.0)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        (self.dir / "v2").mkdir()
        (self.dir / "v2" / "tls.crt").write_text("one")
        (self.dir / "..tmp").symlink_to("v2")
        os.replace(self.dir / "..tmp", self.dir / "..data")
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)

    def test_deleted_then_created(self):
        self.file.unlink()
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)
        self.clock.advance(1)
        self.assertEqual(self.changes, 1)
        self.file.write_text("back")
        self.clock.advance(1)
        self.assertEqual(self.changes, 2)

    def test_a_failing_callback_does_not_stop_the_watching(self):
        calls = []

        def broken() -> None:
            calls.append(1)
            raise RuntimeError("boom")

        other = self.dir / "other"
        other.write_text("x")
        watcher = FileWatcher(self.clock, [str(other)], broken, interval=1.0)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        other.write_text("xy")
        self.clock.advance(1)
        other.write_text("xyz")
        self.clock.advance(1)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stopping_stops_the_polls(self):
        self.watcher.stopService()
        self.file.write_text("changed")
        self.clock.advance(5)
        self.assertEqual(self.changes, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
