"""LVM2 logical volumes, read in-process from a materialized disk.

A partition (or a whole disk) whose first four sectors hold an LVM2 label is
a physical volume (PV). Its metadata area holds the volume group's (VG) text
metadata, which dissect.volume parses; each logical volume (LV) is a list of
segments mapping its extents to PV extents. An LV is read through that map
with the disk's own read(offset, length): no file position, so as
thread-safe as the disk's read.

The label, the metadata area header and the metadata text are read here, not
by dissect's LVM2Device: their checksums are checked (damaged metadata must
give no volume rather than wrong bytes) and the metadata area is a circular
buffer whose text may wrap around its end.

Read: linear and striped segments, mirror and raid1 (through their first
complete leg: every leg holds the same bytes), thin volumes (the pool's
mapping through dissect's dm thin metadata reader), zero segments. Anything
else (raid4/5/6/10, cache, VDO, writecache, integrity, old-style snapshots),
an extent on a PV that is not here, or metadata that does not add up: the LV
gets a note saying why, and no read.
"""

import bisect
import logging
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field

from dissect.util.stream import AlignedStream

log = logging.getLogger(__name__)

SECTOR = 512
LABEL_SCAN_SECTORS = 4        # LVM looks for its label in the first four sectors
MDA_HEADER_SIZE = 512
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1        # this copy of the metadata is not kept up to date
MAX_DEPTH = 8                 # LVs built on LVs (mirror legs, thin pools): more means a loop
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*\Z")
_UUID = re.compile(r"[A-Za-z0-9!#]{32}\Z")


class LvmError(Exception):
    """LVM metadata that cannot be used, or a layout not read here."""


def lvm_crc(data: bytes, value: int = INITIAL_CRC) -> int:
    """LVM's crc32: zlib's polynomial, seeded with INITIAL_CRC and without
    zlib's inversions."""
    return zlib.crc32(data, value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name, as in /dev/mapper: hyphens inside a name are
    doubled, so the one between VG and LV is unambiguous."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


@dataclass
class PhysicalVolume:
    """An LVM2 label found on the disk."""
    uuid: str                  # 32 characters, without the dashes the metadata writes
    offset: int                # where the PV starts on the disk
    size: int
    where: str                 # "partition 2", "the whole disk"
    texts: list[str] = field(default_factory=list)   # metadata copies whose checksums hold
    problems: list[str] = field(default_factory=list)  # metadata copies that could not be read


def probe(read, offset: int, size: int, where: str) -> PhysicalVolume | None:
    """The PV at `offset` of the disk; None without an LVM2 label; LvmError
    when there is a label but it is damaged."""
    head = bytes(read(offset, LABEL_SCAN_SECTORS * SECTOR))
    for i in range(LABEL_SCAN_SECTORS):
        sector = head[i * SECTOR:(i + 1) * SECTOR]
        if sector[:8] != b"LABELONE":
            continue
        if len(sector) < SECTOR:
            raise LvmError(f"LVM label in sector {i} is cut short")
        number, crc, pv_at, kind = struct.unpack_from("<QII8s", sector, 8)
        if crc != lvm_crc(sector[20:]):
            raise LvmError(f"LVM label in sector {i}: checksum mismatch")
        if number != i or kind != b"LVM2 001" or not 32 <= pv_at <= SECTOR - 72:
            raise LvmError(f"LVM label in sector {i}: not an LVM2 label LVM would accept")
        uuid = sector[pv_at:pv_at + 32].decode("ascii", "replace")
        if not _UUID.match(uuid):
            raise LvmError(f"LVM label: physical volume UUID {uuid!r} is not valid")
        device_size = struct.unpack_from("<Q", sector, pv_at + 32)[0]
        # the size LVM saw, but never past the partition: extents beyond it are not read
        pv = PhysicalVolume(uuid, offset, min(size, device_size) if device_size else size, where)
        areas, at = [], pv_at + 40
        for _ in range(2):  # data areas, then metadata areas, each list ended by a zero entry
            found = []
            while True:
                if at + 16 > SECTOR:
                    raise LvmError("LVM label: area lists run past the label sector")
                area = struct.unpack_from("<QQ", sector, at)
                at += 16
                if area == (0, 0):
                    break
                found.append(area)
            areas.append(found)
        for mda_offset, mda_size in areas[1]:
            try:
                text = _metadata_text(read, pv, mda_offset, mda_size)
                if text is not None:
                    pv.texts.append(text)
            except LvmError as e:
                pv.problems.append(f"metadata area at {mda_offset}: {e}")
        return pv
    return None


def _metadata_text(read, pv: PhysicalVolume, start: int, size: int) -> str | None:
    """The text of one metadata area; None when it holds none (an orphan PV,
    or a copy marked ignored)."""
    if start < SECTOR or size <= MDA_HEADER_SIZE or start + size > pv.size:
        raise LvmError(f"metadata area {start}+{size} does not fit the physical volume")
    header = bytes(read(pv.offset + start, MDA_HEADER_SIZE))
    if len(header) != MDA_HEADER_SIZE:
        raise LvmError("metadata area header cut short")
    crc, magic, version, at, length = struct.unpack_from("<I16sIQQ", header, 0)
    if magic != MDA_MAGIC or version != 1:
        raise LvmError("no LVM2 metadata area header")
    if crc != lvm_crc(header[4:]):
        raise LvmError("metadata area header checksum mismatch")
    if at != start or length != size:
        raise LvmError("metadata area header does not match the label")
    offset, text_size, text_crc, flags = struct.unpack_from("<QQII", header, 40)
    if flags & RAW_LOCN_IGNORED or text_size == 0:
        return None
    if not MDA_HEADER_SIZE <= offset < size or text_size > size - MDA_HEADER_SIZE:
        raise LvmError("metadata location out of its area")
    # a circular buffer after the header: the text may go on at its start
    first = min(text_size, size - offset)
    data = bytes(read(pv.offset + start + offset, first))
    if first < text_size:
        data += bytes(read(pv.offset + start + MDA_HEADER_SIZE, text_size - first))
    if len(data) != text_size or lvm_crc(data) != text_crc:
        raise LvmError("metadata text checksum mismatch")
    try:
        return data.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as e:
        raise LvmError(f"metadata text is not text: {e}") from None


@dataclass
class LogicalVolume:
    name: str                  # dm_name(vg, lv)
    size: int
    read: object = None        # read(offset, length) -> bytes, clipped to size; None with a note
    offset: int = 0            # the disk offset of its first byte, when one maps there
    note: str = ""             # why it cannot be read


def logical_volumes(pvs: list[PhysicalVolume], read, where: str) -> list[LogicalVolume]:
    """The visible LVs of every VG whose PVs are among `pvs` (those of one
    disk). What loses a whole VG or PV is logged here, once; an LV that
    cannot be read comes back with a note."""
    here: dict[str, PhysicalVolume | None] = {}
    for pv in pvs:
        if pv.uuid in here:  # a cloned disk or partition: LVM itself would not choose
            log.warning("%s: LVM physical volume %s is on both %s and %s: neither is read",
                        where, pv.uuid, here[pv.uuid].where if here[pv.uuid] else "another", pv.where)
            here[pv.uuid] = None
        else:
            here[pv.uuid] = pv
    groups: dict[str, tuple[int, str, dict]] = {}  # VG id -> (seqno, name, metadata) of the newest copy
    for pv in pvs:
        for text in pv.texts:
            try:
                name, meta = _parse(text)
                vg_id, seqno = str(meta["id"]), _int(meta, "seqno")
            except Exception as e:  # dissect's parser raises whatever the text makes it
                pv.problems.append(f"metadata text cannot be parsed: {type(e).__name__}: {e}")
                continue
            if vg_id not in groups or seqno > groups[vg_id][0]:
                groups[vg_id] = (seqno, name, meta)
    claimed, volumes = set(), []
    for seqno, name, meta in sorted(groups.values(), key=lambda g: g[1]):
        claimed.update(_listed_pvs(meta))
        try:
            group = _VolumeGroup(name, meta, here, read)
        except Exception as e:
            log.warning("%s: LVM volume group %s cannot be read: %s", where, name, e)
            continue
        for lv in group.volumes():
            if any(lv.name == seen.name for seen in volumes):  # two VGs of one name: LVM refuses that too
                lv = LogicalVolume(lv.name, 0, None, 0, "cannot show files: two volume groups of this name")
            volumes.append(lv)
        away = sorted(group.absent)
        if away:
            log.info("%s: LVM volume group %s: physical volume(s) %s not on this disk: the logical "
                     "volumes wholly on them are not shown here", where, name, ", ".join(away))
    for pv in pvs:
        if pv.uuid not in claimed:
            why = "; ".join(pv.problems) or "no volume group metadata names it"
            (log.warning if pv.problems else log.info)(
                "%s: LVM physical volume on %s shows no logical volumes: %s", where, pv.where, why)
        else:
            for problem in pv.problems:  # another copy served
                log.warning("%s: LVM physical volume on %s: %s", where, pv.where, problem)
    return volumes


def _parse(text: str) -> tuple[str, dict]:
    from dissect.volume.lvm.physical import parse_metadata
    root = parse_metadata(text)
    groups = [(k, v) for k, v in root.items() if isinstance(v, dict)]
    if len(groups) != 1:
        raise LvmError(f"{len(groups)} volume groups in one metadata text")
    return groups[0]


def _listed_pvs(meta: dict) -> set[str]:
    try:
        return {str(pv["id"]).replace("-", "") for pv in meta["physical_volumes"].values()}
    except Exception:
        return set()


class _VolumeGroup:
    """One VG's metadata (as dissect's parser gives it: nested dicts) and the
    maps of its LVs onto this disk. (dissect's model classes are not used:
    they require fields LVM leaves out, e.g. a raid1 segment's stripe_count,
    and would lose the whole VG over one such LV.)"""

    def __init__(self, name: str, meta: dict, here: dict, read):
        if not _NAME.match(name):
            raise LvmError(f"volume group name {name!r} is not valid")
        self.name = name
        self.extent = _int(meta, "extent_size") * SECTOR
        if self.extent <= 0:
            raise LvmError(f"extent size {self.extent}")
        self.read_disk = read
        self.lock = threading.Lock()  # dissect's thin metadata reader keeps a file position
        self.pvs = _sections(meta.get("physical_volumes", {}), "physical volume")
        self.lvs = _sections(meta.get("logical_volumes", {}), "logical volume")  # absent when there are none
        self.pv_uuid = {n: str(pv.get("id", "")).replace("-", "") for n, pv in self.pvs.items()}
        self.here = here
        self.absent = {u for n, u in self.pv_uuid.items()
                       if here.get(u) is None or "MISSING" in _strings(self.pvs[n], "flags")}
        # old-style snapshots: the visible LV is the copy-on-write store, not the snapshot's bytes
        self.cow = {seg.get("cow_store") for lv in self.lvs.values() for seg in _segments(lv)
                    if seg.get("type") == "snapshot"}
        self._maps: dict[str, _Map] = {}
        self._pools: dict[str, tuple] = {}

    def volumes(self) -> list[LogicalVolume]:
        out = []
        for lv_name, lv in self.lvs.items():
            if "VISIBLE" not in _strings(lv, "status"):
                continue  # the parts of other LVs: mirror legs, thin pool data, ...
            valid = _NAME.match(lv_name) is not None
            name = dm_name(self.name, lv_name if valid else "?")
            try:
                if not valid:
                    raise LvmError(f"logical volume name {lv_name!r} is not valid")
                uses = self._pvs_of(lv_name, 0)
                if uses and uses <= self.absent:
                    continue  # wholly on other PVs: the disk that holds them shows it
                if lv_name in self.cow:
                    raise LvmError("an old-style snapshot (its copy-on-write store) is not read")
                lv_map = self._map(lv_name, 0)
                out.append(LogicalVolume(name, lv_map.size, lv_map.read, lv_map.start))
            except LvmError as e:
                out.append(LogicalVolume(name, 0, None, 0, f"cannot show files: {e}"))
            except Exception as e:  # a field of the wrong shape in the metadata
                out.append(LogicalVolume(name, 0, None, 0,
                                         f"cannot show files: LVM metadata: {type(e).__name__}: {e}"))
        return out

    def _lv(self, name) -> dict:
        lv = self.lvs.get(name) if isinstance(name, str) else None
        if lv is None:
            raise LvmError(f"logical volume {name!r} is named but not described")
        return lv

    def _pvs_of(self, name: str, depth: int) -> set[str]:
        """The PV UUIDs an LV's segments use, through the LVs it is built on."""
        if depth > MAX_DEPTH:
            raise LvmError("logical volumes built on each other in a loop")
        uses = set()
        for seg in _segments(self._lv(name)):
            for pv_name, _ in _pairs(seg.get("stripes", [])):
                uses.add(self.pv_uuid.get(pv_name, pv_name))
            for sub in _sub_lvs(seg):
                uses |= self._pvs_of(sub, depth + 1)
        return uses

    def _map(self, name: str, depth: int) -> "_Map":
        if depth > MAX_DEPTH:
            raise LvmError("logical volumes built on each other in a loop")
        if name not in self._maps:
            pieces, next_extent = [], 0
            for seg in sorted(_segments(self._lv(name)), key=lambda s: _int(s, "start_extent")):
                count = _int(seg, "extent_count")
                if _int(seg, "start_extent") != next_extent or count <= 0:
                    raise LvmError(f"segments of {name} leave a gap or overlap at extent {next_extent}")
                pieces.append((next_extent * self.extent, self._segment(name, seg, depth)))
                next_extent += count
            if not pieces:
                raise LvmError(f"{name} has no segments")
            self._maps[name] = _Map(pieces, next_extent * self.extent)
        return self._maps[name]

    def _segment(self, lv_name: str, seg: dict, depth: int) -> "_Piece":
        kind, *flags = str(seg.get("type")).split("+")
        if flags:
            raise LvmError(f"segment type {seg.get('type')} is not read")
        length = _int(seg, "extent_count") * self.extent
        if kind == "striped":  # a linear segment is one stripe
            return self._striped(seg, length)
        if kind == "zero":
            return _Zeros(length)
        if kind == "mirror":
            legs = [(leg, _extent(off) * self.extent) for leg, off in _pairs(seg.get("mirrors", []))]
            return self._leg(lv_name, legs, length, depth)
        if kind == "raid1":
            if seg.get("data_offset"):
                raise LvmError("raid1 images with a data offset are not read")
            at = _int(seg, "start_extent") * self.extent
            legs = [(image, at) for _, image in _pairs(seg.get("raids", []))]
            return self._leg(lv_name, legs, length, depth)
        if kind == "thin":
            return self._thin(seg, length, depth)
        if kind == "thin-pool":
            raise LvmError("a thin pool: its thin volumes are shown")
        raise LvmError(f"segment type {kind} is not read")

    def _striped(self, seg: dict, length: int) -> "_Piece":
        stripes = _pairs(seg.get("stripes", []))
        count = len(stripes)
        if count == 0 or count != _int(seg, "stripe_count") or _int(seg, "extent_count") % count:
            raise LvmError(f"striped segment with stripe_count {seg.get('stripe_count')} over {count} areas")
        per_stripe = _int(seg, "extent_count") // count
        bases = [self._extents(pv, _extent(first), per_stripe) for pv, first in stripes]
        if count == 1:
            return _Linear(self.read_disk, bases[0], length)
        chunk = _int(seg, "stripe_size") * SECTOR
        if chunk <= 0 or (per_stripe * self.extent) % chunk:
            raise LvmError(f"stripe size {chunk} bytes does not divide a stripe")
        return _Striped(self.read_disk, bases, chunk, length)

    def _extents(self, pv_name, first: int, count: int) -> int:
        """The disk offset of PV extents [first, first+count), all on this disk."""
        pv = self.pvs.get(pv_name) if isinstance(pv_name, str) else None
        if pv is None:
            raise LvmError(f"a segment on unknown physical volume {pv_name!r}")
        found = self.here.get(self.pv_uuid[pv_name])
        if found is None:
            raise LvmError(f"physical volume {pv.get('id')} ({pv_name}) is not on this disk")
        if self.pv_uuid[pv_name] in self.absent:
            raise LvmError(f"physical volume {pv.get('id')} ({pv_name}) is marked missing")
        start = _int(pv, "pe_start") * SECTOR
        if first + count > _int(pv, "pe_count") or start + (first + count) * self.extent > found.size:
            raise LvmError(f"extents {first}..{first + count - 1} lie outside physical volume {pv_name}")
        return found.offset + start + first * self.extent

    def _leg(self, lv_name: str, legs: list, length: int, depth: int) -> "_Piece":
        """Mirror and raid1: every leg holds the same bytes; the first complete one is read."""
        problems = []
        for leg, offset in legs:
            try:
                if "REBUILD" in _strings(self._lv(leg), "status"):
                    raise LvmError("being rebuilt")
                sub = self._map(leg, depth + 1)
                if offset + length > sub.size:
                    raise LvmError("shorter than the mirror")
                return _Sub(sub, offset, length)
            except LvmError as e:
                problems.append(f"{leg}: {e}")
        raise LvmError(f"no complete leg of {lv_name}: {'; '.join(problems) or 'none listed'}")

    def _thin(self, seg: dict, length: int, depth: int) -> "_Piece":
        if seg.get("external_origin"):
            raise LvmError("thin volumes with an external origin are not read")
        name = seg.get("thin_pool")
        pool = self._pools.get(name)
        if pool is None:
            segs = _segments(self._lv(name))
            if len(segs) != 1 or segs[0].get("type") != "thin-pool":
                raise LvmError(f"{name} is not a thin pool")
            meta = self._map(segs[0].get("metadata"), depth + 1)
            data = self._map(segs[0].get("pool"), depth + 1)
            try:
                from dissect.volume.dm.thin import Metadata
                with self.lock:
                    metadata = Metadata(_Stream(meta.read, meta.size))
            except Exception as e:
                raise LvmError(f"thin pool {name} metadata: {type(e).__name__}: {e}") from None
            block = metadata.data_block_size * SECTOR
            if block <= 0 or _int(segs[0], "chunk_size") * SECTOR != block:
                raise LvmError(f"thin pool {name}: its block size and its metadata's differ")
            pool = self._pools[name] = (metadata, data, block)
        return _Thin(pool, _int(seg, "device_id"), length, self.lock)


def _int(d: dict, key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LvmError(f"{key} = {value!r}")
    return value


def _extent(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LvmError(f"extent {value!r}")
    return value


def _strings(d: dict, key: str) -> list:
    value = d.get(key, [])
    return value if isinstance(value, list) else []


def _sections(value, what: str) -> dict[str, dict]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise LvmError(f"{what} section of the wrong shape")
    return value


def _segments(lv: dict) -> list[dict]:
    return [v for v in lv.values() if isinstance(v, dict)]


def _pairs(values) -> list[tuple]:
    """LVM writes ["pv0", 0, "pv1", 0]: the pairs."""
    if not isinstance(values, list) or len(values) % 2:
        raise LvmError(f"a list of pairs of the wrong shape: {values!r}")
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def _sub_lvs(seg: dict) -> list:
    """The LVs a segment is built on."""
    kind = str(seg.get("type"))
    if kind == "mirror":
        return [leg for leg, _ in _pairs(seg.get("mirrors", []))]
    if kind.startswith("raid"):
        return list(seg.get("raids", []))
    if kind == "thin":
        return [seg.get("thin_pool")]
    if kind == "thin-pool":
        return [seg.get("metadata"), seg.get("pool")]
    return []


# -- reading: pieces of an LV, each read(offset within the piece, length) ---------

class _Piece:
    size: int
    start: int = 0  # the disk offset of the piece's first byte, where there is one

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class _Linear(_Piece):
    def __init__(self, read_disk, base: int, size: int):
        self.read_disk, self.start, self.size = read_disk, base, size

    def read(self, offset, length):
        return _exact(self.read_disk(self.start + offset, length), length)


class _Striped(_Piece):
    """dm-stripe: chunk c of the segment is on stripe c % n, at row c // n."""

    def __init__(self, read_disk, bases: list[int], chunk: int, size: int):
        self.read_disk, self.bases, self.chunk, self.size = read_disk, bases, chunk, size
        self.start = bases[0]

    def read(self, offset, length):
        out, n = [], len(self.bases)
        while length > 0:
            c, within = divmod(offset, self.chunk)
            row, stripe = divmod(c, n)
            k = min(length, self.chunk - within)
            out.append(_exact(self.read_disk(self.bases[stripe] + row * self.chunk + within, k), k))
            offset += k
            length -= k
        return b"".join(out)


class _Zeros(_Piece):
    def __init__(self, size: int):
        self.size = size

    def read(self, offset, length):
        return bytes(length)


class _Sub(_Piece):
    """A range of another LV (a mirror leg)."""

    def __init__(self, lv_map: "_Map", offset: int, size: int):
        self.lv_map, self.offset, self.size = lv_map, offset, size
        self.start = lv_map.start if offset == 0 else 0

    def read(self, offset, length):
        return self.lv_map.read(self.offset + offset, length)


class _Thin(_Piece):
    """Blocks looked up in the pool's mapping one at a time; an unmapped block
    reads as zeros, as dm-thin reads it."""

    def __init__(self, pool, device: int, size: int, lock: threading.Lock):
        self.metadata, self.data, self.block = pool
        self.device, self.size, self.lock = device, size, lock
        with lock:
            try:
                known = self.metadata.device_details.lookup(device)
            except Exception as e:
                raise LvmError(f"thin pool metadata: {type(e).__name__}: {e}") from None
        if not known:
            raise LvmError(f"thin device {device} is not in its pool")

    def read(self, offset, length):
        out = []
        while length > 0:
            block, within = divmod(offset, self.block)
            k = min(length, self.block - within)
            with self.lock:
                found = self.metadata.data_mapping.lookup([self.device, block])
            if found is None:
                out.append(bytes(k))
            else:
                data_block = int.from_bytes(found, "little") >> 24  # low 24 bits: the time
                out.append(_exact(self.data.read(data_block * self.block + within, k), k))
            offset += k
            length -= k
        return b"".join(out)


class _Map:
    """An LV: its pieces in order; read(offset, length) clipped to its size."""

    def __init__(self, pieces: list[tuple[int, _Piece]], size: int):
        self.starts = [s for s, _ in pieces]
        self.pieces = [p for _, p in pieces]
        self.size = size
        self.start = self.pieces[0].start

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = []
        i = bisect.bisect_right(self.starts, offset) - 1
        while offset < end:
            piece, base = self.pieces[i], self.starts[i]
            k = min(end, base + piece.size) - offset
            out.append(piece.read(offset - base, k))
            offset += k
            i += 1
        return b"".join(out)


def _exact(data, length: int) -> bytes:
    """Extents were checked to lie on the disk: a short read means the disk shrank."""
    if len(data) != length:
        raise LvmError(f"short read: {len(data)} of {length} bytes")
    return bytes(data)


class _Stream(AlignedStream):
    def __init__(self, read, size: int):
        self._read_at = read
        super().__init__(size, align=4096)

    def _read(self, offset: int, length: int) -> bytes:
        return self._read_at(offset, length)
