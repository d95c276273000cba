"""Which block point a shipment extends (schema: ShipRecord.base), and an
application's files as a block point holds them.

A block point B is a shipment's base when B's disks hold every file of the
application in a state the shipped streams continue:
  SQLite   B's WAL is a generation of the shipment's lineage, and the
           shipments from B's time on hold that generation's frames from
           where B's copy ends (committed frames never change within a
           generation, so B's frames and the shipped ones agree), then every
           later generation from its start.
  files    the shipments hold the file's generation from its start, or B
           holds the file and the shipments go on from within B's copy,
           agreeing with it on the bytes they share (its identity).
The candidates are the newest block point at or before the shipment and the
base of the app's previous shipment; none that continues: the shipment waits
(`waiting` says why), is never read, and is related again when the next
block point is committed at or before its time (`rebase`). A WAL made anew
(the application closed its last connection, the guest rebooted) starts a
lineage no older block point holds: its shipments wait for the next one.

Shipments are read from `reads_from` on: the oldest whose bytes the base's
copy does not already hold (prune keeps those)."""

import collections
import fnmatch
import posixpath
import threading
from typing import Callable, NamedTuple

from ..errors import RpofsError
from ..files.guest import GuestFileError, GuestFiles
from ..store import shipments
from ..store.schema import AppRecord, PointRecord, StreamState
from . import wal

LOOKBACK_US = 600 * 1_000_000   # shipments before a base this old are not searched for its continuation


class Relation(NamedTuple):
    base: int | None
    chain: int | None
    waiting: str
    reads_from: int


class StreamPiece(NamedTuple):
    """Shipped bytes of one file's stream, stored or about to be."""
    path: str
    lineage: int
    generation: str
    offset: int
    length: int
    time_us: int
    load: Callable[[], bytes]

    @property
    def end(self) -> int:
        return self.offset + self.length


def stored_pieces(repo, records) -> list[StreamPiece]:
    """The pieces of shipment records, oldest first; bytes read when asked."""
    out = []
    for record in records:
        for f in record.files:
            if f.length:
                key = bytes.fromhex(f.key)
                out.append(StreamPiece(f.path, f.lineage, f.generation, f.offset, f.length, record.time_us,
                                       lambda key=key: bytes(repo.read_chunk(key))))
    return out


class PointFiles:
    """An application's files as block points hold them, read through the
    guest filesystems of the point (rpofs.files.guest), remembered for a few
    points: relating and reading ask for the same point again and again."""

    CACHE = 8

    def __init__(self, repo, guest=None):
        self.repo = repo
        self._guest = guest
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()

    @property
    def guest(self):
        if self._guest is None:
            self._guest = GuestFiles(self.repo)
        return self._guest

    def _lookup(self, point: PointRecord, app: AppRecord, path: str):
        """(node, entry) of the guest path `path` in `point`, or None when it
        is not there (or its filesystem cannot be read); damaged repository
        data raises ChunkError (EIO through the mount)."""
        where = app.location
        if not where or where.get("disk") not in [d.target for d in point.disks]:
            return None
        inner = posixpath.relpath(path, where["mountpoint"])
        if inner.startswith(".."):
            return None
        guest = self.guest
        try:
            key, entry = guest.root(point, where["disk"], where["volume"])
            for name in [p for p in inner.split("/") if p not in ("", ".")]:
                children = guest.children(key) if entry.is_dir else {}
                if name not in children:
                    return None
                key, entry = guest.remember(guest.fs_of(key), point, where["disk"], where["volume"], children[name])
        except GuestFileError:
            return None
        return key, entry

    def open(self, point: PointRecord, app: AppRecord, path: str):
        """The guest file `path` as `point` holds it (read(offset, length), size), or None."""
        found = self._lookup(point, app, path)
        if found is None or found[1].is_dir:
            return None
        return _Sized(self.guest.open(found[0]), found[1].size)

    def read(self, point: PointRecord, app: AppRecord, path: str) -> bytes | None:
        """The whole file (a WAL, a log file's copy), remembered."""
        cache_key = (point.point, path)
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
        f = self.open(point, app, path)
        data = None if f is None else f.read(0, f.size)
        with self._lock:
            self._cache[cache_key] = data
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return data

    def glob(self, point: PointRecord, app: AppRecord) -> list[str]:
        """The guest paths a `files` app's pattern names in the point."""
        directory, pattern = posixpath.split(app.path)
        found = self._lookup(point, app, directory)
        if found is None or not found[1].is_dir:
            return []
        try:
            names = [n for n, e in self.guest.children(found[0]).items() if not e.is_dir]
        except GuestFileError:
            return []
        return sorted(posixpath.join(directory, n) for n in names if fnmatch.fnmatchcase(n, pattern))


class _Sized:
    def __init__(self, f, size: int):
        self._f, self.size = f, size

    def read(self, offset: int, length: int) -> bytes:
        return self._f.read(offset, length)


class Continuity(NamedTuple):
    ok: bool
    reads_from: int = 0
    reason: str = ""


def continues(files: PointFiles, point: PointRecord, app: AppRecord, streams: tuple[StreamState, ...],
              pieces: list[StreamPiece], time_us: int) -> Continuity:
    """Whether `point` can be the base of an app point at `time_us` whose
    streams stand at `streams`, given the shipped `pieces` (oldest first)
    from the lookback window on."""
    reads_from = time_us
    for state in streams:
        mine = [p for p in pieces if p.path == state.path and p.lineage == state.lineage]
        check = _wal_continues if app.kind == "sqlite" else _file_continues
        found = check(files, point, app, state, mine)
        if not found.ok:
            return Continuity(False, 0, f"{state.path}: {found.reason}")
        reads_from = min(reads_from, found.reads_from)
    return Continuity(True, reads_from)


def _run_from(pieces: list[StreamPiece], start: int, end: int) -> StreamPiece | None | bool:
    """The piece to read from so that [start, end) is covered without a gap
    (None: nothing needed; False: not covered)."""
    if start >= end:
        return None
    first = None
    at = start
    for p in sorted(pieces, key=lambda p: p.offset):
        if p.offset <= at < p.end:
            first = first or p
            at = p.end
    return first if at >= end else False


def _wal_continues(files, point, app, state, pieces) -> Continuity:
    data = files.read(point, app, state.path)
    header, found = wal.scan_wal(data) if data else (None, None)
    if header is None:
        return Continuity(False, reason="the block point holds no WAL of this database")
    generations = list(dict.fromkeys(p.generation for p in pieces))
    if state.generation not in generations:
        generations.append(state.generation)  # nothing new shipped of the current one in the window
    if header.generation not in generations:
        return Continuity(False, reason=f"the block point's WAL (generation {header.generation}) is not one "
                                        f"the shipped stream holds")
    later = generations[generations.index(header.generation):]
    reads_from = None
    for generation in later:
        mine = [p for p in pieces if p.generation == generation]
        end = state.offset if generation == state.generation else max((p.end for p in mine), default=0)
        start = found.end if generation == header.generation else 0
        first = _run_from(mine, start, end)
        if first is False:
            return Continuity(False, reason=f"generation {generation} was not shipped from "
                                            f"{'the block point on' if start else 'its start'} within the lookback")
        if first is not None and reads_from is None:
            reads_from = first.time_us
    return Continuity(True, reads_from if reads_from is not None else point.time_us)


def _file_continues(files, point, app, state, pieces) -> Continuity:
    mine = sorted((p for p in pieces if p.generation == state.generation), key=lambda p: p.offset)
    if mine and mine[0].offset == 0 and _run_from(mine, 0, state.offset):
        return Continuity(True, _run_from(mine, 0, state.offset).time_us)  # whole in the shipments
    copy = files.read(point, app, state.path)
    if copy is None:
        return Continuity(False, reason="the block point does not hold the file")
    held = len(copy)
    if held > state.offset:
        return Continuity(False, reason="the block point's copy is longer than what was shipped")
    first = _run_from(mine, held, state.offset)
    if first is False:
        return Continuity(False, reason="the bytes after the block point's copy were not shipped within the lookback")
    # identity: the shipped bytes next to the copy's end agree with it
    keep = min(64, held)
    if first is not None and first.offset < held:
        shared = first.load()[max(held - keep, first.offset) - first.offset:held - first.offset]
        if copy[held - len(shared):held] != shared:
            return Continuity(False, reason="the block point holds another file under that name")
    elif first is None and keep and copy[-keep:].hex() != state.tail[-2 * keep:]:
        return Continuity(False, reason="the block point holds another file under that name")
    return Continuity(True, first.time_us if first is not None else point.time_us)


def relate(repo, files: PointFiles, app: AppRecord, candidates: list[PointRecord], time_us: int,
           pending: list[StreamPiece], vm: str) -> Relation:
    """The relation of an app point at `time_us` (its streams: app.streams)
    to the first candidate that it continues. pending: this shipment's own
    pieces, not committed yet."""
    reasons = []
    for point in candidates:
        since = point.time_us - LOOKBACK_US
        stored = stored_pieces(repo, shipments.ships(repo, vm, since_us=since, until_us=time_us, app=app.name))
        try:
            found = continues(files, point, app, app.streams, stored + pending, time_us)
        except RpofsError as e:  # the point's copy cannot be read (damaged): it is no base
            found = Continuity(False, reason=f"its copy cannot be read: {e}")
        if found.ok:
            return Relation(point.point, point.chain, "", found.reads_from)
        reasons.append(f"point {point.name}: {found.reason}")
    return Relation(None, None, "; ".join(reasons) or "no block point yet", 0)
