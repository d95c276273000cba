"""Pieced full chunks (format 3): the record, reads of any range, damage
confined to the piece (or table) it hits, dedup, compaction and defrag over pieced records (a real LMDB and
real pack files, no libvirt, no FUSE)."""

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpofs.errors import CorruptChunk
from rpofs.store import defrag as defrag_mod
from rpofs.store import gc as gc_mod
from rpofs.store import schema
from rpofs.store.chunks import PieceTable, chunk_key, piece_hashes, pieces_key
from rpofs.store.defrag import defrag
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import (BLOCK_SIZE, CHUNK_SIZE, CODEC_PIECES, CODEC_RAW, CODEC_ZSTD, PIECE_ENTRY,
                                PIECE_SIZE, ChunkLocation, piece_table_len)
from rpofs.timefmt import US
from synth import VM, back_up, format_2_full, write
from test_prune import check_repository

pytestmark = pytest.mark.lmdb


def mixed_disk(rnd: random.Random, size: int) -> bytearray:
    """Random pieces, zero pieces, compressible pieces, runs that cross piece
    and chunk edges."""
    disk = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(1, 3 * PIECE_SIZE), size - pos)
        kind = rnd.randrange(3)
        if kind == 0:
            disk[pos:pos + n] = rnd.randbytes(n)
        elif kind == 1:
            disk[pos:pos + n] = (b"rpofs %d " % pos * (n // 8 + 2))[:n]
        pos += n
    return disk


def full_location(repo, point, chunk_no, disk=0) -> tuple[bytes, ChunkLocation]:
    with repo.env.begin() as txn:
        key = bytes(txn.get(schema.full_key(point.chain, disk, chunk_no), db=repo.db["full_index"]))
        return key, ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))


def table_of(repo, key, loc) -> PieceTable:
    with open(os.path.join(repo.chunks_dir, schema.pack_name(loc.pack)), "rb") as f:
        raw = os.pread(f.fileno(), piece_table_len(loc.raw_len), loc.offset)
    return PieceTable(key, loc.raw_len, loc.stored_len, raw, "test")


def flip(repo, loc: ChunkLocation, at: int) -> None:
    """Flip one stored byte, `at` bytes into the record's stored bytes."""
    with open(os.path.join(repo.chunks_dir, schema.pack_name(loc.pack)), "r+b") as f:
        b = os.pread(f.fileno(), 1, loc.offset + at)
        os.pwrite(f.fileno(), bytes([b[0] ^ 0x10]), loc.offset + at)


def cold(repo) -> None:
    """Nothing decoded kept: every read goes to the packs."""
    repo.reader.close()


def test_pieced_record_round_trip(tmp_path):
    rnd = random.Random(1)
    repo = Repository.init(str(tmp_path / "r"))
    size = 2 * CHUNK_SIZE + 3 * PIECE_SIZE + 1234  # a short last chunk with a short last piece
    disk = mixed_disk(rnd, size)
    disk[PIECE_SIZE:2 * PIECE_SIZE] = bytes(PIECE_SIZE)  # a zero piece inside a chunk of data
    point = back_up(repo, [disk], [set()], "full", None, US)
    for chunk_no in range(3):
        key, loc = full_location(repo, point, chunk_no)
        data = bytes(disk[chunk_no * CHUNK_SIZE:(chunk_no + 1) * CHUNK_SIZE])
        assert loc.codec == CODEC_PIECES and loc.raw_len == len(data)
        assert key == pieces_key(piece_hashes(data)) != chunk_key(data)
        table = table_of(repo, key, loc)
        assert len(table.ends) == -(-len(data) // PIECE_SIZE) and table.ends[-1] == loc.stored_len
        codecs = {table.piece(i).codec for i in range(len(table.ends))}
        assert codecs <= {CODEC_RAW, CODEC_ZSTD}
        cold(repo)
        assert repo.read_chunk(key) == data
        got_key, stored = repo.reader.verified(key, loc)  # what compaction copies
        assert got_key == key and len(stored) == loc.stored_len
    key, loc = full_location(repo, point, 0)
    assert table_of(repo, key, loc).piece(1).stop - table_of(repo, key, loc).piece(1).start < 100  # zeros: tiny
    assert point.stats["stored_bytes"] < size  # compressible and zero pieces shrank
    assert repo.format() == schema.FORMAT == 6
    repo.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), ranges=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 3 * CHUNK_SIZE)),
                                                   min_size=1, max_size=12),
       cache=st.sampled_from([0, 100 << 10, 64 << 20]))
def test_random_ranges_read_byte_exact(tmp_path_factory, seed, ranges, cache):
    rnd = random.Random(seed)
    repo = Repository.init(str(tmp_path_factory.mktemp("r")))
    try:
        size = rnd.randrange(1, 3 * CHUNK_SIZE + 99999)
        disk = mixed_disk(rnd, size)
        point = back_up(repo, [disk], [set()], "full", None, US)
        repo.reader._cache_limit = cache
        reader = DiskReader(repo, point, "vda")
        for where, length in ranges:
            off = int(where * (size - 1))
            assert bytes(reader.read(off, length)) == bytes(disk[off:off + length])
        assert bytes(reader.read(0, size)) == bytes(disk)
    finally:
        repo.close()


def test_a_flipped_bit_in_one_piece_fails_exactly_the_ranges_it_serves(tmp_path):
    rnd = random.Random(2)
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE))
    point = back_up(repo, [disk], [set()], "full", None, US)
    key, loc = full_location(repo, point, 1)
    damaged = 5
    piece = table_of(repo, key, loc).piece(damaged)
    flip(repo, loc, piece.start + 77)
    lo, hi = CHUNK_SIZE + damaged * PIECE_SIZE, CHUNK_SIZE + (damaged + 1) * PIECE_SIZE
    reader = DiskReader(repo, point, "vda")
    for off, n in [(lo, 4096), (hi - 1, 1), (lo - 10, 20), (hi - 5, 4096), (CHUNK_SIZE, CHUNK_SIZE),
                   (0, 2 * CHUNK_SIZE), (lo + 1000, 1)]:
        cold(repo)
        with pytest.raises(CorruptChunk, match=f"point {point.point} .* disk vda: chunk .*piece {damaged}"):
            reader.read(off, n)
    for off, n in [(lo - 4096, 4096), (hi, 4096), (CHUNK_SIZE, damaged * PIECE_SIZE),
                   (hi, CHUNK_SIZE - (damaged + 1) * PIECE_SIZE), (0, CHUNK_SIZE), (2 * CHUNK_SIZE - 7, 7)]:
        cold(repo)
        assert bytes(reader.read(off, n)) == bytes(disk[off:off + n])
    # warm: the table is known, the neighbours are cached; the damaged piece still fails
    assert bytes(reader.read(lo - 100, 100)) == bytes(disk[lo - 100:lo])
    with pytest.raises(CorruptChunk):
        reader.read(lo, 1)
    with pytest.raises(CorruptChunk):  # verified copies (compaction, defrag) refuse it too
        repo.reader.verified(key, loc)
    repo.close()


@pytest.mark.parametrize("at", [0, 40, PIECE_ENTRY.size * 16 - 1])
def test_a_flipped_bit_in_the_piece_table_fails_the_chunk(tmp_path, at):
    rnd = random.Random(3)
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE))
    point = back_up(repo, [disk], [set()], "full", None, US)
    key, loc = full_location(repo, point, 0)
    flip(repo, loc, at)
    reader = DiskReader(repo, point, "vda")
    for off, n in [(0, 4096), (CHUNK_SIZE - 1, 1), (9 * PIECE_SIZE + 5, 3 * PIECE_SIZE), (0, CHUNK_SIZE)]:
        cold(repo)
        with pytest.raises(CorruptChunk, match="piece table"):
            reader.read(off, n)
    assert bytes(reader.read(CHUNK_SIZE, CHUNK_SIZE)) == bytes(disk[CHUNK_SIZE:])
    repo.close()


def test_a_truncated_pack_fails_its_chunk(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(random.Random(4).randbytes(CHUNK_SIZE))
    point = back_up(repo, [disk], [set()], "full", None, US)
    key, loc = full_location(repo, point, 0)
    os.truncate(os.path.join(repo.chunks_dir, schema.pack_name(loc.pack)), loc.offset + loc.stored_len - 10)
    reader = DiskReader(repo, point, "vda")
    assert bytes(reader.read(0, 4096)) == bytes(disk[:4096])
    with pytest.raises(CorruptChunk, match="truncated"):
        reader.read(CHUNK_SIZE - 4096, 4096)
    repo.close()


def test_equal_chunks_are_stored_once(tmp_path):
    rnd = random.Random(5)
    repo = Repository.init(str(tmp_path / "r"))
    chunk = mixed_disk(rnd, CHUNK_SIZE)
    disk = chunk + bytearray(rnd.randbytes(CHUNK_SIZE)) + chunk
    p1 = back_up(repo, [disk], [set()], "full", None, US)
    assert p1.stats["new_chunks"] == 3  # two distinct chunks and the domain XML
    assert full_location(repo, p1, 0) == full_location(repo, p1, 2)
    p2 = back_up(repo, [disk], [set()], "full", None, 2 * US)  # a second full: nothing new
    assert p2.stats["new_chunks"] == 0 and p2.stats["stored_bytes"] == 0
    assert bytes(DiskReader(repo, p2, "vda").read(0, len(disk))) == bytes(disk)
    repo.close()


def test_pieced_keys_are_apart_from_whole_keys():
    """A chunk consisting of the bytes of some piece hashes does not share a key with the pieced chunk."""
    data = random.Random(6).randbytes(CHUNK_SIZE)
    hashes = piece_hashes(data)
    assert pieces_key(hashes) != chunk_key(b"".join(hashes))


def test_compaction_copies_pieced_and_whole_records_byte_exact(tmp_path, monkeypatch):
    """Two fulls (a format-2 one and a format-3 one) sharing most blocks, a
    prune of the first: its pack, mostly dead, is compacted, and the kept
    points read the same."""
    monkeypatch.setattr(gc_mod, "COMPACT_BELOW", 0.9)
    rnd = random.Random(8)
    path = str(tmp_path / "r")
    disk = mixed_disk(rnd, 4 * CHUNK_SIZE)
    repo, p1 = format_2_full(path, disk, monkeypatch)
    p2 = back_up(repo, [disk], [set()], "full", None, 2 * US)
    write(disk, d := set(), CHUNK_SIZE, rnd.randbytes(CHUNK_SIZE))
    p3 = back_up(repo, [disk], [set()], "full", None, 3 * US)
    write(disk, d, 5, rnd.randbytes(2 * BLOCK_SIZE))
    p4 = back_up(repo, [disk], [d], "log", p3, 4 * US)
    truth = {p.point: bytes(DiskReader(repo, p, "vda").read(0, len(disk))) for p in (p3, p4)}
    report = prune(repo, VM, Retention(last=2))
    assert [p.point for p in report.points_removed] == [p1.point, p2.point]
    assert report.packs_compacted + report.packs_deleted >= 1
    check_repository(repo)
    cold(repo)
    for p in (p3, p4):
        reader = DiskReader(repo, p, "vda")
        assert bytes(reader.read(0, len(disk))) == truth[p.point]
        for _ in range(20):
            off, n = rnd.randrange(len(disk)), rnd.randrange(1, 2 * PIECE_SIZE)
            assert bytes(reader.read(off, n)) == truth[p.point][off:off + n]
    repo.close()


def test_compaction_moves_pieced_records_and_keeps_them_pieced(tmp_path, monkeypatch):
    monkeypatch.setattr(gc_mod, "COMPACT_BELOW", 0.99)
    rnd = random.Random(9)
    repo = Repository.init(str(tmp_path / "r"))
    disk = mixed_disk(rnd, 3 * CHUNK_SIZE)
    p1 = back_up(repo, [disk], [set()], "full", None, US)
    before = [full_location(repo, p1, c) for c in range(3)]
    write(disk, set(), 0, rnd.randbytes(2 * CHUNK_SIZE))
    p2 = back_up(repo, [disk], [set()], "full", None, 2 * US)
    report = prune(repo, VM, Retention(last=1))
    assert report.packs_compacted == 1
    key, loc = full_location(repo, p2, 2)
    assert key == before[2][0] and loc.pack != before[2][1].pack and loc.codec == CODEC_PIECES
    cold(repo)
    assert bytes(DiskReader(repo, p2, "vda").read(0, len(disk))) == bytes(disk)
    repo.close()


def test_defrag_fills_blocks_out_of_pieced_chunks_byte_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    rnd = random.Random(10)
    repo = Repository.init(str(tmp_path / "r"))
    disk = mixed_disk(rnd, 2 * CHUNK_SIZE + 3 * BLOCK_SIZE)
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    truth = {points[0].point: bytes(disk)}
    for i, block in enumerate(rnd.sample(range(16), 11)):  # most blocks of chunk 0 change, scattered over logs
        write(disk, dirty := set(), block * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
        truth[points[-1].point] = bytes(disk)
    calls = []
    real = repo.reader.read_range
    monkeypatch.setattr(repo.reader, "read_range", lambda *a: calls.append(a[2:]) or real(*a))
    report = defrag(repo, VM)
    assert report.blocks_filled > 0
    assert calls and all(stop - start <= BLOCK_SIZE for start, stop in calls)  # a piece each, not the chunk
    check_repository(repo)
    cold(repo)
    for p in points:
        assert bytes(DiskReader(repo, p, "vda").read(0, len(disk))) == truth[p.point]
    repo.close()


def test_a_small_read_asks_the_kernel_for_its_piece_not_the_chunk(tmp_path, monkeypatch):
    rnd = random.Random(11)
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(rnd.randbytes(4 * CHUNK_SIZE))
    point = back_up(repo, [disk], [set()], "full", None, US)
    advised = []
    monkeypatch.setattr(repo.packs, "advise", lambda pack, off, n: advised.append(n))
    reader = DiskReader(repo, point, "vda")
    reader.read(CHUNK_SIZE - 2048, 4096)  # two chunks, tables unknown: the tables only
    assert advised and max(advised) <= 2 * 16 * PIECE_ENTRY.size
    advised.clear()
    reader.read(2 * CHUNK_SIZE - 2048, 4096)  # chunk 1's table known: its last piece; chunk 2's table
    assert advised == [PIECE_SIZE + schema.PACK_HEADER.size + 16 * PIECE_ENTRY.size]  # they follow one another: one
    repo.close()
