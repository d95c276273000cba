"""Retention: what is kept, and that pruning never changes a byte of a kept
point (a real LMDB and real pack files; the mount test uses a real FUSE mount)."""

import dataclasses
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpofs.store import holds
from rpofs.store import gc as gc_mod
from rpofs.store import schema
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import PruneReport, Retention, _ship_fates, choose, entry_is_live, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, ChunkLocation, DiskRecord, PointRecord, ShipRecord
from rpofs.timefmt import US, format_time, point_names
from synth import VM, back_up, write
from vmlab import mounted, run_rpofs, wait_for

pytestmark = pytest.mark.fuse

HOUR = 3600 * US


def record(no, chain, time_us):
    return PointRecord(no, VM, "m", "full" if no == chain else "log", time_us, chain, None,
                       "crash-consistent", (DiskRecord("vda", 1),), "", "")


def test_choose_keeps_newest_buckets_and_chain_bases():
    # chain 1: points 1..6 an hour apart; chain 7: points 7..9 ten minutes apart
    points = [record(n, 1, n * HOUR) for n in range(1, 7)]
    points += [record(n, 7, 7 * HOUR + (n - 7) * 600 * US) for n in range(7, 10)]
    assert choose(points, Retention()) == set(range(1, 10))              # no policy: keep all
    assert choose(points, Retention(last=1)) == {9, 7}                   # newest + its chain's full
    assert choose(points, Retention(last=4)) == {6, 7, 8, 9, 1}          # 6 keeps chain 1's full
    assert choose(points, Retention(hourly=3)) == {9, 6, 5, 1, 7}        # hours 7, 6, 5
    assert choose(points, Retention(within_s=1200)) == {7, 8, 9}
    assert choose(points, Retention(daily=5)) == {9, 7}                  # all in one day


def test_log_entry_lives_while_a_kept_point_reads_it():
    kept = [1, 5, 9]
    assert entry_is_live(2, 5, kept) is False    # points 2..4 read it: none kept
    assert entry_is_live(2, 6, kept) is True     # point 5 reads it
    assert entry_is_live(5, 6, kept) is True
    assert entry_is_live(6, None, kept) is True  # the newest change: point 9 reads it
    assert entry_is_live(10, None, kept) is False


def check_repository(repo):
    """Every reference resolves, and every pack file holds live data."""
    with repo.env.begin() as txn:
        chunks = txn.cursor(db=repo.db["chunks"])
        packs = set()
        for value in txn.cursor(db=repo.db["full_index"]).iternext(keys=False):
            raw = chunks.get(value)
            assert raw is not None
            packs.add(ChunkLocation.decode(raw).pack)
        for value in txn.cursor(db=repo.db["log_index"]).iternext(keys=False):
            if value:
                packs.add(schema.read_log_value(value, 0).pack)
        packs |= {ChunkLocation.decode(v).pack for v in txn.cursor(db=repo.db["chunks"]).iternext(keys=False)}
    on_disk = {int(n[5:]) for n in os.listdir(repo.chunks_dir)}
    assert packs == on_disk


op = st.one_of(
    st.tuples(st.just("write"), st.floats(0, 1), st.integers(1, 3 * BLOCK_SIZE),
              st.sampled_from(["random", "zeros", "repeat"])),
    st.tuples(st.just("backup"), st.sampled_from(["full", "log", "log", "log", "log"])),
    st.tuples(st.just("prune"), st.integers(0, 4), st.integers(0, 3), st.integers(0, 3)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 2 * CHUNK_SIZE + 777), ops=st.lists(op, max_size=30), seed=st.integers(0, 2**32))
def test_kept_points_read_the_same_after_any_prunes(tmp_path_factory, size, ops, seed):
    rnd = random.Random(seed)
    repo = Repository.init(str(tmp_path_factory.mktemp("repo")))
    try:
        disk = bytearray(rnd.randbytes(size // 2)) + bytearray(size - size // 2)
        dirty = set()
        truth = {}   # point no -> (record, bytes at that point)
        newest = None
        clock = 0
        for o in ops + [("backup", "log"), ("prune", 1, 0, 0)]:
            if o[0] == "write":
                _, where, length, kind = o
                off = int(where * (size - 1))
                length = min(length, size - off)
                data = {"random": lambda: rnd.randbytes(length), "zeros": lambda: bytes(length),
                        "repeat": lambda: bytes(disk[:length])}[kind]()
                write(disk, dirty, off, data)
            elif o[0] == "backup":
                clock += rnd.choice([1, 60, 3600]) * US
                kind = o[1] if newest else "full"
                newest = back_up(repo, [disk], [dirty], kind, newest, clock)
                truth[newest.point] = (newest, bytes(disk))
                dirty = set()
            elif truth:
                policy = Retention(last=o[1], hourly=o[2], within_s=o[3] * 90.0)
                if policy.keeps_everything():
                    continue
                prune(repo, VM, policy)
                kept = {p.point for p in repo.points(VM)}
                assert newest.point in kept and kept <= set(truth)
                truth = {no: truth[no] for no in kept}
                check_repository(repo)
        for point, expected in truth.values():
            assert DiskReader(repo, point, "vda").read(0, size) == expected
        # the chain goes on from the kept newest point
        write(disk, dirty, 0, b"\x07" * min(100, size))
        after = back_up(repo, [disk], [dirty], "log", newest, clock + US)
        assert DiskReader(repo, after, "vda").read(0, size) == bytes(disk)
    finally:
        repo.close()


def three_logs(repo, rnd):
    """A full, then logs that overwrite the same blocks: the early logs' packs die."""
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE))
    points = [back_up(repo, [disk], [set()], "full", None, 1 * US)]
    for i in range(3):
        write(disk, dirty := set(), 0, rnd.randbytes(4 * BLOCK_SIZE - i * BLOCK_SIZE))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], (2 + i) * US))
    return disk, points


def test_prune_frees_space_and_compacts(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk, points = three_logs(repo, random.Random(5))
    before = repo.pack_bytes()
    report = prune(repo, VM, Retention(last=1))
    assert [p.point for p in report.points_removed] == [points[1].point, points[2].point]
    assert [p.point for p in repo.points(VM)] == [points[0].point, points[3].point]
    # the kept point still reads block 3 from log 1 and block 2 from log 2:
    # those two move to a new pack, the other 5 blocks are gone
    assert (report.log_entries_dropped, report.packs_compacted, report.packs_deleted) == (5, 2, 0)
    assert report.bytes_freed == before - repo.pack_bytes() > 0
    assert DiskReader(repo, points[3], "vda").read(0, len(disk)) == bytes(disk)
    check_repository(repo)
    assert prune(repo, VM, Retention(last=1)).points_removed == []  # nothing more to do
    # a log overwriting all four blocks: log 3's pack and the compacted one die whole
    write(disk, dirty := set(), 0, bytes(random.Random(1).randbytes(4 * BLOCK_SIZE)))
    newest = back_up(repo, [disk], [dirty], "log", points[3], 9 * US)
    report = prune(repo, VM, Retention(last=1))
    assert (report.log_entries_dropped, report.packs_compacted, report.packs_deleted) == (4, 0, 2)
    assert DiskReader(repo, newest, "vda").read(0, len(disk)) == bytes(disk)
    check_repository(repo)
    repo.close()


def test_bytes_freed_counts_pack_files_never_below_zero(tmp_path):
    """Points removed whose data another point still holds free no pack
    bytes: the report says 0, not the catalog's growth as a negative."""
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(random.Random(8).randbytes(3 * CHUNK_SIZE))
    for i in range(6):  # equal fulls: every chunk deduplicated, only the catalog grows
        back_up(repo, [disk], [set()], "full", None, (1 + i) * US)
    report = prune(repo, VM, Retention(last=1))
    assert len(report.points_removed) == 5 and report.bytes_freed == 0
    assert "; 0 bytes freed" in report.summary()
    repo.close()


def test_app_points_a_prune_removes_and_those_it_leaves_waiting():
    """App points go with their base, but those a kept app point reads stay
    (without a base, listed as waiting): counted apart, as the summary says."""
    def ship(no, base, time_us, reads_from=0):
        return ShipRecord(no, VM, "orders", "sqlite", time_us, f"s{no}", (), base, base, reads_from=reads_from)

    ships = [ship(1, 1, 10), ship(2, 1, 20), ship(3, 1, 30), ship(4, 5, 60, reads_from=20)]
    fates = _ship_fates(ships, kept={5}, newest_us=50)
    assert [s.ship for s in fates.deleted] == [1] and [s.ship for s in fates.unbased] == [2, 3]
    report = PruneReport(ships_removed=len(fates.deleted), ships_unbased=len(fates.unbased))
    assert "0 points, 1 app points removed, 0 kept (2 app points left without a base" in report.summary()


def test_compaction_moves_live_data_and_readers_of_old_places_find_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gc_mod, "COMPACT_BELOW", 0.9)
    repo = Repository.init(str(tmp_path / "r"))
    disk, points = three_logs(repo, random.Random(6))
    newest = DiskReader(repo, points[3], "vda")
    before = newest.extents(0, len(disk))  # places as a reader saw them before the prune
    report = prune(repo, VM, Retention(last=1))
    assert report.packs_compacted >= 1
    after = newest.extents(0, len(disk))
    moved = [(old, new) for old, new in zip(before, after) if old.loc != new.loc]
    assert moved and all(old._replace(loc=None) == new._replace(loc=None) for old, new in moved)
    repo.reader._cache_limit = 0
    for old, new in moved:  # a read planned before the move finds the data at its new place
        assert bytes(newest.extent_bytes(old)) == bytes(disk[old.pos:old.stop])
    assert DiskReader(repo, points[3], "vda").read(0, len(disk)) == bytes(disk)
    check_repository(repo)
    repo.close()


def test_compaction_leaves_a_damaged_pack_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(gc_mod, "COMPACT_BELOW", 0.9)
    repo = Repository.init(str(tmp_path / "r"))
    disk, points = three_logs(repo, random.Random(7))
    loc = log_block_location(repo, points[1], 3)  # block 3 changed by log 1 only: still read by log 3
    with open(os.path.join(repo.chunks_dir, schema.pack_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset)
        f.write(b"\xff" * 16)
    report = prune(repo, VM, Retention(last=1))
    # log 2's pack is compacted; log 1's, damaged, stays as it is
    assert report.packs_compacted == 1 and os.path.exists(os.path.join(repo.chunks_dir, schema.pack_name(loc.pack)))
    with pytest.raises(Exception):
        DiskReader(repo, points[3], "vda").read(3 * BLOCK_SIZE, BLOCK_SIZE)
    assert DiskReader(repo, points[3], "vda").read(0, BLOCK_SIZE) == bytes(disk[:BLOCK_SIZE])
    repo.close()


def log_block_location(repo, point, block):
    with repo.env.begin() as txn:
        value = txn.get(schema.log_key(point.chain, 0, block, point.point), db=repo.db["log_index"])
        return schema.read_log_value(value, BLOCK_SIZE)


def test_backups_and_prunes_at_once(tmp_path):
    """The repository lock: a backup that found a chunk stored commits before
    prune may collect it."""
    repo = Repository.init(str(tmp_path / "r"))
    rnd = random.Random(8)
    disk = bytearray(rnd.randbytes(CHUNK_SIZE))
    shared = bytes(rnd.randbytes(BLOCK_SIZE))  # written again and again: found already stored
    truth = {}
    errors = []
    done = threading.Event()
    newest = back_up(repo, [disk], [set()], "full", None, US)
    truth[newest.point] = bytes(disk)

    def backups():
        nonlocal newest
        try:
            for i in range(60):
                block = rnd.randrange(CHUNK_SIZE // BLOCK_SIZE)
                write(disk, dirty := set(), block * BLOCK_SIZE, shared if i % 2 else rnd.randbytes(BLOCK_SIZE))
                newest = back_up(repo, [disk], [dirty], "full" if i % 20 == 19 else "log", newest, (2 + i) * US)
                truth[newest.point] = bytes(disk)
        except Exception as e:
            errors.append(e)
        finally:
            done.set()

    def prunes():
        try:
            while not done.is_set():
                prune(repo, VM, Retention(last=3))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=backups), threading.Thread(target=prunes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    prune(repo, VM, Retention(last=3))
    for p in repo.points(VM):
        assert DiskReader(repo, p, "vda").read(0, CHUNK_SIZE) == truth[p.point]
    check_repository(repo)
    repo.close()


def test_pruned_points_leave_a_running_mount(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk, points = three_logs(repo, random.Random(9))
    names = point_names([p.time_us for p in points])
    repo.close()
    assert len(names) == 4
    with mounted(str(tmp_path / "r"), str(tmp_path / "mnt")) as mnt:
        vm = os.path.join(mnt, "m")
        assert os.path.isdir(os.path.join(vm, names[1]))   # looked up: the kernel caches it
        keep = open(os.path.join(vm, names[3], "vda.raw"), "rb")
        r = run_rpofs("--repo", str(tmp_path / "r"), "prune", "m", "--keep-last", "1")
        assert r.returncode == 0 and "2 points removed" in r.stdout, r.stderr
        wait_for(lambda: not os.path.exists(os.path.join(vm, names[1])), 2.5, "pruned point to disappear")
        assert sorted(os.listdir(vm)) == sorted(["at", "latest", names[0], names[3]])
        assert os.readlink(os.path.join(vm, "at", names[2])) == "../" + names[0]  # as of then: the full
        with keep:
            assert keep.read() == bytes(disk)
        with open(os.path.join(vm, "latest", "vda.raw"), "rb") as f:
            assert f.read() == bytes(disk)


def test_prune_refuses_unclear_requests(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    three_logs(repo, random.Random(10))
    repo.close()
    r = str(tmp_path / "r")
    for args, says in [(["m"], "no --keep-"), ([], "name one VM or give --all"),
                       (["m", "--all", "--keep-last", "1"], "name one VM or give --all"),
                       (["nosuch", "--keep-last", "1"], "no VM 'nosuch'"),
                       (["m", "--keep-within", "soon"], "--keep-within"),
                       (["m", "--keep-last", "-1"], "0 or more")]:
        res = run_rpofs("--repo", r, "prune", *args, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and says in res.stderr, (args, res.stderr)
    dry = run_rpofs("--repo", r, "prune", "m", "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "would remove 2 points" in dry.stdout
    repo = Repository.open(r)
    assert len(repo.points(VM)) == 4
    repo.close()


def test_prune_renames_no_point(tmp_path):
    """Names once printed stay: new points of one second keep theirs when a
    neighbour goes, and so do points from before names were stored."""
    repo = Repository.init(str(tmp_path / "r"))
    rnd = random.Random(4)
    disk = bytearray(rnd.randbytes(CHUNK_SIZE))
    t = 1_795_000_000 * US
    full = back_up(repo, [disk], [set()], "full", None, t)
    a = back_up(repo, [disk], [{0}], "log", full, t + 10 * US + 100_000)
    b = back_up(repo, [disk], [{1}], "log", a, t + 10 * US + 700_000)
    c = back_up(repo, [disk], [{2}], "log", b, t + 20 * US + 900_000)
    assert [a.name, b.name] == [format_time(a.time_us), format_time(b.time_us, 1)]
    # as if written before names were stored: c's second alone holds unnamed points
    d = back_up(repo, [disk], [{3}], "log", c, t + 40 * US + 100_000)
    e = back_up(repo, [disk], [{4}], "log", d, t + 40 * US + 700_000)
    with repo.write_txn() as txn:
        for p in (d, e):
            txn.put(schema.point_key(p.point), dataclasses.replace(p, name="").encode(), db=repo.db["points"])
    before = {p.point: n for p, n in zip(repo.points(VM), point_names(
        [p.time_us for p in repo.points(VM)], [p.name for p in repo.points(VM)]))}
    assert before[d.point] == format_time(d.time_us, 1)  # the rule of before: digits tell them apart
    holds.put(repo, holds.Hold("test", VM, b.point))  # kept with e (the newest) and the full: a, c, d go
    prune(repo, VM, Retention(last=1))
    after = {p.point: n for p, n in zip(repo.points(VM), point_names(
        [p.time_us for p in repo.points(VM)], [p.name for p in repo.points(VM)]))}
    assert sorted(after) == [full.point, b.point, e.point]
    assert all(after[no] == before[no] for no in after)
    assert repo.point_at("m", b.name).point == b.point
    repo.close()
