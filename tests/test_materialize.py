"""Pure-logic level: the as-of index and materialization against a reference
model (a real LMDB in a temporary directory, no libvirt, no FUSE)."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.schema import CHUNK_SIZE
from synth import VM, back_up, write

pytestmark = pytest.mark.lmdb

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 1), st.floats(0, 1), st.integers(1, 200_000),
              st.sampled_from(["random", "zeros", "repeat"])),
    st.tuples(st.just("backup"), st.sampled_from(["full", "log", "log", "log"])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.tuples(st.integers(1, 3 * CHUNK_SIZE + 12345), st.integers(1, 2 * CHUNK_SIZE)),
       ops=st.lists(op, max_size=25), seed=st.integers(0, 2**32))
def test_every_point_reads_as_the_model(tmp_path_factory, sizes, ops, seed):
    rnd = random.Random(seed)
    repo = Repository.init(str(tmp_path_factory.mktemp("repo")))
    try:
        disks = [bytearray(rnd.randbytes(s // 2)) + bytearray(s - s // 2) for s in sizes]
        dirty = [set(), set()]
        truth = []  # (point, snapshot of both disks)
        for o in ops + [("backup", "log")]:
            if o[0] == "write":
                _, d, where, length, kind = o
                off = int(where * (len(disks[d]) - 1))
                length = min(length, len(disks[d]) - off)
                data = {"random": lambda: rnd.randbytes(length), "zeros": lambda: bytes(length),
                        "repeat": lambda: bytes(disks[d][:length])}[kind]()
                write(disks[d], dirty[d], off, data)
            else:
                kind = o[1] if truth else "full"
                parent = truth[-1][0] if truth else None
                point = back_up(repo, disks, dirty, kind, parent, 1000 + len(truth))
                truth.append((point, [bytes(x) for x in disks]))
                dirty = [set(), set()]
        for point, snapshot in truth:
            for d, expected in enumerate(snapshot):
                reader = DiskReader(repo, point, f"vd{chr(97 + d)}")
                assert reader.read(0, len(expected) + 999) == expected
                for _ in range(5):  # unaligned reads, some past the end
                    off = rnd.randrange(len(expected))
                    n = rnd.randrange(1, 300_000)
                    assert reader.read(off, n) == expected[off:off + n]
                assert reader.read(len(expected), 10) == b""
    finally:
        repo.close()


def test_points_listed_in_time_order_and_zero_chunks_not_stored(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    disk = bytearray(2 * CHUNK_SIZE)  # all zeros
    p1 = back_up(repo, [disk], [set()], "full", None, 5)
    assert p1.stats["zero_bytes"] == len(disk)
    with repo.env.begin(db=repo.db["full_index"]) as txn:
        assert txn.stat(repo.db["full_index"])["entries"] == 0
    write(disk, s := set(), 100, b"x" * 10)
    p2 = back_up(repo, [disk], [s], "log", p1, 9)
    assert [p.point for p in repo.points(VM)] == [p1.point, p2.point]
    assert p2.stats["new_chunks"] == 1 and p2.chain == p1.point  # the block; the domain XML is shared
    assert DiskReader(repo, p2, "vda").read(0, 200) == bytes(disk[:200])
    repo.close()


def test_concurrent_backups_in_one_process_commit(tmp_path):
    """The ingester runs backups of several VMs on threads of one process."""
    import threading
    repo = Repository.init(str(tmp_path / "r"))
    errors = []

    def work(seed):
        try:
            rnd = random.Random(seed)
            disk = bytearray(rnd.randbytes(CHUNK_SIZE))
            p = back_up(repo, [disk], [set()], "full", None, 10 + seed)
            for i in range(20):
                write(disk, dirty := set(), rnd.randrange(CHUNK_SIZE - 10), b"z" * 10)
                p = back_up(repo, [disk], [dirty], "log", p, 100 + 40 * i + seed)
            assert DiskReader(repo, p, "vda").read(0, CHUNK_SIZE) == bytes(disk)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    repo.close()


def test_few_pack_files_open_however_many_points(tmp_path, monkeypatch):
    """A pack per backup: readers keep only OPEN_PACKS of them open, also when
    threads read from packs being closed."""
    import threading

    from rpofs.store import packs
    monkeypatch.setattr(packs, "OPEN_PACKS", 2)
    repo = Repository.init(str(tmp_path / "r"))
    rnd = random.Random(3)
    disk = bytearray(rnd.randbytes(CHUNK_SIZE))
    points = [back_up(repo, [disk], [set()], "full", None, 1)]
    for i in range(12):  # each log in its own pack
        write(disk, dirty := set(), i * 65536, rnd.randbytes(100))
        points.append(back_up(repo, [disk], [dirty], "log", points[-1], 2 + i))
    truth = bytes(disk)
    repo.reader._cache_limit = 0  # every read goes to the packs
    errors = []

    def read_all():
        try:
            for _ in range(20):
                assert DiskReader(repo, points[-1], "vda").read(0, CHUNK_SIZE) == truth
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=read_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(repo.packs._fds) <= 2
    repo.close()
