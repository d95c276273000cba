"""An ext4 filesystem as a mount would see it: its JBD2 journal replayed in
memory over a read-only image, which is never written.

A recovery point taken without freezing the guest holds the filesystem as a
power cut would leave it: metadata that reached only the journal is missing
from its home blocks until the journal is replayed. ReplayedDevice reads the
journal once, keeps the newest committed copy of each block it logs, and
serves reads from those copies over the raw image, as `e2fsck -E journal_only`
would leave the image (see tests/test_journal.py for the few superblock fields
that differ).

Layouts follow the ext4 and JBD2 on-disk format documentation. All journal
fields are big-endian, all ext4 fields little-endian.
"""

import struct
from bisect import bisect_left

from dissect.util.hash import crc32c as _crc32c_impl  # native when available

_crc32c = _crc32c_impl.crc32c

# ext4 superblock (1024 bytes at byte 1024 of the filesystem)
SB_OFFSET = 1024
EXT4_MAGIC = 0xEF53
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_RECOVER = 0x4
INCOMPAT_64BIT = 0x80
RO_COMPAT_METADATA_CSUM = 0x400
EXTENTS_FL = 0x80000
EXTENT_MAGIC = 0xF30A

# JBD2
JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
J_INCOMPAT_REVOKE = 0x1
J_INCOMPAT_64BIT = 0x2
J_INCOMPAT_ASYNC_COMMIT = 0x4
J_INCOMPAT_CSUM_V2 = 0x8
J_INCOMPAT_CSUM_V3 = 0x10
J_INCOMPAT_FAST_COMMIT = 0x20
J_INCOMPAT_KNOWN = (J_INCOMPAT_REVOKE | J_INCOMPAT_64BIT | J_INCOMPAT_ASYNC_COMMIT
                    | J_INCOMPAT_CSUM_V2 | J_INCOMPAT_CSUM_V3)
TAG_ESCAPE, TAG_SAME_UUID, TAG_LAST = 0x1, 0x2, 0x8


class JournalError(Exception):
    """The filesystem needs its journal replayed, and it cannot be done here."""


def crc32c_raw(seed: int, *parts: bytes) -> int:
    """The kernel's crc32c(seed, data): no inversion on the way in or out, as
    ext4 and JBD2 checksums use it (the library's crc32c inverts both)."""
    value = seed ^ 0xFFFFFFFF
    for part in parts:
        value = _crc32c(part, value)
    return value ^ 0xFFFFFFFF


class ReplayedDevice:
    """A read-only block device view with the ext4 journal replayed over it."""

    def __init__(self, read, size: int):
        self._read = read
        self.size = size
        self.replayed = False
        self.transactions = 0   # committed transactions replayed
        self.blocks = 0         # distinct filesystem blocks taken from the journal
        self._overlay: dict[int, bytes] = {}
        self._keys: list[int] = []  # the overlay's block numbers, sorted, to find runs
        sb = read(SB_OFFSET, 1024)
        if len(sb) < 1024 or _u16(sb, 0x38) != EXT4_MAGIC:
            return  # not ext: nothing a mount would replay
        if not _u32(sb, 0x60) & INCOMPAT_RECOVER:
            return
        try:
            self._open(sb)
        except struct.error as e:  # a record cut short: damaged metadata
            raise JournalError(f"malformed journal metadata: {e}") from None

    # -- reads -------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if not self._overlay:
            return self._read(offset, length)
        end = min(offset + length, self.size)
        bs = self._bs
        parts = []
        while offset < end:
            block = offset // bs
            data = self._overlay.get(block)
            if data is not None:
                start = offset - block * bs
                n = min(end - offset, bs - start)
                parts.append(data[start:start + n])
            else:  # raw up to the next overlaid block, in one read
                i = bisect_left(self._keys, block)
                stop = self._keys[i] * bs if i < len(self._keys) else end
                n = min(end, stop) - offset
                parts.append(self._read(offset, n))
            offset += n
        return b"".join(parts)

    # -- opening -------------------------------------------------------------

    def _open(self, sb: bytes) -> None:
        self._bs = bs = 1024 << _u32(sb, 0x18)
        inum = _u32(sb, 0xE0)
        if inum == 0:
            raise JournalError("the filesystem needs recovery from an external journal "
                               f"(device {_u32(sb, 0xE4):#x}); only an internal one can be replayed")
        if not _u32(sb, 0x5C) & COMPAT_HAS_JOURNAL:
            raise JournalError("the filesystem needs recovery but has no journal")
        self._jmap = self._inode_blocks(sb, inum)
        if 0 not in self._jmap:
            raise JournalError("the journal inode maps no first block")
        jsb = self._raw_block(self._jmap[0])[:1024]
        magic, btype = struct.unpack_from(">II", jsb)
        if magic != JBD2_MAGIC or btype not in (SB_V1, SB_V2):
            raise JournalError("no JBD2 superblock at the start of the journal")
        jbs, maxlen, first, sequence, start = struct.unpack_from(">IIIII", jsb, 12)
        incompat = struct.unpack_from(">I", jsb, 40)[0] if btype == SB_V2 else 0
        if jbs != bs:
            raise JournalError(f"journal block size {jbs} differs from the filesystem's {bs}")
        if incompat & ~J_INCOMPAT_KNOWN:
            # fast commit too: its blocks would need replaying through ext4's own logic
            raise JournalError(f"journal with unsupported features {incompat & ~J_INCOMPAT_KNOWN:#x}")
        if not 0 < first < maxlen or any(b not in self._jmap for b in range(maxlen)):
            raise JournalError("journal superblock and journal inode disagree on its size")
        self._first, self._last = first, maxlen
        self._is64 = bool(incompat & J_INCOMPAT_64BIT)
        self._v3 = bool(incompat & J_INCOMPAT_CSUM_V3)
        self._csum = bool(incompat & (J_INCOMPAT_CSUM_V2 | J_INCOMPAT_CSUM_V3))
        if self._csum:
            if crc32c_raw(0xFFFFFFFF, jsb[:0xFC], bytes(4), jsb[0x100:]) != _be32(jsb, 0xFC):
                raise JournalError("journal superblock checksum mismatch")
            self._seed = crc32c_raw(0xFFFFFFFF, jsb[48:64])  # the journal UUID
        if self._v3:
            self._tag_size = 16
        else:
            self._tag_size = 8 + (2 if self._csum else 0) + (4 if self._is64 else 0)
        if start and not first <= start < maxlen:
            raise JournalError(f"journal log start {start} outside the journal")

        committed = self._scan(start, sequence) if start else []
        self._replay(committed)
        self.replayed = True
        self.transactions = len(committed)
        self.blocks = len(self._overlay)
        self._clean_superblocks(sequence)
        self._keys = sorted(self._overlay)

    def _raw_block(self, block: int) -> bytes:
        data = self._read(block * self._bs, self._bs)
        if len(data) != self._bs:
            raise JournalError(f"block {block} is past the end of the device")
        return data

    def _inode_blocks(self, sb: bytes, inum: int) -> dict[int, int]:
        """logical block -> physical block of inode `inum`."""
        bs = self._bs
        ipg = _u32(sb, 0x28)
        inode_size = _u16(sb, 0x58) if _u32(sb, 0x4C) >= 1 else 128
        is64 = bool(_u32(sb, 0x60) & INCOMPAT_64BIT)
        desc_size = max(_u16(sb, 0xFE), 32) if is64 else 32
        group, index = divmod(inum - 1, ipg)
        # descriptors follow the superblock's block (meta_bg moves only later groups')
        desc_at = (_u32(sb, 0x14) + 1) * bs + group * desc_size
        desc = self._read(desc_at, desc_size)
        table = _u32(desc, 0x8) | (_u32(desc, 0x28) << 32 if desc_size >= 64 else 0)
        inode = self._read(table * bs + index * inode_size, inode_size)
        if len(inode) != inode_size:
            raise JournalError(f"journal inode {inum} is past the end of the device")
        nblocks = -(-(_u32(inode, 0x4) | _u32(inode, 0x6C) << 32) // bs)
        out: dict[int, int] = {}
        if _u32(inode, 0x20) & EXTENTS_FL:
            self._extents(inode[0x28:0x64], out, 5)
        else:
            self._block_map(struct.unpack_from("<15I", inode, 0x28), nblocks, out)
        return out

    def _extents(self, node: bytes, out: dict, depth_left: int) -> None:
        magic, entries, _, depth = struct.unpack_from("<HHHH", node)
        if magic != EXTENT_MAGIC or depth_left < depth or 12 + 12 * entries > len(node):
            raise JournalError("journal inode: bad extent tree")
        for e in range(12, 12 + 12 * entries, 12):
            if depth == 0:
                logical, length, hi, lo = struct.unpack_from("<IHHI", node, e)
                if length > 32768:  # an uninitialized extent; the blocks are still its
                    length -= 32768
                for k in range(length):
                    out[logical + k] = (hi << 32 | lo) + k
            else:
                lo, hi = struct.unpack_from("<IH", node, e + 4)
                self._extents(self._raw_block(hi << 32 | lo), out, depth - 1)

    def _block_map(self, ptrs, nblocks: int, out: dict) -> None:
        """ext2/3 block map: 12 direct pointers, then single, double and triple
        indirect blocks; a zero pointer is a hole."""
        per = self._bs // 4

        def walk(block, level, logical):
            span = per ** (level - 1)
            for i, p in enumerate(struct.unpack(f"<{per}I", self._raw_block(block))):
                at = logical + i * span
                if at >= nblocks:
                    return
                if p and level == 1:
                    out[at] = p
                elif p:
                    walk(p, level - 1, at)

        for i in range(12):
            if ptrs[i] and i < nblocks:
                out[i] = ptrs[i]
        logical = 12
        for level, root in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if logical >= nblocks:
                break
            if root:
                walk(root, level, logical)
            logical += per ** level

    # -- the log -------------------------------------------------------------

    def _scan(self, start: int, sequence: int) -> list[tuple[list, set]]:
        """The committed transactions of the log from `start`, oldest first,
        each as ([(fs block, data)], {revoked fs blocks}). The log ends at the
        first block that is not the next one expected: no magic, another
        sequence, a bad checksum, a malformed record."""
        committed = []
        writes, revokes = [], set()
        pos = start
        blocks_left = self._last - self._first  # a log never laps the journal

        def advance():
            nonlocal pos, blocks_left
            pos = pos + 1 if pos + 1 < self._last else self._first  # circular
            blocks_left -= 1

        while blocks_left > 0:
            block = self._log_block(pos)
            magic, btype, seq = struct.unpack_from(">III", block)
            if magic != JBD2_MAGIC or seq != sequence:
                break
            if btype == DESCRIPTOR:
                if self._csum and not self._tail_ok(block):
                    break
                tags = self._tags(block)
                if len(tags) >= blocks_left:
                    break
                ok = True
                for fs_block, flags, csum in tags:
                    advance()
                    data = self._log_block(pos)
                    # Real recovery writes the rest of the log and then fails
                    # (mount refused, e2fsck goes on to a full check); here the
                    # log ends so that what is shown is a consistent older state.
                    if self._csum and not self._tag_ok(data, seq, csum):
                        ok = False
                        break
                    if (fs_block + 1) * self._bs > self.size:
                        ok = False
                        break
                    if flags & TAG_ESCAPE:  # the block began with the journal magic
                        data = struct.pack(">I", JBD2_MAGIC) + data[4:]
                    writes.append((fs_block, data))
                if not ok:
                    break
            elif btype == COMMIT:
                # The commit block is the transaction's only proof of completeness.
                # Not checked: the old v1 COMPAT_CHECKSUM (crc32 of the data in the
                # commit block), superseded by v2/v3 and not made by today's kernels.
                if self._csum and not self._commit_ok(block):
                    break
                committed.append((writes, revokes))
                writes, revokes = [], set()
                sequence = (sequence + 1) & 0xFFFFFFFF
            elif btype == REVOKE:
                if self._csum and not self._tail_ok(block):
                    break
                records = self._revoked(block)
                if records is None:
                    break
                revokes.update(records)
            else:
                break
            advance()
        return committed

    def _log_block(self, logical: int) -> bytes:
        return self._raw_block(self._jmap[logical])

    def _tags(self, block: bytes) -> list[tuple[int, int, int]]:
        """(fs block, flags, checksum) of each tag of a descriptor block."""
        end = self._bs - (4 if self._csum else 0)  # v2/v3: a checksum tail
        tags, p = [], 12
        while p + self._tag_size <= end:
            if self._v3:
                lo, flags, hi, csum = struct.unpack_from(">IIII", block, p)
            else:
                lo, csum, flags = struct.unpack_from(">IHH", block, p)
                hi = _be32(block, p + 8) if self._is64 else 0
            tags.append(((hi << 32 | lo) if self._is64 else lo, flags, csum))
            p += self._tag_size + (0 if flags & TAG_SAME_UUID else 16)
            if flags & TAG_LAST:
                break
        return tags

    def _revoked(self, block: bytes):
        """The fs blocks of a revoke block; None when its count is impossible."""
        count = _be32(block, 12)  # bytes used, header included
        width = 8 if self._is64 else 4
        if count < 16 or count > self._bs - (4 if self._csum else 0) or (count - 16) % width:
            return None
        return struct.unpack_from(f">{(count - 16) // width}{'Q' if self._is64 else 'I'}", block, 16)

    def _tail_ok(self, block: bytes) -> bool:
        """Descriptor and revoke blocks end in a checksum of the block with it zeroed."""
        return crc32c_raw(self._seed, block[:-4], bytes(4)) == _be32(block, self._bs - 4)

    def _commit_ok(self, block: bytes) -> bool:
        """A commit block's checksum is its first h_chksum word (at 16), zeroed in the sum."""
        return crc32c_raw(self._seed, block[:16], bytes(4), block[20:]) == _be32(block, 16)

    def _tag_ok(self, data: bytes, seq: int, csum: int) -> bool:
        """A logged block's checksum covers its sequence and its data as logged
        (escaped); v2 keeps only the low 16 bits."""
        value = crc32c_raw(self._seed, struct.pack(">I", seq), data)
        return value == csum if self._v3 else (value & 0xFFFF) == csum

    # -- replay --------------------------------------------------------------

    def _replay(self, committed: list[tuple[list, set]]) -> None:
        """The newest copy of each block wins, except that a revoke in a
        transaction hides that block's copies in it and in older ones."""
        revoked_in = {}  # fs block -> index of the last transaction revoking it
        for i, (_, revokes) in enumerate(committed):
            for block in revokes:
                revoked_in[block] = i
        for i, (writes, _) in enumerate(committed):
            for block, data in writes:
                if revoked_in.get(block, -1) < i:
                    self._overlay[block] = data

    def _view_block(self, block: int) -> bytearray:
        return bytearray(self._overlay.get(block) or self._raw_block(block))

    def _clean_superblocks(self, sequence: int) -> None:
        """What recovery writes besides the log's blocks: the ext4 superblock
        loses INCOMPAT_RECOVER, the journal is marked empty (s_start 0) and its
        next transaction is the one after the last sequence number the log
        could have held (s_sequence = old + replayed + 1, as jbd2 and e2fsck
        do). The journal's s_errno is left as it is."""
        block, at = divmod(SB_OFFSET, self._bs)
        sb = self._view_block(block)
        struct.pack_into("<I", sb, at + 0x60, _u32(sb, at + 0x60) & ~INCOMPAT_RECOVER)
        if _u32(sb, at + 0x64) & RO_COMPAT_METADATA_CSUM:
            struct.pack_into("<I", sb, at + 0x3FC, crc32c_raw(0xFFFFFFFF, sb[at:at + 0x3FC]))
        self._overlay[block] = bytes(sb)

        jblock = self._jmap[0]
        jsb = self._view_block(jblock)
        struct.pack_into(">II", jsb, 24, (sequence + self.transactions + 1) & 0xFFFFFFFF, 0)
        if self._csum:
            struct.pack_into(">I", jsb, 0xFC, 0)
            struct.pack_into(">I", jsb, 0xFC, crc32c_raw(0xFFFFFFFF, jsb[:1024]))
        self._overlay[jblock] = bytes(jsb)


def _u16(b, at: int) -> int:
    return struct.unpack_from("<H", b, at)[0]


def _u32(b, at: int) -> int:
    return struct.unpack_from("<I", b, at)[0]


def _be32(b, at: int) -> int:
    return struct.unpack_from(">I", b, at)[0]
