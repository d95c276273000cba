"""Shipping one VM's applications: a round reads what each app appended
(rpofs.apps.ship), relates it to a block point (rpofs.apps.relate) and
commits it as one app point (rpofs.store.shipments). `rpofs ship` runs one
round; the ingester one per app every `interval`."""

import dataclasses
import logging
import posixpath
import re
from typing import NamedTuple

from ..errors import RpofsError
from ..store import shipments
from ..store.schema import AppRecord, ShipRecord
from ..timefmt import now_us
from ..virt.client import Domain
from ..vmconfig import AppConfig
from . import guestio, relate
from .ship import file_round, wal_round

log = logging.getLogger(__name__)


class ShipResult(NamedTuple):
    app: str
    record: ShipRecord | None    # None: nothing new
    restarts: list[str]          # why streams started again this round
    bytes: int


class _Previous(NamedTuple):
    base: int | None
    chain: int | None
    reads_from: int
    streams: tuple      # the app's streams after it


def locate(dom: Domain, path: str) -> dict:
    """Where a guest path's filesystem is in the block points: the
    mountpoint holding it (the agent's guest-get-fsinfo), the disk and the
    volume (rpofs.files: partition number, "0" the whole disk). {} when it
    is on something rpofs.files cannot place (LVM, RAID, several disks)."""
    best = None
    for fs in dom.guest_filesystems():
        mp = fs.mountpoint.rstrip("/") or "/"
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best.mountpoint)):
            best = dataclasses.replace(fs, mountpoint=mp)
    if best is None or len(best.targets) != 1:
        return {}
    target = best.targets[0]
    rest = best.device[len(target):] if best.device.startswith(target) else None
    if rest is None or not re.fullmatch(r"p?\d*", rest):
        return {}
    return {"mountpoint": best.mountpoint, "disk": target, "volume": rest.lstrip("p") or "0"}


class Shipper:
    """The apps of one VM, shipped round by round. Thread-confined: the
    ingester runs one VM's rounds one at a time."""

    def __init__(self, repo, dom: Domain, vm: str, vm_name: str):
        self.repo, self.dom, self.vm, self.vm_name = repo, dom, vm, vm_name
        self.files = relate.PointFiles(repo)
        self._newest_base: int | None = None
        self._previous: dict[str, _Previous] = {}   # per app: its last app point, as this shipper made it

    def ship(self, app: AppConfig) -> ShipResult:
        """One round of one app. AgentUnavailable when the agent does not
        answer: nothing is recorded, the streams stay where they were."""
        record = start = self._record(app)
        before = record.streams
        paths = [app.path + "-wal"] if app.kind == "sqlite" else guestio.glob(self.dom, app.path)
        step = wal_round if app.kind == "sqlite" else file_round
        pieces, restarts, streams, lineage = [], [], dict((s.path, s) for s in record.streams), record.next_lineage
        for path in paths:
            try:
                with guestio.open_file(self.dom, path) as f:
                    result = step(f, path, streams.get(path), lineage)
            except guestio.GuestFileMissing:
                if app.kind == "sqlite":
                    self._database_exists(app)  # no WAL is normal between connections; no database is not
                continue
            if result.state is not None:
                if result.state.lineage >= lineage:
                    lineage = result.state.lineage + 1
                streams[path] = result.state
            pieces += result.pieces
            if result.restart:
                restarts.append(f"{path}: {result.restart}")
        time_us = now_us()
        record = dataclasses.replace(record, streams=tuple(streams.values()), next_lineage=lineage)
        if not pieces:
            if record != start or not self._stored(app):
                with self.repo.write_txn() as txn:
                    shipments.put_app(self.repo, txn, self.vm, record)
            return ShipResult(app.name, None, restarts, 0)
        candidates = self._candidates(app, time_us)
        previous = self._previous.get(app.name)
        if (not restarts and previous is not None and previous.base is not None and candidates
                and candidates[0].point == previous.base and previous.streams == before):
            # the streams went on from where the previous app point left them, over the same base:
            # it continues them as it did (the common case, without reading the base again)
            relation = relate.Relation(previous.base, previous.chain, "", previous.reads_from)
        else:
            pending = [relate.StreamPiece(p.file.path, p.file.lineage, p.file.generation, p.file.offset,
                                          p.file.length, time_us, lambda data=p.data: data) for p in pieces]
            relation = relate.relate(self.repo, self.files, record, candidates, time_us, pending, self.vm)
        size = sum(len(p.data) for p in pieces)
        made = shipments.commit(self.repo, self.vm, record, [(p.file, p.data) for p in pieces], time_us,
                              relation, {"bytes": size})
        self._previous[app.name] = _Previous(made.base, made.chain, made.reads_from, record.streams)
        self.rebase(record)
        return ShipResult(app.name, made, restarts, size)

    def _database_exists(self, app: AppConfig) -> None:
        try:
            with guestio.open_file(self.dom, app.path):
                pass
        except guestio.GuestFileMissing as e:
            raise RpofsError(f"{self.vm_name}: app {app.name}: the database {app.path} is missing in the guest "
                             f"({e})") from None

    def _record(self, app: AppConfig) -> AppRecord:
        with self.repo.env.begin() as txn:
            found = shipments.get_app(self.repo, txn, self.vm, app.name)
        if found is not None and (found.kind, found.path) == (app.kind, app.path) and found.location:
            return found
        where = locate(self.dom, app.path if app.kind == "sqlite" else posixpath.dirname(app.path))
        if not where:
            raise RpofsError(f"{self.vm_name}: app {app.name}: {app.path} is not on a filesystem rpofs can "
                             f"find in the block points (one disk, whole or a partition)")
        if found is not None and (found.kind, found.path) == (app.kind, app.path):
            return dataclasses.replace(found, location=where)
        return AppRecord(app.name, app.kind, app.path, where, (), found.next_lineage if found else 1)

    def _stored(self, app: AppConfig) -> bool:
        """Whether the app has a record (else _record locates it through the agent each round)."""
        with self.repo.env.begin() as txn:
            return shipments.get_app(self.repo, txn, self.vm, app.name) is not None

    def _candidates(self, app: AppConfig, time_us: int):
        """The newest block point at or before time_us, and the base of the
        app's previous shipment."""
        out = []
        newest = next((p for p in self.repo.newest_points(self.vm) if p.time_us <= time_us), None)
        if newest is not None:
            out.append(newest)
        previous = next(shipments.ships(self.repo, self.vm, app=app.name, newest_first=True), None)
        if previous is not None and previous.base is not None and previous.base != (newest and newest.point):
            point = self._point(previous.base)
            if point is not None:
                out.append(point)
        return out

    def _point(self, no: int):
        with self.repo.env.begin() as txn:
            return self.repo.get_point(txn, no)

    def rebase(self, record: AppRecord) -> int:
        """Relate again the app's shipments newer than the newest block
        point that have an older base or none: it was committed after them
        (a backup commits when its job ends, after its snapshot), or they
        were waiting for it. How many changed."""
        newest = next(self.repo.newest_points(self.vm), None)
        if newest is None or newest.point == self._newest_base:
            return 0
        self._newest_base = newest.point
        later = [s for s in shipments.ships(self.repo, self.vm, since_us=newest.time_us, app=record.name)
                 if s.base != newest.point]
        changed = []
        for ship in later:
            state = _streams_at(record, ship, later)
            pieces = relate.stored_pieces(self.repo, shipments.ships(self.repo, self.vm,
                                                                   since_us=newest.time_us - relate.LOOKBACK_US,
                                                                   until_us=ship.time_us, app=record.name))
            try:
                found = relate.continues(self.files, newest, state, state.streams, pieces, ship.time_us)
            except RpofsError:
                continue  # its copy cannot be read: it is no base
            if found.ok:
                changed.append(dataclasses.replace(ship, base=newest.point, chain=newest.chain, waiting="",
                                                   reads_from=found.reads_from))
        if changed:
            with self.repo.write_txn() as txn:
                for ship in changed:
                    shipments.put_ship(self.repo, txn, ship)
        return len(changed)


def _streams_at(record: AppRecord, ship: ShipRecord, later: list[ShipRecord]) -> AppRecord:
    """The app's streams as they stood after `ship`: the current ones, with
    each file's end taken back to where `ship` left it."""
    ends = {}
    for s in later:
        if s.time_us > ship.time_us:
            break
        for f in s.files:
            ends[f.path] = f
    streams = []
    for state in record.streams:
        f = ends.get(state.path)
        if f is not None:
            state = dataclasses.replace(state, lineage=f.lineage, generation=f.generation, offset=f.offset + f.length,
                                        tail="")
        streams.append(state)
    return dataclasses.replace(record, streams=tuple(streams))
