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

import zstandard

from ..errors import CorruptChunk, PackMissing
from .crypto import PLAIN_IDS, Ids, Sealer
from .packs import PackStore
from .schema import (CODEC_PIECES, CODEC_RAW, CODEC_ZSTD, PACK_HEADER, PIECE_ENTRY, PIECE_SIZE,
                     ChunkLocation, pack_name, piece_count, piece_table_len, record_span)

ZSTD_LEVEL = 1  # ~1 GB/s per core; higher levels cost more than they save on disk data
PREFETCH_GAP = 64 << 10  # prefetched spans this close are asked for as one (fewer requests to a store)
TABLES = 16384  # piece tables kept decoded: ~1.3 KB each, 21 MB for 16 GiB of full chunks
_local = threading.local()


def _ident(key: bytes | None, loc: ChunkLocation) -> bytes:
    """What the cache knows a chunk by: its key; a log block (whose key is in
    its record) by its place."""
    return key if key is not None else b"@%d:%d" % (loc.pack, loc.offset)


def _piece_ident(key: bytes, i: int) -> bytes:
    """What the cache knows a piece of a pieced chunk by (never a chunk key: 33 bytes)."""
    return key + bytes((i,))


# An unencrypted repository's ids (crypto.Ids). Code that works on a
# repository uses repo.ids, which an encrypted repository keys.
chunk_key = PLAIN_IDS.chunk_key
pieces_key = PLAIN_IDS.pieces_key
piece_hashes = PLAIN_IDS.piece_hashes


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
    table's bytes and the pieces' ends. `table` is the table's plaintext;
    overhead is what sealing adds to each unit (0 unencrypted): the pieces'
    places in the pack count it (the table is unit 0, piece i unit i + 1)."""
    __slots__ = ("raw", "ends", "raw_len", "overhead")

    def __init__(self, key: bytes, raw_len: int, stored_len: int, table: bytes, where: str,
                 ids: Ids = PLAIN_IDS, overhead: int = 0):
        n = piece_count(raw_len)
        if len(table) != n * PIECE_ENTRY.size:
            raise CorruptChunk(f"{where}: pack file is truncated")
        entries = list(PIECE_ENTRY.iter_unpack(table))
        if ids.pieces_key(e[0] for e in entries) != key:
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
        self.raw, self.ends, self.raw_len, self.overhead = bytes(table), tuple(ends), raw_len, overhead

    def piece(self, i: int) -> Piece:
        """Piece i, its start and stop where its (sealed) unit is in the pack,
        from the record's stored bytes."""
        digest, _, codec = PIECE_ENTRY.unpack_from(self.raw, i * PIECE_ENTRY.size)
        start = self.ends[i - 1] if i else len(self.raw)
        o = self.overhead
        return Piece(digest, start + o * (i + 1), self.ends[i] + o * (i + 2), codec,
                     min(PIECE_SIZE, self.raw_len - i * PIECE_SIZE))


def _decode_piece(piece: Piece, stored, where: str, i: int, ids: Ids = PLAIN_IDS, opened: bool = False):
    """A piece's raw bytes out of its stored bytes, verified against its hash.
    opened: the stored bytes are an encrypted repository's unit that just
    authenticated (AES-GCM, the record's key and place in its AAD): a raw
    piece is then the one sealed for that key, and its hash is not computed
    again on the mount's hot path (schema: Encryption, verification); a
    zstd piece is still checked after decompression."""
    if piece.codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(stored, max_output_size=piece.raw_len)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"{where}: piece {i}: {e}") from None
    else:
        data = stored
    if len(data) != piece.raw_len or not (opened and piece.codec == CODEC_RAW) and ids.chunk_key(data) != piece.hash:
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


def compress(data) -> bytes:
    """zstd of data, with its size in the frame (for rpofs.store.publish)."""
    return _compressor().compress(data)


def decompress(data, limit: int) -> bytes:
    """What compress() made; ValueError for anything else or more than `limit` bytes."""
    try:
        return _decompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise ValueError(f"not zstd: {e}") from None


def encode(data) -> tuple[int, bytes]:
    """(codec, stored bytes): zstd only when it saves space."""
    packed = _compressor().compress(data)
    if len(packed) < len(data):
        return CODEC_ZSTD, packed
    return CODEC_RAW, bytes(data)


class _Open:
    """One pack of a PackWriter: its file, where the next record goes, how
    many writes are under way, whether the writer has moved on from it."""
    __slots__ = ("number", "file", "end", "writing", "full")

    def __init__(self, number: int, file):
        self.number, self.file, self.end, self.writing, self.full = number, file, 0, 0, False


class PackWriter:
    """Appends chunk records to new packs: one, or as many as the PackStore's
    `target` size asks for (the next pack is numbered by `allocate()`, the
    repository's meta/next_pack). Thread-safe: a record's place is reserved
    under the lock, and it is sealed (encrypted repositories) and written
    outside it, so threads seal in parallel; a full pack is finished (an
    object store starts its upload) when its last write is done."""

    def __init__(self, packs: PackStore, pack: int, sealer: Sealer | None = None, allocate=None):
        self._packs = packs
        self._allocate = allocate
        self._target = packs.target if allocate is not None else None
        self._lock = threading.Lock()
        self._sealer = sealer
        self._all = [_Open(pack, packs.create(pack))]
        self.bytes_written = 0

    @property
    def pack(self) -> int:
        """The pack records go to now."""
        return self._all[-1].number

    @property
    def packs(self) -> list[int]:
        """Every pack this writer made."""
        return [p.number for p in self._all]

    def append(self, key: bytes, codec: int, raw_len: int, stored) -> ChunkLocation:
        """A record of the stored bytes in plaintext (as encode or
        encode_pieces make them, or ChunkReader.verified returns them); an
        encrypted repository's writer seals them here, bound to where they
        go, so whatever copies records (compaction, defrag) re-seals them."""
        header = PACK_HEADER.pack(key, codec, raw_len, len(stored))
        size = record_span(ChunkLocation(0, 0, len(stored), raw_len, codec), self._sealer.overhead if self._sealer else 0)
        full = None
        with self._lock:
            cur = self._all[-1]
            assert not cur.full, "append after sync"
            if self._target and cur.end and cur.end + size > self._target:
                cur.full = True
                if not cur.writing:
                    full = cur
                number = self._allocate()
                cur = _Open(number, self._packs.create(number))
                self._all.append(cur)
            start = cur.end
            cur.end += size
            cur.writing += 1
            self.bytes_written += size
        if full is not None:
            full.file.finish()
        offset = start + len(header)
        try:
            parts = [header] + (self._seal(key, codec, raw_len, cur.number, offset, stored) if self._sealer
                                else [stored])
            cur.file.write_at(start, parts)
        finally:
            with self._lock:
                cur.writing -= 1
                done = cur.full and not cur.writing
            if done:
                cur.file.finish()
        return ChunkLocation(cur.number, offset, len(stored), raw_len, codec)

    def _seal(self, key: bytes, codec: int, raw_len: int, pack: int, offset: int, stored) -> list[bytes]:
        """The record's sealed units: the whole stored bytes, or a pieced
        record's table and then each piece."""
        seal, view = self._sealer.seal, memoryview(stored)
        if codec != CODEC_PIECES:
            return [seal(key, pack, offset, view)]
        table_len = piece_table_len(raw_len)
        units = [seal(key, pack, offset, view[:table_len])]
        pos, at = table_len, offset + table_len + self._sealer.overhead
        for _, stored_minus_1, _ in PIECE_ENTRY.iter_unpack(view[:table_len]):
            n = stored_minus_1 + 1
            units.append(seal(key, pack, at, view[pos:pos + n]))
            pos, at = pos + n, at + n + self._sealer.overhead
        assert pos == len(view)
        return units

    def sync(self) -> None:
        """Make every pack durable; the catalog may refer to them afterwards.
        The writer takes no more records."""
        with self._lock:
            opened = list(self._all)
            for p in opened:
                p.full = True
        for p in opened:
            p.file.finish()
        for p in opened:
            p.file.sync()

    def close(self) -> None:
        for p in self._all:
            p.file.close()

    def discard(self) -> None:
        """Remove the packs: nothing refers to them (the backup was not committed)."""
        for p in self._all:
            p.file.discard()


class ChunkReader:
    """Reads and verifies chunks. Thread-safe. In an encrypted repository
    (a sealer given) each unit read is opened (authenticated against its key
    and place) before anything else looks at it; the cache holds plaintext."""

    def __init__(self, packs: PackStore, cache_bytes: int = 64 << 20, ids: Ids = PLAIN_IDS,
                 sealer: Sealer | None = None):
        self.packs = packs
        self.ids = ids
        self.sealer = sealer
        self.overhead = sealer.overhead if sealer else 0
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._tables: collections.OrderedDict[bytes, PieceTable] = collections.OrderedDict()

    def _pread(self, pack: int, length: int, offset: int) -> bytes:
        return self.packs.read(pack, offset, length)

    def record_len(self, loc: ChunkLocation) -> int:
        """Bytes of a pack record: its header and stored bytes as sealed."""
        return record_span(loc, self.overhead)

    def sealed_len(self, loc: ChunkLocation) -> int:
        """Bytes of a record's stored part in its pack (after its header)."""
        return record_span(loc, self.overhead) - PACK_HEADER.size

    def _unseal(self, key: bytes, loc: ChunkLocation, at: int, sealed, where: str):
        """The plaintext of the unit `at` bytes into the record's stored part
        (itself when the repository is not encrypted)."""
        if self.sealer is None:
            return sealed
        return self.sealer.open(key, loc.pack, loc.offset + at, sealed, where)

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
                        spans.append((loc.pack, loc.offset - head, loc.offset + self.sealed_len(loc)))
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
                    spans.append((loc.pack, loc.offset - head, loc.offset + self.sealed_len(loc)))
                else:
                    spans.append((loc.pack, loc.offset, loc.offset + piece_table_len(loc.raw_len) + self.overhead))
        if len(spans) < 2:
            return  # the read itself asks for it right away
        merged = []  # spans that touch, or nearly (the piece tables between pieces), go as one
        for pack, start, end in sorted(spans):
            if merged and merged[-1][0] == pack and merged[-1][2] >= start - PREFETCH_GAP:
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
        # encrypted: each sealed block into a buffer of its own, opened into its view
        bodies = views if self.sealer is None else [bytearray(self.sealed_len(loc)) for loc in locs]
        got = self.packs.read_into(first.pack, first.offset - head, [b for pair in zip(heads, bodies) for b in pair])
        if got != sum(self.record_len(loc) for loc in locs):
            raise CorruptChunk(f"{where}: pack file is truncated")
        for header, loc, body, view in zip(heads, locs, bodies, views):
            key, codec, raw_len, stored_len = PACK_HEADER.unpack_from(header)
            if (codec, raw_len, stored_len) != (loc.codec, loc.raw_len, loc.stored_len):
                raise CorruptChunk(f"{where}: the record at {loc.offset} does not match the catalog")
            if self.sealer is not None:
                plain = self._unseal(key, loc, 0, body, where)
                if len(plain) != len(view):
                    raise CorruptChunk(f"{where}: the record at {loc.offset} does not match the catalog")
                view[:] = plain
            elif self.ids.chunk_key(view) != key:  # (encrypted: the tag checked it, see _decode_piece)
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
            table_len = piece_table_len(loc.raw_len) + self.overhead
            if table is None and start == 0 and stop == loc.raw_len:
                record = self._pread_exactly(loc.pack, self.sealed_len(loc), loc.offset, where)  # all: one read
                table = self._table(key, loc, self._unseal(key, loc, 0, record[:table_len], where), where)
                span, origin = record, 0
            else:
                if table is None:
                    table = self._table(key, loc, self._unseal(key, loc, 0, self._pread_exactly(
                        loc.pack, table_len, loc.offset, where), where), where)
                origin = table.piece(missing[0]).start  # the pieces wanted, and those between: one read
                span = self._pread_exactly(loc.pack, table.piece(missing[-1]).stop - origin, loc.offset + origin,
                                           where)
            view = memoryview(span)
            for i in missing:
                piece = table.piece(i)
                stored = self._unseal(key, loc, piece.start, view[piece.start - origin:piece.stop - origin], where)
                data = got[i] = _decode_piece(piece, stored, where, i, self.ids, self.sealer is not None)
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
        table = PieceTable(key, loc.raw_len, loc.stored_len, raw, where, self.ids, self.overhead)
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
        """(key, stored bytes in plaintext) of a chunk whose content was
        checked: what compaction copies (PackWriter.append seals it anew)."""
        key, stored, _ = self._load(key, loc)
        return key, bytes(stored)

    def stored(self, loc: ChunkLocation) -> bytes:
        """The record's stored part as it is in the pack (compressed or not,
        sealed in an encrypted repository), unverified."""
        stored = self._pread(loc.pack, self.sealed_len(loc), loc.offset)
        if len(stored) != self.sealed_len(loc):
            raise CorruptChunk(f"{pack_name(loc.pack)} at {loc.offset}: pack file is truncated")
        return stored

    def _load(self, key: bytes | None, loc: ChunkLocation) -> tuple[bytes, bytes, bytes]:
        """(key, stored bytes, raw bytes), checked."""
        where = (f"chunk {key.hex()[:16]}" if key else "log block") + f" in {pack_name(loc.pack)} at {loc.offset}"
        head = PACK_HEADER.size
        if key is None:  # the record header says what the block's key is
            record = self._pread(loc.pack, self.record_len(loc), loc.offset - head)
            if len(record) != self.record_len(loc):
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
            table_len = piece_table_len(loc.raw_len)
            plain_table = self._unseal(key, loc, 0, stored[:table_len + self.overhead], where)
            table = PieceTable(key, loc.raw_len, loc.stored_len, plain_table, where, self.ids, self.overhead)
            view = memoryview(stored)
            parts, units = [], [plain_table]
            for i in range(len(table.ends)):
                piece = table.piece(i)
                units.append(self._unseal(key, loc, piece.start, view[piece.start:piece.stop], where))
                parts.append(_decode_piece(piece, units[-1], where, i, self.ids))
            if self.sealer is not None:
                stored = b"".join(units)
            return key, stored, b"".join(parts)
        stored, data = self._open_whole(key, loc, stored, where)
        return key, stored, data

    def _open_whole(self, key: bytes, loc: ChunkLocation, stored, where: str) -> tuple[bytes, bytes]:
        """(stored bytes in plaintext, raw bytes) of a whole record, checked against its key."""
        stored = self._unseal(key, loc, 0, stored, where)
        if len(stored) != loc.stored_len:
            raise CorruptChunk(f"{where}: its stored length does not match the catalog")
        if loc.codec == CODEC_ZSTD:
            try:
                data = _decompressor().decompress(stored, max_output_size=loc.raw_len)
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"{where}: {e}") from None
        elif loc.codec == CODEC_RAW:
            data = stored
        else:
            raise CorruptChunk(f"{where}: unknown codec {loc.codec}")
        if len(data) != loc.raw_len or self.ids.chunk_key(data) != key:
            raise CorruptChunk(f"{where}: content does not match its key")
        return stored, data

    def check(self, key: bytes, loc: ChunkLocation, stored) -> frozenset:
        """Check a record from its stored part as it lies in the pack (sealed
        in an encrypted repository), keeping nothing: what verify --read-data
        does with the packs it reads in bulk. Returns the damaged pieces of a
        pieced record (empty: intact; each piece is opened, decoded and
        hashed on its own, so only those read EIO); CorruptChunk when the
        whole record is damaged (its table, or a whole record's content)."""
        where = f"chunk {key.hex()[:16]} in {pack_name(loc.pack)} at {loc.offset}"
        stored = memoryview(stored)
        if len(stored) != self.sealed_len(loc):
            raise CorruptChunk(f"{where}: pack file is truncated")
        if loc.codec != CODEC_PIECES:
            self._open_whole(key, loc, stored, where)
            return frozenset()
        table_len = piece_table_len(loc.raw_len) + self.overhead
        table = PieceTable(key, loc.raw_len, loc.stored_len, self._unseal(key, loc, 0, stored[:table_len], where),
                           where, self.ids, self.overhead)
        bad = set()
        for i in range(len(table.ends)):
            piece = table.piece(i)
            try:
                _decode_piece(piece, self._unseal(key, loc, piece.start, stored[piece.start:piece.stop], where),
                              where, i, self.ids)
            except CorruptChunk:
                bad.add(i)
        return frozenset(bad)

    def close(self) -> None:
        self.packs.close()
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._tables.clear()
