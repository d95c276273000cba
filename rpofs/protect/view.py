"""A protected VM's disks as of any instant its journal covers, for the
mount (rpofs.mount.journalnodes).

An instant T of a session (from its first fold to its newest record) reads
as the newest point at or before T, which must be one of the session's
folds, with the session's records after that point up to T applied in
journal order. Whatever T is, that is at most one journal_fold of records:
the cost of a read does not grow with the history. An instant whose base
point was pruned, or whose records were dropped by retention, is not
readable and is not listed; at/ then falls back to the points.

Instants are named by a record's time (format_time(t, 6)): the disks do
not change between two records, so at/T links to the newest record at or
before T. Listed are the newest record of each `spacing` of activity, so a
listing stays short; any record's instant can be looked up.
"""

import bisect
import collections
import threading
from dataclasses import dataclass

from ..store import journal as rec, protection
from ..store.journal import JournalReader
from ..store.materialize import DiskReader, Extent
from ..store.repo import Repository
from ..store.schema import BLOCK_SIZE, PointRecord, ProtectionSession
from ..timefmt import format_time


@dataclass
class _SessionView:
    session: ProtectionSession
    journal: JournalReader
    records: list
    times: list

    @property
    def until_us(self) -> int:
        """The newest instant it reads at."""
        newest = self.times[-1] if self.times else 0
        return min(newest, self.session.last_us) if self.session.state == "ended" else newest


class JournalViews:
    def __init__(self, repo: Repository):
        self.repo = repo
        self._views: dict[tuple[str, int], _SessionView] = {}
        self._lock = threading.Lock()
        self.cache = rec.RecordCache(64, sealer=repo.keys.journal if repo.keys else None)

    def refresh(self, vm: str) -> list[_SessionView]:
        """The VM's sessions that have a journal to read, scanned on."""
        out = []
        for s in protection.of_vm(self.repo, vm):
            if not s.ready_us:
                continue
            with self._lock:
                view = self._views.get((vm, s.started_us))
                if view is None:
                    view = self._views[(vm, s.started_us)] = _SessionView(
                        s, rec.reader(self.repo.path, s), [], [])
            view.session = s
            records = view.journal.records()
            view.records, view.times = records, [r.time_us for r in records]
            if records:
                out.append(view)
        return out

    def instants(self, views: list[_SessionView], points: list[PointRecord], spacing_us: int) -> list[int]:
        """The instants to list: per `spacing` that has records, its newest,
        where a fold of the session is the base (not a point's own time)."""
        times = [p.time_us for p in points]
        taken = set(times)
        out = []
        for v in views:
            last_window = None
            for t in v.times:
                if t > v.until_us:
                    break
                if t in taken or not self._based(v, points, times, t):
                    continue
                window = t // spacing_us
                if window == last_window:
                    out[-1] = t
                else:
                    out.append(t)
                    last_window = window
        return sorted(set(out))

    def change_at_or_before(self, views: list[_SessionView], points: list[PointRecord], bound: int) -> int | None:
        """The newest readable record time at or before bound."""
        times = [p.time_us for p in points]
        for v in reversed(views):  # sessions follow one another: the newest that has one
            i = bisect.bisect_right(v.times, min(bound, v.until_us))
            if i and self._based(v, points, times, v.times[i - 1]):
                return v.times[i - 1]
        return None

    def base(self, views: list[_SessionView], points: list[PointRecord], t: int) -> tuple[_SessionView, PointRecord] | None:
        """The session and base point instant t reads from, or None when it
        cannot be read."""
        times = [p.time_us for p in points]
        for v in views:
            if v.session.ready_us <= t <= v.until_us:
                found = self._based(v, points, times, t)
                if found is not None:
                    return v, found
        return None

    @staticmethod
    def _based(v: _SessionView, points: list[PointRecord], times: list[int], t: int) -> PointRecord | None:
        i = bisect.bisect_right(times, t)
        if not i:
            return None
        base = points[i - 1]
        if base.stats.get("journal", {}).get("session") != v.session.started_us:
            return None
        if base.time_us < v.session.journal_from_us:  # records after it were dropped (retention)
            return None
        return base

    def reader(self, v: _SessionView, base: PointRecord, t: int, target: str) -> "JournalDiskReader":
        disk = next(i for i, d in enumerate(v.session.disks) if d.target == target)
        lo = bisect.bisect_right(v.times, base.time_us)
        hi = bisect.bisect_right(v.times, t)
        return JournalDiskReader(DiskReader(self.repo, base, target),
                                 [r for r in v.records[lo:hi] if r.disk == disk], self.cache)


JOURNALED = object()  # an extent's place when the journal's records are applied over it


class JournalDiskReader:
    """A disk as of an instant: its base point's bytes with the records
    after it applied, in journal order. read() like DiskReader's."""

    def __init__(self, base: DiskReader, records: list[rec.Record], cache: rec.RecordCache):
        self.base = base
        self.size = base.size
        self.records = records
        self.cache = cache
        self.index = collections.defaultdict(list)   # block (BLOCK_SIZE) -> records touching it, in order
        for i, r in enumerate(records):
            for b in range(r.offset // BLOCK_SIZE, (r.end - 1) // BLOCK_SIZE + 1):
                self.index[b].append(i)

    def extents(self, offset: int, end: int) -> list[Extent]:
        """The base's extents, those the journal's records touch marked
        JOURNALED (read through read(), records applied): what a restore's
        copy walks (rpofs.store.restore.copy_disk)."""
        out = []
        for e in self.base.extents(offset, end):
            if self._touching(e.pos, e.stop):
                e = e._replace(loc=JOURNALED)
            out.append(e)
        return out

    def extent_bytes(self, extent: Extent):
        if extent.loc is JOURNALED:
            return memoryview(bytes(self.read(extent.pos, extent.stop - extent.pos)))
        return self.base.extent_bytes(extent)

    def prefetch(self, extents: list[Extent]) -> None:
        self.base.prefetch([e for e in extents if e.loc is not JOURNALED])

    def _touching(self, offset: int, end: int) -> list[int]:
        """The records touching [offset, end), in journal order."""
        return sorted({i for b in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1)
                       for i in self.index.get(b, ()) if self.records[i].offset < end and self.records[i].end > offset})

    def read(self, offset: int, length: int):
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        touching = self._touching(offset, end)
        data = self.base.read(offset, end - offset)
        if not touching:
            return data
        buf = bytearray(data)
        for i in touching:
            rec.apply(buf, offset, self.records[i], self.cache)
        return buf


def instant_json(v: _SessionView, base: PointRecord, t: int) -> dict:
    """point.json of a journal instant: a stable, documented shape (docs/PROTECT.md)."""
    lo = bisect.bisect_right(v.times, base.time_us)
    hi = bisect.bisect_right(v.times, t)
    s = v.session
    return {
        "name": format_time(t, 6),
        "time": format_time(t, 6),
        "kind": "journal",
        "origin": "journal",
        "vm": {"uuid": s.vm, "name": base.vm_name},
        "base": {"point": base.point, "name": base.name, "time": format_time(base.time_us, 6)},
        "chain": base.chain,
        "consistency": "crash-consistent",
        "session": {"started": format_time(s.started_us, 6), "state": s.state,
                    "ready": format_time(s.ready_us, 6)},
        "disks": [{"target": d.target, "size": d.size, "source": d.source} for d in s.disks],
        "records_applied": hi - lo,
    }
