"""Defragmenting: every point reads the same bytes before and after, the
newest point's log blocks end up in disk order, readers of old places find
the data, damage is neither copied nor hidden (a real LMDB and real pack
files; the mount test uses a real FUSE mount)."""

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpofs.errors import CorruptChunk
from rpofs.store import defrag as defrag_mod
from rpofs.store import schema
from rpofs.store.defrag import MIN_RUN, LogBlock, defrag, scattered_blocks
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, PACK_HEADER, ChunkLocation
from rpofs.timefmt import US, point_names
from synth import VM, back_up, write
from test_prune import check_repository
from vmlab import mounted, run_rpofs

pytestmark = pytest.mark.fuse

HEAD = PACK_HEADER.size


def loc(pack, offset, length=BLOCK_SIZE):
    return ChunkLocation(pack, offset, length, length, schema.CODEC_RAW)


def stored(disk, block, where):
    return LogBlock(disk, block, schema.log_key(1, disk, block, 2), where)


def test_scattered_blocks_are_those_in_short_runs():
    step = BLOCK_SIZE + HEAD
    long_run = [stored(0, 100 + i, loc(5, HEAD + i * step)) for i in range(MIN_RUN)]
    short_run = [stored(0, 200 + i, loc(6, HEAD + i * step)) for i in range(MIN_RUN - 1)]
    # disk-adjacent but not one after another in the pack: every block its own run
    reversed_order = [stored(0, 300 + i, loc(7, HEAD + (MIN_RUN - i) * step)) for i in range(MIN_RUN)]
    # unchanged blocks between, or the next disk: still one run of the pack
    gaps = [stored(0, 400 + 3 * i, loc(8, HEAD + i * step)) for i in range(MIN_RUN // 2)]
    gaps += [stored(1, i, loc(8, HEAD + (MIN_RUN // 2 + i) * step)) for i in range(MIN_RUN // 2)]
    entries = long_run + short_run + reversed_order + gaps
    plain = lambda loc: HEAD + loc.stored_len  # noqa: E731 - an unencrypted repository's records
    assert scattered_blocks(entries, plain) == short_run + reversed_order
    assert scattered_blocks(long_run[:-1], plain) == long_run[:-1]
    assert scattered_blocks([], plain) == []


def chain_of_scattered_logs(repo, rnd, logs=40, size=3 * CHUNK_SIZE + 5000):
    """A full, then logs each writing a few scattered blocks (one partly zeros,
    one ending in the disk's odd last block now and then)."""
    disk = bytearray(rnd.randbytes(size))
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    truth = {points[0].point: bytes(disk)}
    for i in range(logs):
        dirty = set()
        for _ in range(rnd.randrange(1, 4)):
            off = rnd.randrange(0, size - 10)
            data = rnd.choice([rnd.randbytes(BLOCK_SIZE), bytes(BLOCK_SIZE), rnd.randbytes(100)])
            write(disk, dirty, off, data[:size - off])
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
        truth[points[-1].point] = bytes(disk)
    return disk, points, truth


def newest_scattered(repo, point):
    with repo.env.begin() as txn:
        sizes = [d.size for d in point.disks]
        return scattered_blocks(defrag_mod._newest_blocks(repo, txn, sizes, point.chain)[0], repo.reader.record_len)


def test_defrag_moves_the_newest_points_blocks_into_disk_order(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    repo = Repository.init(str(tmp_path / "r"))
    disk, points, truth = chain_of_scattered_logs(repo, random.Random(1))
    scattered = newest_scattered(repo, points[-1])
    packs_before = len(os.listdir(repo.chunks_dir))
    report = defrag(repo, VM)
    assert report.blocks_moved == len(scattered) > MIN_RUN and report.scattered_left == 0
    assert report.packs_deleted > 0 and len(os.listdir(repo.chunks_dir)) < packs_before
    assert newest_scattered(repo, points[-1]) == []   # one pack, in disk order
    for p in points:
        assert DiskReader(repo, p, "vda").read(0, len(disk)) == truth[p.point]
    check_repository(repo)
    assert defrag(repo, VM).blocks_moved == 0  # nothing left worth moving

    # the chain goes on, and a later pass moves only what the new logs scattered
    rnd = random.Random(2)
    for i in range(5):
        write(disk, dirty := set(), rnd.randrange(0, len(disk) - BLOCK_SIZE), rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (100 + i) * US))
        truth[points[-1].point] = bytes(disk)
    again = defrag(repo, VM)
    assert 0 < again.blocks_moved < report.blocks_moved
    for p in points:
        assert DiskReader(repo, p, "vda").read(0, len(disk)) == truth[p.point]
    check_repository(repo)
    repo.close()


def test_a_small_budget_moves_part_and_the_next_pass_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    repo = Repository.init(str(tmp_path / "r"))
    disk, points, truth = chain_of_scattered_logs(repo, random.Random(3))
    first = defrag(repo, VM, budget=8 * BLOCK_SIZE)
    assert first.blocks_moved + first.blocks_filled == 8 and first.scattered_left > 0
    rest = defrag(repo, VM)
    assert rest.blocks_moved + rest.blocks_filled > 0 and rest.scattered_left == 0
    for p in points:
        assert DiskReader(repo, p, "vda").read(0, len(disk)) == truth[p.point]
    check_repository(repo)
    repo.close()


def test_few_scattered_blocks_are_left_where_they_are(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(random.Random(4).randbytes(64 * CHUNK_SIZE))   # 1,024 blocks: worth it from 64
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    for i in range(10):
        write(disk, dirty := set(), i * 7 * BLOCK_SIZE, bytes([i + 1]) * BLOCK_SIZE)
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
    assert defrag(repo, VM).blocks_moved == 0
    repo.close()


def test_readers_of_old_places_find_moved_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    repo = Repository.init(str(tmp_path / "r"))
    disk, points, truth = chain_of_scattered_logs(repo, random.Random(5))
    newest = DiskReader(repo, points[-1], "vda")
    before = newest.extents(0, len(disk))  # places as a reader saw them before defrag
    assert defrag(repo, VM).packs_deleted > 0
    gone = [e for e in before
            if e.loc and not os.path.exists(os.path.join(repo.chunks_dir, schema.pack_name(e.loc.pack)))]
    assert gone
    repo.reader.close()   # no descriptor still open on a deleted pack
    repo.reader._cache_limit = 0
    for old in before:   # a read planned before the move finds the data at its new place
        if old.loc:
            assert bytes(newest.extent_bytes(old)) == bytes(disk[old.pos:old.stop])
    repo.close()


def test_damaged_blocks_are_not_moved_and_a_damaged_run_fails_its_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(random.Random(6).randbytes(2 * CHUNK_SIZE))
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    rnd = random.Random(7)
    for i, block in enumerate(rnd.sample(range(32), 32)):  # every block, one log each, in no order
        write(disk, dirty := set(), block * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
    damaged = entry_location(repo, points[-1], 5)
    flip(repo, damaged)
    report = defrag(repo, VM)
    assert report.blocks_moved == 31 and report.scattered_left == 1
    assert os.path.exists(os.path.join(repo.chunks_dir, schema.pack_name(damaged.pack)))
    reader = DiskReader(repo, points[-1], "vda")
    with pytest.raises(CorruptChunk, match="log block"):
        reader.read(5 * BLOCK_SIZE, BLOCK_SIZE)
    assert reader.read(0, 5 * BLOCK_SIZE) == bytes(disk[:5 * BLOCK_SIZE])
    assert reader.read(6 * BLOCK_SIZE, 26 * BLOCK_SIZE) == bytes(disk[6 * BLOCK_SIZE:32 * BLOCK_SIZE])

    # damage inside the moved run: reads over it fail, reads beside it do not
    moved = entry_location(repo, points[-1], 20)
    flip(repo, moved)
    repo.reader.close()
    for offset, length in [(16 * BLOCK_SIZE, 8 * BLOCK_SIZE), (20 * BLOCK_SIZE, BLOCK_SIZE)]:
        with pytest.raises(CorruptChunk, match="does not match its key"):
            DiskReader(repo, points[-1], "vda").read(offset, length)
    assert reader.read(6 * BLOCK_SIZE, 14 * BLOCK_SIZE) == bytes(disk[6 * BLOCK_SIZE:20 * BLOCK_SIZE])
    repo.close()


def entry_location(repo, point, block):
    with repo.env.begin() as txn:
        cur = txn.cursor(db=repo.db["log_index"])
        assert cur.set_range(schema.log_key(point.chain, 0, block, point.point))
        return schema.read_log_value(cur.value(), BLOCK_SIZE)


def flip(repo, where: ChunkLocation):
    with open(os.path.join(repo.chunks_dir, schema.pack_name(where.pack)), "r+b") as f:
        f.seek(where.offset + 100)
        byte = f.read(1)
        f.seek(where.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


op = st.one_of(
    st.tuples(st.just("write"), st.floats(0, 1), st.integers(1, 3 * BLOCK_SIZE), st.booleans()),
    st.tuples(st.just("backup"), st.sampled_from(["full", "log", "log", "log"])),
    st.tuples(st.just("defrag"), st.integers(0, 40)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 2 * CHUNK_SIZE + 777), min_size=1, max_size=2),
       ops=st.lists(op, max_size=40), seed=st.integers(0, 2**32))
def test_every_point_reads_the_same_after_any_defrags(tmp_path_factory, sizes, ops, seed):
    defrag_mod.MIN_SCATTERED, saved = 1, defrag_mod.MIN_SCATTERED
    rnd = random.Random(seed)
    repo = Repository.init(str(tmp_path_factory.mktemp("repo")))
    try:
        disks = [bytearray(rnd.randbytes(s)) for s in sizes]
        dirty = [set() for _ in disks]
        truth, newest = {}, None
        for o in ops + [("backup", "log"), ("defrag", 1000)]:
            if o[0] == "write":
                d = rnd.randrange(len(disks))
                off = int(o[1] * (len(disks[d]) - 1))
                data = rnd.randbytes(o[2]) if o[3] else bytes(o[2])
                write(disks[d], dirty[d], off, data[:len(disks[d]) - off])
            elif o[0] == "backup":
                kind = o[1] if newest else "full"
                newest = back_up(repo, disks, dirty, kind, newest, (len(truth) + 1) * US)
                truth[newest.point] = (newest, [bytes(x) for x in disks])
                dirty = [set() for _ in disks]
            elif truth:
                defrag(repo, VM, budget=o[1] * BLOCK_SIZE)
                check_repository(repo)
        for point, expected in truth.values():
            for d, data in enumerate(expected):
                reader = DiskReader(repo, point, f"vd{chr(97 + d)}")
                assert reader.read(0, len(data)) == data
                for _ in range(3):  # reads that start and end inside blocks
                    a = rnd.randrange(len(data))
                    b = rnd.randrange(a, len(data)) + 1
                    assert reader.read(a, b - a) == data[a:b]
    finally:
        defrag_mod.MIN_SCATTERED = saved
        repo.close()


def test_defrag_by_command_and_through_a_running_mount(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(random.Random(8).randbytes(8 * CHUNK_SIZE))   # 128 blocks: worth it from 8
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    rnd = random.Random(9)
    for i, block in enumerate(rnd.sample(range(128), 100)):
        write(disk, dirty := set(), block * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
    names = point_names([p.time_us for p in points])
    repo.close()
    r = str(tmp_path / "r")
    for args, says in [([], "name one VM or give --all"), (["m", "--all"], "name one VM or give --all"),
                       (["nosuch"], "no VM 'nosuch'")]:
        res = run_rpofs("--repo", r, "defrag", *args, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and says in res.stderr, (args, res.stderr)
    with mounted(r, str(tmp_path / "mnt")) as mnt:
        held = open(os.path.join(mnt, "m", names[-1], "vda.raw"), "rb")
        assert held.read(CHUNK_SIZE) == bytes(disk[:CHUNK_SIZE])   # its pieces and packs are in use
        res = run_rpofs("--repo", r, "defrag", "m")
        assert res.returncode == 0 and "100 log blocks moved" in res.stdout, res.stdout
        with held:
            assert held.read() == bytes(disk[CHUNK_SIZE:])
        with open(os.path.join(mnt, "m", "latest", "vda.raw"), "rb") as f:
            assert f.read() == bytes(disk)
    assert "0 log blocks moved and 0 unchanged blocks filled" in run_rpofs("--repo", r, "defrag", "--all").stdout


def test_mostly_changed_chunks_are_filled_so_the_newest_point_skips_the_full(tmp_path, monkeypatch):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    repo = Repository.init(str(tmp_path / "r"))
    rnd = random.Random(11)
    disk = bytearray(rnd.randbytes(4 * CHUNK_SIZE))
    disk[13 * BLOCK_SIZE:14 * BLOCK_SIZE] = bytes(BLOCK_SIZE)  # an unchanged block of zeros in chunk 0
    points = [back_up(repo, [disk], [set()], "full", None, US)]
    truth = {points[0].point: bytes(disk)}
    changes = rnd.sample(range(10), 10) + [16, 20, 24] + list(range(32, 48))  # chunk 0: 10 of 16; 1: 3; 2: all
    for i, block in enumerate(changes):
        write(disk, dirty := set(), block * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
        truth[points[-1].point] = bytes(disk)
    report = defrag(repo, VM)
    assert report.blocks_filled == 6
    extents = DiskReader(repo, points[-1], "vda").extents(0, len(disk))
    chunk_of = {e.pos // CHUNK_SIZE: [] for e in extents}
    for e in extents:
        chunk_of[e.pos // CHUNK_SIZE].append(e)
    assert all(e.kind == "log" for e in chunk_of[0])       # chunk 0 now read from logs only ...
    assert [e.loc for e in chunk_of[0]].count(None) == 1   # ... its zero block from no stored bytes
    assert any(e.kind == "full" for e in chunk_of[1])      # chunk 1 (3 of 16 changed) still uses the full
    for p in points:
        assert DiskReader(repo, p, "vda").read(0, len(disk)) == truth[p.point]
    check_repository(repo)
    assert defrag(repo, VM).blocks_filled == 0
    repo.close()
