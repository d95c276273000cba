"""Folding the journal into ordinary points.

A session's first fold is a full: every record up to the mirror's ready
time replayed onto zeros. The mirror's first pass wrote every byte of each
disk (data where the source has data, zeroes elsewhere) before QEMU
called it ready, and the records replay in the order QEMU's writes
completed, so the result is the disk at that instant; a disk the records do
not cover whole is refused, never filled with guessed zeros. Each later
fold is a log of its predecessor: the blocks that the records since touched,
each read from the predecessor and the records applied in order.

Folding reads only the journal and the repository: no libvirt backup job
(libvirt refuses one on a disk that is being mirrored).
"""

import collections
from dataclasses import dataclass

from ..errors import RpofsError
from ..store import journal as rec
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import BLOCK_SIZE, CHUNK_SIZE, DiskRecord, PointRecord

@dataclass(frozen=True)
class FoldInput:
    """What a fold records besides the journal."""
    vm: str
    vm_name: str
    domain_xml: str          # the live definition, stored with the point
    checkpoint: str          # the confirmed checkpoint a log backup after the mirror may extend
    checkpoint_xml: str


def replay(records: list[rec.Record], unit: int, sizes: list[int], base_read, sealer=None):
    """(disk, unit no, bytes) of each unit the records touch, in order:
    base_read(disk, offset, length) with the records applied in journal order.
    sealer: an encrypted repository's keys.journal."""
    touched = collections.defaultdict(list)
    for i, r in enumerate(records):
        if r.disk >= len(sizes) or r.end > sizes[r.disk]:
            raise RpofsError(f"journal record beyond disk {r.disk}: {r.offset}+{r.length} in {r.segment}")
        for u in range(r.offset // unit, (r.end - 1) // unit + 1):
            touched[(r.disk, u)].append(i)
    cache = rec.RecordCache(sealer=sealer)
    for disk, u in sorted(touched):
        start = u * unit
        buf = bytearray(base_read(disk, start, min(unit, sizes[disk] - start)))
        for i in touched[(disk, u)]:
            rec.apply(buf, start, records[i], cache)
        yield disk, u, bytes(buf)


def uncovered(records: list[rec.Record], disks: tuple[DiskRecord, ...]) -> str:
    """"" when the records write every byte of every disk; else the first gap."""
    spans = collections.defaultdict(list)
    for r in records:
        spans[r.disk].append((r.offset, r.end))
    for i, d in enumerate(disks):
        pos = 0
        for start, end in sorted(spans[i]):
            if start > pos:
                break
            pos = max(pos, end)
        if pos < d.size:
            return f"disk {d.target}: bytes {pos} on were not written by the mirror's first pass"
    return ""


def fold(repo: Repository, session, journal: list[rec.Record], until_us: int, parent: PointRecord | None,
         what: FoldInput, also=None) -> PointRecord:
    """The session's records up to until_us as a point at until_us: a full
    (parent None: the session's first fold, from every record) or a log of
    parent (the records after it). also(txn, record): committed with it."""
    after = parent.time_us if parent is not None else -1
    chosen = [r for r in journal if after < r.time_us <= until_us]
    sizes = [d.size for d in session.disks]
    sealer = repo.keys.journal if repo.keys else None   # an encrypted repository's records are sealed
    if parent is None:
        gap = uncovered(chosen, session.disks)
        if gap:
            raise RpofsError(f"the journal cannot make a full: {gap}")
    elif [(d.target, d.size) for d in parent.disks] != [(d.target, d.size) for d in session.disks]:
        raise RpofsError("the disks changed since the last point: the journal cannot extend it")
    with repo.begin_writer() as writer:
        if parent is None:
            for disk, chunk, data in replay(chosen, CHUNK_SIZE, sizes, lambda d, o, n: bytes(n), sealer):
                writer.put_full_chunk(disk, chunk, data)
        else:
            readers = [DiskReader(repo, parent, d.target) for d in session.disks]
            for disk, block, data in replay(chosen, BLOCK_SIZE, sizes, lambda d, o, n: readers[d].read(o, n),
                                            sealer):
                writer.put_log_block(disk, block, data)
        xml_key, _ = writer.put_chunk(what.domain_xml.encode())
        cp_key = writer.put_chunk(what.checkpoint_xml.encode())[0].hex() if what.checkpoint_xml else ""
        stats = {"journal": {"session": session.started_us, "from_us": max(after, 0), "to_us": until_us,
                             "records": len(chosen),
                             "bytes": sum(rec.RECORD_HEADER.size + (r.length if r.kind == rec.KIND_WRITE else 0)
                                          for r in chosen)}}
        return writer.commit(
            vm=what.vm, vm_name=what.vm_name, time_us=until_us, parent=parent, consistency="crash-consistent",
            disks=list(session.disks), checkpoint=what.checkpoint, domain_xml=xml_key.hex(),
            reason="continuous protection started: the mirror's first pass" if parent is None else "",
            checkpoint_xml=cp_key, origin="journal", stats=stats, also=also)
