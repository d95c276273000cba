"""rpofs.apps.wal against SQLite itself: WALs written by Python's sqlite3 in
WAL mode (synchronous=FULL, no automatic checkpoint), copied at chosen
moments the way the guest agent copies them, must yield exactly the frames
SQLite's recovery lets count, and the image checkpointed from them must be
the database SQLite sees in (and checkpoints out of) the same copies.

Moments: after each commit; with another connection's transaction open that
spilled frames into the WAL (cache_size=10); every byte of a torn tail; a
flipped bit; after `wal_checkpoint(RESTART)` and a new write, where the WAL
restarts with new salts and the old generation's frames still follow the
new ones; after DROP TABLE + VACUUM shrank the file. SQLite on this machine
writes little-endian checksums; WALs made here by hand cover the big-endian
ones and the truncation between batches that real traffic rarely shows.

The image is also opened the way the mount will offer it: immutable=1, from
a directory nobody can write, with no -wal or -shm file (as root the check
runs as nobody, since root writes anywhere).
"""

import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from rpofs.apps.wal import (FRAME_HEADER_SIZE, WAL_HEADER_SIZE, DatabaseImage, Frame,
                            FrameBatch, Scan, WalHeader, parse_header, scan, scan_wal)

pytestmark = pytest.mark.pure

MASK = 0xFFFFFFFF


# -- helpers -------------------------------------------------------------------

class Copy(NamedTuple):
    """The database file and its WAL as a copy taken at one moment holds them."""
    db: bytes
    wal: bytes


class Truth(NamedTuple):
    """What SQLite makes of a copy: its rows, and the file its checkpoint leaves."""
    rows: list
    checkpointed: bytes


class Opened(NamedTuple):
    rows: list
    integrity: list


class Db:
    """A database in WAL mode that only ever grows its WAL until told."""

    def __init__(self, path: Path, page_size: int = 4096, seed: int = 1):
        self.path = path
        self.rng = random.Random(seed)
        self.con = connect(path)
        self.con.execute(f"PRAGMA page_size={page_size}")
        assert self.con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        self.con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")

    def insert(self, keys, size: int = 300, con=None) -> None:
        """One transaction."""
        con = con or self.con
        con.execute("BEGIN")
        for k in keys:
            con.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (k, self.rng.randbytes(size)))
        con.execute("COMMIT")

    def copy(self) -> Copy:
        wal = Path(f"{self.path}-wal")
        return Copy(self.path.read_bytes(), wal.read_bytes() if wal.exists() else b"")


def connect(path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    return con


def dump(con: sqlite3.Connection) -> list:
    return con.execute("SELECT * FROM t ORDER BY k").fetchall()


def truth(copy: Copy, tmp: Path) -> Truth:
    """SQLite's view of a copy, and the file its checkpoint leaves (on a copy
    of the copy: recovery, then wal_checkpoint(TRUNCATE))."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    (d / "t.db").write_bytes(copy.db)
    (d / "t.db-wal").write_bytes(copy.wal)
    con = connect(d / "t.db")
    rows = dump(con)
    busy, log, done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and log == done
    checkpointed = (d / "t.db").read_bytes()
    con.close()
    return Truth(rows, checkpointed)


def reader(data: bytes, log: list | None = None):
    def read(offset: int, length: int) -> bytes:
        if log is not None:
            log.append((offset, length))
        return data[offset:offset + length]
    return read


def batch(wal: bytes, log: list | None = None) -> FrameBatch:
    header, found = scan_wal(wal)
    assert header is not None
    return FrameBatch(header, found.frames, reader(wal, log))


def image(db: bytes, *wals: bytes) -> DatabaseImage:
    return DatabaseImage(reader(db), len(db), [batch(w) for w in wals if w])


def open_image(img: DatabaseImage, tmp: Path) -> Opened:
    """The image as a file of its own, opened immutable (no -wal beside it)."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    (d / "img.db").write_bytes(img.read(0, img.size))
    con = sqlite3.connect(f"file:{d / 'img.db'}?immutable=1", uri=True)
    try:
        return Opened(dump(con), con.execute("PRAGMA integrity_check").fetchall())
    finally:
        con.close()
        assert os.listdir(d) == ["img.db"]


def assert_image_is_sqlites(copy: Copy, tmp: Path, base: bytes | None = None,
                            earlier: tuple[bytes, ...] = ()) -> DatabaseImage:
    """The image of `copy` (its WAL over `base`, after `earlier` WALs) reads
    as SQLite's checkpoint of the copy, byte for byte, and as its rows."""
    img = image(copy.db if base is None else base, *earlier, copy.wal)
    seen = truth(copy, tmp)
    assert img.size == len(seen.checkpointed)
    assert img.read(0, img.size + 4096) == seen.checkpointed
    opened = open_image(img, tmp)
    assert opened.integrity == [("ok",)]
    assert opened.rows == seen.rows
    return img


def frame_size(header: WalHeader) -> int:
    return FRAME_HEADER_SIZE + header.page_size


def commit_ends(header: WalHeader, frames: list[Frame]) -> list[int]:
    return [f.offset + frame_size(header) for f in frames if f.commit_pages]


def committed_at(header: WalHeader, frames: list[Frame], cut: int) -> Scan:
    """What a scan of the WAL cut at `cut` must find: frames of the commits
    that end at or before it (the checksum is checked elsewhere)."""
    end = max([e for e in commit_ends(header, frames) if e <= cut], default=WAL_HEADER_SIZE)
    return Scan([f for f in frames if f.offset < end], end, None)


def many_commits(tmp: Path, page_size: int = 4096) -> tuple[Db, list[Copy]]:
    """A table created, then six transactions of 20 rows; a copy after each."""
    db = Db(tmp / "a.db", page_size)
    copies = [db.copy()]
    for i in range(6):
        db.insert(range(i * 20, i * 20 + 20), size=200 + 50 * i)
        copies.append(db.copy())
    return db, copies


# -- scanning real WALs ----------------------------------------------------------

def test_scan_finds_exactly_the_committed_frames(tmp_path):
    db, copies = many_commits(tmp_path)
    final = copies[-1].wal
    header, found = scan_wal(final)
    fs = frame_size(header)
    assert header.page_size == 4096 and not header.big_endian and header.checkpoint_seq == 0
    assert (len(final) - WAL_HEADER_SIZE) % fs == 0
    # every frame of a WAL nobody is writing counts, in file order
    assert [f.offset for f in found.frames] == list(range(WAL_HEADER_SIZE, len(final), fs))
    assert found.end == len(final)
    assert found.checksum == struct.unpack_from(">II", final, len(final) - fs + 16)
    # one commit frame per transaction, exactly where each copy's WAL ended
    assert commit_ends(header, found.frames) == [len(c.wal) for c in copies]
    assert found.frames[-1].commit_pages == db.con.execute("PRAGMA page_count").fetchone()[0]
    for f in found.frames:
        assert f.page == struct.unpack_from(">I", final, f.offset)[0] >= 1
    for c in copies:
        h, s = scan_wal(c.wal)
        assert h == header and h.generation == header.generation
        assert s.frames == found.frames[:len(s.frames)] and s.end == len(c.wal)
        assert_image_is_sqlites(c, tmp_path)


def test_uncommitted_spilled_frames_never_count(tmp_path):
    db = Db(tmp_path / "a.db")
    db.insert(range(50))
    committed = db.copy()
    writer = connect(db.path)
    writer.execute("PRAGMA cache_size=10")   # the transaction outgrows it: pages spill into the WAL
    writer.execute("BEGIN")
    for k in range(50, 450):
        writer.execute("INSERT INTO t VALUES (?, ?)", (k, db.rng.randbytes(1000)))
    spilled = db.copy()
    header, found = scan_wal(spilled.wal)
    fs = frame_size(header)
    assert len(spilled.wal) >= len(committed.wal) + 10 * fs, "no frames spilled"
    # the spilled frames are well-formed frames of this generation: only the missing commit keeps them out
    first = struct.unpack_from(">IIII", spilled.wal, len(committed.wal))
    assert first[0] >= 1 and first[1] == 0 and first[2:] == (header.salt1, header.salt2)
    assert found.end == len(committed.wal)
    assert found.frames == scan_wal(committed.wal)[1].frames
    assert found.checksum == scan_wal(committed.wal)[1].checksum
    img = assert_image_is_sqlites(spilled, tmp_path)
    assert open_image(img, tmp_path).rows == dump(db.con)   # the open transaction is invisible
    writer.execute("COMMIT")
    done = db.copy()
    header, found = scan_wal(done.wal)
    assert found.end == len(done.wal) > len(spilled.wal) - fs
    assert_image_is_sqlites(done, tmp_path)
    assert len(open_image(image(done.db, done.wal), tmp_path).rows) == 450


def test_torn_wal_never_yields_more_than_the_committed_prefix(tmp_path):
    db, copies = many_commits(tmp_path, page_size=512)
    db.insert([1000], size=1500)   # a last transaction of several frames (overflow pages)
    final = db.copy().wal
    header, whole = scan_wal(final)
    fs = frame_size(header)
    ends = commit_ends(header, whole.frames)
    previous = ends[-2]
    assert (ends[-1] - previous) // fs >= 3
    before = scan(header, memoryview(final)[WAL_HEADER_SIZE:previous], WAL_HEADER_SIZE,
                  header.checksum)
    assert before.end == previous
    # every byte of the last transaction's frames: nothing until its commit frame is whole
    for cut in range(previous, len(final) + 1):
        got = scan(header, memoryview(final)[previous:cut], previous, before.checksum)
        if cut < len(final):
            assert got == Scan([], previous, before.checksum), cut
        else:
            assert got.frames == whole.frames[len(before.frames):] and got.end == len(final)
    # and the whole file cut anywhere, header included
    for cut in list(range(0, 40)) + list(range(40, len(final) + 1, 97)):
        h, got = scan_wal(final[:cut])
        if cut < WAL_HEADER_SIZE:
            assert h is None and got == Scan([], 0, (0, 0))
            continue
        expected = committed_at(header, whole.frames, cut)
        assert (got.frames, got.end) == (expected.frames, expected.end), cut


def test_a_flipped_bit_stops_the_scan_at_its_frame(tmp_path):
    db, copies = many_commits(tmp_path, page_size=1024)
    final = copies[-1].wal
    header, whole = scan_wal(final)
    fs = frame_size(header)
    rng = random.Random(7)
    frames = whole.frames
    for frame in (frames[0], frames[1], frames[len(frames) // 2], frames[-1]):
        for at in (0, 3, 7, 8, 15, 16, 23, 24, fs - 1, rng.randrange(24, fs)):
            damaged = bytearray(final)
            damaged[frame.offset + at] ^= 1 << rng.randrange(8)
            h, got = scan_wal(damaged)
            expected = committed_at(header, frames, frame.offset)
            assert (got.frames, got.end) == (expected.frames, expected.end), (frame, at)
            assert got.end <= frame.offset
    for at in range(WAL_HEADER_SIZE):   # the header: nothing counts
        damaged = bytearray(final)
        damaged[at] ^= 0x10
        assert scan_wal(damaged) == (None, Scan([], 0, (0, 0))), at


def test_incremental_scan_equals_one_whole_scan(tmp_path):
    db, copies = many_commits(tmp_path)
    final = copies[-1].wal
    header, whole = scan_wal(final)
    rng = random.Random(3)
    # the copies as they arrived, then pieces cut anywhere (a copy caught mid-write)
    for cuts in ([len(c.wal) for c in copies],
                 sorted(rng.sample(range(WAL_HEADER_SIZE, len(final)), 12)) + [len(final)]):
        frames, end, checksum = [], WAL_HEADER_SIZE, header.checksum
        for cut in cuts:
            got = scan(header, final[end:cut], end, checksum)
            frames += got.frames
            end, checksum = got.end, got.checksum
        assert Scan(frames, end, checksum) == whole
    with pytest.raises(ValueError):
        scan(header, final[WAL_HEADER_SIZE + 8:], WAL_HEADER_SIZE + 8, header.checksum)


# -- the image -----------------------------------------------------------------

def test_image_opens_immutable_from_a_read_only_directory(tmp_path):
    """The finding DatabaseImage's docstring reports: the image, still in WAL
    mode (header bytes 18 and 19 are 2), opens with immutable=1 where no -wal
    or -shm can exist or be made, and passes integrity_check."""
    db, copies = many_commits(tmp_path)
    base = copies[0].db
    img = image(base, copies[-1].wal)
    data = img.read(0, img.size)
    assert data[18:20] == b"\x02\x02"
    with tempfile.TemporaryDirectory() as top:   # not under tmp_path: nobody must reach it
        os.chmod(top, 0o755)
        ro = Path(top) / "ro"
        ro.mkdir()
        (ro / "img.db").write_bytes(data)
        os.chmod(ro / "img.db", 0o444)
        os.chmod(ro, 0o555)
        child = r"""
import json, os, sqlite3, sys
d = sys.argv[1]
try:
    open(os.path.join(d, "probe"), "w")
    writable = True
except PermissionError:
    writable = False
con = sqlite3.connect("file:" + os.path.join(d, "img.db") + "?immutable=1", uri=True)
print(json.dumps({"writable": writable,
                  "integrity": con.execute("PRAGMA integrity_check").fetchall(),
                  "rows": [[k, v.hex()] for k, v in con.execute("SELECT * FROM t ORDER BY k")],
                  "files": sorted(os.listdir(d))}))
"""
        as_nobody = {"user": 65534} if os.geteuid() == 0 else {}
        out = subprocess.run([sys.executable, "-I", "-c", child, str(ro)], cwd="/",
                             capture_output=True, text=True, check=True, **as_nobody)
        os.chmod(ro, 0o755)
    seen = json.loads(out.stdout)
    assert seen["writable"] is False
    assert seen["integrity"] == [["ok"]]
    assert seen["files"] == ["img.db"]
    assert seen["rows"] == [[k, v.hex()] for k, v in dump(db.con)]


def test_image_reads_frames_lazily(tmp_path):
    db, copies = many_commits(tmp_path)
    final = copies[-1]
    log: list = []
    img = DatabaseImage(reader(final.db), len(final.db), [batch(final.wal, log)])
    assert log == [] and img.page_size == 4096
    assert img.frames == len({f.page for f in scan_wal(final.wal)[1].frames})
    img.read(100, 10)   # within page 1: its newest frame, those 10 bytes
    page1 = max((f for f in scan_wal(final.wal)[1].frames if f.page == 1), key=lambda f: f.offset)
    assert log == [(page1.offset + FRAME_HEADER_SIZE + 100, 10)]
    # reads at any offset and length agree with one whole read
    whole = img.read(0, img.size)
    rng = random.Random(5)
    for _ in range(200):
        offset = rng.randrange(img.size + 100)
        length = rng.choice([1, 7, 4095, 4096, 4097, 20000, rng.randrange(img.size)])
        assert img.read(offset, length) == whole[offset:offset + length]


def test_two_generations_applied_in_order(tmp_path):
    db, copies = many_commits(tmp_path)
    base = copies[0].db                     # the file no checkpoint has touched yet
    generation1 = copies[-1].wal
    busy, log, done = db.con.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    assert busy == 0 and log == done
    db.insert(range(5, 15), size=700)       # the WAL restarts: new salts, written from frame 0
    db.insert(range(500, 510))
    restarted = db.copy()
    h1, s1 = scan_wal(generation1)
    h2, s2 = scan_wal(restarted.wal)
    assert h2.generation != h1.generation and h2.checkpoint_seq == h1.checkpoint_seq + 1
    assert h2.salt1 == (h1.salt1 + 1) & MASK
    # the first generation's frames still lie after the second's: other salts stop the scan
    assert len(restarted.wal) == len(generation1) > s2.end
    assert restarted.wal[s2.end:] == generation1[s2.end:]
    assert len(commit_ends(h2, s2.frames)) == 2
    # generation 1 over the untouched base, then generation 2: the database now
    img = assert_image_is_sqlites(restarted, tmp_path, base=base, earlier=(generation1,))
    assert open_image(img, tmp_path).rows == dump(db.con)
    # generation 2 alone needs the file generation 1 was checkpointed into
    assert_image_is_sqlites(restarted, tmp_path)
    assert image(base, restarted.wal).read(0, img.size) != img.read(0, img.size)


def test_shrinking_database_truncates_the_image(tmp_path):
    db = Db(tmp_path / "a.db")
    db.con.execute("CREATE TABLE big(v BLOB)")
    db.con.execute("BEGIN")
    for _ in range(300):
        db.con.execute("INSERT INTO big VALUES (?)", (db.rng.randbytes(1000),))
    db.con.execute("COMMIT")
    db.insert(range(30))
    db.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    big = db.copy()
    assert big.wal == b"" and len(big.db) > 300 * 1000
    db.con.execute("DROP TABLE big")
    db.con.execute("VACUUM")
    small = db.copy()
    header, found = scan_wal(small.wal)
    assert found.frames[-1].commit_pages * 4096 < len(big.db) // 10
    img = assert_image_is_sqlites(small, tmp_path)
    assert img.size == found.frames[-1].commit_pages * 4096
    assert img.read(img.size, 10) == b"" and len(img.read(img.size - 5, 10)) == 5
    # and grows again over the same base
    assert small.db == big.db
    db.insert(range(30, 40), size=3000)
    later = db.copy()
    assert_image_is_sqlites(later, tmp_path, base=big.db)


def test_no_frames_is_the_base(tmp_path):
    for page_size in (1024, 65536):   # 65536 is stored as 1 in the database header
        db = Db(tmp_path / f"p{page_size}.db", page_size)
        db.insert(range(3))
        db.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c = db.copy()
        assert c.wal == b""
        assert struct.unpack_from(">H", c.db, 16)[0] == (1 if page_size == 65536 else page_size)
        for batches in ([], [FrameBatch(parse_header(_wal_header(page_size, 5, 6)), [], None)]):
            img = DatabaseImage(reader(c.db), len(c.db), batches)
            assert img.page_size == page_size and img.size == len(c.db) and img.frames == 0
            assert img.read(0, img.size + 1) == c.db
            assert img.read(page_size - 3, 10) == c.db[page_size - 3:page_size + 7]
            assert open_image(img, tmp_path).rows == dump(db.con)
    empty = DatabaseImage(reader(b""), 0, [])
    assert empty.size == 0 and empty.read(0, 4096) == b""
    for junk in (b"", b"\0" * 100, os.urandom(5000)):
        assert scan_wal(junk) == (None, Scan([], 0, (0, 0)))


# -- WALs made by hand ---------------------------------------------------------

def _checksum(data: bytes, big_endian: bool, s: tuple[int, int]) -> tuple[int, int]:
    """The reference loop of the file format document, kept apart from the module's."""
    s0, s1 = s
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & MASK
        s1 = (s1 + words[i + 1] + s0) & MASK
    return s0, s1


def _wal_header(page_size: int, salt1: int, salt2: int, big_endian: bool = False,
                seq: int = 0, version: int = 3007000) -> bytes:
    head = struct.pack(">IIIIII", 0x377F0682 | big_endian, version, page_size, seq, salt1, salt2)
    return head + struct.pack(">II", *_checksum(head, big_endian, (0, 0)))


def make_wal(page_size: int, frames: list[tuple[int, int, bytes]], big_endian: bool = False,
             salts: tuple[int, int] = (0x1234, 0x5678)) -> bytes:
    """A WAL of (page, commit pages, data) frames, as SQLite would write it."""
    out = bytearray(_wal_header(page_size, *salts, big_endian))
    running = struct.unpack_from(">II", out, 24)
    for page, commit, data in frames:
        assert len(data) == page_size
        head = struct.pack(">IIII", page, commit, *salts)
        running = _checksum(head[:8] + data, big_endian, running)
        out += head + struct.pack(">II", *running) + data
    return bytes(out)


def test_headers_and_big_endian_checksums():
    page = bytes(range(256)) * 2
    for big_endian in (False, True):
        wal = make_wal(512, [(1, 0, page), (2, 2, page[::-1]), (3, 0, page)], big_endian)
        header, found = scan_wal(wal)
        assert header == WalHeader(512, 0, 0x1234, 0x5678, big_endian, header.checksum)
        assert header.generation == "0000123400005678"
        assert found.frames == [Frame(32, 1, 0), Frame(32 + 536, 2, 2)]
        assert found.end == 32 + 2 * 536
        assert found.checksum == struct.unpack_from(">II", wal, 32 + 536 + 16)
        # the same bytes read with the other word order are not a valid WAL
        other = bytearray(wal)
        other[3] ^= 1
        assert scan_wal(other)[0] is None
    assert parse_header(_wal_header(4096, 1, 2)) is not None
    assert parse_header(_wal_header(65536, 1, 2)).page_size == 65536
    for bad in (_wal_header(4096, 1, 2, version=3007001), _wal_header(1000, 1, 2),
                _wal_header(256, 1, 2), _wal_header(131072, 1, 2), _wal_header(4096, 1, 2)[:31]):
        assert parse_header(bad) is None
    # other salts (an older generation's frame) stop the scan like a bad checksum
    stale = make_wal(512, [(1, 1, page)], salts=(9, 9))
    wal = make_wal(512, [(1, 1, page)]) + stale[32:]
    assert len(scan_wal(wal)[1].frames) == 1
    # page 0 is never a valid frame
    assert scan_wal(make_wal(512, [(0, 1, page)]))[1].frames == []


def test_each_batch_ends_truncated_as_its_checkpoint_leaves_the_file():
    """SQLite's checkpoint copies each page's newest frame up to the last
    commit's size (the size within a WAL may shrink and grow again) and then
    truncates the file to that size; a later WAL that grows the file again
    finds zeros where the truncation cut."""
    ps = 512
    base = b"".join(bytes([0xB0 + i]) * ps for i in range(4))
    page = lambda byte: bytes([byte]) * ps
    # one WAL: page 3 written at 3 pages, the file shrinks to 2, grows to 4 writing page 4 only
    one = make_wal(ps, [(3, 3, page(0xA3)), (2, 2, page(0xA2)), (4, 4, page(0xA4))])
    img = image(base, one)
    assert img.read(0, img.size) == base[:ps] + page(0xA2) + page(0xA3) + page(0xA4)
    # two WALs: the first checkpoint truncates to 2 pages, the second grows to 4 writing page 4
    first = make_wal(ps, [(3, 0, page(0xA3)), (2, 2, page(0xA2))])
    second = make_wal(ps, [(4, 4, page(0xC4))], salts=(0x1235, 0x9999))
    img = image(base, first, second)
    assert img.size == 4 * ps
    assert img.read(0, img.size) == base[:ps] + page(0xA2) + bytes(ps) + page(0xC4)
    # a base shorter than the image: zeros past it
    img = image(base[:ps], make_wal(ps, [(3, 3, page(0xA3))]))
    assert img.read(0, img.size) == base[:ps] + bytes(ps) + page(0xA3)
    with pytest.raises(ValueError):
        image(base, make_wal(ps, [(1, 1, page(1))]), make_wal(1024, [(1, 1, bytes(1024))]))
