"""Retention: which recovery points a VM keeps, and removing the others
without touching a byte of the kept ones.

Choosing is pure (`choose`). A VM always keeps its newest point (the next log
extends it), and a chain keeps its full while any of its points stays (the
full is every log's base).

Removing (`prune`) runs under the repository's exclusive lock, so no backup
is between finding a chunk already stored and committing its reference: one
write transaction drops the points and the index entries no kept point reads
any more (and with them their log blocks), then garbage collection
(rpofs.store.gc) frees what nothing refers to any more.

A log entry (block B changed at point P) serves every point from P until the
next change of B; it is kept while a kept point falls in that span, so a
removed log point's changes live on when a later kept point still reads them.
"""

import bisect
import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import NamedTuple

from . import gc, holds, schema, shipments
from .repo import fix_names, points_in, second_group
from .schema import PointRecord, ShipRecord
from ..timefmt import US


@dataclass(frozen=True)
class Retention:
    last: int = 0            # the newest N points
    within_s: float = 0.0    # every point this close to the newest
    hourly: int = 0          # the newest point of each of the last N hours that have points (UTC)
    daily: int = 0
    weekly: int = 0          # ISO weeks
    monthly: int = 0

    def keeps_everything(self) -> bool:
        return not any((self.last, self.within_s, self.hourly, self.daily, self.weekly, self.monthly))


def _bucket(unit: str, time_us: int):
    t = datetime.datetime.fromtimestamp(time_us / US, datetime.timezone.utc)
    return {"hourly": (t.date(), t.hour), "daily": t.date(), "weekly": t.isocalendar()[:2],
            "monthly": (t.year, t.month)}[unit]


def choose(points: list[PointRecord], policy: Retention, held: set[int] = frozenset()) -> set[int]:
    """The point numbers to keep; points oldest first. `held`: points
    something outside the catalog reads (rpofs.store.holds), kept whatever
    the policy says."""
    if not points or policy.keeps_everything():
        return {p.point for p in points}
    keep = {points[-1].point} | (held & {p.point for p in points})
    if policy.last:
        keep.update(p.point for p in points[-policy.last:])
    if policy.within_s:
        since = points[-1].time_us - policy.within_s * US
        keep.update(p.point for p in points if p.time_us >= since)
    for unit in ("hourly", "daily", "weekly", "monthly"):
        wanted, seen = getattr(policy, unit), set()
        for p in reversed(points):
            if len(seen) >= wanted:
                break
            bucket = _bucket(unit, p.time_us)
            if bucket not in seen:
                seen.add(bucket)
                keep.add(p.point)
    keep.update({p.chain for p in points if p.point in keep})
    return keep


def entry_is_live(changed_at: int, next_change: int | None, kept: list[int]) -> bool:
    """Whether a log entry made at point `changed_at`, superseded at
    `next_change` (None: never), is read by one of the chain's kept points
    (sorted)."""
    i = bisect.bisect_left(kept, changed_at)
    return i < len(kept) and (next_change is None or kept[i] < next_change)


@dataclass
class PruneReport:
    points_removed: list[PointRecord] = field(default_factory=list)
    points_kept: int = 0
    chunks_freed: int = 0
    log_entries_dropped: int = 0
    ships_removed: int = 0       # app points (rpofs.apps) gone with their base
    ships_unbased: int = 0       # app points kept without a base: later ones read their bytes
    app_points_removed: list[ShipRecord] = field(default_factory=list)
    packs_deleted: int = 0
    packs_compacted: int = 0
    bytes_freed: int = 0         # of pack files (the catalog's freed pages are reused, its file never shrinks)

    def summary(self) -> str:
        apps = f", {self.ships_removed} app points" if self.ships_removed else ""
        unbased = (f" ({self.ships_unbased} app points left without a base, waiting: later app points read "
                   f"them)" if self.ships_unbased else "")
        return (f"{len(self.points_removed)} points{apps} removed, {self.points_kept} kept{unbased}; "
                f"{self.log_entries_dropped} log blocks and {self.chunks_freed} chunks freed; "
                f"{self.packs_deleted} pack files deleted, "
                f"{self.packs_compacted} compacted; {self.bytes_freed} bytes freed")


def prune(repo, vm: str, policy: Retention, dry_run: bool = False, progress=None) -> PruneReport:
    """progress: a rpofs.progress.Progress (set, add), told the bytes the
    compaction copies, the long part of a prune."""
    report = PruneReport()
    if dry_run:
        points = repo.points(vm)
        keep = choose(points, policy, holds.held_points(repo.path, vm))
        report.points_removed = [p for p in points if p.point not in keep]
        report.points_kept = len(keep)
        if report.points_removed:
            fates = _ship_fates(list(shipments.ships(repo, vm)), keep,
                                max((p.time_us for p in points if p.point in keep), default=0))
            report.app_points_removed = fates.deleted
            report.ships_removed, report.ships_unbased = len(fates.deleted), len(fates.unbased)
        return report
    with repo.exclusive():
        before = repo.pack_bytes()
        with repo.write_txn() as txn:
            _drop_points(repo, txn, vm, policy, report)
            if report.points_removed:
                pruned = schema.read_u32(txn.get(schema.META_PRUNED, default=schema.u32(0), db=repo.db["meta"]))
                txn.put(schema.META_PRUNED, schema.u32(pruned + 1), db=repo.db["meta"])
                gc.mark(repo, txn)
        if report.points_removed or gc.pending(repo):  # also what an interrupted collection left
            report.packs_deleted, report.packs_compacted = gc.collect(repo, progress)
        report.bytes_freed = before - repo.pack_bytes()
    return report


def _drop_points(repo, txn, vm: str, policy: Retention, report: PruneReport) -> None:
    db = repo.db
    points = points_in(repo, txn, vm)
    keep = choose(points, policy, holds.held_points(repo.path, vm))
    report.points_kept = len(keep)
    report.points_removed = [p for p in points if p.point not in keep]
    if not report.points_removed:
        return
    vm_bytes = schema.vm_key(vm)
    for second in {p.time_us // US for p in report.points_removed}:
        fix_names(repo, txn, second_group(repo, txn, vm_bytes, second))  # the survivors keep their names
    for p in report.points_removed:
        txn.delete(schema.point_key(p.point), db=db["points"])
        txn.delete(schema.vm_point_key(vm_bytes, p.time_us, p.point), db=db["vm_points"])
    touched = {p.chain for p in report.points_removed}
    for chain in touched:
        kept = sorted(p.point for p in points if p.chain == chain and p.point in keep)
        prefix = schema.chain_prefix(chain)
        if not kept:  # the whole chain goes
            delete_prefix(txn.cursor(db=db["full_index"]), prefix)
            report.log_entries_dropped += delete_prefix(txn.cursor(db=db["log_index"]), prefix)
        else:
            report.log_entries_dropped += _drop_dead_entries(txn.cursor(db=db["log_index"]), prefix, kept)
    fates = _ship_fates(list(shipments.ships(repo, vm, txn=txn)), {p.point for p in points if p.point in keep},
                        max((p.time_us for p in points if p.point in keep), default=0))
    for s in fates.deleted:
        shipments.delete_ship(repo, txn, s)
    for s in fates.unbased:
        shipments.put_ship(repo, txn, dataclasses.replace(
            s, base=None, chain=None, waiting="its base point was pruned (kept: later app points read it)"))
    report.app_points_removed = fates.deleted
    report.ships_removed, report.ships_unbased = len(fates.deleted), len(fates.unbased)
    report.chunks_freed = gc.drop_unused_chunks(repo, txn)


class ShipFates(NamedTuple):
    """What a prune does to a VM's app points."""
    deleted: list[ShipRecord]    # gone from the catalog (and from listings)
    unbased: list[ShipRecord]    # kept without their base, waiting: later app points read their bytes


def _ship_fates(ships: list[ShipRecord], kept: set[int], newest_us: int) -> ShipFates:
    """App points go with the block point they extend (read without it,
    they would be wrong); one waiting for a base goes once a block point
    newer than it is kept (no base can come any more). What a kept app point
    reads (its app's shipments from its reads_from on) stays, without a
    base of its own."""
    stays = [s for s in ships if s.base in kept or (s.base is None and s.time_us >= newest_us)]
    needed = {}
    for s in stays:
        needed[s.app] = min(needed.get(s.app, s.reads_from or s.time_us), s.reads_from or s.time_us)
    deleted, unbased = [], []
    for s in ships:
        if s in stays:
            continue
        if s.time_us >= needed.get(s.app, 1 << 63):  # its bytes are read by a kept one: no point of its own
            if s.base is not None:
                unbased.append(s)
        else:
            deleted.append(s)
    return ShipFates(deleted, unbased)


def delete_prefix(cur, prefix: bytes) -> int:
    """Delete every entry whose key starts with prefix (one of schema's); how many."""
    return _delete(cur, list(schema.scan_keys(cur, prefix)))


def _drop_dead_entries(cur, prefix: bytes, kept: list[int]) -> int:
    """Entries of one block come newest first: each one's successor is the
    entry before it."""
    dead, block_of, newer = [], None, None
    for key in schema.scan_keys(cur, prefix):
        _, disk, block, changed_at = schema.read_log_key(key)
        if (disk, block) != block_of:
            block_of, newer = (disk, block), None
        if not entry_is_live(changed_at, newer, kept):
            dead.append(key)
        # even when dropped, it ends the span of the entry before it: no kept
        # point fell between the two, so the older one serves the same points
        newer = changed_at
    return _delete(cur, dead)


def _delete(cur, keys: list[bytes]) -> int:
    """Collected first: py-lmdb's cursor does not show the next item after a delete."""
    for key in keys:
        cur.set_key(key)
        cur.delete()
    return len(keys)


def prune_by_name(repo, vm_ref: str, policy: Retention, dry_run: bool = False,
                  progress=None) -> tuple[str, PruneReport]:
    """The VM by name or UUID as recorded in the repository. progress(name):
    a Progress for that VM's prune (or None)."""
    uuid, name = repo.find_vm(vm_ref)
    if progress is None or dry_run:
        return name, prune(repo, uuid, policy, dry_run)
    with progress(name) as shown:
        return name, prune(repo, uuid, policy, dry_run, shown)
