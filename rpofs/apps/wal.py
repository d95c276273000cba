"""SQLite write-ahead logs: which frames count, and the database file as a
checkpoint of them would leave it.

rpofs ships a database's `-wal` file out of the guest every second; the mount
later shows the database as of a time: the database file of a backup point
with WAL frames checkpointed over it, in memory and only as reads need them.
So a frame counts exactly when SQLite's own WAL recovery (walIndexRecover)
would let it count, whatever moment the copy caught the file in: a torn or
uncommitted tail, or frames left from an earlier generation behind a restarted
WAL, must never reach the image. Layouts follow
https://www.sqlite.org/fileformat2.html#walformat.

Header (32 bytes, big-endian): magic 0x377f0682/0x377f0683 (the low bit: the
checksums read the data as big-endian 32-bit words), version 3007000, page
size, checkpoint sequence, salt-1, salt-2, checksum-1, checksum-2 (over the
first 24 bytes). Frame: a 24-byte header (page number, the database size in
pages for a commit frame else 0, salt-1, salt-2, checksum-1, checksum-2) and
one page. The checksum runs on from the header's through each frame's first
8 header bytes and its page; a frame is valid when its salts are the
header's and its checksum is the running one, and only frames up to the last
valid commit frame count.

Nothing here does I/O: callers pass bytes and read callables.
"""

import functools
import struct
from typing import Callable, NamedTuple

from ..errors import ChunkError

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
WAL_MAGIC_LE = 0x377F0682   # checksums over little-endian words
WAL_MAGIC_BE = 0x377F0683   # checksums over big-endian words
WAL_VERSION = 3007000
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536

DB_MAGIC = b"SQLite format 3\0"
DB_HEADER_SIZE = 100

_HEADER = struct.Struct(">IIIIIIII")
_FRAME_HEADER = struct.Struct(">IIIIII")
_MASK = 0xFFFFFFFF


class WalHeader(NamedTuple):
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    big_endian: bool            # checksums read big-endian words (magic 0x377f0683)
    checksum: tuple[int, int]   # over the header's first 24 bytes: where frames' checksums start

    @property
    def generation(self) -> str:
        """The salts name one life of the WAL: SQLite draws new ones when it
        restarts the log after a checkpoint, and frames of one generation are
        never rewritten."""
        return f"{self.salt1:08x}{self.salt2:08x}"


class Frame(NamedTuple):
    offset: int         # of the frame header in the WAL file
    page: int           # page number, 1-based
    commit_pages: int   # database size in pages after this commit frame; 0: not a commit frame


class Scan(NamedTuple):
    frames: list[Frame]         # valid frames up to and including the last commit frame
    end: int                    # WAL offset just after the last commit frame (== start if none)
    checksum: tuple[int, int]   # running checksum at `end`, to continue a scan from there


class FrameBatch(NamedTuple):
    """Frames of one WAL file (one generation), as scan() found them."""
    header: WalHeader
    frames: list[Frame]                  # applied in order, later batches over earlier ones
    read: Callable[[int, int], bytes]    # read(wal_offset, length) -> bytes of this batch's WAL file


class PageSource(NamedTuple):
    batch: FrameBatch
    frame: Frame


# -- checksums -----------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _words(count: int, big_endian: bool) -> struct.Struct:
    return struct.Struct(f"{'>' if big_endian else '<'}{count}I")


def wal_checksum(data, offset: int, length: int, big_endian: bool,
                 checksum: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """SQLite's walChecksumBytes over data[offset:offset + length] (a multiple
    of 8), continuing from `checksum`. A plain loop: some 150 us a 4 KiB
    page here, and a WAL followed with scan() from Scan.end checksums each
    frame once."""
    words = iter(_words(length // 4, big_endian).unpack_from(data, offset))
    s0, s1 = checksum
    for a, b in zip(words, words):
        s0 = (s0 + a + s1) & _MASK
        s1 = (s1 + b + s0) & _MASK
    return s0, s1


# -- parsing -------------------------------------------------------------------

def parse_header(data: bytes) -> WalHeader | None:
    """The WAL header, or None where SQLite would ignore the WAL's contents:
    bad magic, version or page size, a short header, or a wrong checksum (a
    header being written when the copy was taken)."""
    if len(data) < WAL_HEADER_SIZE:
        return None
    magic, version, page_size, seq, salt1, salt2, c1, c2 = _HEADER.unpack_from(data)
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE) or version != WAL_VERSION:
        return None
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        return None
    big_endian = bool(magic & 1)
    if wal_checksum(data, 0, 24, big_endian) != (c1, c2):
        return None
    return WalHeader(page_size, seq, salt1, salt2, big_endian, (c1, c2))


def scan(header: WalHeader, data, start: int, checksum: tuple[int, int]) -> Scan:
    """The committed frames in `data`, the WAL file from offset `start` on.

    `start` is a frame boundary and `checksum` the running checksum there
    (header.checksum at 32), so a WAL that only grew since the last look is
    scanned from where that look ended (Scan.end, Scan.checksum): frames of a
    generation are never rewritten. Stops at the first frame that is short,
    carries other salts (an older generation, or unwritten space), page 0,
    or a wrong checksum (torn, or never completed); frames after the last
    commit frame before it are left out, as SQLite's recovery leaves them.
    """
    frame_size = FRAME_HEADER_SIZE + header.page_size
    if start < WAL_HEADER_SIZE or (start - WAL_HEADER_SIZE) % frame_size:
        raise ValueError(f"WAL offset {start} is not a frame boundary (frames of {frame_size} bytes)")
    view = memoryview(data)
    frames: list[Frame] = []
    pending: list[Frame] = []
    end, end_checksum = start, checksum
    salts = (header.salt1, header.salt2)
    running = checksum
    pos = 0
    while pos + frame_size <= len(view):
        page, commit, salt1, salt2, c1, c2 = _FRAME_HEADER.unpack_from(view, pos)
        if page == 0 or (salt1, salt2) != salts:
            break
        running = wal_checksum(view, pos, 8, header.big_endian, running)
        running = wal_checksum(view, pos + FRAME_HEADER_SIZE, header.page_size,
                               header.big_endian, running)
        if running != (c1, c2):
            break
        pending.append(Frame(start + pos, page, commit))
        pos += frame_size
        if commit:
            frames += pending
            pending = []
            end, end_checksum = start + pos, running
    return Scan(frames, end, end_checksum)


def scan_wal(data) -> tuple[WalHeader | None, Scan]:
    """A whole WAL file from offset 0. Without a valid header nothing counts:
    (None, Scan([], 0, (0, 0)))."""
    header = parse_header(bytes(data[:WAL_HEADER_SIZE]))
    if header is None:
        return None, Scan([], 0, (0, 0))
    return header, scan(header, memoryview(data)[WAL_HEADER_SIZE:], WAL_HEADER_SIZE,
                        header.checksum)


def db_page_size(header: bytes) -> int:
    """The page size a database file's header gives (1 stands for 65536),
    or 0 when these bytes are not a SQLite database header."""
    if len(header) < DB_HEADER_SIZE or header[:16] != DB_MAGIC:
        return 0
    size = struct.unpack_from(">H", header, 16)[0]
    size = MAX_PAGE_SIZE if size == 1 else size
    if size & (size - 1) or not MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE:
        return 0
    return size


# -- the checkpointed image ------------------------------------------------------

class DatabaseImage:
    """The database file as a full checkpoint of `batches` over a base file
    would leave it.

    A page's bytes come from its newest frame (later batches over earlier
    ones, later frames over earlier ones), else from the base file, else are
    zeros (past base_size). Each batch ends as SQLite's checkpoint of it
    ends: the file truncated to that batch's last commit size, so a page cut
    off there and not written again reads as zeros, even if a later batch
    grows the file. size is the last commit's size; page_size the WALs', or
    with no frames the base header's (0: the base is no SQLite database, and
    is served as it is).

    Built from the frame headers scan() already read; page data is read only
    when read() touches it, so opening a database "as of" a time costs a
    dict, not a checkpoint.

    Checked (tests/test_wal.py): the image, still marked WAL mode (header
    bytes 18 and 19 are 2), opens with sqlite3 as
    "file:PATH?immutable=1" from a read-only directory with no -wal or -shm
    file, and passes PRAGMA integrity_check: an immutable database is read
    without a WAL, so the header needs no rewriting to rollback mode.
    """

    def __init__(self, base_read: Callable[[int, int], bytes], base_size: int,
                 batches: list[FrameBatch]):
        self._base_read = base_read
        self._base_limit = base_size   # base bytes past this were truncated away: zeros
        self._pages: dict[int, PageSource] = {}
        page_size = 0
        pages = None   # size in pages after the last commit so far
        for batch in batches:
            if not batch.frames:
                continue
            if page_size and batch.header.page_size != page_size:
                raise ValueError(f"WAL page size {batch.header.page_size} after {page_size}: "
                                 "batches of different databases")
            page_size = batch.header.page_size
            batch_pages = None
            for frame in batch.frames:
                self._pages[frame.page] = PageSource(batch, frame)
                if frame.commit_pages:
                    batch_pages = frame.commit_pages
            if batch_pages is None:
                raise ValueError("a frame batch without a commit frame (not from scan())")
            pages = batch_pages
            # the checkpoint of this batch truncates the file: what lay beyond is gone
            self._base_limit = min(self._base_limit, pages * page_size)
            for page in [p for p in self._pages if p > pages]:
                del self._pages[page]
        if pages is None:
            self.size = base_size
            self.page_size = (db_page_size(base_read(0, DB_HEADER_SIZE))
                              if base_size >= DB_HEADER_SIZE else 0)
        else:
            self.size = pages * page_size
            self.page_size = page_size

    @property
    def frames(self) -> int:
        """How many pages come from WAL frames."""
        return len(self._pages)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the image; short only at its end."""
        if offset < 0 or length < 0:
            raise ValueError(f"read of {length} bytes at {offset}")
        end = min(offset + length, self.size)
        if not self._pages:
            return self._read_base(offset, end - offset) if offset < end else b""
        ps = self.page_size
        parts = []
        while offset < end:
            index = offset // ps
            source = self._pages.get(index + 1)
            if source is not None:
                start = offset - index * ps
                n = min(end - offset, ps - start)
                data = source.batch.read(source.frame.offset + FRAME_HEADER_SIZE + start, n)
                if len(data) != n:
                    raise ChunkError(f"WAL frame at {source.frame.offset} (page {index + 1}) "
                                     f"read short: {len(data)} of {n} bytes")
            else:   # the base up to the next page from a frame, in one read
                stop = index + 1
                while stop * ps < end and stop + 1 not in self._pages:
                    stop += 1
                n = min(end, stop * ps) - offset
                data = self._read_base(offset, n)
            parts.append(data)
            offset += n
        return b"".join(parts)

    def _read_base(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self._base_limit - offset))
        data = self._base_read(offset, n) if n else b""
        if len(data) != n:
            raise ChunkError(f"database file read short at {offset}: {len(data)} of {n} bytes")
        return data + bytes(length - n)
