"""`rpofs verify`: proof, before the day it is needed, that every byte a
recovery point reads is there and intact — and, when it is not, which VMs,
points, disks and byte ranges read EIO because of it.

What is checked (every reference comes from rpofs.store.refs):
  * relations: every point record has its `vm_points` entry and `vms` row
    and the other way round; a log's chain is a full of the same VM, its
    parent an earlier point of that chain, its disks the full's; every index
    entry belongs to a chain with a full and lies inside that disk; the
    counters in `meta` are ahead of every point and pack;
  * references: every chunk a full or a point names has its `chunks` row;
    every place (a `chunks` row, a stored log block) is the start of a pack
    record whose header says what the catalog says (key, codec, lengths);
  * with read_data, every record of every pack read where it is kept (an
    object store itself, never its local cache) and checked against its
    key (the content's blake3, each piece of a pieced record): packs are
    cut into ranges of about RANGE bytes at record starts the catalog knows,
    each walked front to back in WINDOW-sized reads by one of WORKERS
    threads (blake3, zstd and AES-GCM release the GIL), and every record
    nothing refers to counted as garbage.
Garbage (pack data the catalog does not refer to: a killed backup's pack, a
killed prune's copy) is reported, not counted as damage, and freed by a
later prune (rpofs.store.gc); a backup running meanwhile may show as garbage
too.

Verify takes no lock: backups, prune and defrag go on. What it reads is one
catalog snapshot; a problem found is confirmed against a fresh snapshot at
the end, so a record that prune or defrag moved meanwhile is checked where it
is now instead of being reported.

Results of the last run are kept in REPO/verify.json (per VM: when, whether
damaged, how many points) for `rpofs status` and the metrics.
"""

import contextlib
import concurrent.futures
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from .. import durable
from ..errors import ChunkError, ChunkMissing, PackMissing
from ..timefmt import point_names
from . import journal, protection, refs, schema
from .shipments import all_ships
from .refs import Ref
from .schema import BLOCK_SIZE, BLOCKS_PER_CHUNK, CHUNK_SIZE, PACK_HEADER, ChunkLocation, PointRecord

log = logging.getLogger(__name__)

WORKERS = max(4, os.cpu_count() or 1)   # walks at once: the disk's queue busy while threads hash
WINDOW = 16 << 20    # bytes a walk reads at once (a record is at most ~1.1 MiB)
RANGE = 64 << 20     # a pack is walked in ranges of about this many bytes, one per worker at a time
RESULTS = "verify.json"


@dataclass
class Affected:
    """What reads EIO because of one problem: a disk's byte ranges at one
    point ([start, stop), merged), or a point's own data (ranges empty)."""
    vm: str
    vm_name: str
    point: int
    name: str
    what: str            # a disk's target ("vda"), or "domain_xml", "checkpoint_xml", "firmware/nvram", "point",
                         # or "apps/<app>": an app point, `point` then being its shipment's number
    ranges: list = field(default_factory=list)


@dataclass
class Problem:
    kind: str            # "relation" | "missing-chunk" | "missing-pack" | "truncated" | "header" | "corrupt"
                         # | "journal" (rpofs.protect: no point affected, instants after it unreadable)
    message: str
    pack: int | None = None
    offset: int | None = None
    affects: list = field(default_factory=list)


class Finding(NamedTuple):
    """A problem one reference seems to have, in the snapshot checked: a
    Problem once _confirm finds it still there."""
    kind: str                         # as Problem.kind (not "relation", "journal")
    ref: Ref
    detail: str                       # what is wrong with the record
    pieces: frozenset | None = None   # a pieced record's damaged pieces; None: all of it


@dataclass
class Garbage:
    packs: int = 0       # packs nothing refers to
    records: int = 0     # read_data: records nothing refers to (in packs that are in use too)
    bytes: int = 0


@dataclass
class VerifyReport:
    time_us: int
    read_data: bool
    vms: list                   # uuids checked
    repository_wide: bool = True  # False: one VM's data only (no garbage counted, no schedule kept)
    points: int = 0
    references: int = 0
    records_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    garbage: Garbage = field(default_factory=Garbage)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def damaged_vms(self) -> dict[str, set[int]]:
        """uuid -> the points that read EIO somewhere."""
        out: dict[str, set[int]] = {}
        for problem in self.problems:
            for a in problem.affects:
                out.setdefault(a.vm, set()).add(a.point)
        return out


class _Catalog:
    """What one snapshot says about points, read once."""

    def __init__(self, repo, txn):
        self.bad_records: list[tuple[int, str]] = []   # (point no, why its record cannot be read)
        self.points: dict[int, PointRecord] = {p.point: p for p in repo.all_points(txn, self.bad_records)}
        self.chain_points: dict[int, list[PointRecord]] = {}
        by_vm: dict[str, list[PointRecord]] = {}
        for record in sorted(self.points.values(), key=lambda p: (p.time_us, p.point)):
            self.chain_points.setdefault(record.chain, []).append(record)
            by_vm.setdefault(record.vm, []).append(record)
        self.names: dict[int, str] = {}
        for records in by_vm.values():
            for record, name in zip(records, point_names([p.time_us for p in records], [p.name for p in records])):
                self.names[record.point] = name
        self.bad_ships: list[tuple[int, str]] = []   # (shipment no, why its record cannot be read)
        self.ships = {s.ship: s for s in all_ships(repo, txn, self.bad_ships)}
        self.fulls = {no: p for no, p in self.points.items() if p.kind == "full" and p.chain == no}
        self.sizes = {(chain, i): d.size for chain, full in self.fulls.items() for i, d in enumerate(full.disks)}

    def affected(self, record: PointRecord, what: str, ranges=()) -> Affected:
        return Affected(record.vm, record.vm_name, record.point, self.names.get(record.point, ""), what,
                        [list(r) for r in ranges])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, stop in sorted(ranges):
        if out and out[-1][1] >= start:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [tuple(r) for r in out]


def _changes(repo, txn, chain: int, disk: int, block: int) -> list[int]:
    """The points that changed a block, oldest first."""
    prefix = schema.log_block_prefix(chain, disk, block)
    cur = txn.cursor(db=repo.db["log_index"])
    out = []
    for key in schema.scan_keys(cur, prefix):
        out.append(schema.read_log_key(key)[3])
    return sorted(out)


def affects(repo, txn, cat: _Catalog, ref: Ref, pieces: frozenset | None = None) -> list[Affected]:
    """Who reads the bytes `ref` refers to: the points and disk ranges.
    pieces: of a full chunk, only those pieces are damaged (a piece is a
    block: PIECE_SIZE == BLOCK_SIZE)."""
    if ref.kind == "app":  # the shipment, and every app point of its app that reads it
        ship = cat.ships.get(ref.point)
        if ship is None:
            return []
        readers = [s for s in cat.ships.values() if s.vm == ship.vm and s.app == ship.app and s.base is not None
                   and s.reads_from <= ship.time_us <= s.time_us]
        base = cat.points.get(ship.base) if ship.base is not None else None
        return [Affected(s.vm, base.vm_name if base else "", s.ship, s.name, f"apps/{s.app}")
                for s in sorted(readers, key=lambda s: s.time_us)]
    if ref.kind not in ("full", "log"):
        record = cat.points.get(ref.point)
        return [cat.affected(record, ref.kind)] if record else []
    full = cat.fulls.get(ref.chain)
    if full is None or ref.disk >= len(full.disks):
        return []
    target, size = full.disks[ref.disk].target, full.disks[ref.disk].size
    nblocks = -(-size // BLOCK_SIZE)
    out = []
    if ref.kind == "full":
        first = ref.index * BLOCKS_PER_CHUNK
        changes = {b: _changes(repo, txn, ref.chain, ref.disk, b)
                   for b in range(first, min(first + BLOCKS_PER_CHUNK, nblocks))
                   if pieces is None or b - first in pieces}
        for record in cat.chain_points.get(ref.chain, []):
            ranges = [(b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, size)) for b, points in changes.items()
                      if not any(p <= record.point for p in points)]
            if ranges:
                out.append(cat.affected(record, target, _merge(ranges)))
        return out
    later = [p for p in _changes(repo, txn, ref.chain, ref.disk, ref.index) if p > ref.point]
    until = later[0] if later else None
    span = [(ref.index * BLOCK_SIZE, min((ref.index + 1) * BLOCK_SIZE, size))]
    for record in cat.chain_points.get(ref.chain, []):
        if ref.point <= record.point and (until is None or record.point < until):
            out.append(cat.affected(record, target, span))
    return out


def _relations(repo, txn, cat: _Catalog, vms: set[str] | None) -> list[Problem]:
    """The catalog's own invariants (schema.py)."""
    problems = []

    def bad(message, *records):
        problems.append(Problem("relation", message, affects=[cat.affected(r, "point") for r in records if r]))

    def wanted(vm: str) -> bool:
        return vms is None or vm in vms

    for no, why in cat.bad_records:
        bad(f"point record {no} cannot be read: {why}")
    listed = set()
    for key in txn.cursor(db=repo.db["vm_points"]).iternext(values=False):
        vm_bytes, time_us, no = schema.read_vm_point_key(key)
        vm = schema.read_vm_key(vm_bytes)
        listed.add(no)
        record = cat.points.get(no)
        if record is None:
            if wanted(vm):
                bad(f"VM {vm} lists point {no}, which has no record")
        elif (record.vm, record.time_us) != (vm, time_us):
            bad(f"point {no} is listed under VM {vm} at {time_us}, its record says {record.vm} at "
                f"{record.time_us}", record)
    vm_rows = {schema.read_vm_key(k) for k in txn.cursor(db=repo.db["vms"]).iternext(values=False)}
    meta = repo.db["meta"]
    next_point = schema.read_u32(txn.get(schema.META_NEXT_POINT, db=meta))
    for no, record in sorted(cat.points.items()):
        if not wanted(record.vm):
            continue
        if no not in listed:
            bad(f"point {no} ({record.vm_name}) is not listed under its VM", record)
        if record.vm not in vm_rows:
            bad(f"VM {record.vm} ({record.vm_name}) of point {no} has no row in vms", record)
        if no >= next_point:
            bad(f"point {no} is not below meta next_point {next_point}", record)
        if record.kind == "full":
            if record.chain != no or record.parent is not None:
                bad(f"full point {no} names chain {record.chain} and parent {record.parent}", record)
            continue
        full = cat.fulls.get(record.chain)
        parent = cat.points.get(record.parent) if record.parent is not None else None
        if full is None or full.vm != record.vm:
            bad(f"log point {no} ({record.vm_name}) extends chain {record.chain}, which has no full of its VM", record)
        elif tuple((d.target, d.size) for d in record.disks) != tuple((d.target, d.size) for d in full.disks):
            bad(f"log point {no} ({record.vm_name}) has other disks than its chain's full {full.point}", record)
        # a pruned parent is gone (the log's changes stay with it): its number still lies in the chain
        pruned_parent = parent is None and record.parent is not None and record.chain <= record.parent < no
        if not pruned_parent and (parent is None or parent.chain != record.chain or parent.point >= no
                                  or parent.time_us > record.time_us):
            bad(f"log point {no} ({record.vm_name}) names parent {record.parent}, "
                f"which is not an earlier point of chain {record.chain}", record)
    for no, why in cat.bad_ships:
        bad(f"shipment record {no} cannot be read: {why}")
    next_ship = txn.get(schema.META_NEXT_SHIP, db=meta)
    for no, ship in sorted(cat.ships.items()):
        if not wanted(ship.vm):
            continue
        base = cat.points.get(ship.base) if ship.base is not None else None
        if ship.base is not None and (base is None or base.vm != ship.vm or base.chain != ship.chain
                                      or base.time_us > ship.time_us):
            problems.append(Problem("relation", f"app point {ship.name} ({ship.app}) extends point {ship.base}, "
                                    f"which is not an earlier block point of its VM in chain {ship.chain}",
                                    affects=[Affected(ship.vm, "", no, ship.name, f"apps/{ship.app}")]))
        if next_ship is None or no >= schema.read_u32(next_ship):
            problems.append(Problem("relation", f"shipment {no} is not below meta next_ship",
                                    affects=[Affected(ship.vm, "", no, ship.name, f"apps/{ship.app}")]))
    chains_of = {chain: full.vm for chain, full in cat.fulls.items()}
    for name, read_key, unit in (("full_index", schema.read_full_key, CHUNK_SIZE),
                                 ("log_index", schema.read_log_key, BLOCK_SIZE)):
        seen_bad = set()
        for key in txn.cursor(db=repo.db[name]).iternext(values=False):
            chain, disk, index = read_key(key)[:3]
            if chain in chains_of and not wanted(chains_of[chain]):
                continue
            if vms is not None and chain not in chains_of:
                continue  # whose it is cannot be told: the repository-wide run reports it
            size = cat.sizes.get((chain, disk))
            if size is None or index * unit >= size:
                if (chain, disk) not in seen_bad:
                    seen_bad.add((chain, disk))
                    bad(f"{name} has entries of chain {chain} disk {disk} that no full point's disk holds",
                        cat.fulls.get(chain))
    return problems


def _check_header(repo, ref: Ref, header: bytes, size: int) -> str:
    """What is wrong with the record a reference points at ("" nothing),
    judged by its header and the pack's size."""
    loc = ref.loc
    if len(header) < PACK_HEADER.size or loc.offset - PACK_HEADER.size + refs.record_len(repo, loc) > size:
        return "truncated"
    key, codec, raw_len, stored_len = PACK_HEADER.unpack(header)
    if (codec, raw_len, stored_len) != (loc.codec, loc.raw_len, loc.stored_len) or \
            (ref.keyed and key != ref.key):
        return "header"
    return ""


_WHY = {"truncated": "the pack file ends before the record", "header": "the record's header does not say what "
        "the catalog does (key, codec or lengths)", "missing-pack": "the pack file is missing"}


@dataclass
class _Record:
    """A record as the walk through its pack found it."""
    key: bytes
    loc: ChunkLocation
    kind: str = ""               # "" intact, "corrupt", "truncated"
    error: str = ""
    pieces: frozenset | None = None   # a pieced record's damaged pieces; None: all of it


def _checked(repo, key: bytes, loc: ChunkLocation, stored) -> _Record:
    """A record checked from its stored part as read from the pack."""
    record = _Record(key, loc)
    try:
        bad = repo.reader.check(key, loc, stored)
    except ChunkError as e:
        record.kind, record.error = "corrupt", str(e)
        return record
    if bad:
        record.kind, record.pieces = "corrupt", bad
        record.error = (f"chunk {key.hex()[:16]} in {schema.pack_name(loc.pack)} at {loc.offset}: "
                        f"pieces {', '.join(map(str, sorted(bad)))} do not match their hashes")
    return record


def _check_record(repo, key: bytes, loc: ChunkLocation) -> _Record:
    """Read and check one record where the catalog says it is (in the
    store itself, past any cache)."""
    try:
        stored = repo.packs.uncached().read(loc.pack, loc.offset, repo.reader.sealed_len(loc))
    except ChunkError as e:
        return _Record(key, loc, "truncated", str(e))
    if len(stored) != repo.reader.sealed_len(loc):
        return _Record(key, loc, "truncated", f"{schema.pack_name(loc.pack)} at {loc.offset}: pack file is truncated")
    return _checked(repo, key, loc, stored)


class _Walk:
    """One thread's walk through a range of a pack, record by record, in
    WINDOW-sized reads into one buffer it keeps (fresh buffers for every
    record cost more in page faults than the hashing)."""

    def __init__(self):
        self.buffer = memoryview(bytearray(WINDOW))

    def run(self, repo, task: "_Range", progress, report: VerifyReport, lock: threading.Lock) -> dict[int, _Record]:
        """The records whose header starts in [task.start, task.stop), by the
        offset of their stored bytes. It stops where a header makes no
        sense: the rest of the range cannot be parsed."""
        out: dict[int, _Record] = {}
        pack, size = task.pack, task.size
        held_from, held = task.start, 0       # the buffer holds pack bytes [held_from, held_from + held)
        pos = task.start
        while pos < task.stop and pos + PACK_HEADER.size <= size:
            if pos + PACK_HEADER.size > held_from + held:
                held_from, held = pos, self._fill(repo, pack, pos, size)
            key, codec, raw_len, stored_len = PACK_HEADER.unpack_from(self.buffer, pos - held_from)
            loc = ChunkLocation(pack, pos + PACK_HEADER.size, stored_len, raw_len, codec)
            if codec not in (schema.CODEC_RAW, schema.CODEC_ZSTD, schema.CODEC_PIECES) or raw_len == 0 or \
                    raw_len > CHUNK_SIZE or stored_len == 0:
                out[loc.offset] = _Record(key, loc, "corrupt", f"unreadable record header at {pos}: the rest of "
                                          f"the pack ({size - pos} bytes) cannot be parsed")
                break
            length = refs.record_len(repo, loc)
            if pos + length > size:
                out[loc.offset] = _Record(key, loc, "truncated", _WHY["truncated"])
                break
            if pos + length > held_from + held:
                held_from, held = pos, self._fill(repo, pack, pos, size)
            at = pos - held_from
            out[loc.offset] = _checked(repo, bytes(key), loc, self.buffer[at + PACK_HEADER.size:at + length])
            pos += length
            with lock:
                report.records_read += 1
                report.bytes_read += length
            if progress is not None:
                progress.add(length)
        return out

    def _fill(self, repo, pack: int, at: int, size: int) -> int:
        """The next window, read from where the pack is kept (an object
        store itself, not the local cache: what another reader would get)."""
        return repo.packs.uncached().read_into(pack, at, [self.buffer[:min(WINDOW, size - at)]])


class _Range(NamedTuple):
    pack: int
    size: int
    start: int       # a record's header
    stop: int        # records whose header starts before this


def _ranges(repo, pack: int, size: int, starts: list[tuple[int, Ref]]) -> list[_Range]:
    """A pack cut into ranges of about RANGE bytes for the workers, at record
    starts the catalog knows whose header reads as it says (a place that
    lies would send a walk into the middle of a record)."""
    cuts = [0]
    for start, ref in sorted(starts):
        if start - cuts[-1] >= RANGE and size - start >= RANGE // 2 and \
                not _check_header(repo, ref, repo.packs.read(pack, start, PACK_HEADER.size), size):
            cuts.append(start)
    return [_Range(pack, size, a, b) for a, b in zip(cuts, cuts[1:] + [size])]


def _locate(repo, txn, ref: Ref) -> Ref | None:
    """The same reference as a later snapshot has it (None: it is gone)."""
    if ref.kind == "log":
        found = txn.get(schema.log_key(ref.chain, ref.disk, ref.index, ref.point), db=repo.db["log_index"])
        if found is None:
            return None
        loc = schema.read_log_value(found, ref.loc.raw_len)
        return ref._replace(loc=loc) if loc is not None else None
    if ref.kind == "full":
        found = txn.get(schema.full_key(ref.chain, ref.disk, ref.index), db=repo.db["full_index"])
        if found is None:
            return None
        ref = ref._replace(key=bytes(found))
    elif txn.get(schema.point_key(ref.point), db=repo.db["points"]) is None:
        return None
    row = txn.get(ref.key, db=repo.db["chunks"])
    return ref._replace(loc=ChunkLocation.decode(row) if row is not None else None)


def _still_wrong(repo, ref: Ref, read_data: bool) -> _Record | None:
    """Checks one reference's record where it is: None when it is fine."""
    if ref.loc is None:
        return _Record(ref.key, ref.loc, "missing-chunk", f"chunk {ref.key.hex()[:16]} has no row in chunks")
    try:
        size = repo.packs.size(ref.loc.pack)
    except PackMissing:
        return _Record(ref.key, ref.loc, "missing-pack", _WHY["missing-pack"])
    header = repo.packs.read(ref.loc.pack, ref.loc.offset - PACK_HEADER.size, PACK_HEADER.size)
    if problem := _check_header(repo, ref, header, size):
        return _Record(ref.key, ref.loc, problem, _WHY[problem])
    if not read_data:
        return None
    record = _check_record(repo, ref.key if ref.keyed else PACK_HEADER.unpack(header)[0], ref.loc)
    return record if record.kind else None


def verify(repo, vm: str | None = None, read_data: bool = False, progress=None,
           only_packs: set[int] | None = None) -> VerifyReport:
    """Verify the repository, or the data one VM (uuid) reads. progress: a
    rpofs.progress.Progress, told the pack bytes read (read_data).
    only_packs: read the data of these packs only (a slice of a pass, see
    verify_slice); the references into other packs get their headers checked."""
    started = time.monotonic()
    vms = {vm} if vm else None
    report = VerifyReport(time_us=time.time_ns() // 1000, read_data=read_data, vms=[], repository_wide=vm is None)
    found: list[Finding] = []
    with repo.env.begin() as txn:
        cat = _Catalog(repo, txn)
        report.vms = sorted({p.vm for p in cat.points.values() if vms is None or p.vm in vms})
        report.points = sum(1 for p in cat.points.values() if vms is None or p.vm in vms)
        report.problems.extend(_relations(repo, txn, cat, vms))
        chain_vm = {chain: full.vm for chain, full in cat.fulls.items()}
        ship_vm = {no: s.vm for no, s in cat.ships.items()}
        wanted = [r for r in refs.references(repo, txn, []) if vms is None
                  or (ship_vm.get(r.point) if r.kind == "app" else chain_vm.get(r.chain)) in vms]
        next_pack = schema.read_u32(txn.get(schema.META_NEXT_PACK, db=repo.db["meta"]))
        in_use = refs.bytes_in_use(repo, txn)
    report.references = len(wanted)
    lent = [r for r in wanted if r.lender]
    wanted = [r for r in wanted if not r.lender]
    by_place: dict[tuple[int, int], list[Ref]] = {}
    for ref in wanted:
        if ref.loc is None:
            found.append(Finding("missing-chunk", ref, f"chunk {ref.key.hex()[:16]} has no row in chunks"))
        else:
            by_place.setdefault((ref.loc.pack, ref.loc.offset), []).append(ref)
    packs = sorted({pack for pack, _ in by_place})
    on_disk = repo.packs.list()
    if vms is None:  # a pack nothing refers to (and no backup newer than the snapshot writes): garbage
        for pack in on_disk:
            if pack not in in_use and pack < next_pack:
                with contextlib.suppress(PackMissing):  # collected since it was listed: garbage no more
                    report.garbage.bytes += repo.packs.size(pack)
                    report.garbage.packs += 1
    if read_data:
        scan_packs = [p for p in on_disk if ((vms is None and p < next_pack and p in in_use) or p in packs)
                      and (only_packs is None or p in only_packs)]
        scanned = set(scan_packs)
        found.extend(_check_data(repo, scan_packs, set(on_disk),
                                 {place: users for place, users in by_place.items() if place[0] in scanned},
                                 report, progress))
        by_place = {place: users for place, users in by_place.items() if place[0] not in scanned}
    found.extend(_check_headers(repo, set(on_disk), by_place))
    _confirm(repo, found, read_data, report)
    report.problems.extend(_check_borrowed(repo, lent, read_data, report))
    if read_data and only_packs is None:
        report.problems.extend(_journals(repo, report.vms))
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _check_borrowed(repo, lent: list[Ref], read_data: bool, report: VerifyReport) -> list[Problem]:
    """The chunks this catalog borrows from other hosts (rpofs.store.lending):
    each still held by its lender (its replica followed), and with
    read_data read from the store itself through the lender's packs and
    checked against its key. A problem names the chunk and the lender."""
    by_key: dict[tuple[str, bytes], list[Ref]] = {}
    for ref in lent:
        by_key.setdefault((ref.lender, ref.key), []).append(ref)
    problems = []
    for (host, key), users in sorted(by_key.items()):
        where = f"chunk {key.hex()[:16]} borrowed from host {host}"
        try:
            loc = repo.relocate_borrowed(host, key)
            if read_data:
                repo.lender_reader(host, streaming=True).read(key, loc)
                report.records_read += 1
                report.bytes_read += repo.reader.record_len(loc)
            continue
        except ChunkMissing as e:
            problem = Problem("missing-chunk", f"{where}: {e}")
        except ChunkError as e:
            problem = Problem("corrupt", f"{where}: {e}")
        with repo.env.begin() as txn:
            cat = _Catalog(repo, txn)
            for ref in users:
                problem.affects.extend(affects(repo, txn, cat, ref))
        problems.append(problem)
    return problems


def _journals(repo, vms: list[str]) -> list[Problem]:
    """Continuous protection's journals (rpofs.protect): every record read
    and verified. Damage before a journal's newest segment ends what its
    instants can read (never wrong bytes: they stop there) and is reported;
    a torn end of the newest segment is a crash's unanswered batch."""
    problems = []
    for vm in vms:
        for session in protection.of_vm(repo, vm):
            reader = journal.reader(repo.path, session)
            found = reader.records()
            if reader.damage:
                problems.append(Problem("journal", f"VM {vm}: {reader.damage}"))
            elif session.state == "ended" and session.last_us > session.journal_from_us and (
                    not found or found[-1].time_us < session.last_us):
                where = reader.torn_tail() or "records are missing"
                problems.append(Problem("journal", f"VM {vm}: the ended session of {session.started_us} journaled "
                                                   f"up to {session.last_us}, but {where}"))
    return problems


def _check_headers(repo, on_disk: set[int], by_place) -> list[Finding]:
    found = []
    sizes: dict[int, int] = {}
    for (pack, offset), users in sorted(by_place.items()):
        if pack not in on_disk:
            found.extend(Finding("missing-pack", ref, _WHY["missing-pack"]) for ref in users)
            continue
        try:
            if pack not in sizes:
                sizes[pack] = repo.packs.size(pack)
            header = repo.packs.read(pack, offset - PACK_HEADER.size, PACK_HEADER.size)
        except PackMissing:  # deleted since it was listed (a compaction): _confirm asks a fresh snapshot
            found.extend(Finding("missing-pack", ref, _WHY["missing-pack"]) for ref in users)
            continue
        for ref in users:
            if problem := _check_header(repo, ref, header, sizes[pack]):
                found.append(Finding(problem, ref, _WHY[problem]))
    return found


def _check_data(repo, packs: list[int], on_disk: set[int], by_place, report: VerifyReport,
                progress) -> list[Finding]:
    """Read every record of `packs` on WORKERS threads, a pack in ranges of
    about RANGE bytes (a backup writes one pack: one walk would leave the
    other cores idle); match the references."""
    sizes = {}
    for pack in packs:
        try:
            sizes[pack] = repo.packs.size(pack)
        except PackMissing:
            pass
    starts: dict[int, list[tuple[int, Ref]]] = {}
    for (pack, offset), users in by_place.items():
        if pack in sizes:
            starts.setdefault(pack, []).append((offset - PACK_HEADER.size, users[0]))
    tasks = [r for pack in sizes for r in _ranges(repo, pack, sizes[pack], starts.get(pack, []))]
    if progress is not None:
        progress.set(0, sum(sizes.values()))
    lock = threading.Lock()
    walks = threading.local()

    def walk(task: _Range) -> dict[int, _Record]:
        if not hasattr(walks, "walk"):
            walks.walk = _Walk()
        return walks.walk.run(repo, task, progress, report, lock)

    scans: dict[int, dict[int, _Record]] = {}
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for task, records in zip(tasks, pool.map(walk, tasks)):
            scans.setdefault(task.pack, {}).update(records)
    found = []
    referenced: set[tuple[int, int]] = set()
    for (pack, offset), users in sorted(by_place.items()):
        referenced.add((pack, offset))
        if pack not in on_disk or pack not in sizes:
            found.extend(Finding("missing-pack", ref, _WHY["missing-pack"]) for ref in users)
            continue
        record = scans.get(pack, {}).get(offset)
        for ref in users:
            if record is None:  # the walk lost its way before it (a header that lies): checked where it is
                if problem := _still_wrong(repo, ref, True):
                    found.append(Finding(problem.kind, ref, problem.error, problem.pieces))
            elif (record.loc.codec, record.loc.raw_len, record.loc.stored_len) != \
                    (ref.loc.codec, ref.loc.raw_len, ref.loc.stored_len) or (ref.keyed and ref.key != record.key):
                checked = _check_record(repo, ref.key, ref.loc) if ref.keyed else None
                if checked is not None and checked.kind:  # read by key and place: is the content there?
                    found.append(Finding(checked.kind, ref, checked.error, checked.pieces))
                else:
                    found.append(Finding("header", ref, _WHY["header"]))
            elif record.kind:
                found.append(Finding(record.kind, ref, record.error, record.pieces))
    for pack, records in scans.items():
        for offset, record in records.items():
            if (pack, offset) not in referenced:
                report.garbage.records += 1
                report.garbage.bytes += refs.record_len(repo, record.loc)
    return found


def _confirm(repo, found: list[Finding], read_data: bool, report: VerifyReport) -> None:
    """Each problem checked again against a fresh snapshot (prune or defrag
    may have moved the record meanwhile), then grouped by the damaged place
    with everything that reads it."""
    if not found:
        return
    groups: dict[tuple, Problem] = {}
    with repo.env.begin() as txn:
        cat = _Catalog(repo, txn)
        for finding in found:
            now = _locate(repo, txn, finding.ref)
            if now is None:
                continue  # no longer referenced: nothing reads it
            if now != finding.ref:
                record = _still_wrong(repo, now, read_data)
                if record is None:
                    continue
                finding = Finding(record.kind, now, record.error, record.pieces)
            kind, ref = finding.kind, finding.ref
            place = (kind, ref.loc.pack, ref.loc.offset) if ref.loc else (kind, ref.key)
            problem = groups.get(place)
            if problem is None:
                if ref.loc is None:
                    message = f"chunk {ref.key.hex()[:16]} is not in the catalog's chunks"
                else:
                    message = f"{schema.pack_name(ref.loc.pack)} at {ref.loc.offset}: {finding.detail}"
                problem = groups[place] = Problem(kind, message, ref.loc.pack if ref.loc else None,
                                                  ref.loc.offset if ref.loc else None)
            if not (kind == "header" and ref.keyed):  # a keyed read never looks at the header
                problem.affects.extend(affects(repo, txn, cat, ref, finding.pieces))
    for problem in groups.values():
        merged: dict[tuple, Affected] = {}
        for a in problem.affects:
            key = (a.vm, a.point, a.what)
            if key in merged:
                merged[key].ranges = [list(r) for r in _merge([tuple(r) for r in merged[key].ranges + a.ranges])]
            else:
                merged[key] = a
        problem.affects = sorted(merged.values(), key=lambda a: (a.vm_name, a.point, a.what))
        report.problems.append(problem)


def verify_slice(repo, cursor: int, budget: int) -> tuple[VerifyReport, int]:
    """One bounded step of a read-data pass, as the ingester runs it: the
    catalog and every header checked, and the data of the packs from number
    `cursor` on, up to about `budget` bytes (at least one pack). Returns the
    report and the cursor for the next step, 0 when this step ended the pass."""
    chosen, total, following = set(), 0, 0
    for pack in repo.packs.list():
        if pack < cursor:
            continue
        try:
            size = repo.packs.size(pack)
        except PackMissing:  # collected since it was listed
            continue
        if chosen and total + size > budget:
            following = pack
            break
        chosen.add(pack)
        total += size
    return verify(repo, read_data=True, only_packs=chosen), following


# -- results kept for rpofs status ------------------------------------------------

def save(repo_path: str, report: VerifyReport, read_pass: dict | None = None) -> None:
    """Record the run in REPO/verify.json: per VM checked, when and what it
    found; read_pass: where the ingester's read-data pass stands."""
    results = load(repo_path)
    if read_pass is not None:
        results["read_pass"] = read_pass
    damaged = report.damaged_vms()
    for vm in report.vms:
        results["vms"][vm] = {"time_us": report.time_us, "read_data": report.read_data,
                              "ok": vm not in damaged, "points_damaged": len(damaged.get(vm, ()))}
    if report.repository_wide:
        results["repository"] = {"time_us": report.time_us, "read_data": report.read_data, "ok": report.ok,
                                 "problems": len(report.problems), "garbage_bytes": report.garbage.bytes}
    durable.write_file(os.path.join(repo_path, RESULTS), json.dumps(results, indent=1).encode())


def load(repo_path: str) -> dict:
    """The kept results ({"vms": {}} when there are none or they are unreadable)."""
    try:
        with open(os.path.join(repo_path, RESULTS), "rb") as f:
            results = json.load(f)
        if isinstance(results, dict) and isinstance(results.get("vms"), dict):
            return results
    except (OSError, ValueError):
        pass
    return {"vms": {}}


def describe(report: VerifyReport) -> list[str]:
    """The report as lines a person acts on."""
    lines = []
    for problem in report.problems:
        lines.append(f"DAMAGED: {problem.message}")
        for a in problem.affects:
            where = a.what
            if a.ranges:
                where += " bytes " + ", ".join(f"{s}-{e - 1}" for s, e in a.ranges)
            lines.append(f"  {a.vm_name} {a.name or a.point}: {where} read EIO")
        if not problem.affects:
            lines.append("  reads are not affected (they find the record by the catalog's key and place); "
                         "compaction writes it anew" if problem.kind == "header" else "  no point reads it")
    kind = "every stored byte read" if report.read_data else "catalog and record headers"
    size = f", {report.bytes_read / 1e6:.0f} MB in {report.records_read} records" if report.read_data else ""
    lines.append(f"{len(report.vms)} VMs, {report.points} points, {report.references} references checked "
                 f"({kind}{size}) in {report.seconds:.1f} s: "
                 + ("no damage" if report.ok else f"{len(report.problems)} problems"))
    if report.garbage.bytes:
        lines.append(f"garbage: {report.garbage.bytes} bytes nothing refers to ({report.garbage.packs} packs"
                     f"{f', {report.garbage.records} records' if report.garbage.records else ''}); "
                     f"a prune that removes points frees it, as does the next prune after an interrupted one")
    return lines



