"""`rpofs upgrade`: formats 2, 3, 4 and 5 converted to 6 in place, byte-exact, and
crash-safe under kill -9 at random moments (a real LMDB and real packs)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import pytest

from rpofs.errors import CorruptChunk, NeedsUpgrade, UnknownFormat
from rpofs.store import schema
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, CODEC_PIECES, ChunkLocation
from rpofs.store.upgrade import upgrade
from synth import VM, back_up, format_2_full, write
from test_pieces import mixed_disk
from test_prune import check_repository
from vmlab import run_rpofs

pytestmark = pytest.mark.lmdb

US = 1_000_000


def set_format(path: str, value: bytes) -> None:
    env = lmdb.open(os.path.join(path, "catalog"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(schema.META_FORMAT, value, db=env.open_db(b"meta", txn=txn))
    env.close()


def drop_new_tables(path: str, fmt: int) -> None:
    """Releases before format 5 had no `apps` and `ships`, before 6 no `protection`."""
    env = lmdb.open(os.path.join(path, "catalog"), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in ((b"apps", b"ships") if fmt < 5 else ()) + (b"protection",):
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()


def full_codecs(repo) -> set[int]:
    with repo.env.begin() as txn:
        rows = txn.cursor(db=repo.db["chunks"])
        return {ChunkLocation.decode(rows.get(v)).codec for v in txn.cursor(db=repo.db["full_index"]).iternext(keys=False)}


def old_repository(path: str, rnd: random.Random, monkeypatch, fmt: int, size: int = 3 * CHUNK_SIZE + 5000):
    """A repository of format `fmt` as earlier releases left it: a format-2
    full (whole chunks) and a log; for format 3 also a pieced full and a log
    after it; for formats 4 and 5 a pieced full and a log. Returns the truth
    of every point's disk, by point."""
    disk = mixed_disk(rnd, size)
    if fmt >= 4:
        repo = Repository.init(path)
        full = back_up(repo, [disk], [set()], "full", None, 1 * US)
    else:
        repo, full = format_2_full(path, disk, monkeypatch)
    truth = {full.point: bytes(disk)}
    write(disk, dirty := set(), 100, rnd.randbytes(3 * BLOCK_SIZE))
    log = back_up(repo, [disk], [dirty], "log", full, 2 * US)
    truth[log.point] = bytes(disk)
    if fmt == 3:  # the previous release: new fulls pieced, the old ones kept whole
        write(disk, set(), CHUNK_SIZE, rnd.randbytes(CHUNK_SIZE // 2))
        new_full = back_up(repo, [disk], [set()], "full", None, 3 * US)
        truth[new_full.point] = bytes(disk)
        write(disk, dirty := set(), 7 * BLOCK_SIZE, rnd.randbytes(2 * BLOCK_SIZE))
        truth[back_up(repo, [disk], [dirty], "log", new_full, 4 * US).point] = bytes(disk)
    repo.close()
    set_format(path, schema.format_value(fmt))
    drop_new_tables(path, fmt)
    return truth


def check_reads(path: str, truth: dict[int, bytes], upgrading: bool = False) -> None:
    repo = Repository.open(path, upgrading=upgrading)
    try:
        points = {p.point: p for p in repo.points(VM)}
        assert set(points) == set(truth)
        for no, data in truth.items():
            assert bytes(DiskReader(repo, points[no], "vda").read(0, len(data))) == data
    finally:
        repo.close()


@pytest.mark.parametrize("fmt", [2, 3, 4, 5])
def test_an_old_repository_is_refused_then_upgraded_byte_exact(tmp_path, monkeypatch, fmt):
    rnd = random.Random(fmt)
    path = str(tmp_path / "r")
    truth = old_repository(path, rnd, monkeypatch, fmt)
    with pytest.raises(NeedsUpgrade, match=f"has format {fmt}; convert it to format 6 with: rpofs --repo .* upgrade"):
        Repository.open(path)
    got = run_rpofs("--repo", path, "points", VM, check=False)
    assert got.returncode == 1 and "upgrade" in got.stderr and got.stderr.count("\n") == 1

    report = upgrade(path)
    assert (report.old_format, report.new_format, report.chunks_damaged) == (fmt, 6, 0)
    first = truth[min(truth)]  # the format-2 full's disk: its non-zero chunks were whole
    assert report.chunks_converted == (0 if fmt >= 4 else len({first[c:c + CHUNK_SIZE] for c in range(0, len(first), CHUNK_SIZE)
                                                               if any(first[c:c + CHUNK_SIZE])}))
    check_reads(path, truth)
    repo = Repository.open(path)
    assert repo.format() == 6 and full_codecs(repo) == {CODEC_PIECES}
    with repo.env.begin() as txn:  # the new sub-databases are there, empty
        assert txn.stat(repo.db["apps"])["entries"] == txn.stat(repo.db["ships"])["entries"] == 0
        assert txn.stat(repo.db["protection"])["entries"] == 0
    check_repository(repo)
    # a new full of content the upgraded full holds stores nothing again
    data = truth[min(truth)]
    disk = bytearray(data)
    again = back_up(repo, [disk], [set()], "full", None, 10 * US)
    assert again.stats["new_chunks"] <= 1  # the XML at most
    repo.close()
    assert upgrade(path).summary() == "already format 6: nothing to do"


def test_formats_it_does_not_know_are_refused(tmp_path):
    path = str(tmp_path / "r")
    Repository.init(path).close()
    for found in (b"1", b"7"):
        set_format(path, found)
        with pytest.raises(UnknownFormat, match=f"has format {found.decode()}; this rpofs reads format 6"):
            Repository.open(path)
        with pytest.raises(UnknownFormat):
            upgrade(path)


def test_a_damaged_whole_chunk_is_left_and_the_rest_converted(tmp_path, monkeypatch):
    rnd = random.Random(5)
    path = str(tmp_path / "r")
    truth = old_repository(path, rnd, monkeypatch, 2)
    repo = Repository.open(path, upgrading=True)
    with repo.env.begin() as txn:
        key = bytes(txn.get(schema.full_key(1, 0, 1), db=repo.db["full_index"]))
        loc = ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))
    repo.close()
    with open(os.path.join(path, "chunks", schema.pack_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + 10)
        byte = f.read(1)
        f.seek(loc.offset + 10)
        f.write(bytes([byte[0] ^ 0x40]))
    report = upgrade(path)
    assert report.chunks_damaged == 1 and report.chunks_converted == 2
    repo = Repository.open(path)
    points = repo.points(VM)
    reader = DiskReader(repo, points[0], "vda")
    assert bytes(reader.read(0, CHUNK_SIZE)) == truth[points[0].point][:CHUNK_SIZE]
    assert bytes(reader.read(2 * CHUNK_SIZE, CHUNK_SIZE)) == truth[points[0].point][2 * CHUNK_SIZE:3 * CHUNK_SIZE]
    with pytest.raises(CorruptChunk):
        reader.read(CHUNK_SIZE, 4096)
    repo.close()


# the conversion, saying "converting" on stdout once it starts converting chunks
UPGRADE = """
import sys
from rpofs.store.upgrade import upgrade
class Told:
    said = False
    def set(self, done, total=None):
        if not self.said:
            print("converting", flush=True)
            self.said = True
    def add(self, n):
        pass
upgrade(sys.argv[1], Told())
"""


def start_upgrade(path: str) -> subprocess.Popen:
    """The conversion in a process of its own, returned once it converts
    (its start, opening and planning done: a kill before would prove nothing)."""
    proc = subprocess.Popen([sys.executable, "-c", UPGRADE, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "converting\n"
    return proc


def test_killed_at_any_moment_it_leaves_the_old_format_or_the_new_one_complete(tmp_path, monkeypatch):
    rnd = random.Random(9)
    path = str(tmp_path / "r")
    truth = old_repository(path, rnd, monkeypatch, 3, size=24 * CHUNK_SIZE)
    shutil.copytree(path, tmp_path / "probe")
    proc = start_upgrade(str(tmp_path / "probe"))
    start = time.monotonic()
    assert proc.wait() == 0
    converting = time.monotonic() - start  # from its first chunk to its exit
    proc.stdout.close()
    outcomes = set()
    for attempt in range(8):
        proc = start_upgrade(path)
        # the first kill within the first third of the conversion: the old
        # format is seen even when this run goes quicker than the probe did
        time.sleep(rnd.uniform(0.0, 0.3 if attempt == 0 else 1.0) * converting)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        try:
            Repository.open(path).close()
            outcomes.add("new")
            check_reads(path, truth)
            break
        except NeedsUpgrade:
            outcomes.add("old")
            check_reads(path, truth, upgrading=True)  # the old format, intact
    upgrade(path)
    check_reads(path, truth)
    repo = Repository.open(path)
    check_repository(repo)  # the killed runs' packs are gone too
    assert full_codecs(repo) == {CODEC_PIECES}
    repo.close()
    assert "old" in outcomes


def test_upgrade_finishes_the_collection_a_killed_run_left(tmp_path):
    """A run killed after its commit (the format is new, a collection is
    marked) and before its collection leaves garbage packs: `upgrade` again
    finds nothing to convert but finishes that collection."""
    from rpofs.store import gc
    path = str(tmp_path / "r")
    repo = Repository.init(path)
    disk = bytearray(random.Random(2).randbytes(2 * CHUNK_SIZE))
    back_up(repo, [disk], [set()], "full", None, 10**6)
    orphan = os.path.join(repo.chunks_dir, schema.pack_name(99))
    with open(orphan, "wb") as f:  # what the killed run had written and no longer refers to
        f.write(os.urandom(4096))
    with repo.write_txn() as txn:
        gc.mark(repo, txn)
    repo.close()
    report = upgrade(path)
    assert report.packs_deleted == 1 and not os.path.exists(orphan)
    with Repository.open(path) as repo:
        check_repository(repo)
        assert not gc.pending(repo)
        assert DiskReader(repo, repo.points(VM)[0], "vda").read(0, len(disk)) == bytes(disk)
