"""An application's files as of a point, for the mount's apps/ and `rpofs cp`.

    <point>/apps/<app>/<file>

For a block point, the files as its disks hold them (a SQLite database with
its WAL checkpointed in memory). For an app point, its base's copy plus the
shipments from `reads_from` to its time, for the app that shipped; for the
VM's other apps, as of their newest app point at or before that time with
the same base (else as the base holds them). A database is rpofs.apps.wal's
DatabaseImage: built from frame headers, pages read when read; a torn or
uncommitted tail is never applied (every frame's salts and checksum are
checked as SQLite's recovery does).
"""

import collections
import posixpath
import threading
from typing import NamedTuple

from ..errors import RpofsError
from ..store import shipments
from ..store.schema import AppRecord, PointRecord, ShipRecord
from ..timefmt import format_time
from . import wal
from .relate import PointFiles, StreamPiece, stored_pieces


class AppFile(NamedTuple):
    name: str
    size: int
    reader: object     # read(offset, length) -> bytes


class AppReadError(RpofsError):
    """An app point's files cannot be made (EIO for them)."""


class AppViews:
    """Apps of the points of one repository; a few views remembered."""

    CACHE = 16

    def __init__(self, repo, guest=None):
        self.repo = repo
        self.files = PointFiles(repo, guest)
        self._lock = threading.Lock()
        self._views: collections.OrderedDict = collections.OrderedDict()

    def apps(self, vm: str) -> list[AppRecord]:
        return shipments.apps(self.repo, vm)

    def app_points(self, vm: str, since_us: int = 0) -> list[ShipRecord]:
        """The VM's readable app points (related to a base), oldest first."""
        return [s for s in shipments.ships(self.repo, vm, since_us=since_us) if s.base is not None]

    def view(self, vm: str, base: PointRecord, ship: ShipRecord | None, app: AppRecord) -> dict[str, AppFile]:
        """One app's files at a block point (ship None) or at an app point."""
        key = (base.point, ship.ship if ship else None, app.name)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        made = self._make(vm, base, ship, app)
        with self._lock:
            self._views[key] = made
            while len(self._views) > self.CACHE:
                self._views.popitem(last=False)
        return made

    def at(self, vm: str, base: PointRecord, time_us: int, app: AppRecord, own: ShipRecord | None = None):
        """An app as of `time_us` over `base`: its newest app point with that
        base at or before the time (`own` when it is that app's), else the base's copy."""
        ship = own if own is not None and own.app == app.name else None
        if ship is None and time_us > base.time_us:
            ship = next((s for s in shipments.ships(self.repo, vm, since_us=base.time_us, until_us=time_us,
                                                  app=app.name, newest_first=True) if s.base == base.point), None)
        return self.view(vm, base, ship, app)

    def _make(self, vm, base, ship, app) -> dict[str, AppFile]:
        pieces = []
        if ship is not None:
            records = shipments.ships(self.repo, vm, since_us=ship.reads_from, until_us=ship.time_us, app=app.name)
            lineages = {f.path: f.lineage for f in ship.files}
            pieces = [p for p in stored_pieces(self.repo, records) if lineages.get(p.path, p.lineage) == p.lineage]
        if app.kind == "sqlite":
            return self._database(base, app, pieces)
        return self._files(base, app, pieces)

    def _database(self, base: PointRecord, app: AppRecord, pieces: list[StreamPiece]) -> dict[str, AppFile]:
        name = posixpath.basename(app.path)
        db = self.files.open(base, app, app.path)
        if db is None:
            return {}
        copy = self.files.read(base, app, app.path + "-wal") or b""
        header, found = wal.scan_wal(copy)
        batches = []
        generations = list(dict.fromkeys(p.generation for p in pieces))
        if header is not None:
            batches.append(wal.FrameBatch(header, found.frames, _reader(copy)))
            if header.generation in generations:
                generations = generations[generations.index(header.generation):]
            # else the base's copy holds all its generation shipped; the pieces (of the
            # app point's lineage, which relate found the base's generation in) are later ones
        for generation in generations:
            mine = sorted((p for p in pieces if p.generation == generation), key=lambda p: p.offset)
            start = found.end if header is not None and generation == header.generation else 0
            data = bytearray(copy[:start])
            for p in mine:
                if p.end > len(data):
                    if p.offset > len(data):
                        raise AppReadError(f"{name}: shipped WAL generation {generation} has a gap at {len(data)}")
                    data += p.load()[len(data) - p.offset:]
            gen_header, gen_found = wal.scan_wal(bytes(data))
            if gen_header is None:
                raise AppReadError(f"{name}: shipped WAL generation {generation} has no valid header")
            if start and gen_found.end < start:
                raise AppReadError(f"{name}: the base's WAL and the shipped frames disagree")
            if start:
                batches.pop()  # the base's own batch: the merged one holds it and what was shipped after
            batches.append(wal.FrameBatch(gen_header, gen_found.frames, _reader(bytes(data))))
        image = wal.DatabaseImage(db.read, db.size, batches)
        return {name: AppFile(name, image.size, image)}

    def _files(self, base: PointRecord, app: AppRecord, pieces: list[StreamPiece]) -> dict[str, AppFile]:
        newest = {}
        for p in pieces:   # oldest first: the last generation seen of each path is its own at the time
            newest[p.path] = p.generation
        paths = sorted(set(self.files.glob(base, app)) | set(newest))
        out = {}
        for path in paths:
            mine = sorted((p for p in pieces if p.path == path and p.generation == newest.get(path)),
                          key=lambda p: p.offset)
            if mine and mine[0].offset == 0:
                data = bytearray()
            else:
                data = bytearray(self.files.read(base, app, path) or b"")
            for p in mine:
                if p.end > len(data):
                    if p.offset > len(data):
                        raise AppReadError(f"{posixpath.basename(path)}: shipped bytes have a gap at {len(data)}")
                    data += p.load()[len(data) - p.offset:]
            name = _unique(posixpath.basename(path), out)
            out[name] = AppFile(name, len(data), _reader(bytes(data)))
        return out


def _unique(name: str, taken: dict) -> str:
    n, candidate = 2, name
    while candidate in taken:
        candidate, n = f"{name}~{n}", n + 1
    return candidate


class _reader:
    def __init__(self, data: bytes):
        self.data = data

    def __call__(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def app_point_json(ship: ShipRecord, base: PointRecord | None) -> dict:
    """An app point's point.json body (and `rpofs points --json`'s entry)."""
    return {
        "name": ship.name,
        "time": format_time(ship.time_us, 6),
        "kind": "app",
        "ship": ship.ship,
        "vm": {"uuid": ship.vm, "name": base.vm_name if base else ""},
        "app": ship.app,
        "app_kind": ship.kind,
        "extends": {"point": base.point, "name": base.name, "time": format_time(base.time_us, 6)} if base else None,
        "waiting": ship.waiting,
        "files": [{"path": f.path, "lineage": f.lineage, "generation": f.generation, "offset": f.offset,
                   "length": f.length} for f in ship.files],
        "stats": ship.stats,
    }
