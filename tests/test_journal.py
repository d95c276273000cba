"""rpofs.files.journal against e2fsck: ext4 images whose journal needs
recovery, replayed in memory, must read block for block as a copy replayed by
`e2fsck -y -E journal_only` does.

Real level: the test guest (tests/guestlab.py) powered off mid-workload, both
of its ext4 disks. Made level: journals written here in every JBD2 tag format
(32/64-bit, no checksum, CSUM_V2, CSUM_V3) over ext4 (extents, 1 KiB and
4 KiB blocks) and ext3 (block map), with revokes, an escaped block, several
descriptors, a log wrapping around the journal's end, sequence numbers
wrapping around 2**32 and an uncommitted tail. Also: a clean image passes
through, an external journal is refused, a corrupt journal block ends the
replay at the transaction before it.

e2fsck changes three superblock fields beyond the replay (seen on these
images: nothing else differs), which the comparison leaves out, checking the
view's own checksum instead:
  s_wtime (with its high byte s_wtime_hi): ext2fs_flush stamps the time
    e2fsck wrote the superblock;
  s_kbytes_written: e2fsck adds the KiB it wrote while replaying;
  s_checksum: covers the two above.
No -f: with it, e2fsck 1.47 goes on to the full check after the replay and
fixes more (the superblock's free block count, the mount count).
"""

import os
import random
import re
import struct
import subprocess
import time
import uuid

import pytest
from dissect.util.hash import crc32c as _crc32c_impl
from dissect.util.stream import AlignedStream

from guestlab import Guest, build_guest, read_log
from rpofs.files.journal import JournalError, ReplayedDevice

pytestmark = pytest.mark.libvirt

MAGIC = 0xC03B3998
RECOVER, METADATA_CSUM = 0x4, 0x400
SB = 1024  # the ext4 superblock's byte offset
# (offset, length) in the superblock of the fields e2fsck sets beyond the replay (see above)
E2FSCK_ONLY = {"s_wtime": (0x30, 4), "s_wtime_hi": (0x274, 1), "s_kbytes_written": (0x178, 8),
               "s_checksum": (0x3FC, 4)}


def kcrc(seed, *parts):
    """The kernel's crc32c(seed, data), without the usual inversions."""
    value = seed ^ 0xFFFFFFFF
    for part in parts:
        value = _crc32c_impl.crc32c(part, value)
    return value ^ 0xFFFFFFFF


class Image:
    """A raw image file: reads for ReplayedDevice, block reads and writes for the tests."""

    def __init__(self, path):
        self.path = str(path)
        self.size = os.path.getsize(self.path)
        self.bs = 1024 << struct.unpack_from("<I", self.superblock(), 0x18)[0]

    def read(self, offset, length):
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def block(self, n):
        return self.read(n * self.bs, self.bs)

    def write(self, offset, data):
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)

    def superblock(self):
        return self.read(SB, 1024)

    def patch_superblock(self, fn):
        """fn(bytearray) edits the ext4 superblock; its checksum is kept valid."""
        sb = bytearray(self.superblock())
        fn(sb)
        if struct.unpack_from("<I", sb, 0x64)[0] & METADATA_CSUM:
            struct.pack_into("<I", sb, 0x3FC, kcrc(0xFFFFFFFF, sb[:0x3FC]))
        self.write(SB, bytes(sb))

    def device(self):
        return ReplayedDevice(self.read, self.size)


def copy(src, dst):
    """A sparse copy (the images are mostly empty); dst."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    os.chmod(dst, 0o644)  # the guest's base images are read-only
    return dst


def needs_recovery(sb):
    return bool(struct.unpack_from("<I", sb, 0x60)[0] & RECOVER)


def journal_blocks(path):
    """Physical block of each journal block (inode 8), from debugfs."""
    out = subprocess.run(["debugfs", "-R", "stat <8>", str(path)], capture_output=True,
                         text=True, check=True).stdout
    mapping = {}
    for lfrom, lto, pfrom in re.findall(r"\((\d+)(?:-(\d+))?\):(\d+)", out):
        lfrom = int(lfrom)
        for k in range(int(lto or lfrom) - lfrom + 1):
            mapping[lfrom + k] = int(pfrom) + k
    return [mapping[i] for i in range(len(mapping))]


def e2fsck_replayed(src, dst):
    """A copy of src with its journal replayed by e2fsck (and nothing else checked)."""
    copy(src, dst)
    r = subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(dst)], capture_output=True, text=True)
    assert r.returncode in (0, 1), f"e2fsck failed ({r.returncode}): {r.stdout}{r.stderr}"
    assert "recovering journal" in r.stdout, r.stdout
    assert not needs_recovery(Image(dst).superblock())
    return Image(dst)


def masked(sb):
    sb = bytearray(sb)
    for at, n in E2FSCK_ONLY.values():
        sb[at:at + n] = bytes(n)
    return bytes(sb)


def assert_same_as_e2fsck(dev, ref, skip_blocks=()):
    """dev reads as ref does, block for block over the whole image, but for the
    superblock fields only e2fsck sets and the blocks in skip_blocks."""
    assert dev.size == ref.size
    bs, chunk = ref.bs, 1 << 20
    differ = []
    for off in range(0, ref.size, chunk):
        mine, theirs = dev.read(off, chunk), ref.read(off, chunk)
        assert len(mine) == len(theirs)
        if mine != theirs:
            differ += [off // bs + i for i in range(-(-len(mine) // bs))
                       if mine[i * bs:(i + 1) * bs] != theirs[i * bs:(i + 1) * bs]]
    sb_block = SB // bs
    differ = [b for b in differ if b not in skip_blocks and b != sb_block]
    assert not differ, f"blocks differing from e2fsck's replay: {differ[:20]}"
    # the superblock's block: the same but for e2fsck's own fields
    mine, theirs = dev.read(sb_block * bs, bs), ref.read(sb_block * bs, bs)
    at = SB % bs
    assert mine[:at] + mine[at + 1024:] == theirs[:at] + theirs[at + 1024:]
    sb = mine[at:at + 1024]
    assert masked(sb) == masked(theirs[at:at + 1024]), \
        [hex(i) for i in range(1024) if sb[i] != theirs[at + i]]
    assert not needs_recovery(sb)
    if struct.unpack_from("<I", sb, 0x64)[0] & METADATA_CSUM:  # still valid
        assert struct.unpack_from("<I", sb, 0x3FC)[0] == kcrc(0xFFFFFFFF, sb[:0x3FC])


# --- the real guest, powered off mid-workload ----------------------------------

@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """{"log": Image, "db": Image}: the guest's disks after a power cut while
    its workload runs, both needing journal recovery with committed
    transactions in the log; if either does not, the guest is run again,
    longer."""
    for attempt in range(3):
        work = tmp_path_factory.mktemp(f"crash{attempt}")
        with Guest(f"rpofs-jnl-{uuid.uuid4().hex[:8]}", work) as guest:
            deadline = time.monotonic() + 60
            while guest.progress() < 15 + 20 * attempt:  # >= a few seconds of writes
                assert time.monotonic() < deadline, guest.console_tail()
                time.sleep(0.2)
        images = {}
        for disk in ("log", "db"):
            raw = work / f"{disk}.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(work / f"{disk}.qcow2"), str(raw)],
                           check=True)
            images[disk] = Image(raw)
        if all(needs_recovery(i.superblock()) and i.device().transactions > 0 for i in images.values()):
            return images
    raise AssertionError("no power cut left both disks needing journal recovery in 3 tries")


@pytest.mark.parametrize("disk", ["log", "db"])
def test_guest_disk_replays_as_e2fsck(crashed, disk, tmp_path):
    image = crashed[disk]
    dev = image.device()
    assert dev.replayed and dev.transactions > 0 and dev.blocks > 0
    ref = e2fsck_replayed(image.path, tmp_path / "ref.img")
    assert ref.read(0, ref.size) != image.read(0, image.size)  # the replay changed something
    assert_same_as_e2fsck(dev, ref)
    # unaligned reads, across overlaid and raw blocks
    rnd = random.Random(disk)
    for _ in range(300):
        off = rnd.randrange(image.size)
        n = rnd.choice([1, 3, 700, 1024, 5000, 70000])
        if not (off < SB + 1024 and off + n > SB):  # the superblock: compared above
            assert dev.read(off, n) == ref.read(off, n)
    assert dev.read(image.size - 10, 100) == ref.read(image.size - 10, 100)
    # the image itself was only read
    assert needs_recovery(image.superblock())


class _Stream(AlignedStream):
    def __init__(self, dev):
        self.dev = dev
        super().__init__(dev.size)

    def _read(self, offset, length):
        return self.dev.read(offset, length)


def test_guest_log_reads_through_dissect(crashed):
    """A reader on top (dissect.extfs) sees the filesystem a mount would."""
    from dissect.extfs import ExtFS

    image = crashed["log"]
    fs = ExtFS(_Stream(image.device()))
    text = fs.get("/seq.log").open().read().decode()
    assert [(int(n), float(t)) for n, t in (line.split() for line in text.splitlines())] == \
        read_log(image.path)


# --- corruption: the replay ends before the first bad block --------------------

@pytest.fixture(scope="module")
def corrupt_lab(crashed, tmp_path_factory):
    """The db disk's log as debugfs lists it: a middle transaction k, its
    descriptor, first data and commit blocks (physical), how many committed
    transactions precede it; and e2fsck's replay of a copy whose log ends
    before k (its descriptor zeroed)."""
    image = crashed["db"]
    work = tmp_path_factory.mktemp("corrupt")
    found = subprocess.run(["debugfs", "-R", "logdump -a", image.path], capture_output=True,
                           text=True, check=True)
    dump = found.stdout
    # debugfs exits 0 when it cannot open the image: an empty dump, and stderr says why
    assert "Journal starts at block" in dump, f"debugfs on {image.path}: {found.stderr}"
    txs = {}  # sequence -> {"descriptor": j, "data": j, "commit": j}, journal block numbers
    seq = None
    for line in dump.splitlines():
        m = re.match(r"Found expected sequence (\d+), type (\d+) \((\w+) block\) at block (\d+)", line)
        if m:
            seq = int(m[1])
            txs.setdefault(seq, {}).setdefault(m[3], int(m[4]))
        m = re.match(r"\s*FS block \d+ logged at journal block (\d+)", line)
        if m:
            txs[seq].setdefault("data", int(m[1]))
    full = [s for s, t in sorted(txs.items()) if {"descriptor", "data", "commit"} <= t.keys()]
    assert len(full) >= 4, dump[-2000:]
    k = full[len(full) // 2]
    jmap = journal_blocks(image.path)
    blocks = {kind: jmap[j] for kind, j in txs[k].items()}
    cut = work / "cut.img"
    copy(image.path, cut)
    Image(cut).write(blocks["descriptor"] * image.bs, bytes(image.bs))
    ref = e2fsck_replayed(cut, work / "cut-ref.img")
    return image, blocks, k - min(txs), ref, work


@pytest.mark.parametrize("kind", ["descriptor", "data", "commit"])
def test_corrupt_journal_block_ends_replay(corrupt_lab, kind):
    image, blocks, before, ref, work = corrupt_lab
    bad = Image(copy(image.path, work / f"bad-{kind}.img"))
    # data and commit blocks: any byte is checksummed; a descriptor: bytes past
    # its tags, so that only the descriptor's own checksum can tell
    at = blocks[kind] * image.bs + (image.bs - 100 if kind == "descriptor" else 100)
    bad.write(at, bytes(b ^ 0x5A for b in image.read(at, 8)))
    dev = bad.device()  # must not raise
    assert dev.replayed and dev.transactions == before
    skip = {blocks["descriptor"], blocks[kind]}
    assert_same_as_e2fsck(dev, ref, skip_blocks=skip)
    # and the transactions from k on did matter
    whole = image.device()
    assert whole.transactions > before
    changed = [b for b in range(image.size // image.bs) if b not in skip
               and whole.read(b * image.bs, image.bs) != dev.read(b * image.bs, image.bs)]
    assert changed


# --- pass-through and refusal ---------------------------------------------------

def test_clean_image_passes_through(crashed, tmp_path):
    for path in (build_guest()["log_img"], e2fsck_replayed(crashed["db"].path, tmp_path / "ref.img").path):
        image = Image(path)
        dev = image.device()
        assert not dev.replayed and dev.transactions == 0 and dev.blocks == 0
        for off, n in ((0, image.size), (SB + 7, 3000), (image.size - 5, 50), (12345, 1)):
            assert dev.read(off, n) == image.read(off, n)
    junk = bytes(range(256)) * 64
    dev = ReplayedDevice(lambda off, n: junk[off:off + n], len(junk))  # not ext at all
    assert not dev.replayed and dev.read(5, 10) == junk[5:15]


def test_external_journal_is_refused(tmp_path):
    image = Image(copy(build_guest()["log_img"], tmp_path / "ext.img"))

    def external(sb):
        struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] | RECOVER)
        struct.pack_into("<II", sb, 0xE0, 0, 0x0801)  # s_journal_inum 0, s_journal_dev 8:1
        sb[0xD0:0xE0] = uuid.uuid4().bytes
    image.patch_superblock(external)
    with pytest.raises(JournalError, match="external journal"):
        image.device()


# --- journals written here, in every format ------------------------------------

FORMATS = {  # name: (64-bit block numbers, CSUM_V2, CSUM_V3)
    "plain-32": (False, False, False), "plain-64": (True, False, False),
    "v2-32": (False, True, False), "v2-64": (True, True, False),
    "v3-32": (False, False, True), "v3-64": (True, False, True),
}


@pytest.fixture(scope="module")
def clean_fs(tmp_path_factory):
    """Clean images: the guest's ext4 (1 KiB blocks, extents, metadata_csum),
    an ext4 with 4 KiB blocks (superblock inside block 0), an ext3 (journal
    through a block map with double indirect blocks)."""
    work = tmp_path_factory.mktemp("fs")
    images = {name: work / f"{name}.img" for name in ("ext4-1k", "ext4-4k", "ext3-1k")}
    copy(build_guest()["log_img"], images["ext4-1k"])
    for mkfs, name, bs in (("mkfs.ext4", "ext4-4k", "4096"), ("mkfs.ext3", "ext3-1k", "1024")):
        subprocess.run([mkfs, "-q", "-F", "-b", bs, str(images[name]), "32M"], check=True, capture_output=True)
    return images


class JournalWriter:
    """Writes a log of transactions into an image's (clean, zeroed) journal,
    as a kernel would have left it at a power cut, and marks the filesystem
    as needing recovery."""

    def __init__(self, image, fmt):
        self.image = image
        self.is64, self.v2, self.v3 = FORMATS[fmt]
        self.csum = self.v2 or self.v3
        self.bs = image.bs
        self.jmap = journal_blocks(image.path)
        self.jsb = bytearray(image.block(self.jmap[0]))
        self.uuid = bytes(self.jsb[48:64])
        self.seed = kcrc(0xFFFFFFFF, self.uuid)
        self.tag_size = 16 if self.v3 else 8 + (2 if self.v2 else 0) + (4 if self.is64 else 0)

    def descriptors(self, writes, seq):
        out = []
        while writes:
            d, datas, p = bytearray(self.bs), [], 12
            struct.pack_into(">III", d, 0, MAGIC, 1, seq)
            end = self.bs - (4 if self.csum else 0)
            while writes and p + self.tag_size + (0 if datas else 16) <= end:
                block, data = writes.pop(0)
                flags = 0x2 if datas else 0  # SAME_UUID but for the first tag
                if data[:4] == struct.pack(">I", MAGIC):
                    data, flags = bytes(4) + data[4:], flags | 0x1  # ESCAPE
                c = kcrc(self.seed, struct.pack(">I", seq), data)
                last = p
                if self.v3:
                    struct.pack_into(">IIII", d, p, block & 0xFFFFFFFF, flags, block >> 32, c)
                else:
                    struct.pack_into(">IHH", d, p, block & 0xFFFFFFFF, c & 0xFFFF if self.v2 else 0, flags)
                    if self.is64:
                        struct.pack_into(">I", d, p + 8, block >> 32)
                p += self.tag_size
                if not datas:
                    d[p:p + 16] = self.uuid
                    p += 16
                datas.append(data)
            flags_at, fmt = (last + 4, ">I") if self.v3 else (last + 6, ">H")
            struct.pack_into(fmt, d, flags_at, struct.unpack_from(fmt, d, flags_at)[0] | 0x8)  # LAST_TAG
            self.tail(d)
            out += [bytes(d)] + datas
        return out

    def revoke(self, blocks, seq):
        d = bytearray(self.bs)
        width = 8 if self.is64 else 4
        struct.pack_into(">IIII", d, 0, MAGIC, 5, seq, 16 + width * len(blocks))
        struct.pack_into(f">{len(blocks)}{'Q' if self.is64 else 'I'}", d, 16, *blocks)
        self.tail(d)
        return [bytes(d)]

    def commit(self, seq, when):
        d = bytearray(self.bs)
        struct.pack_into(">III", d, 0, MAGIC, 2, seq)
        struct.pack_into(">QI", d, 0x30, when, 0)
        if self.csum:
            struct.pack_into(">I", d, 16, kcrc(self.seed, d))
        return [bytes(d)]

    def tail(self, d):
        if self.csum:
            struct.pack_into(">I", d, self.bs - 4, kcrc(self.seed, d))

    def write(self, transactions, start_back, seq0):
        """transactions: (writes [(block, data)], revokes [block], committed);
        the log starts start_back blocks before the journal's end."""
        maxlen, first = struct.unpack_from(">II", self.jsb, 16)
        log = []
        for i, (writes, revokes, committed) in enumerate(transactions):
            seq = (seq0 + i) & 0xFFFFFFFF
            log += self.descriptors(list(writes), seq)
            log += self.revoke(revokes, seq) if revokes else []
            log += self.commit(seq, 1_700_000_000 + i) if committed else []
        start = pos = maxlen - start_back
        for block in log + [bytes(self.bs)]:  # a zero block ends the log
            self.image.write(self.jmap[pos] * self.bs, block)
            pos = pos + 1 if pos + 1 < maxlen else first
        incompat = 0x1 | (0x2 if self.is64 else 0) | (0x8 if self.v2 else 0) | (0x10 if self.v3 else 0)
        struct.pack_into(">III", self.jsb, 24, seq0, start, 0)  # s_sequence, s_start, s_errno
        struct.pack_into(">I", self.jsb, 40, incompat)
        self.jsb[0x50] = 4 if self.csum else 0  # s_checksum_type: crc32c
        struct.pack_into(">I", self.jsb, 0xFC, 0)
        if self.csum:
            struct.pack_into(">I", self.jsb, 0xFC, kcrc(0xFFFFFFFF, self.jsb[:1024]))
        self.image.write(self.jmap[0] * self.bs, bytes(self.jsb))
        self.image.patch_superblock(
            lambda sb: struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] | RECOVER))
        return log


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fs", ["ext4-1k", "ext4-4k", "ext3-1k"])
def test_written_journal_replays_as_e2fsck(clean_fs, fs, fmt, tmp_path):
    image = Image(copy(clean_fs[fs], tmp_path / "fs.img"))
    writer = JournalWriter(image, fmt)
    # 300 blocks at the end of the filesystem, clear of the journal
    jset = set(writer.jmap)
    count = image.size // image.bs
    a = [b for b in range(count - 400, count) if b not in jset][:300]
    rnd = random.Random(f"{fs}-{fmt}")
    v1 = {b: rnd.randbytes(image.bs) for b in a}
    v2 = {b: rnd.randbytes(image.bs) for b in a[:10] + [a[20]]}
    escaped = struct.pack(">I", MAGIC) + rnd.randbytes(image.bs - 4)
    v3 = {a[11]: rnd.randbytes(image.bs), a[21]: escaped}
    transactions = [
        (list(v1.items()), [], True),   # several descriptors: more tags than one holds
        (list(v2.items()), a[10:21], True),  # a[10:21] revoked, a[20] even written here
        (list(v3.items()), [a[30]], True),   # a[11] written again after its revoke
        ([(a[40], rnd.randbytes(image.bs))], [a[41]], False),  # never committed
    ]
    log = writer.write(transactions, start_back=50, seq0=0xFFFFFFFE)
    assert len(log) > 50  # the log wraps around the journal's end
    raw = {b: image.block(b) for b in a}

    dev = image.device()
    assert dev.replayed and dev.transactions == 3
    ref = e2fsck_replayed(image.path, tmp_path / "ref.img")
    assert_same_as_e2fsck(dev, ref)

    def view(b):
        return dev.read(b * image.bs, image.bs)
    assert view(a[0]) == v2[a[0]] and view(a[299]) == v1[a[299]]
    assert view(a[10]) == raw[a[10]] and view(a[20]) == raw[a[20]] and view(a[30]) == raw[a[30]]
    assert view(a[11]) == v3[a[11]] and view(a[21]) == escaped
    assert view(a[40]) == v1[a[40]] and view(a[41]) == v1[a[41]]
    assert dev.blocks == len(set(a) - set(a[10:21]) - {a[30]}) + 1  # + a[11]
    # the journal superblock as recovery leaves it: empty, next sequence after the log's
    jsb = dev.read(writer.jmap[0] * image.bs, 1024)
    assert struct.unpack_from(">II", jsb, 24) == ((0xFFFFFFFE + 3 + 1) & 0xFFFFFFFF, 0)
