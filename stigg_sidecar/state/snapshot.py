"""The cache snapshot: the memory cache written to STATE_DIR and loaded at the next start.

File format (`STATE_DIR/snapshot.gz`): gzip (its CRC and length catch truncation and corruption)
of JSON lines: a header `{"format": "stigg-sidecar-snapshot", "version": 1, "writtenMs", "entries"}`,
one line per entry `[customerId, resourceId, [[keySuffix, value, timestamp], ...]]`, and a trailer
`{"end": entries}`. An entry's items are Stigg's Redis format (`cache.redis.format.encode_entry`,
read back as `decode_from` does): a stable, documented shape, independent of the record classes.
An entitlements value already written (customers of one plan share it) is written as its number.

`SnapshotService` owns when: every SNAPSHOT_INTERVAL_SECS if the cache changed, and at stop. The
reactor only takes the list of (immutable) entries; encoding, compressing, writing, syncing and
the atomic rename run on a thread. At start the file is read and decoded on a thread with
readiness blocked, its entries stored on the reactor in slices, then revalidated in the
background. A missing, corrupt, truncated or unknown-version file is one log line and an empty
start, never a failure.

The write at stop is the stop's last step (`StopBudget`): each write's duration is reserved, so
the parts stopping before it leave that much time, and the final write is waited for only until
the deadline; one that outlasts it is abandoned (its own daemon thread, so the process still
exits) and the previous snapshot stays, whole.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from stigg_sidecar import spans
from stigg_sidecar.cache.redis.format import (
    EntryKeys,
    FormatError,
    MissingUsage,
    StoredEntitlements,
    decode_entitlements,
    decode_entry,
    decode_timestamp,
    encode_entry,
    timestamp_key,
)
from stigg_sidecar.entitlements.records import CustomerEntry
from stigg_sidecar.lifecycle.reactor import IReactor
from stigg_sidecar.lifecycle.stopping import StopBudget

log = Logger()
T = TypeVar("T")

FORMAT = "stigg-sidecar-snapshot"
VERSION = 1
FILE_NAME = "snapshot.gz"
_PREFIX = "snapshot"  # the Redis-format key prefix inside the file; never sent anywhere
_YIELD_EVERY = 5  # entries encoded or decoded between offers of the GIL to the reactor
_SLICE_SECONDS = 0.004  # reactor time per turn spent storing loaded entries


class SnapshotError(Exception):
    """The snapshot cannot be used; the message says why in a few words."""


class SnapshotMissing(SnapshotError):
    pass


@dataclass(frozen=True)
class Snapshot:
    written_ms: int
    entries: list[CustomerEntry]


class _Encoder:
    """Entry lines; an entitlements value seen before (customers of one plan share it) is
    written as its number instead, so the file and its decoding pay for each plan once."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def line(self, entry: CustomerEntry) -> bytes:
        base = EntryKeys(_PREFIX, entry.customer_id, entry.resource_id).entitlements
        items: list[list[Any]] = []
        for item in encode_entry(_PREFIX, entry):
            suffix = item.key[len(base):]
            value: str | int = item.value
            if suffix == "":
                seen = self._seen.get(item.value)
                if seen is None:
                    self._seen[item.value] = len(self._seen)
                else:
                    value = seen
            items.append([suffix, value, item.timestamp])
        return json.dumps([entry.customer_id, entry.resource_id, items], separators=(",", ":")).encode() + b"\n"


class _Decoder:
    """Entries back from their lines (the same steps as `cache.redis.format.decode_from`), decoding
    each distinct entitlements value once."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._decoded: dict[tuple[int, str], StoredEntitlements] = {}

    def entry(self, line: bytes) -> CustomerEntry | None:
        customer_id, resource_id, items = json.loads(line)
        keys = EntryKeys(_PREFIX, customer_id, resource_id)
        base = keys.entitlements
        store: dict[str, str] = {}
        number = -1
        for suffix, value, stamp in items:
            if suffix == "":
                if isinstance(value, int):
                    number = value
                    value = self._texts[value]
                else:
                    number = len(self._texts)
                    self._texts.append(value)
            store[base + suffix] = value
            store[timestamp_key(base + suffix)] = str(stamp)
        text, stamp_text = store.get(base), store.get(timestamp_key(base))
        if not text or stamp_text is None:
            return None
        stored = self._decoded.get((number, stamp_text))
        if stored is None:
            stored = decode_entitlements(text, decode_timestamp(stamp_text, "entitlements#timestamp"))
            self._decoded[(number, stamp_text)] = stored
        usages = {}
        for ref in stored.usage_refs:
            key = f"{base}:{ref}"
            usages[ref] = (store.get(key), store.get(timestamp_key(key)))
        try:
            return decode_entry(customer_id, resource_id, stored, store.get(keys.metadata), stamp_text, usages)
        except MissingUsage:
            return None


def _yielding(items: Sequence[T]) -> Iterator[T]:
    """`items`, letting other threads (the reactor) take the GIL every few of them: a thread
    that only computes keeps it for the whole switch interval each time, and on a busy machine
    the reactor would wait behind it for much longer than that."""
    for index, item in enumerate(items):
        if index % _YIELD_EVERY == 0:
            time.sleep(0)
        yield item


def write_snapshot(path: str, entries: Sequence[CustomerEntry], written_ms: int) -> int:
    """Write `entries` atomically (a new file, synced, renamed over the old one, the directory
    synced); returns the file's size. Runs on any thread: entries are immutable."""
    partial = f"{path}.partial"
    with open(partial, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:
            header = {"format": FORMAT, "version": VERSION, "writtenMs": written_ms, "entries": len(entries)}
            out.write(json.dumps(header).encode() + b"\n")
            encoder = _Encoder()
            out.writelines(encoder.line(entry) for entry in _yielding(entries))
            out.write(json.dumps({"end": len(entries)}).encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
        size = raw.tell()
    os.replace(partial, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return size


def read_snapshot(path: str) -> Snapshot:
    """The snapshot at `path`; raises SnapshotMissing or SnapshotError (naming what is wrong)."""
    try:
        with gzip.open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise SnapshotMissing("no snapshot yet") from None
    except (OSError, EOFError, zlib.error) as e:
        raise SnapshotError(f"unreadable ({e})") from None
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SnapshotError("not a snapshot")
        if header.get("version") != VERSION:
            raise SnapshotError(f"version {header.get('version')!r}, this sidecar reads {VERSION}")
        count = header["entries"]
        if len(lines) != count + 3 or lines[-1] != b"" or json.loads(lines[-2]) != {"end": count}:
            raise SnapshotError("truncated")
        decoder = _Decoder()
        entries = [entry for entry in map(decoder.entry, _yielding(lines[1:-2])) if entry is not None]
        return Snapshot(int(header["writtenMs"]), entries)
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, FormatError) as e:
        raise SnapshotError(f"malformed ({type(e).__name__}: {e})") from None


class SnapshotStore(Protocol):
    """What the snapshot uses of the store (`online.store.EntitlementStore`), on the reactor."""

    @property
    def changes(self) -> int:
        """Bumped by every change of the cached state."""

    def snapshot_entries(self) -> list[CustomerEntry]:
        """The entries as a snapshot holds them."""

    def put(self, entry: CustomerEntry, force: bool = False) -> CustomerEntry:
        """Store a loaded entry (newer wins)."""


class SnapshotService(Service):
    name = "snapshot"

    def __init__(
        self,
        reactor: IReactor,
        path: str,
        store: SnapshotStore,
        interval: float,
        refresh: Callable[[], Any] | None = None,
        readiness: Any = None,
        on_loaded_age: Callable[[float], None] = lambda age: None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        budget: StopBudget | None = None,
    ) -> None:
        self._reactor = reactor
        self._budget = budget
        if budget is not None:  # until a write says how long one takes
            budget.reserve_last_step(min(1.0, budget.seconds / 4))
        self.path = path
        self._store = store
        self._interval = interval
        self._refresh = refresh  # revalidates the cache in the background (Refresher.refresh)
        self._readiness = readiness
        self._on_loaded_age = on_loaded_age
        self._wall_ms = wall_ms
        self._loop: LoopingCall | None = None
        self._writing: Deferred | None = None
        self._written_changes = -1  # the cache's change count at the last snapshot
        self.writes = 0
        self.loaded = 0

    # -- loading ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._readiness is not None:
            self._readiness.block("snapshot", "loading the cache snapshot")
        self._load().addBoth(self._start_writing)

    @inlineCallbacks
    def _load(self) -> Generator[Deferred[Any], Any, None]:
        try:
            snapshot = yield threads.deferToThread(read_snapshot, self.path)
        except SnapshotMissing:
            log.info("No cache snapshot in {path}; starting empty", path=self.path)
            return
        except Exception as e:
            log.warn("Cache snapshot {path} not used ({why}); starting empty", path=self.path, why=str(e))
            return
        entries = snapshot.entries
        index = 0
        while index < len(entries):  # in slices of a few ms: the reactor keeps serving meanwhile
            slice_ends = time.perf_counter() + _SLICE_SECONDS
            while index < len(entries) and time.perf_counter() < slice_ends:
                self._store.put(entries[index])
                index += 1
            yield deferLater(self._reactor, 0, lambda: None)
        age = max(0.0, (self._wall_ms() - snapshot.written_ms) / 1000)
        self.loaded = len(entries)
        self._on_loaded_age(age)
        log.info("Loaded {n} cached customers from the snapshot ({age:.0f}s old); revalidating in the background",
                 n=len(entries), age=age)
        # What was loaded is what the cache holds now: no need to write it again until it changes.
        self._written_changes = self._store.changes
        if self._refresh is not None:
            self._refresh()

    def _start_writing(self, _: Any) -> None:
        if self._readiness is not None:
            self._readiness.unblock("snapshot")
        if self.running:
            self._loop = LoopingCall(self.write_if_changed)
            self._loop.clock = self._reactor
            self._loop.start(self._interval, now=False)

    # -- writing ----------------------------------------------------------------------------------

    def write_if_changed(self) -> Deferred | None:
        if self._writing is not None or self._store.changes == self._written_changes:
            return None
        return self.write()

    def write(self, on_own_thread: bool = False) -> Deferred:
        """Write the cache as it is now; fires with the file's size. One write at a time.
        `on_own_thread`: a daemon thread, not the reactor's pool, which the process waits for at
        exit; always so under a stop budget, so that a periodic write running when the stop
        begins (seconds at 100,000 customers) cannot hold the exit past the deadline either."""
        if self._writing is not None:
            return self._writing.addCallback(lambda _: self.write(on_own_thread))
        changes = self._store.changes
        entries = self._store.snapshot_entries()
        started = self._reactor.seconds()

        def written(size: int) -> int:
            self._writing = None
            self._written_changes = changes
            self.writes += 1
            if self._budget is not None:  # the stop leaves the next write this long, and some
                self._budget.reserve_last_step(1.5 * (self._reactor.seconds() - started) + 0.1)
            log.debug("Cache snapshot: {n} customers, {size} bytes in {s:.2f}s", n=len(entries), size=size,
                      s=self._reactor.seconds() - started)
            return size

        def failed(failure: Failure) -> int:
            self._writing = None
            log.warn("Could not write the cache snapshot {path}: {why}", path=self.path, why=failure.getErrorMessage())
            return 0

        # One span, from the capture to the file synced on its thread.
        attributes = {"stigg.snapshot.customers": len(entries)}
        if on_own_thread or self._budget is not None:
            self._writing = spans.span_until("snapshot write", _on_daemon_thread, self._reactor, write_snapshot,
                                             self.path, entries, self._wall_ms(), attributes=attributes)
        else:
            self._writing = spans.span_until("snapshot write", threads.deferToThread, write_snapshot, self.path,
                                             entries, self._wall_ms(), attributes=attributes)
        self._writing.addCallbacks(written, failed)
        return self._writing

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._budget is None:
            if self._writing is not None:
                yield self._writing
            if self._store.changes != self._written_changes:
                yield self.write()
            return
        self._budget.begin()
        if self._store.changes != self._written_changes or self._writing is not None:
            left = self._budget.remaining_for_last_step()
            final = self.write(on_own_thread=True)
            finished = yield _within(self._reactor, final, left)
            if not finished:
                log.warn("The cache snapshot was not written within SHUTDOWN_GRACE_SECS ({grace:g}s);"
                         " the previous one stays", grace=self._budget.seconds)


def _on_daemon_thread(reactor: IReactorFromThreads, f: Callable[..., Any], *args: Any) -> Deferred:
    """`f(*args)` on a thread of its own that does not hold the process open."""
    d: Deferred = Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException as e:
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="snapshot-at-stop", daemon=True).start()
    return d


def _within(reactor: IReactorTime, d: Deferred, seconds: float) -> Deferred:
    """Deferred[bool]: whether `d` fired within `seconds` (`d` itself is left to finish or not)."""
    outcome: Deferred = Deferred()

    def late() -> None:
        if not outcome.called:
            outcome.callback(False)

    timer = reactor.callLater(seconds, late)

    def fired(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not outcome.called:
            outcome.callback(True)
        return result

    d.addBoth(fired)
    return outcome
