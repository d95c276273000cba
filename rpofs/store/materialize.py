"""Materialize a disk at a recovery point, read by read.

For each 64 KiB block in a read: the newest log change in (full, point] —
one seek in the as-of index, whose entry says where the block's bytes are —
else the full's chunk, else zeros. Opening is O(1) and a read costs the same
however many logs precede the point.
"""

import bisect
import itertools
import threading
from typing import NamedTuple

from ..errors import ChunkError, ChunkMissing, PackMissing
from . import schema
from .repo import Repository
from .schema import BLOCK_SIZE, CHUNK_SIZE, CODEC_RAW, ChunkLocation, PointRecord

READ_AHEAD = 8 << 20


class Extent(NamedTuple):
    """A run of a read that one stored chunk or log block serves, or zeros."""
    pos: int                    # disk offset of the run's first byte
    stop: int                   # disk offset just past its last
    base: int                   # disk offset of the chunk's (or block's) first byte
    span: int                   # CHUNK_SIZE or BLOCK_SIZE: what the chunk covers, less at the disk's end
    kind: str                   # "full": the full's chunk serves it; "log": a log's record of the block
    key: bytes | None           # the full chunk's key; None when the catalog has none (a log block's is in
                                # its record's header, checked on reading; a full's zeros have none)
    loc: ChunkLocation | None   # where it is stored; None: zeros
    lender: str = ""            # the host whose packs hold it when this catalog borrows it (schema: borrowed)

    def wanted(self) -> tuple[bytes | None, ChunkLocation, int, int]:
        """(key, location, start, stop) within the chunk: what ChunkReader.prefetch takes."""
        return self.key, self.loc, self.pos - self.base, self.stop - self.base


class DiskReader:
    def __init__(self, repo: Repository, point: PointRecord, target: str, reader=None):
        """reader: the ChunkReader to read with (default the repository's;
        a whole-disk copy passes repo.streaming_reader())."""
        self.repo = repo
        self.reader = reader or repo.reader
        self._streaming = self.reader is not repo.reader
        self.point = point
        self.disk = point.disk_index(target)
        self.size = point.disks[self.disk].size
        self.target = target
        self._ahead_lock = threading.Lock()
        self._ahead_from = self._ahead_to = 0   # the read-ahead window asked for
        self._last_end = -1     # where the last read ended: the next one there goes forward

    def read(self, offset: int, length: int):
        """Exactly the bytes in [offset, offset+length) clipped to the disk
        (a bytes-like object), or a ChunkError naming the point and the chunk."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        extents = self.extents(offset, end)
        self._read_ahead(offset, end, extents)
        if len(extents) == 1 and extents[0].loc is not None:
            return self.extent_bytes(extents[0])  # the whole read from one chunk: no copy
        out = bytearray(end - offset)
        view = memoryview(out)
        i = 0
        while i < len(extents):
            run = _run_from(extents, i, self.reader.record_len)
            if len(run) > 1:
                self._read_run(run, view, offset)
            elif extents[i].loc is not None:
                e = extents[i]
                view[e.pos - offset:e.stop - offset] = self.extent_bytes(e)
            i += max(1, len(run))
        return out

    def _read_run(self, run: list[Extent], view: memoryview, offset: int) -> None:
        """Whole log blocks stored one after another: one read into place."""
        try:
            self.reader.read_run_into([e.loc for e in run], [view[e.pos - offset:e.stop - offset] for e in run])
        except PackMissing:  # moved after our snapshot: block by block, each finds its new place
            for e in run:
                view[e.pos - offset:e.stop - offset] = self.extent_bytes(e)
        except ChunkError as e:
            raise type(e)(f"{self._where()}: {e}") from None

    def _read_ahead(self, offset: int, end: int, extents: list[Extent]) -> None:
        """Ask the kernel for the stored bytes of this read's extents and, when
        reads go forward, of the next READ_AHEAD bytes, all at once: a point
        behind many logs draws each 64 KiB block from another place, and cold
        blocks read one after another would wait on the disk one at a time.
        Only the bytes each extent needs are asked for: of a pieced full
        chunk, the pieces the read touches (or its table, until known), so
        a 4 KiB read does not pull 1 MiB off the disk."""
        ahead = None
        with self._ahead_lock:
            # forward: right after the last read, or inside the window asked for
            # (the kernel's own read-ahead sends several requests at once)
            forward = offset == self._last_end or self._ahead_from <= offset <= self._ahead_to
            if forward and self._ahead_to - end < READ_AHEAD // 2:
                start, stop = max(end, self._ahead_to), min(self.size, end + READ_AHEAD)
                if start < stop:
                    ahead = (start, stop)
                    self._ahead_from, self._ahead_to = offset, stop
            self._last_end = end
        if ahead:
            extents = extents + self.extents(*ahead)
        self.prefetch(extents)

    def extents(self, offset: int, end: int) -> list[Extent]:
        """The runs of [offset, end) each served by one chunk or log block (or
        zeros), in order, all from one snapshot."""
        db = self.repo.db
        chain, disk = self.point.chain, self.disk
        out = []
        with self.repo.env.begin() as txn:
            fulls = txn.cursor(db=db["full_index"])
            chunks = txn.cursor(db=db["chunks"])
            borrowed = txn.cursor(db=db["borrowed"])
            changes = {}
            if self.point.kind == "log":
                changes = self._changes(txn.cursor(db=db["log_index"]), offset // BLOCK_SIZE,
                                        (end - 1) // BLOCK_SIZE)
            changed = sorted(changes)
            pos = offset
            while pos < end:
                block = pos // BLOCK_SIZE
                lender = ""
                if block in changes:  # a log's record of the block, or None: zeros
                    kind = "log"
                    base, span = block * BLOCK_SIZE, BLOCK_SIZE
                    stop = min(base + BLOCK_SIZE, end)
                    key = None
                    loc = schema.read_log_value(changes[block], min(span, self.size - base))
                else:
                    kind = "full"
                    chunk_no = pos // CHUNK_SIZE
                    base, span = chunk_no * CHUNK_SIZE, CHUNK_SIZE
                    stop = min(base + CHUNK_SIZE, end)
                    i = bisect.bisect_right(changed, block)  # the full serves up to the next change
                    if i < len(changed):
                        stop = min(stop, changed[i] * BLOCK_SIZE)
                    key = fulls.get(schema.full_key(chain, disk, chunk_no))
                    loc = None
                    if key is not None:  # absent: zeros
                        key = bytes(key)
                        raw = chunks.get(key)
                        if raw is not None:
                            loc = ChunkLocation.decode(raw)
                        elif (lent := borrowed.get(key)) is not None:
                            lent = schema.Borrow.decode(lent)
                            loc, lender = lent.loc, lent.host
                        else:
                            raise ChunkMissing(f"{self._where()}: chunk {key.hex()[:16]} is not in the catalog")
                out.append(Extent(pos, stop, base, span, kind, key, loc, lender))
                pos = stop
        return out

    def _changes(self, logs, first: int, last: int) -> dict[int, bytes]:
        """block -> the log_index value (where its bytes are) of its newest
        change at or before the point, for the blocks first..last that have
        one. Blocks no log touched cost nothing: the scan jumps from one
        changed block to the next; a changed block costs one seek past the
        changes newer than the point."""
        chain, disk, point = self.point.chain, self.disk, self.point.point
        out = {}
        found = logs.set_range(schema.log_key(chain, disk, first, point))
        while found:
            c, d, block, changed_at = schema.read_log_key(logs.key())
            if (c, d) != (chain, disk) or block > last:
                break
            if changed_at > point:  # newer than the point: to this block's changes at the point
                found = logs.set_range(schema.log_key(chain, disk, block, point))
                continue
            out[block] = logs.value()
            found = logs.set_range(schema.log_key(chain, disk, block + 1, point))
        return out

    def prefetch(self, extents: list[Extent]) -> None:
        """Start fetching the stored extents among these (a copy's window)."""
        by_reader: dict[str, list] = {}
        for e in extents:
            if e.loc is not None:
                by_reader.setdefault(e.lender, []).append(e.wanted())
        for lender, wanted in by_reader.items():
            self._reader_of(lender).prefetch(wanted)

    def _reader_of(self, lender: str):
        """What reads an extent: this catalog's reader, or the lender's packs' for a borrowed chunk."""
        return self.repo.lender_reader(lender, self._streaming) if lender else self.reader

    def extent_bytes(self, extent: Extent):
        """The bytes of an extent that has a chunk (or a log block), verified:
        of a pieced full chunk only the pieces it covers are read."""
        try:
            return self._bytes(extent)
        except PackMissing:  # prune moved it after our snapshot: look again
            if extent.lender:  # the lender's compaction moved it: its replica says where
                return self._bytes(extent._replace(loc=self.repo.relocate_borrowed(extent.lender, extent.key)))
            fresh = self.extents(extent.pos, extent.stop)
            if len(fresh) != 1 or fresh[0].loc is None or fresh[0].loc == extent.loc:
                raise
            return self._bytes(fresh[0])


    def _bytes(self, extent: Extent):
        loc, base = extent.loc, extent.base
        if loc.raw_len != min(extent.span, self.size - base):
            raise ChunkError(f"{self._where()}: {_what(extent)} does not fit its place")
        try:
            return self._reader_of(extent.lender).read_range(extent.key, loc, extent.pos - base, extent.stop - base)
        except PackMissing:
            raise
        except ChunkError as e:
            raise type(e)(f"{self._where()}: {e}") from None

    def _where(self) -> str:
        return f"point {self.point.point} ({self.point.vm_name}) disk {self.target}"


def _run_from(extents: list[Extent], i: int, record_len) -> list[Extent]:
    """The extents from i on that are whole log blocks stored raw, one right
    after another in one pack (a defragmented point's runs)."""
    run = []
    for e in itertools.islice(extents, i, None):
        loc = e.loc
        if e.kind != "log" or loc is None or loc.codec != CODEC_RAW or e.pos != e.base or e.stop - e.pos != loc.raw_len:
            break
        if run:
            prev = run[-1].loc
            if loc.pack != prev.pack or loc.offset != prev.offset + record_len(prev):
                break
        run.append(e)
    return run


def _what(extent: Extent) -> str:
    return "log block" if extent.kind == "log" else f"chunk {extent.key.hex()[:16]}"
