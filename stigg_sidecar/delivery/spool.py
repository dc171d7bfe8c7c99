"""SpoolFile: the write spool on disk, one SQLite database in WAL mode owned by one thread.

SQLite (the standard library's sqlite3) gives what the spool needs without a service: atomic,
durable transactions (`synchronous=FULL` syncs the write-ahead log before a commit returns), a
torn tail detected and rolled back on open (WAL frames carry checksums; a transaction that was not
fully written was never acknowledged), and a file anyone can inspect with the sqlite3 shell.

Every SQLite call runs on the writer thread, which owns the connection: the reactor never waits
on the disk. Jobs queue up while a commit is syncing, and the thread runs all queued jobs in one
transaction: concurrent writes share one sync (group commit). Results are handed back to the
reactor with `callFromThread`.

Tables: `spool` (records waiting for delivery: seq, kind, body, created_ms, trace) and
`dead_letters` (records Stigg refused for good, with the error and when). A body is the record as
JSON (see `delivery.bodies`); the format of the whole file is `PRAGMA user_version`. `trace` (the
W3C traceparent of the write that spooled the record, or NULL) was added to format 1 as a
nullable column: opening a file without it adds it, rows without it load with None, and a sidecar
that predates it still reads and writes the file (it names its columns).

A job submitted inside a recording trace span carries that span's context to the writer thread,
where its transaction is a span ("spool commit") under it: spans follow a write across threads.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans

log = Logger()

FORMAT_VERSION = 1
# The write-ahead log is checkpointed into the database every this many pages (SQLite's default
# is 1000), and cut back to _WAL_KEEP_BYTES after: it never holds more than a few MB on disk.
_WAL_CHECKPOINT_PAGES = 256
_WAL_KEEP_BYTES = 1024 * 1024
# After a delivery the log is folded in and truncated when it holds more than this.
_WAL_SHRINK_BYTES = 64 * 1024

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, body TEXT NOT NULL, created_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, created_ms INTEGER NOT NULL,"
    " failed_ms INTEGER NOT NULL, error TEXT NOT NULL)",
)
# Columns added to format 1 since, each nullable: (table, column, declaration).
_ADDED_COLUMNS = (("spool", "trace", "TEXT"),)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    seq: int
    kind: str  # "usage" | "event"
    body: str
    created_ms: int
    trace: str | None = None  # the spooling write's W3C traceparent


class SpoolFileError(Exception):
    """The spool file cannot be used (not a database, a newer format, not writable)."""


class _Job:
    __slots__ = ("run", "done", "result", "trace")

    def __init__(self, run: Callable[[sqlite3.Connection], Any], done: Deferred,
                 trace: otel_context.Context | None = None) -> None:
        self.run = run
        self.done = done
        self.result: Any = None
        self.trace = trace  # the submitter's context when its span records


_STOP = object()


class SpoolFile:
    def __init__(self, reactor: IReactorFromThreads, path: str) -> None:
        self._reactor = reactor
        self.path = path
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.commits = 0  # transactions synced so far (the writer thread counts, tests read)
        # Bytes the spool takes on disk after the last commit: live database pages plus the
        # write-ahead log's file (the writer thread measures, the reactor reads).
        self.disk_bytes = 0
        self._deleted = False

    # -- reactor ----------------------------------------------------------------------------------

    def open(self) -> Deferred:
        """Start the writer thread, create or check the file; fires with every StoredRecord."""
        self._thread = threading.Thread(target=self._serve, name="spool-writer", daemon=True)
        self._thread.start()
        return self._submit(_load)

    def append(self, rows: Sequence[tuple[str, str, int] | tuple[str, str, int, str | None]]) -> Deferred:
        """Store (kind, body, created_ms[, trace]) rows; fires with their seqs once synced to disk."""
        return self._submit(lambda db: [_insert(db, row) for row in rows])

    def delete(self, seqs: Sequence[int]) -> Deferred:
        def delete(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])
            self._deleted = True  # (writer thread) the log may be checkpointed after this commit

        return self._submit(delete)

    def dead_letter(self, seqs: Sequence[int], error: str, failed_ms: int) -> Deferred:
        """Move records from the spool to the dead-letter table, in one transaction."""

        def move(db: sqlite3.Connection) -> None:
            for seq in seqs:
                db.execute(
                    "INSERT OR REPLACE INTO dead_letters (seq, kind, body, created_ms, failed_ms, error)"
                    " SELECT seq, kind, body, created_ms, ?, ? FROM spool WHERE seq = ?",
                    (failed_ms, error, seq),
                )
                db.execute("DELETE FROM spool WHERE seq = ?", (seq,))

        return self._submit(move)

    def dead_letters(self) -> Deferred:
        """Fires with [(seq, kind, body, error)] of the dead-letter table (for tests and tools)."""
        return self._submit(
            lambda db: db.execute("SELECT seq, kind, body, error FROM dead_letters ORDER BY seq").fetchall()
        )

    def close(self) -> Deferred:
        """Finish the queued jobs, close the database; fires when the thread is gone."""
        done: Deferred = Deferred()
        if self._thread is None:
            done.callback(None)
            return done
        thread, self._thread = self._thread, None

        def wait() -> None:
            thread.join()
            self._reactor.callFromThread(done.callback, None)

        self._jobs.put(_STOP)
        threading.Thread(target=wait, name="spool-close", daemon=True).start()
        return done

    def _submit(self, run: Callable[[sqlite3.Connection], Any]) -> Deferred:
        done: Deferred = Deferred()
        if self._thread is None:
            done.errback(Failure(SpoolFileError("the spool is closed")))
            return done
        traced = otel_context.get_current() if trace.get_current_span().is_recording() else None
        self._jobs.put(_Job(run, done, traced))
        return done

    # -- the writer thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        db: sqlite3.Connection | None = None
        opening_error: Exception | None = None
        try:
            db = _connect(self.path)
        except Exception as e:
            opening_error = e
        while True:
            first = self._jobs.get()
            jobs = [first]
            while True:  # everything queued while the last commit synced: one transaction
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            stop = any(job is _STOP for job in jobs)
            jobs = [job for job in jobs if job is not _STOP]
            if opening_error is not None or db is None:
                error = SpoolFileError(f"cannot open the spool {self.path}: {opening_error}")
                for job in jobs:
                    self._reactor.callFromThread(job.done.errback, Failure(error))
            elif jobs:
                self._run_together(db, jobs)
            if stop:
                if db is not None:
                    db.close()
                return

    def _run_together(self, db: sqlite3.Connection, jobs: list[_Job]) -> None:
        started = time.time_ns()
        try:
            with db:  # one transaction, committed (and synced) at the end
                for job in jobs:
                    job.result = job.run(db)
        except Exception:
            # One bad job must not fail the others: run each in its own transaction.
            for job in jobs:
                try:
                    with db:
                        job.result = job.run(db)
                except Exception as e:
                    self._reactor.callFromThread(job.done.errback, Failure(e))
                    job.done = None  # type: ignore[assignment]
        self.commits += 1
        if self._deleted:
            self._deleted = False
            _shrink_log(db, self.path)
        self.disk_bytes = _disk_bytes(db, self.path)
        ended = time.time_ns()
        for job in jobs:
            if job.trace is not None:  # one span per traced job, over the transaction it shared
                span = spans.tracer.start_span("spool commit", context=job.trace, start_time=started,
                                               attributes={"db.system": "sqlite", "stigg.spool.jobs": len(jobs)})
                if job.done is None:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, "the job failed"))
                span.end(end_time=ended)
        for job in jobs:
            if job.done is not None:
                self._reactor.callFromThread(job.done.callback, job.result)


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)  # `with db` opens one transaction and commits it
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolFileError(f"cannot use write-ahead logging (journal_mode is {mode})")
        db.execute("PRAGMA synchronous=FULL")  # the WAL is synced before a commit returns
        db.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > FORMAT_VERSION:
            raise SpoolFileError(f"written by a newer sidecar (format {version}, this one reads {FORMAT_VERSION})")
        with db:
            for statement in _SCHEMA:
                db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
    except Exception:
        db.close()
        raise
    return db


def _disk_bytes(db: sqlite3.Connection, path: str) -> int:
    """Live database pages (freed ones are reused, so they do not count) plus the WAL file."""
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        wal = os.stat(path + "-wal").st_blocks * 512
    except (sqlite3.Error, OSError):
        return 0
    return pages * page_size + wal


def _shrink_log(db: sqlite3.Connection, path: str) -> None:
    """After deliveries: fold the write-ahead log into the database and cut it to nothing when it
    holds more than _WAL_SHRINK_BYTES, so delivered records stop counting against SPOOL_MAX_BYTES."""
    try:
        if os.stat(path + "-wal").st_size > _WAL_SHRINK_BYTES:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except (sqlite3.Error, OSError):
        pass  # the next automatic checkpoint does it


def is_disk_full(error: BaseException | None) -> bool:
    """Whether SQLite failed for want of disk space (SQLITE_FULL)."""
    return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _load(db: sqlite3.Connection) -> list[StoredRecord]:
    rows = db.execute("SELECT seq, kind, body, created_ms, trace FROM spool ORDER BY seq").fetchall()
    return [StoredRecord(*row) for row in rows]


def _insert(db: sqlite3.Connection, row: tuple[str, str, int] | tuple[str, str, int, str | None]) -> int:
    kind, body, created_ms, *traced = row
    values = (kind, body, created_ms, traced[0] if traced else None)
    cursor = db.execute("INSERT INTO spool (kind, body, created_ms, trace) VALUES (?, ?, ?, ?)", values)
    return int(cursor.lastrowid or 0)
