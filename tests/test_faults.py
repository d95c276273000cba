"""Fault injection against a real LMDB and real pack files: the disk full
(ENOSPC on a small tmpfs) during a backup, a prune, a defrag and an upgrade;
LMDB's map full; prune, defrag and verify killed with SIGKILL at random
moments; a flipped bit that prune, compaction and defrag must neither copy
nor hide.

Each time: verify names exactly the damage (none, when the fault was only an
interruption) and nothing else; every point the fault did not touch reads
byte-exact; nothing already stored is lost; the next backup works.
(test_verify covers what verify reports for a flipped bit, a truncated or
deleted pack and a log block's record whose header lies.)

Truth: every point's disk as the digest of each 64 KiB block, so that
repositories of tens of MiB with dozens of points stay cheap to hold and to
compare (check_points reads each point whole, in one read)."""

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import blake3
import pytest

from rpofs.errors import NeedsUpgrade, RpofsError
from rpofs.store import defrag as defrag_mod
from rpofs.store import gc as gc_mod
from rpofs.store import repo as repo_mod
from rpofs.store import refs, schema, verify
from rpofs.store import upgrade as upgrade_mod
from rpofs.store.crypto import Passphrase
from rpofs.store.defrag import defrag
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, ChunkLocation
from rpofs.store.upgrade import upgrade
from synth import VM, back_up, write
from test_defrag import newest_scattered
from test_pieces import mixed_disk
from test_prune import check_repository
from test_upgrade import check_reads, old_repository
from test_verify import VM_A, VM_B, eio_blocks, flip, full_loc, pack_path, record, reported_blocks

pytestmark = pytest.mark.lmdb

US = 1_000_000
HOUR = 3600 * US
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(TESTS_DIR)


# -- the truth: every point's disk, block by block ------------------------------------------------

def digest(data) -> bytes:
    return blake3.blake3(data).digest()


class Disk:
    """An in-memory disk and the digest of each of its blocks, kept up to
    date as it is written: a point's truth is `digests()` at its backup."""

    def __init__(self, size: int, data: bytes = b""):
        self.data = bytearray(size)
        self.data[:len(data)] = data
        self._digests = [digest(self.data[b:b + BLOCK_SIZE]) for b in range(0, size, BLOCK_SIZE)]

    def write(self, dirty: set, offset: int, data: bytes) -> None:
        write(self.data, dirty, offset, data)
        for b in range(offset // BLOCK_SIZE, (offset + len(data) - 1) // BLOCK_SIZE + 1):
            self._digests[b] = digest(self.data[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])

    def write_blocks(self, dirty: set, blocks, rnd: random.Random) -> None:
        for b in sorted(blocks):
            self.write(dirty, b * BLOCK_SIZE, rnd.randbytes(min(BLOCK_SIZE, len(self.data) - b * BLOCK_SIZE)))

    def digests(self) -> tuple:
        return tuple(self._digests)

    def saved(self):
        return bytes(self.data), list(self._digests)

    def restore(self, saved) -> None:
        self.data[:] = saved[0]
        self._digests = list(saved[1])


class History:
    """A VM's disk and the truth of every point recorded from it."""

    def __init__(self, disk: Disk):
        self.disk = disk
        self.truth: dict[int, tuple] = {}
        self.newest = None

    def back_up(self, repo, dirty: set, kind: str, time_us: int):
        point = back_up(repo, [self.disk.data], [dirty], kind, None if kind == "full" else self.newest, time_us)
        self.truth[point.point] = self.disk.digests()
        self.newest = point
        return point


def check_points(repo, truth: dict[int, tuple], expected: set[int] | None = None) -> set[int]:
    """Every point of the VM is one we recorded (exactly `expected` if
    given) and reads, in one read of the whole disk, the bytes it had."""
    points = repo.points(VM)
    found = {p.point for p in points}
    assert found <= set(truth), f"points nobody recorded: {found - set(truth)}"
    if expected is not None:
        assert found == expected
    for p in points:
        data = DiskReader(repo, p, "vda").read(0, p.disks[0].size)
        got = [digest(data[b:b + BLOCK_SIZE]) for b in range(0, len(data), BLOCK_SIZE)]
        bad = [b for b, (x, y) in enumerate(zip(got, truth[p.point])) if x != y]
        assert len(data) == p.disks[0].size and not bad, f"point {p.point} reads other bytes in blocks {bad}"
    return found


def verified_clean(repo) -> verify.VerifyReport:
    """verify --read-data finds no problem (garbage is not one)."""
    report = verify.verify(repo, read_data=True)
    assert report.problems == [], "\n".join(verify.describe(report))
    return report


def pack_files(path: str) -> set[str]:
    return set(os.listdir(os.path.join(path, "chunks")))


def log_index(repo) -> dict[bytes, bytes]:
    with repo.env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=repo.db["log_index"])}


# -- a small filesystem to fill up ------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(where, size: str):
    """A tmpfs of its own at `where` (we run as root), unmounted afterwards."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield str(where)
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], check=True)
            raise AssertionError(f"{where} was still in use: a repository was left open")


@pytest.fixture
def small_fs(tmp_path):
    """16 MiB to fill up."""
    with tmpfs(tmp_path / "fs", "16m") as where:
        yield where


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(fs: str, leave: int) -> None:
    """Grow fs/filler until about `leave` bytes are free (0: none at all)."""
    fd = os.open(os.path.join(fs, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while (room := free_bytes(fs) - leave) > 0:
            os.write(fd, b"\xa5" * min(room, 1 << 20))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    assert free_bytes(fs) <= max(leave, 0) + 4096


def unfill(fs: str) -> None:
    os.unlink(os.path.join(fs, "filler"))


@pytest.fixture(params=["plain", "encrypted"])
def passphrase(request):
    """None for an unencrypted repository, else an encrypted one's passphrase."""
    return None if request.param == "plain" else "fault injection"


@contextlib.contextmanager
def opened(path: str, upgrading: bool = False, passphrase: str | None = None):
    repo = Repository.open(path, upgrading=upgrading, keys=Passphrase(lambda: passphrase))
    try:
        yield repo
    finally:
        repo.close()


# -- ENOSPC ---------------------------------------------------------------------------------------------

def test_a_backup_that_does_not_fit_records_nothing_and_the_next_one_works(small_fs, monkeypatch, passphrase):
    path = os.path.join(small_fs, "r")
    rnd = random.Random(1)
    repo = Repository.init(path, passphrase)
    try:
        vm = History(Disk(24 * CHUNK_SIZE, rnd.randbytes(3 * CHUNK_SIZE)))  # 384 blocks, 3 MiB of data
        vm.back_up(repo, set(), "full", US)
        for i in range(6):
            vm.disk.write_blocks(dirty := set(), rnd.sample(range(64), 4), rnd)
            vm.back_up(repo, dirty, "log", (2 + i) * US)
        points, packs = check_points(repo, vm.truth), pack_files(path)
        fill(small_fs, 256 << 10)

        # (1) the pack does not fit: a full of 3 MiB of new data
        vm.disk.write(set(), 0, rnd.randbytes(3 * CHUNK_SIZE))
        with pytest.raises(RpofsError, match="No space left on device"):
            back_up(repo, [vm.disk.data], [set()], "full", None, 20 * US)
        assert pack_files(path) == packs and check_points(repo, vm.truth) == points
        assert verified_clean(repo).garbage.packs == 0

        # (2) the pack fits, the catalog does not: the disk fills up while
        # the backup commits a log of 384 blocks (most became zeros)
        unfill(small_fs)
        real = repo_mod.BackupWriter._put_chunks

        def disk_full_now(self, txn):
            fill(small_fs, 0)
            return real(self, txn)

        vm.disk.write(dirty := set(range(384)), 0, bytes(3 * CHUNK_SIZE))
        vm.disk.write_blocks(dirty, [5, 300], rnd)
        with monkeypatch.context() as m:
            m.setattr(repo_mod.BackupWriter, "_put_chunks", disk_full_now)
            with pytest.raises(RpofsError, match="writing the catalog failed, nothing was recorded") as caught:
                back_up(repo, [vm.disk.data], [dirty], "log", vm.newest, 21 * US)
        assert type(caught.value) is RpofsError and caught.value.__cause__ is None
        assert pack_files(path) == packs and check_points(repo, vm.truth) == points
        assert verified_clean(repo).garbage.packs == 0

        # room again: the same open repository records both, and they read back
        unfill(small_fs)
        vm.back_up(repo, dirty, "log", 22 * US)
        vm.disk.write(set(), 0, rnd.randbytes(3 * CHUNK_SIZE))
        vm.back_up(repo, set(), "full", 23 * US)
        assert check_points(repo, vm.truth) == points | set(list(vm.truth)[-2:])
        report = verified_clean(repo)
        assert report.garbage.packs == 0 and report.garbage.records == 0
        check_repository(repo)
    finally:
        repo.close()


def ring_history(rnd: random.Random, ring: int) -> History:
    """A disk of 1 MiB of data (the full's) and `ring` blocks after it that logs write."""
    return History(Disk(CHUNK_SIZE + ring * BLOCK_SIZE, rnd.randbytes(CHUNK_SIZE)))


RING0 = CHUNK_SIZE // BLOCK_SIZE  # the first block of the ring


def test_a_prune_that_does_not_fit(small_fs, passphrase):
    """With no room at all the prune changes nothing. With room for its
    transaction but not for its compaction, the points go, and the
    compaction fails and leaves every record where it was: garbage, which
    the next prune that removes a point compacts once there is room."""
    path = os.path.join(small_fs, "r")
    rnd = random.Random(2)
    repo = Repository.init(path, passphrase)
    try:
        vm = ring_history(rnd, 32)
        full = vm.back_up(repo, set(), "full", US)
        hot = [RING0 + b for b in range(4)]
        for i in range(10):  # each log: 2 blocks of its own, and the 4 every log rewrites
            vm.disk.write_blocks(dirty := set(), hot + [RING0 + 4 + 2 * i, RING0 + 5 + 2 * i], rnd)
            vm.back_up(repo, dirty, "log", (2 + i) * US)
        packs, points = pack_files(path), set(vm.truth)

        # (1) not even the catalog's transaction fits: nothing changes
        fill(small_fs, 0)
        with pytest.raises(RpofsError, match="writing the catalog failed, nothing was recorded"):
            prune(repo, VM, Retention(last=1))
        assert pack_files(path) == packs
        check_points(repo, vm.truth, points)
        verified_clean(repo)
        unfill(small_fs)

        # (2) the compaction does not fit: the 9 sparse packs' live blocks (1.1 MiB)
        fill(small_fs, 512 << 10)
        with pytest.raises(RpofsError, match="No space left on device"):
            prune(repo, VM, Retention(last=1))
        assert check_points(repo, vm.truth) == {full.point, vm.newest.point}
        assert pack_files(path) == packs  # nothing deleted, the copy discarded
        left = verified_clean(repo).garbage
        assert left.packs == 0 and left.records == 9 * 4  # the hot blocks of the 9 removed logs
        unfill(small_fs)
        vm.disk.write_blocks(dirty := set(), [RING0 + 30], rnd)
        vm.back_up(repo, dirty, "log", 20 * US)
        report = prune(repo, VM, Retention(last=1))
        assert report.packs_compacted >= 9
        assert check_points(repo, vm.truth) == {full.point, vm.newest.point}
        assert verified_clean(repo).garbage.bytes < left.bytes
        check_repository(repo)
    finally:
        repo.close()


def test_a_defrag_that_does_not_fit(small_fs, monkeypatch, passphrase):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    path = os.path.join(small_fs, "r")
    rnd = random.Random(3)
    repo = Repository.init(path, passphrase)
    try:
        vm = ring_history(rnd, 64)
        vm.back_up(repo, set(), "full", US)
        for i in range(16):
            vm.disk.write_blocks(dirty := set(), [RING0 + b for b in rnd.sample(range(64), 3)], rnd)
            vm.back_up(repo, dirty, "log", (2 + i) * US)
        scattered = newest_scattered(repo, vm.newest)
        entries, packs, points = log_index(repo), pack_files(path), set(vm.truth)

        # (1) the moved blocks do not fit: nothing changes
        fill(small_fs, 512 << 10)
        with pytest.raises(RpofsError, match="No space left on device"):
            defrag(repo, VM)
        assert log_index(repo) == entries and pack_files(path) == packs
        assert newest_scattered(repo, vm.newest) == scattered and len(scattered) > 16
        check_points(repo, vm.truth, points)
        assert verified_clean(repo).garbage.packs == 0

        # (2) they fit, and the disk fills up before the compaction
        unfill(small_fs)
        real = defrag_mod.gc.compact

        def disk_full_now(*args, **kwargs):
            fill(small_fs, 0)
            return real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(defrag_mod.gc, "compact", disk_full_now)
            with pytest.raises(RpofsError, match="No space left on device"):
                defrag(repo, VM)
        assert newest_scattered(repo, vm.newest) == []  # the move was committed
        check_points(repo, vm.truth, points)
        verified_clean(repo)

        # room again
        unfill(small_fs)
        vm.disk.write_blocks(dirty := set(), [RING0 + 63], rnd)
        vm.back_up(repo, dirty, "log", 40 * US)
        defrag(repo, VM)
        check_points(repo, vm.truth, points | {vm.newest.point})
        verified_clean(repo)
    finally:
        repo.close()


def test_an_upgrade_that_does_not_fit(small_fs, monkeypatch):
    path = os.path.join(small_fs, "r")
    rnd = random.Random(4)
    truth = old_repository(path, rnd, monkeypatch, 3, size=4 * CHUNK_SIZE + 5000)
    with opened(path, upgrading=True) as repo:
        with repo.env.begin() as txn:
            need = sum(schema.PACK_HEADER.size + loc.stored_len
                       for loc in upgrade_mod.whole_full_chunks(repo, txn).values())
    packs = pack_files(path)
    assert need > 1 << 20

    def unchanged():
        with pytest.raises(NeedsUpgrade):
            Repository.open(path)
        check_reads(path, truth, upgrading=True)
        assert pack_files(path) == packs
        with opened(path, upgrading=True) as repo:
            assert verified_clean(repo).garbage.packs == 0

    # (1) it looks first, and says so
    fill(small_fs, need // 2)
    with pytest.raises(RpofsError, match="upgrade needs about"):
        upgrade(path)
    unchanged()

    # (2) there was room when it looked, and then there was not
    unfill(small_fs)
    real = upgrade_mod._check_room

    def room_then_none(repo, whole):
        real(repo, whole)
        fill(small_fs, need // 4)

    with monkeypatch.context() as m:
        m.setattr(upgrade_mod, "_check_room", room_then_none)
        with pytest.raises(RpofsError, match="No space left on device"):
            upgrade(path)
    unchanged()

    # room again
    unfill(small_fs)
    assert upgrade(path).chunks_converted > 0
    check_reads(path, truth)
    with opened(path) as repo:
        assert repo.format() == schema.FORMAT
        verified_clean(repo)
        newest = repo.points(VM)[-1]
        disk = bytearray(truth[newest.point])
        write(disk, dirty := set(), 3 * BLOCK_SIZE + 7, rnd.randbytes(2 * BLOCK_SIZE))
        after = back_up(repo, [disk], [dirty], "log", newest, 50 * US)
        assert DiskReader(repo, after, "vda").read(0, len(disk)) == disk
        check_repository(repo)


# -- LMDB's map full ------------------------------------------------------------------------------

def test_lmdb_map_full(tmp_path, monkeypatch):
    """A catalog in a map of 256 KiB: logs that rewrite all 512 blocks of a
    disk (most with zeros) until one does not fit."""
    path = str(tmp_path / "r")
    rnd = random.Random(5)
    with monkeypatch.context() as m:
        m.setattr(repo_mod, "MAP_SIZE", 256 << 10)
        repo = Repository.init(path)
        try:
            vm = History(Disk(32 * CHUNK_SIZE, rnd.randbytes(2 * CHUNK_SIZE)))  # 512 blocks
            vm.back_up(repo, set(), "full", US)
            for i in range(1, 40):
                points, packs, before = set(vm.truth), pack_files(path), vm.disk.saved()
                vm.disk.write(dirty := set(range(512)), 0, bytes(2 * CHUNK_SIZE))
                vm.disk.write_blocks(dirty, rnd.sample(range(512), 2), rnd)
                try:
                    vm.back_up(repo, dirty, "log", (1 + i) * US)
                except RpofsError as e:
                    caught = e
                    break
            else:
                raise AssertionError("the map never filled up")
            assert i > 1 and "MDB_MAP_FULL" in str(caught)
            assert type(caught) is RpofsError and "nothing was recorded" in str(caught)
            assert pack_files(path) == packs
            check_points(repo, vm.truth, points)
            assert verified_clean(repo).garbage.packs == 0
            # what still fits is recorded
            failed = vm.disk.saved()
            vm.disk.restore(before)
            vm.disk.write_blocks(small := set(), [7], rnd)
            vm.back_up(repo, small, "log", 100 * US)
            points.add(vm.newest.point)
        finally:
            repo.close()
    assert repo_mod.MAP_SIZE == 1 << 40
    with opened(path) as repo:  # the usual map: the backup that did not fit goes in
        vm.disk.restore(failed)
        vm.back_up(repo, dirty | small, "log", 101 * US)
        check_points(repo, vm.truth, points | {vm.newest.point})
        verified_clean(repo)
        check_repository(repo)


# -- SIGKILL at random moments ------------------------------------------------------------------------

CHILD = """
import os, sys
from rpofs.store.crypto import Passphrase
from rpofs.store.repo import Repository
op, path, vm = sys.argv[1:4]
repo = Repository.open(path, keys=Passphrase(lambda: os.environ.get("RPOFS_PASSPHRASE")))
if op == "prune":
    from rpofs.store.prune import Retention, prune
    run = lambda: prune(repo, vm, Retention(hourly=int(sys.argv[4])))
elif op == "defrag":
    from rpofs.store.defrag import defrag
    run = lambda: defrag(repo, vm)
else:
    from rpofs.store import verify
    run = lambda: verify.save(path, verify.verify(repo, read_data=True))
print("ready", flush=True)
run()
repo.close()
print("done", flush=True)
"""
HOURLY = 1000   # prune's policy in these tests: the newest point of each hour


def child_env(passphrase: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("RPOFS_PASSPHRASE", None)
    if passphrase is not None:
        env["RPOFS_PASSPHRASE"] = passphrase
    return env


def start(op: str, path: str, passphrase: str | None) -> subprocess.Popen:
    """The operation in a process of its own, once it has opened the
    repository: what follows "ready" is the operation itself."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, op, path, VM, str(HOURLY)], stdout=subprocess.PIPE,
                            text=True, env=child_env(passphrase))
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(f"{op} did not start")
    return proc


def whole_run(op: str, path: str, passphrase: str | None) -> float:
    """Seconds the operation takes, uninterrupted."""
    proc = start(op, path, passphrase)
    began = time.monotonic()
    with proc.stdout:
        assert proc.stdout.read() == "done\n"
    assert proc.wait() == 0
    return time.monotonic() - began


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The kill tests' repositories and their copies, on a tmpfs: with no
    fsync to wait for, one run of an operation takes about as long as the
    next, so the moments drawn from a measured run fall inside the others."""
    with tmpfs(tmp_path_factory.mktemp("kill") / "fs", "1g") as where:
        yield where


@pytest.fixture(scope="module", params=["plain", "encrypted"])
def kill_passphrase(request):
    return None if request.param == "plain" else "killed at random"


def kill_at_random_moments(scratch: str, source, op: str, rnd: random.Random, attempts: int, check) -> list[bool]:
    """Measure whole runs on copies (the median of three), then, each attempt
    on a fresh copy that this process keeps open (as the ingest daemon and a
    mount do), SIGKILL the operation at a uniformly random fraction of that
    time, and check(repository, path). Returns, per attempt, whether the kill
    found the operation still running."""
    pristine, passphrase = source.path, source.passphrase
    runs = []
    for i in range(3):
        probe = os.path.join(scratch, f"{op}-probe")
        shutil.copytree(pristine, probe)
        try:
            runs.append(whole_run(op, probe, passphrase))
        finally:
            shutil.rmtree(probe)
    seconds = sorted(runs)[1]
    running = []
    for attempt in range(attempts):
        path = os.path.join(scratch, f"{op}-{attempt}")
        shutil.copytree(pristine, path)
        try:
            with opened(path, passphrase=passphrase) as repo:
                proc = start(op, path, passphrase)
                with proc.stdout:
                    time.sleep(rnd.uniform(0, 1) * seconds)
                    running.append(proc.poll() is None)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                check(repo, path)
        finally:
            shutil.rmtree(path)
    assert any(running), f"{op} (measured {runs} s) had always ended before the kill"
    return running


class Source(NamedTuple):
    path: str              # the repository to copy for each attempt
    vm: History            # the truth of its points
    passphrase: str | None


T0 = 472_223 * HOUR  # on the hour


@pytest.fixture(scope="module")
def prune_source(scratch, kill_passphrase):
    """A chain of 60 logs, two an hour (76 MiB of packs): the first of each
    hour writes 24 blocks of a 64-block ring, and the second rewrites 16 of
    them. Pruning to the newest point of each hour drops the first ones and
    leaves their packs a third in use: the compaction copies 15 MiB."""
    rnd = random.Random(7)
    path = os.path.join(scratch, "prune")
    repo = Repository.init(path, kill_passphrase)
    vm = ring_history(rnd, 64)
    vm.back_up(repo, set(), "full", T0)
    for hour in range(1, 31):
        blocks = [RING0 + b for b in rnd.sample(range(64), 24)]
        vm.disk.write_blocks(dirty := set(), blocks, rnd)
        vm.back_up(repo, dirty, "log", T0 + hour * HOUR + 60 * US)
        vm.disk.write_blocks(dirty := set(), blocks[8:], rnd)
        vm.back_up(repo, dirty, "log", T0 + hour * HOUR + 120 * US)
    repo.close()
    yield Source(path, vm, kill_passphrase)
    shutil.rmtree(path)


def then_a_backup(repo, vm: History, rnd: random.Random, after_us: int) -> History:
    """A new log extends the repository's newest point, `after_us` later;
    returns the truth with it (the source's stays as it was)."""
    history = History(vm.disk)
    history.truth, history.newest = dict(vm.truth), repo.points(VM)[-1]
    saved = vm.disk.saved()
    try:
        vm.disk.write_blocks(dirty := set(), [RING0 + 3, RING0 + 60], rnd)
        history.back_up(repo, dirty, "log", history.newest.time_us + after_us)
    finally:
        vm.disk.restore(saved)
    return history


def test_prune_killed_at_random_moments(scratch, prune_source):
    vm = prune_source.vm
    before = set(vm.truth)
    full = min(before)
    after = {p for p in before if (p - full) % 2 == 0}  # the full, and the second log of each hour
    rnd = random.Random(8)
    outcomes = []

    def check(repo, path):
        kept = check_points(repo, vm.truth)
        assert kept in (before, after)
        outcomes.append("before" if kept == before else "after")
        verified_clean(repo)
        prune(repo, VM, Retention(hourly=HOURLY))
        assert {p.point for p in repo.points(VM)} == after
        # the next backup, in the newest point's hour: the prune after it
        # removes that point, and collects whatever the kill left
        history = then_a_backup(repo, vm, rnd, 60 * US)
        prune(repo, VM, Retention(hourly=HOURLY))
        check_points(repo, history.truth, after - {history.newest.parent} | {history.newest.point})
        assert verified_clean(repo).garbage.packs == 0
        check_repository(repo)

    kill_at_random_moments(scratch, prune_source, "prune", rnd, 6, check)
    assert set(outcomes) <= {"before", "after"}


@pytest.fixture(scope="module")
def defrag_source(scratch, kill_passphrase):
    """A chain of 40 logs, each writing 12 blocks of a 128-block ring (30 MiB
    of packs): the newest point reads some 120 blocks from as many short
    runs, which defrag moves, and the packs it leaves partly in use are
    compacted."""
    rnd = random.Random(9)
    path = os.path.join(scratch, "defrag")
    repo = Repository.init(path, kill_passphrase)
    vm = ring_history(rnd, 128)
    vm.back_up(repo, set(), "full", US)
    for i in range(40):
        vm.disk.write_blocks(dirty := set(), [RING0 + b for b in rnd.sample(range(128), 12)], rnd)
        vm.back_up(repo, dirty, "log", (2 + i) * US)
    repo.close()
    yield Source(path, vm, kill_passphrase)
    shutil.rmtree(path)


def then_a_backup_and_a_prune(repo, vm: History, rnd: random.Random) -> None:
    """A new log extends the newest point; a prune removes the oldest log
    (and collects whatever garbage the kill left); everything reads."""
    history = then_a_backup(repo, vm, rnd, US)
    points = repo.points(VM)
    removed = prune(repo, VM, Retention(last=len(points) - 2)).points_removed  # the full stays: the base
    assert [p.point for p in removed] == [points[1].point]
    check_points(repo, history.truth, {p.point for p in points} - {points[1].point})
    assert verified_clean(repo).garbage.packs == 0
    check_repository(repo)


def test_defrag_killed_at_random_moments(scratch, defrag_source):
    vm = defrag_source.vm
    with opened(defrag_source.path, passphrase=defrag_source.passphrase) as repo:
        scattered = len(newest_scattered(repo, vm.newest))
    assert scattered > 100
    rnd = random.Random(10)
    outcomes = []

    def check(repo, path):
        check_points(repo, vm.truth, set(vm.truth))
        verified_clean(repo)
        left = len(newest_scattered(repo, vm.newest))
        outcomes.append("before" if left == scattered else "moved" if left == 0 else left)
        report = defrag(repo, VM)
        assert report.blocks_moved == left and report.scattered_left == 0
        assert newest_scattered(repo, vm.newest) == []
        then_a_backup_and_a_prune(repo, vm, rnd)

    kill_at_random_moments(scratch, defrag_source, "defrag", rnd, 6, check)
    assert set(outcomes) <= {"before", "moved"}  # one transaction moves them all


def test_verify_killed_at_random_moments(scratch, defrag_source):
    vm = defrag_source.vm
    rnd = random.Random(11)

    def check(repo, path):
        results = os.path.join(path, verify.RESULTS)
        if os.path.exists(results):  # the last complete run's results, never half a file
            with open(results, "rb") as f:
                assert set(json.load(f)["vms"]) == {VM}
        verified_clean(repo)
        check_points(repo, vm.truth, set(vm.truth))
        then_a_backup_and_a_prune(repo, vm, rnd)

    kill_at_random_moments(scratch, defrag_source, "verify", rnd, 5, check)


# -- a flipped bit, then prune, compaction and defrag -----------------------------------------------

def log_loc(repo, point, block) -> ChunkLocation:
    with repo.env.begin() as txn:
        value = txn.get(schema.log_key(point.chain, 0, block, point.point), db=repo.db["log_index"])
    return schema.read_log_value(value, BLOCK_SIZE)


def named_exactly(repo, places: set[tuple[int, int]]) -> verify.VerifyReport:
    """verify --read-data names the damaged records (pack, offset) and no
    other, and the byte ranges it says read EIO are exactly those that do
    (eio_blocks also reads every other block against its truth)."""
    report = verify.verify(repo, read_data=True)
    assert {(p.pack, p.offset) for p in report.problems} == places, "\n".join(verify.describe(report))
    assert {p.kind for p in report.problems} <= {"corrupt"}
    eio = eio_blocks(repo)
    assert reported_blocks(report) == eio
    assert bool(eio) == bool(places)
    return report


def test_a_flipped_bit_is_neither_copied_nor_hidden_by_prune_compaction_and_defrag(tmp_path, monkeypatch,
                                                                                  passphrase):
    monkeypatch.setattr(defrag_mod, "MIN_SCATTERED", 1)
    rnd = random.Random(6)
    repo = Repository.init(str(tmp_path / "r"), passphrase)
    repo.truth = {}
    try:
        disk = mixed_disk(rnd, 5 * CHUNK_SIZE + 3 * BLOCK_SIZE + 100)
        b_disk = bytearray(disk)
        b_disk[:4 * CHUNK_SIZE] = rnd.randbytes(4 * CHUNK_SIZE)  # beta shares alpha's chunks 4 and 5 only
        first = p = record(repo, VM_A, "alpha", disk, None, "full", None, 1 * US)
        repo.truth[p.point] = bytes(disk)
        logs = []
        for i in range(6):  # blocks 2 and 3 rewritten by every log, and one of each log's own
            dirty = {2, 3, 17 + 5 * i}
            for b in dirty:
                disk[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] = rnd.randbytes(BLOCK_SIZE)
            p = record(repo, VM_A, "alpha", disk, dirty, "log", p, (2 + i) * US)
            repo.truth[p.point] = bytes(disk)
            logs.append(p)
        q = record(repo, VM_B, "beta", b_disk, None, "full", None, 8 * US)
        repo.truth[q.point] = bytes(b_disk)
        disk[:CHUNK_SIZE] = rnd.randbytes(CHUNK_SIZE)
        p = record(repo, VM_A, "alpha", disk, None, "full", None, 9 * US)
        repo.truth[p.point] = bytes(disk)
        disk[40 * BLOCK_SIZE:41 * BLOCK_SIZE] = rnd.randbytes(BLOCK_SIZE)
        p = record(repo, VM_A, "alpha", disk, {40}, "log", p, 10 * US)
        repo.truth[p.point] = bytes(disk)

        bad_log = log_loc(repo, logs[2], 17 + 5 * 2)       # read by every later point of chain 1
        flip(repo, bad_log.pack, bad_log.offset + 9)
        bad_full = full_loc(repo, first.chain, 4)           # alpha's first full and beta's
        flip(repo, bad_full.pack, bad_full.offset + repo.reader.sealed_len(bad_full) - 100)  # in its last piece
        both = {(bad_log.pack, bad_log.offset), (bad_full.pack, bad_full.offset)}
        named_exactly(repo, both)

        # prune: the removed logs' packs keep one live block in four: compacted,
        # but for the damaged one, left where it is (and still damaged)
        report = prune(repo, VM_A, Retention(last=3))
        assert [x.point for x in report.points_removed] == [x.point for x in logs[:5]]
        assert report.packs_compacted == 4 and os.path.exists(pack_path(repo, bad_log.pack))
        named_exactly(repo, both)

        # defrag moves chain 1's newest point's blocks, not the damaged one
        report = defrag(repo, VM_A)
        assert report.blocks_moved > 0 and report.scattered_left == 1
        named_exactly(repo, both)

        # chain 1 goes, and its damaged log block with it; the first full's
        # pack, now mostly garbage, keeps the chunks alpha's second full and
        # beta share with it, one of them damaged: left where it is
        report = prune(repo, VM_A, Retention(last=1))
        assert first.point in {x.point for x in report.points_removed}
        assert not os.path.exists(pack_path(repo, bad_log.pack)) and os.path.exists(pack_path(repo, bad_full.pack))
        with repo.env.begin() as txn:
            live = refs.bytes_in_use(repo, txn)[bad_full.pack]
        assert live < gc_mod.COMPACT_BELOW * os.path.getsize(pack_path(repo, bad_full.pack))  # worth compacting
        assert full_loc(repo, q.chain, 4) == bad_full
        named_exactly(repo, {(bad_full.pack, bad_full.offset)})

        # the next backups work, and a point that still reads the damage says so
        b_disk[10:20] = b"beta again"
        q = record(repo, VM_B, "beta", b_disk, {0}, "log", q, 11 * US)
        repo.truth[q.point] = bytes(b_disk)
        disk[:10] = b"alpha more"
        p = record(repo, VM_A, "alpha", disk, {0}, "log", p, 12 * US)
        repo.truth[p.point] = bytes(disk)
        report = named_exactly(repo, {(bad_full.pack, bad_full.offset)})
        affected = {(a.vm_name, a.point) for x in report.problems for a in x.affects}
        assert ("beta", q.point) in affected and ("alpha", p.point) in affected  # alpha's new full shares it too
    finally:
        repo.close()


# -- a process killed inside a catalog transaction, while another keeps the catalog open --------------

HOLD = """
import sys, time
from rpofs.store import gc
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
where, path, vm = sys.argv[1:4]
repo = Repository.open(path)
if where == "write":       # inside prune's write transaction
    real = gc.drop_unused_chunks
    def hold(repo, txn):
        print("holding", flush=True)
        time.sleep(60)
        return real(repo, txn)
    gc.drop_unused_chunks = hold
else:                      # inside the compaction's copy, whose read transaction lasts as long
    real = repo.reader.verified
    def hold(key, loc):
        print("holding", flush=True)
        time.sleep(60)
        return real(key, loc)
    repo.reader.verified = hold
prune(repo, vm, Retention(last=1))
"""


def kill_prune_holding(path: str, where: str) -> None:
    """SIGKILL a prune while it is inside its write transaction ("write") or
    inside the compaction's read transaction ("read")."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, where, path, VM], stdout=subprocess.PIPE, text=True,
                            env=child_env(None))
    with proc.stdout:
        holding = proc.stdout.readline() == "holding\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holding, "the prune never got there"


def three_log_chain(repo, rnd) -> History:
    """A full and logs that rewrite each other's blocks: pruning to the
    newest point drops entries and leaves packs to compact."""
    vm = ring_history(rnd, 16)
    vm.back_up(repo, set(), "full", US)
    for i in range(3):
        vm.disk.write_blocks(dirty := set(), [RING0, RING0 + 1, RING0 + 2 + i], rnd)
        vm.back_up(repo, dirty, "log", (2 + i) * US)
    return vm


def test_a_prune_killed_inside_its_write_transaction_does_not_stop_the_next_writer(tmp_path):
    """LMDB's writer lock is a robust mutex in the lock file: a process
    killed holding it must not leave every later writer waiting (the ingest
    daemon keeps the catalog open meanwhile)."""
    path = str(tmp_path / "r")
    rnd = random.Random(12)
    repo = Repository.init(path)
    try:
        vm = three_log_chain(repo, rnd)
        kill_prune_holding(path, "write")
        done = []

        def backup():
            vm.disk.write_blocks(dirty := set(), [RING0 + 9], rnd)
            done.append(vm.back_up(repo, dirty, "log", 10 * US))

        thread = threading.Thread(target=backup, daemon=True)
        thread.start()
        thread.join(30)
        assert done, "the backup after the killed prune still waits for the catalog's writer lock"
        check_points(repo, vm.truth, set(vm.truth))  # the killed prune removed nothing
        prune(repo, VM, Retention(last=1))
        check_points(repo, vm.truth, {min(vm.truth), vm.newest.point})
        verified_clean(repo)
        check_repository(repo)
    finally:
        repo.close()


def test_a_reader_killed_while_the_catalog_stays_open_does_not_make_it_grow(tmp_path):
    """A prune killed in its compaction (whose read transaction lasts the
    whole copy; verify's catalog walk and upgrade's conversion hold one as
    long) while this process keeps the repository open, as the ingest daemon
    does: then 150 backups and 15 prunes. Without the dead reader the
    catalog stays at about 200 KiB."""
    path = str(tmp_path / "r")
    rnd = random.Random(13)
    repo = Repository.init(path)
    try:
        vm = three_log_chain(repo, rnd)
        kill_prune_holding(path, "read")
        for i in range(150):
            vm.disk.write_blocks(dirty := set(), [RING0 + i % 16], rnd)
            vm.back_up(repo, dirty, "log", (10 + i) * US)
            if i % 10 == 9:
                prune(repo, VM, Retention(last=3))
        check_points(repo, vm.truth)
        verified_clean(repo)
        size = os.path.getsize(os.path.join(path, "catalog", "data.mdb"))
        assert size < 1 << 20, f"the catalog grew to {size} bytes; stale readers: {repo.env.readers()}"
    finally:
        repo.close()


def test_the_next_prune_frees_what_an_interrupted_one_left(tmp_path, monkeypatch):
    """A prune whose compaction fails (out of room: see
    test_a_prune_that_does_not_fit), then, with room again, the same prune:
    it must leave what an uninterrupted prune leaves."""
    path, control = str(tmp_path / "r"), str(tmp_path / "control")
    rnd = random.Random(14)
    repo = Repository.init(path)
    three_log_chain(repo, rnd)
    repo.close()
    shutil.copytree(path, control)
    with opened(control) as repo:
        prune(repo, VM, Retention(last=1))
        clean = verified_clean(repo).garbage
    assert clean.bytes == 0
    with opened(path) as repo:
        with monkeypatch.context() as m:
            def no_room(*args, **kwargs):
                raise RpofsError("writing pack-00000009: No space left on device")
            m.setattr(gc_mod, "compact", no_room)
            with pytest.raises(RpofsError):
                prune(repo, VM, Retention(last=1))
        assert verified_clean(repo).garbage.bytes > 0
        prune(repo, VM, Retention(last=1))
        assert verified_clean(repo).garbage == clean


def test_a_full_chunks_record_header_that_lies(tmp_path):
    """test_verify's lying header is a log block's (whose reads check the
    header); here a full chunk's raw length in its header is one more."""
    rnd = random.Random(15)
    repo = Repository.init(str(tmp_path / "r"))
    repo.truth = {}
    try:
        disk = mixed_disk(rnd, 3 * CHUNK_SIZE)
        p = record(repo, VM_A, "alpha", disk, None, "full", None, US)
        repo.truth[p.point] = bytes(disk)
        loc = full_loc(repo, p.chain, 1)
        at = loc.offset - schema.PACK_HEADER.size + 33
        with open(pack_path(repo, loc.pack), "r+b") as f:
            f.seek(at)
            raw = int.from_bytes(f.read(4), "big")
            f.seek(at)
            f.write((raw + 1).to_bytes(4, "big"))
        report = verify.verify(repo, read_data=True)
        assert {x.kind for x in report.problems} <= {"header"}
        assert reported_blocks(report) == eio_blocks(repo)
    finally:
        repo.close()
