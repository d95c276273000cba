"""LVM2 volume groups written by hand, byte for byte as pvcreate, vgcreate
and lvcreate leave them (LVM 2.03), so that tests need neither root-only
kernel tools (device-mapper) nor lvm2 itself:

  sector 1 of each PV   label_header "LABELONE" (its crc from byte 20 on), then
                        pv_header: UUID, device size, data areas (pe_start, 0),
                        metadata areas (4096, size), pv_header_extension v2
  PV byte 4096          mda_header: crc of bytes 4..512, " LVM2 x[5A%r0N*>",
                        version 1, start, size, raw_locn (offset in the area,
                        size with the ending NUL, crc of the text, flags)
  mda + raw offset      the VG's text metadata, a circular buffer after the
                        512-byte header
  PV byte pe_start      extent 0

Checked once against lvm2 2.03.16 (pvck, pvs, vgs, lvs -o+seg_pe_ranges).
"""

import random
import struct
import zlib
from dataclasses import dataclass, field

SECTOR = 512
MiB = 1 << 20
MDA_START = 4096
MAGIC = b" LVM2 x[5A%r0N*>"
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def lvm_crc(data: bytes, value: int = 0xF597A6CF) -> int:
    return zlib.crc32(data, value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def lvm_id(rnd: random.Random) -> str:
    raw = "".join(rnd.choice(_ID_CHARS) for _ in range(32))
    parts, at = [], 0
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append(raw[at:at + n])
        at += n
    return "-".join(parts)


@dataclass
class PV:
    name: str          # pv0, pv1, ...: how the metadata refers to it
    offset: int        # where it starts in its image
    size: int
    id: str
    pe_start: int = MiB
    metadata: bool = True  # False: pvcreate --metadatacopies 0
    text_at: int = 512     # where in the metadata area the text goes (past its end: it wraps)


@dataclass
class LV:
    name: str
    segments: list[dict]   # start_extent, extent_count, type, and the type's fields
    id: str
    status: list = field(default_factory=lambda: ["READ", "WRITE", "VISIBLE"])


class VolumeGroup:
    def __init__(self, name: str, extent_size: int = 4 * MiB, seed: int = 1, seqno: int = 7):
        self.name = name
        self.extent = extent_size
        self.rnd = random.Random(seed)
        self.id = lvm_id(self.rnd)
        self.seqno = seqno
        self.pvs: list[PV] = []
        self.lvs: list[LV] = []

    def pv(self, offset: int, size: int, **kw) -> str:
        pv = PV(f"pv{len(self.pvs)}", offset, size, lvm_id(self.rnd), **kw)
        self.pvs.append(pv)
        return pv.name

    def _pv(self, name: str) -> PV:
        return next(p for p in self.pvs if p.name == name)

    def pe_count(self, name: str) -> int:
        pv = self._pv(name)
        return (pv.size - pv.pe_start) // self.extent

    def linear(self, name: str, pieces: list[tuple[str, int, int]]) -> None:
        """An LV of linear segments, in LV order: (pv, first extent, count) each."""
        segments, at = [], 0
        for pv, first, count in pieces:
            segments.append({"start_extent": at, "extent_count": count, "type": "striped",
                             "stripe_count": 1, "stripes": [(pv, first)]})
            at += count
        self.lvs.append(LV(name, segments, lvm_id(self.rnd)))

    def striped(self, name: str, stripes: list[tuple[str, int]], extent_count: int, stripe_size: int) -> None:
        """One striped segment over stripes [(pv, first extent)]; stripe_size in bytes."""
        self.lvs.append(LV(name, [{"start_extent": 0, "extent_count": extent_count, "type": "striped",
                                   "stripe_count": len(stripes), "stripe_size": stripe_size // SECTOR,
                                   "stripes": stripes}], lvm_id(self.rnd)))

    def other(self, name: str, kind: str, extent_count: int, visible: bool = True, **fields) -> None:
        """An LV of one segment of any type, its fields as given (a list of
        pairs, like a mirror's legs, as [(name, number), ...])."""
        status = ["READ", "WRITE"] + (["VISIBLE"] if visible else [])
        self.lvs.append(LV(name, [{"start_extent": 0, "extent_count": extent_count, "type": kind, **fields}],
                           lvm_id(self.rnd), status))

    def hide(self, name: str) -> None:
        """An LV that is part of another (thin pool data, mirror legs): not VISIBLE."""
        lv = next(v for v in self.lvs if v.name == name)
        lv.status = [s for s in lv.status if s != "VISIBLE"]

    # -- the metadata text, as LVM formats it -----------------------------------

    def text(self) -> str:
        out = [f"{self.name} {{", f'id = "{self.id}"', f"seqno = {self.seqno}", 'format = "lvm2"',
               'status = ["RESIZEABLE", "READ", "WRITE"]', "flags = []",
               f"extent_size = {self.extent // SECTOR}", "max_lv = 0", "max_pv = 0", "metadata_copies = 0",
               "", "physical_volumes {"]
        for pv in self.pvs:
            out += ["", f"{pv.name} {{", f'id = "{pv.id}"', f'device = "/dev/vd{pv.name}"', "",
                    'status = ["ALLOCATABLE"]', "flags = []", f"dev_size = {pv.size // SECTOR}",
                    f"pe_start = {pv.pe_start // SECTOR}", f"pe_count = {self.pe_count(pv.name)}", "}"]
        out.append("}")
        if self.lvs:
            out += ["", "logical_volumes {"]
            for lv in self.lvs:
                status = ", ".join(f'"{s}"' for s in lv.status)
                out += ["", f"{lv.name} {{", f'id = "{lv.id}"', f"status = [{status}]", "flags = []",
                        "creation_time = 1700000000", 'creation_host = "rpofs-test"',
                        f"segment_count = {len(lv.segments)}"]
                for i, seg in enumerate(lv.segments, 1):
                    out += ["", f"segment{i} {{", f"start_extent = {seg['start_extent']}",
                            f"extent_count = {seg['extent_count']}", "", f'type = "{seg["type"]}"']
                    if seg["type"] == "striped":
                        out.append(f"stripe_count = {seg['stripe_count']}")
                        if seg["stripe_count"] > 1:
                            out.append(f"stripe_size = {seg['stripe_size']}")
                        pairs = ",\n".join(f'"{pv}", {first}' for pv, first in seg["stripes"])
                        out += ["", "stripes = [", pairs, "]"]
                    else:
                        out += [f"{k} = {_value(v)}" for k, v in seg.items()
                                if k not in ("start_extent", "extent_count", "type")]
                    out.append("}")
                out.append("}")
            out.append("}")
        out += ["}", "# Generated by rpofs tests/lvmimage.py", "", 'contents = "Text Format Volume Group"',
                "version = 1", "", 'description = ""', "", 'creation_host = "rpofs-test"',
                "creation_time = 1700000000", ""]
        return "\n".join(out)

    # -- writing ----------------------------------------------------------------

    def write(self, f) -> None:
        """Every PV's label, metadata area header and metadata text into f (an
        image opened r+b, already as large as the PVs need)."""
        text = self.text().encode() + b"\0"
        for pv in self.pvs:
            write_label(f, pv, text if pv.metadata else None)

    def runs(self, name: str) -> list[tuple[int, int, int]]:
        """Where an LV's bytes are in the image: (LV offset, length, image offset),
        linear and striped segments."""
        lv = next(v for v in self.lvs if v.name == name)
        out = []
        for seg in lv.segments:
            base = seg["start_extent"] * self.extent
            n = seg["stripe_count"]
            per = seg["extent_count"] // n * self.extent
            starts = [self._pv(pv).offset + self._pv(pv).pe_start + first * self.extent for pv, first in seg["stripes"]]
            if n == 1:
                out.append((base, per, starts[0]))
                continue
            chunk = seg["stripe_size"] * SECTOR
            for c in range(seg["extent_count"] * self.extent // chunk):
                row, stripe = divmod(c, n)
                out.append((base + c * chunk, chunk, starts[stripe] + row * chunk))
        return out

    def put(self, f, name: str, data: bytes) -> None:
        """An LV's contents (e.g. a filesystem image) into its extents."""
        for at, length, where in self.runs(name):
            f.seek(where)
            f.write(data[at:at + length].ljust(length, b"\0"))

    def size(self, name: str) -> int:
        lv = next(v for v in self.lvs if v.name == name)
        return sum(s["extent_count"] for s in lv.segments) * self.extent


def _value(v) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        flat = [x for item in v for x in (item if isinstance(item, tuple) else (item,))]
        return "[" + ", ".join(_value(x) for x in flat) + "]"
    return str(v)


def write_label(f, pv: PV, text: bytes | None) -> None:
    sector = bytearray(SECTOR)
    pv_header = bytearray(pv.id.replace("-", "").encode() + struct.pack("<Q", pv.size))
    pv_header += struct.pack("<QQQQ", pv.pe_start, 0, 0, 0)  # data area, end of list
    mda_size = pv.pe_start - MDA_START
    if text is not None:
        pv_header += struct.pack("<QQ", MDA_START, mda_size)
    pv_header += struct.pack("<QQ", 0, 0)
    pv_header += struct.pack("<IIQQ", 2, 1, 0, 0)  # extension v2, PV_EXT_USED, no bootloader area
    sector[32:32 + len(pv_header)] = pv_header
    sector[0:8] = b"LABELONE"
    struct.pack_into("<QII8s", sector, 8, 1, 0, 32, b"LVM2 001")
    struct.pack_into("<I", sector, 16, lvm_crc(bytes(sector[20:])))
    f.seek(pv.offset)
    f.write(bytes(SECTOR) + sector + bytes(2 * SECTOR))  # LVM clears the rest of the label scan area
    if text is None:
        return
    header = bytearray(SECTOR)
    struct.pack_into("<16sIQQ", header, 4, MAGIC, 1, MDA_START, mda_size)
    struct.pack_into("<QQII", header, 40, pv.text_at, len(text), lvm_crc(text), 0)
    struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
    f.seek(pv.offset + MDA_START)
    f.write(header)
    first = min(len(text), mda_size - pv.text_at)  # the area is a circular buffer after its header
    f.seek(pv.offset + MDA_START + pv.text_at)
    f.write(text[:first])
    if first < len(text):
        f.seek(pv.offset + MDA_START + SECTOR)
        f.write(text[first:])


# -- dm thin-pool metadata (what a thin pool's _tmeta LV holds) -------------------

THIN_BLOCK = 4096
THIN_MAGIC = 27022010


def thin_metadata(block_sectors: int, nr_data_blocks: int, devices: dict[int, dict[int, int]],
                  nr_blocks: int = 1024) -> bytes:
    """A thin pool's metadata as the kernel commits it, for devices
    {dev_id: {virtual block: data block}}: the superblock (block 0), the
    device details tree, the two-level mapping tree (dev_id, then virtual
    block -> data block << 24 | time), each a single leaf. The space maps'
    roots hold their counts only: readers of the mappings do not walk them.
    Checked once with thin_dump (thin-provisioning-tools 0.9)."""
    from dissect.util.hash import crc32c

    def csum(block: bytes, xor: int) -> int:  # the kernel's crc32c(~0, ...) ^ xor
        return (crc32c.crc32c(block, 0) ^ 0xFFFFFFFF) ^ xor

    def leaf(number: int, entries: list[tuple[int, bytes]], value_size: int) -> bytes:
        max_entries = (THIN_BLOCK - 32) // (8 + value_size) // 3 * 3
        assert len(entries) <= max_entries
        node = bytearray(THIN_BLOCK)
        struct.pack_into("<IQIII", node, 4, 2, number, len(entries), max_entries, value_size)  # LEAF_NODE
        for i, (key, value) in enumerate(sorted(entries)):
            struct.pack_into("<Q", node, 32 + 8 * i, key)
            at = 32 + 8 * max_entries + value_size * i
            node[at:at + value_size] = value
        struct.pack_into("<I", node, 0, csum(bytes(node[4:]), 121107))
        return bytes(node)

    ids = sorted(devices)
    blocks = [b""] * (3 + len(ids))
    details = [(d, struct.pack("<QQII", len(devices[d]), 0, 0, 0)) for d in ids]
    blocks[1] = leaf(1, details, 24)
    blocks[2] = leaf(2, [(d, struct.pack("<Q", 3 + i)) for i, d in enumerate(ids)], 8)
    for i, d in enumerate(ids):
        blocks[3 + i] = leaf(3 + i, [(v, struct.pack("<Q", b << 24)) for v, b in devices[d].items()], 8)
    sb = bytearray(THIN_BLOCK)
    struct.pack_into("<IQ16sQIIQQ", sb, 4, 0, 0, bytes(16), THIN_MAGIC, 2, 0, 1, 0)
    used = sum(len(m) for m in devices.values())
    struct.pack_into("<QQQQ", sb, 64, nr_data_blocks, used, 0, 0)
    struct.pack_into("<QQQQ", sb, 192, nr_blocks, len(blocks), 0, 0)
    struct.pack_into("<QQIIQ", sb, 320, 2, 1, block_sectors, THIN_BLOCK // SECTOR, nr_blocks)
    struct.pack_into("<I", sb, 0, csum(bytes(sb[4:]), 160774))
    blocks[0] = bytes(sb)
    return b"".join(blocks)


def thin_pool(vg: VolumeGroup, name: str, meta: list, data: list, volumes: dict[str, bytes],
              block: int = 64 * 1024, seed: int = 0):
    """A thin pool `name` (its _tmeta and _tdata LVs of linear pieces, as
    VolumeGroup.linear takes them) holding a thin LV per `volumes` entry
    {lv name: contents}; a block of zeros is left unmapped, the others get
    data blocks in shuffled order. Returns each LV's mapping {virtual block:
    data block}, and put(f) that writes the pool's metadata and data (after
    vg.write)."""
    vg.linear(f"{name}_tmeta", meta)
    vg.linear(f"{name}_tdata", data)
    vg.hide(f"{name}_tmeta")
    vg.hide(f"{name}_tdata")
    data_blocks = vg.size(f"{name}_tdata") // block
    vg.other(name, "thin-pool", vg.size(f"{name}_tdata") // vg.extent, metadata=f"{name}_tmeta",
             pool=f"{name}_tdata", transaction_id=len(volumes), chunk_size=block // SECTOR,
             discards="passdown", zero_new_blocks=1)
    free = list(range(data_blocks))
    random.Random(seed).shuffle(free)
    maps = {}
    for dev_id, (lv, contents) in enumerate(volumes.items(), 1):
        vg.other(lv, "thin", -(-len(contents) // vg.extent), thin_pool=name, transaction_id=dev_id - 1,
                 device_id=dev_id)
        maps[lv] = {v: free.pop() for v in range(-(-len(contents) // block))
                    if any(contents[v * block:(v + 1) * block])}

    def put(f):
        pool = bytearray(data_blocks * block)
        for lv, mapping in maps.items():
            for v, b in mapping.items():
                piece = volumes[lv][v * block:(v + 1) * block]
                pool[b * block:b * block + len(piece)] = piece
        devices = {dev_id: maps[lv] for dev_id, lv in enumerate(volumes, 1)}
        vg.put(f, f"{name}_tmeta", thin_metadata(block // SECTOR, data_blocks, devices))
        vg.put(f, f"{name}_tdata", bytes(pool))
    return maps, put
