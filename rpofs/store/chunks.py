"""The chunk store: content-addressed data in append-only pack files.

Writing: PackWriter appends records to one new pack file per backup session
(two sessions never share a file, so concurrent backups of different VMs need
no lock) and makes them durable with sync() before the catalog refers to them.
Reading: ChunkReader finds, decompresses and verifies; a cache of decoded
chunks lets sequential reads of one 1 MiB chunk decode it once.
"""

import collections
import os
import threading

import blake3
import zstandard

from ..errors import CorruptChunk, PackMissing, RpofsError
from .schema import CODEC_RAW, CODEC_ZSTD, PACK_HEADER, ChunkLocation, pack_name

OPEN_PACKS = 256
ZSTD_LEVEL = 1  # ~1 GB/s per core; higher levels cost more than they save on disk data
_local = threading.local()


def _ident(key: bytes | None, loc: ChunkLocation) -> bytes:
    """What the cache knows a chunk by: its key; a log block (whose key is in
    its record) by its place."""
    return key if key is not None else b"@%d:%d" % (loc.pack, loc.offset)


def chunk_key(data) -> bytes:
    return blake3.blake3(data).digest()


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
    """Appends chunk records to one pack file. Thread-safe."""

    def __init__(self, chunks_dir: str, pack: int):
        self.pack = pack
        self.path = os.path.join(chunks_dir, pack_name(pack))
        self._dir = chunks_dir
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._offset = 0
        self._lock = threading.Lock()
        self.bytes_written = 0

    def append(self, key: bytes, codec: int, raw_len: int, stored: bytes) -> ChunkLocation:
        header = PACK_HEADER.pack(key, codec, raw_len, len(stored))
        with self._lock:
            offset = self._offset + len(header)
            total = len(header) + len(stored)
            try:
                done = os.writev(self._fd, [header, stored])
                rest = memoryview(header + stored)[done:] if done < total else b""
                while rest:  # a short write: the next one raises the reason (e.g. ENOSPC)
                    rest = rest[os.write(self._fd, rest):]
            except OSError as e:
                raise RpofsError(f"writing {self.path}: {e.strerror}") from None
            self._offset = offset + len(stored)
            self.bytes_written += len(header) + len(stored)
        return ChunkLocation(self.pack, offset, len(stored), raw_len, codec)

    def sync(self) -> None:
        """Make the pack durable; the catalog may refer to it afterwards."""
        os.fsync(self._fd)
        dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the pack: nothing refers to it (the backup was not committed)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ChunkReader:
    """Reads and verifies chunks. Thread-safe; keeps pack files open."""

    def __init__(self, chunks_dir: str, cache_bytes: int = 64 << 20):
        self._dir = chunks_dir
        # pack -> [fd, readers now]; least recently used first
        self._fds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes

    def _acquire(self, pack: int) -> list[int]:
        """A pack's [fd, readers now]. At most OPEN_PACKS stay open (a
        repository holds a pack per backup, far more than a process may open);
        a descriptor in use by another thread is closed only when that thread
        releases it."""
        with self._lock:
            entry = self._fds.get(pack)
            if entry is None:
                path = os.path.join(self._dir, pack_name(pack))
                try:
                    entry = self._fds[pack] = [os.open(path, os.O_RDONLY), 0]
                except FileNotFoundError:
                    raise PackMissing(f"pack file {path} is missing") from None
            self._fds.move_to_end(pack)
            entry[1] += 1
            while len(self._fds) > OPEN_PACKS:
                old = self._fds.popitem(last=False)[1]
                old[1] -= 1  # its own reference: closed below or by its last reader
                if old[1] < 0:
                    os.close(old[0])
        return entry

    def _release(self, entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] < 0:  # evicted while in use
                os.close(entry[0])

    def _pread(self, pack: int, length: int, offset: int) -> bytes:
        entry = self._acquire(pack)
        try:
            return os.pread(entry[0], length, offset)
        finally:
            self._release(entry)

    def prefetch(self, chunks: list[tuple[bytes | None, ChunkLocation]]) -> None:
        """Start reading the chunks (key, location) a read is about to need,
        all at once: a point behind many logs draws each 64 KiB block from
        another place, and read one after another the cold ones would wait
        on the disk one at a time."""
        with self._lock:
            cold = [loc for key, loc in chunks if _ident(key, loc) not in self._cache]
        if len(cold) < 2:
            return
        head = PACK_HEADER.size
        spans = []  # [pack, start, end]: records that follow one another in a pack go as one
        for loc in sorted(cold, key=lambda loc: (loc.pack, loc.offset)):
            if spans and spans[-1][0] == loc.pack and spans[-1][2] == loc.offset - head:
                spans[-1][2] = loc.offset + loc.stored_len
            else:
                spans.append([loc.pack, loc.offset - head, loc.offset + loc.stored_len])
        for pack, start, end in spans:
            try:
                entry = self._acquire(pack)
            except PackMissing:
                continue  # the read itself will say so, or find the chunk's new place
            try:
                os.posix_fadvise(entry[0], start, end - start, os.POSIX_FADV_WILLNEED)
            finally:
                self._release(entry)

    def read_run_into(self, locs: list[ChunkLocation], views: list[memoryview]) -> None:
        """Log blocks stored raw one right after another in one pack, read by
        one preadv straight into `views` (each exactly its block's length) and
        verified against their record headers: the copy-free path for reading
        a run of a defragmented point. Not cached."""
        head = PACK_HEADER.size
        heads = [bytearray(head) for _ in locs]
        first = locs[0]
        where = f"log blocks in {pack_name(first.pack)} from {first.offset}"
        entry = self._acquire(first.pack)
        try:
            got = os.preadv(entry[0], [b for pair in zip(heads, views) for b in pair], first.offset - head)
        finally:
            self._release(entry)
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
        with self._lock:
            data = self._cache.get(ident)
            if data is not None:
                self._cache.move_to_end(ident)
                return data
        data = self._load(key, loc)[2]
        with self._lock:
            if ident not in self._cache:
                self._cache[ident] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > self._cache_limit:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)
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
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._cache.clear()
            self._cache_bytes = 0
