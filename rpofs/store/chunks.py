"""The chunk store: content-addressed data in append-only pack files.

Writing: PackWriter appends records to one new pack file per backup session
(two sessions never share a file, so concurrent backups of different VMs need
no lock) and makes them durable with sync() before the catalog refers to them.
Reading: ChunkReader finds, decompresses and verifies. A full chunk is
stored pieced (schema: CODEC_PIECES): a read of part of it reads the piece
table (cached: ~600 bytes a MiB of disk) and only the 64 KiB pieces it
touches, each verified; a read of all of it is one pread of the record. A
cache of decoded data (whole records, and the pieces a read used only part
of) lets the next read of the same bytes skip decoding them again.
"""

import collections
import threading
from typing import NamedTuple

import blake3
import zstandard

from ..errors import CorruptChunk, PackMissing
from .packs import PackStore
from .schema import (CODEC_PIECES, CODEC_RAW, CODEC_ZSTD, PACK_HEADER, PIECE_ENTRY, PIECE_SIZE,
                     PIECES_KEY_CONTEXT, ChunkLocation, pack_name, piece_count, piece_table_len)

ZSTD_LEVEL = 1  # ~1 GB/s per core; higher levels cost more than they save on disk data
TABLES = 16384  # piece tables kept decoded: ~1.3 KB each, 21 MB for 16 GiB of full chunks
_local = threading.local()


def _ident(key: bytes | None, loc: ChunkLocation) -> bytes:
    """What the cache knows a chunk by: its key; a log block (whose key is in
    its record) by its place."""
    return key if key is not None else b"@%d:%d" % (loc.pack, loc.offset)


def _piece_ident(key: bytes, i: int) -> bytes:
    """What the cache knows a piece of a pieced chunk by (never a chunk key: 33 bytes)."""
    return key + bytes((i,))


def chunk_key(data) -> bytes:
    return blake3.blake3(data).digest()


def pieces_key(hashes) -> bytes:
    """A pieced chunk's key: blake3 over its pieces' hashes in key-derivation
    mode, so that it is never the plain blake3 of some chunk that happens to
    consist of those bytes (schema: pieced records)."""
    return blake3.blake3(b"".join(hashes), derive_key_context=PIECES_KEY_CONTEXT).digest()


def piece_hashes(data) -> list[bytes]:
    """blake3 of each PIECE_SIZE piece of a full chunk's raw bytes."""
    view = memoryview(data)
    return [chunk_key(view[at:at + PIECE_SIZE]) for at in range(0, len(view), PIECE_SIZE)]


class Piece(NamedTuple):
    """One piece of a pieced record, as its verified table says."""
    hash: bytes
    start: int       # where its stored bytes are, from the start of the record's stored bytes
    stop: int
    codec: int       # CODEC_RAW or CODEC_ZSTD
    raw_len: int


class PieceTable:
    """A pieced chunk's table, checked: its hashes against the chunk's key,
    its lengths and codecs for sense and against the stored length the
    catalog holds (the key covers the hashes only, so that equal content has
    equal keys whatever zstd makes of it; a damaged length or codec that got
    past these checks would still fail its piece's hash). Kept as the
    table's bytes and the pieces' ends."""
    __slots__ = ("raw", "ends", "raw_len")

    def __init__(self, key: bytes, raw_len: int, stored_len: int, table: bytes, where: str):
        n = piece_count(raw_len)
        if len(table) != n * PIECE_ENTRY.size:
            raise CorruptChunk(f"{where}: pack file is truncated")
        entries = list(PIECE_ENTRY.iter_unpack(table))
        if pieces_key(e[0] for e in entries) != key:
            raise CorruptChunk(f"{where}: piece table does not match its key")
        ends, pos = [], len(table)
        for i, (_, stored_minus_1, codec) in enumerate(entries):
            raw = min(PIECE_SIZE, raw_len - i * PIECE_SIZE)
            stored = stored_minus_1 + 1
            if not (codec == CODEC_RAW and stored == raw or codec == CODEC_ZSTD and stored < raw):
                raise CorruptChunk(f"{where}: piece table is malformed at piece {i}")
            pos += stored
            ends.append(pos)
        if pos != stored_len:
            raise CorruptChunk(f"{where}: piece table does not match the catalog's stored length")
        self.raw, self.ends, self.raw_len = bytes(table), tuple(ends), raw_len

    def piece(self, i: int) -> Piece:
        digest, _, codec = PIECE_ENTRY.unpack_from(self.raw, i * PIECE_ENTRY.size)
        start = self.ends[i - 1] if i else len(self.raw)
        return Piece(digest, start, self.ends[i], codec, min(PIECE_SIZE, self.raw_len - i * PIECE_SIZE))


def _decode_piece(piece: Piece, stored, where: str, i: int):
    """A piece's raw bytes out of its stored bytes, verified against its hash."""
    if piece.codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(stored, max_output_size=piece.raw_len)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"{where}: piece {i}: {e}") from None
    else:
        data = stored
    if len(data) != piece.raw_len or chunk_key(data) != piece.hash:
        raise CorruptChunk(f"{where}: piece {i}: content does not match its hash")
    return data


def encode_pieces(data, hashes: list[bytes]) -> bytes:
    """A pieced record's stored bytes: the table, then each piece, zstd only
    where that is shorter (a piece of zeros inside a chunk of data costs ~20
    bytes; incompressible pieces stay raw and are read with no decoding)."""
    view = memoryview(data)
    table, pieces = [], []
    for i, digest in enumerate(hashes):
        codec, stored = encode(view[i * PIECE_SIZE:(i + 1) * PIECE_SIZE])
        table.append(PIECE_ENTRY.pack(digest, len(stored) - 1, codec))
        pieces.append(stored)
    return b"".join(table + pieces)


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode(data) -> tuple[int, bytes]:
    """(codec, stored bytes): zstd only when it saves space."""
    packed = _compressor().compress(data)
    if len(packed) < len(data):
        return CODEC_ZSTD, packed
    return CODEC_RAW, bytes(data)


class PackWriter:
    """Appends chunk records to one new pack. Thread-safe."""

    def __init__(self, packs: PackStore, pack: int):
        self.pack = pack
        self._file = packs.create(pack)
        self._lock = threading.Lock()
        self.bytes_written = 0

    def append(self, key: bytes, codec: int, raw_len: int, stored: bytes) -> ChunkLocation:
        header = PACK_HEADER.pack(key, codec, raw_len, len(stored))
        with self._lock:
            offset = self._file.append([header, stored]) + len(header)
            self.bytes_written += len(header) + len(stored)
        return ChunkLocation(self.pack, offset, len(stored), raw_len, codec)

    def sync(self) -> None:
        """Make the pack durable; the catalog may refer to it afterwards."""
        self._file.sync()

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        """Remove the pack: nothing refers to it (the backup was not committed)."""
        self._file.discard()


class ChunkReader:
    """Reads and verifies chunks. Thread-safe."""

    def __init__(self, packs: PackStore, cache_bytes: int = 64 << 20):
        self.packs = packs
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._tables: collections.OrderedDict[bytes, PieceTable] = collections.OrderedDict()

    def _pread(self, pack: int, length: int, offset: int) -> bytes:
        return self.packs.read(pack, offset, length)

    def prefetch(self, chunks: list[tuple[bytes | None, ChunkLocation, int, int]]) -> None:
        """Start reading what a read is about to need, all at once: (key,
        location, start, stop) of each chunk, start and stop within its raw
        bytes. A point behind many logs draws each 64 KiB block from another
        place, and read one after another the cold ones would wait on the disk
        one at a time. Of a pieced chunk only the pieces in [start, stop) are
        asked for when its table is known, else the table (and the whole
        record when all of it is wanted)."""
        spans = []  # (pack, start, end) in the pack file
        head = PACK_HEADER.size
        with self._lock:
            for key, loc, start, stop in chunks:
                if loc.codec != CODEC_PIECES:
                    if _ident(key, loc) not in self._cache:
                        spans.append((loc.pack, loc.offset - head, loc.offset + loc.stored_len))
                    continue
                first, last = start // PIECE_SIZE, (stop - 1) // PIECE_SIZE
                cold = [i for i in range(first, last + 1) if _piece_ident(key, i) not in self._cache]
                if not cold:
                    continue
                table = self._tables.get(key)
                if table is not None:
                    spans.append((loc.pack, loc.offset + table.piece(cold[0]).start,
                                  loc.offset + table.piece(cold[-1]).stop))
                elif start == 0 and stop == loc.raw_len:
                    spans.append((loc.pack, loc.offset - head, loc.offset + loc.stored_len))
                else:
                    spans.append((loc.pack, loc.offset, loc.offset + piece_table_len(loc.raw_len)))
        if len(spans) < 2:
            return  # the read itself asks for it right away
        merged = []  # spans that touch go as one
        for pack, start, end in sorted(spans):
            if merged and merged[-1][0] == pack and merged[-1][2] >= start - head:
                merged[-1][2] = max(merged[-1][2], end)
            else:
                merged.append([pack, start, end])
        for pack, start, end in merged:
            try:
                self.packs.advise(pack, start, end - start)
            except PackMissing:
                continue  # the read itself will say so, or find the chunk's new place

    def read_run_into(self, locs: list[ChunkLocation], views: list[memoryview]) -> None:
        """Log blocks stored raw one right after another in one pack, read by
        one preadv straight into `views` (each exactly its block's length) and
        verified against their record headers: the copy-free path for reading
        a run of a defragmented point. Not cached."""
        head = PACK_HEADER.size
        heads = [bytearray(head) for _ in locs]
        first = locs[0]
        where = f"log blocks in {pack_name(first.pack)} from {first.offset}"
        got = self.packs.read_into(first.pack, first.offset - head, [b for pair in zip(heads, views) for b in pair])
        if got != sum(head + loc.stored_len for loc in locs):
            raise CorruptChunk(f"{where}: pack file is truncated")
        for header, loc, view in zip(heads, locs, views):
            key, codec, raw_len, stored_len = PACK_HEADER.unpack_from(header)
            if (codec, raw_len, stored_len) != (loc.codec, loc.raw_len, loc.stored_len):
                raise CorruptChunk(f"{where}: the record at {loc.offset} does not match the catalog")
            if chunk_key(view) != key:
                raise CorruptChunk(f"{where}: the block at {loc.offset}: content does not match its key")

    def read(self, key: bytes | None, loc: ChunkLocation) -> bytes:
        """The chunk's bytes, verified against its key; key None for a log
        block, verified against the key in its record header."""
        ident = _ident(key, loc)
        data = self._cached(ident)
        if data is None:
            data = self._load(key, loc)[2]
            self._remember(ident, data)
        return data

    def _cached(self, ident: bytes):
        with self._lock:
            data = self._cache.get(ident)
            if data is not None:
                self._cache.move_to_end(ident)
            return data

    def _remember(self, ident: bytes, data) -> None:
        with self._lock:
            if ident not in self._cache:
                self._cache[ident] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > self._cache_limit and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)

    def read_range(self, key: bytes | None, loc: ChunkLocation, start: int, stop: int):
        """Bytes [start, stop) of a chunk (0 <= start < stop <= its raw
        length), verified. Of a pieced chunk only the table and the pieces
        the range touches are read: a 4 KiB read costs a 64 KiB piece, not
        the 1 MiB chunk. Other records are read whole (and cached whole)."""
        if loc.codec != CODEC_PIECES:
            return memoryview(self.read(key, loc))[start:stop]
        where = f"chunk {key.hex()[:16]} in {pack_name(loc.pack)} at {loc.offset}"
        first, last = start // PIECE_SIZE, (stop - 1) // PIECE_SIZE
        got = {i: self._cached(_piece_ident(key, i)) for i in range(first, last + 1)}
        missing = [i for i, data in got.items() if data is None]
        if missing:
            with self._lock:
                table = self._tables.get(key)
                if table is not None:
                    self._tables.move_to_end(key)
            if table is None and start == 0 and stop == loc.raw_len:
                record = self._pread_exactly(loc.pack, loc.stored_len, loc.offset, where)  # all: one read
                table = self._table(key, loc, record[:piece_table_len(loc.raw_len)], where)
                span, origin = record, 0
            else:
                if table is None:
                    table = self._table(key, loc, self._pread_exactly(
                        loc.pack, piece_table_len(loc.raw_len), loc.offset, where), where)
                origin = table.piece(missing[0]).start  # the pieces wanted, and those between: one read
                span = self._pread_exactly(loc.pack, table.piece(missing[-1]).stop - origin, loc.offset + origin,
                                           where)
            view = memoryview(span)
            for i in missing:
                piece = table.piece(i)
                data = got[i] = _decode_piece(piece, view[piece.start - origin:piece.stop - origin], where, i)
                lo, hi = i * PIECE_SIZE, i * PIECE_SIZE + piece.raw_len
                if start > lo or stop < hi:  # used in part: the next read likely wants the rest
                    self._remember(_piece_ident(key, i), bytes(data))
        if first == last:
            return memoryview(got[first])[start - first * PIECE_SIZE:stop - first * PIECE_SIZE]
        parts = [memoryview(got[i]) for i in range(first, last + 1)]
        parts[0] = parts[0][start - first * PIECE_SIZE:]
        parts[-1] = parts[-1][:stop - last * PIECE_SIZE]
        return b"".join(parts)

    def _table(self, key: bytes, loc: ChunkLocation, raw, where: str) -> PieceTable:
        """The record's piece table, verified, and kept."""
        table = PieceTable(key, loc.raw_len, loc.stored_len, raw, where)
        with self._lock:
            self._tables[key] = table
            if len(self._tables) > TABLES:
                self._tables.popitem(last=False)
        return table

    def _pread_exactly(self, pack: int, length: int, offset: int, where: str) -> bytes:
        data = self._pread(pack, length, offset)
        if len(data) != length:
            raise CorruptChunk(f"{where}: pack file is truncated")
        return data

    def verified(self, key: bytes | None, loc: ChunkLocation) -> tuple[bytes, bytes]:
        """(key, stored bytes) of a chunk whose content was checked: what
        compaction copies."""
        key, stored, _ = self._load(key, loc)
        return key, bytes(stored)

    def stored(self, loc: ChunkLocation) -> bytes:
        """The chunk's bytes as stored (compressed or not), unverified."""
        stored = self._pread(loc.pack, loc.stored_len, loc.offset)
        if len(stored) != loc.stored_len:
            raise CorruptChunk(f"{pack_name(loc.pack)} at {loc.offset}: pack file is truncated")
        return stored

    def _load(self, key: bytes | None, loc: ChunkLocation) -> tuple[bytes, bytes, bytes]:
        """(key, stored bytes, raw bytes), checked."""
        where = (f"chunk {key.hex()[:16]}" if key else "log block") + f" in {pack_name(loc.pack)} at {loc.offset}"
        head = PACK_HEADER.size
        if key is None:  # the record header says what the block's key is
            record = self._pread(loc.pack, head + loc.stored_len, loc.offset - head)
            if len(record) != head + loc.stored_len:
                raise CorruptChunk(f"{where}: pack file is truncated")
            key, codec, raw_len, stored_len = PACK_HEADER.unpack_from(record)
            if (codec, raw_len, stored_len) != (loc.codec, loc.raw_len, loc.stored_len):
                raise CorruptChunk(f"{where}: its record header does not match the catalog")
            stored = memoryview(record)[head:]
        else:
            try:
                stored = self.stored(loc)
            except CorruptChunk:
                raise CorruptChunk(f"{where}: pack file is truncated") from None
        if loc.codec == CODEC_PIECES:  # every piece checked, so the whole record is known good
            table = PieceTable(key, loc.raw_len, loc.stored_len, stored[:piece_table_len(loc.raw_len)], where)
            view = memoryview(stored)
            parts = []
            for i in range(len(table.ends)):
                piece = table.piece(i)
                parts.append(_decode_piece(piece, view[piece.start:piece.stop], where, i))
            return key, stored, b"".join(parts)
        if loc.codec == CODEC_ZSTD:
            try:
                data = _decompressor().decompress(stored, max_output_size=loc.raw_len)
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"{where}: {e}") from None
        elif loc.codec == CODEC_RAW:
            data = stored
        else:
            raise CorruptChunk(f"{where}: unknown codec {loc.codec}")
        if len(data) != loc.raw_len or chunk_key(data) != key:
            raise CorruptChunk(f"{where}: content does not match its key")
        return key, stored, data

    def close(self) -> None:
        self.packs.close()
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._tables.clear()
