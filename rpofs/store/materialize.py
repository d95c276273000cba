"""Materialize a disk at a recovery point, read by read.

For each 64 KiB block in a read: the newest log change in (full, point] —
one seek in the as-of index — else the full's chunk, else zeros. Opening is
O(1) and a read costs the same however many logs precede the point.
"""

from ..errors import ChunkError, ChunkMissing
from . import schema
from .repo import Repository
from .schema import BLOCK_SIZE, CHUNK_SIZE, ZERO_KEY, ChunkLocation, PointRecord


class DiskReader:
    def __init__(self, repo: Repository, point: PointRecord, target: str):
        self.repo = repo
        self.point = point
        self.disk = point.disk_index(target)
        self.size = point.disks[self.disk].size
        self.target = target

    def read(self, offset: int, length: int):
        """Exactly the bytes in [offset, offset+length) clipped to the disk
        (a bytes-like object), or a ChunkError naming the point and the chunk."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = None  # allocated only when the read spans more than one piece
        repo, db = self.repo, self.repo.db
        chain, disk, point = self.point.chain, self.disk, self.point.point
        with repo.env.begin() as txn:
            fulls = txn.cursor(db=db["full_index"])
            logs = txn.cursor(db=db["log_index"]) if self.point.kind == "log" else None
            chunks = txn.cursor(db=db["chunks"])
            pos = offset
            while pos < end:
                block = pos // BLOCK_SIZE
                key = None
                if logs is not None:
                    wanted = schema.log_key(chain, disk, block, point)
                    if logs.set_range(wanted) and schema.log_key_block_prefix(logs.key()) == schema.log_key_block_prefix(wanted):
                        key = logs.value()
                if key is not None:
                    base, span = block * BLOCK_SIZE, BLOCK_SIZE
                    stop = min(base + BLOCK_SIZE, end)
                else:
                    chunk_no = pos // CHUNK_SIZE
                    base, span = chunk_no * CHUNK_SIZE, CHUNK_SIZE
                    stop = min(base + CHUNK_SIZE, end)
                    if logs is not None:  # the next block may have a log change
                        stop = min(stop, (block + 1) * BLOCK_SIZE)
                    key = fulls.get(schema.full_key(chain, disk, chunk_no)) or ZERO_KEY
                if key != ZERO_KEY:
                    data = self._chunk(chunks, key)
                    if len(data) != min(span, self.size - base):
                        raise ChunkError(f"{self._where()}: chunk {key.hex()[:16]} does not fit its place")
                    piece = memoryview(data)[pos - base:stop - base]
                    if pos == offset and stop == end:
                        return piece  # the whole read from one chunk: no copy
                    if out is None:
                        out = bytearray(end - offset)
                    out[pos - offset:stop - offset] = piece
                elif out is None:
                    out = bytearray(end - offset)
                pos = stop
        return out

    def _chunk(self, chunks_cursor, key: bytes) -> bytes:
        raw = chunks_cursor.get(key)
        try:
            if raw is None:
                raise ChunkMissing(f"chunk {key.hex()[:16]} is not in the catalog")
            return self.repo.reader.read(key, ChunkLocation.decode(raw))
        except ChunkError as e:
            raise type(e)(f"{self._where()}: {e}") from None

    def _where(self) -> str:
        return f"point {self.point.point} ({self.point.vm_name}) disk {self.target}"
