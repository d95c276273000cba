"""The mount's tree without FUSE, then a real FUSE mount of a repository
filled without libvirt: errors become EIO for the damaged range only."""

import dataclasses
import json
import errno
import os
import random
import signal
import subprocess

import pytest

from rpofs.mount.vfs import ROOT_INO, NoSuchEntry, NotADirectory, Tree
from rpofs.store.repo import Repository
from rpofs.store import schema
from rpofs.store.schema import CHUNK_SIZE, ChunkLocation
from rpofs.timefmt import US
from synth import VM, back_up, write
from vmlab import mounted, run_rpofs, wait_for

pytestmark = pytest.mark.fuse

T0 = 1_795_546_770 * US  # 2026-11-24T18:59:30Z


def fill(path, rnd):
    repo = Repository.init(str(path))
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE)) + bytearray(CHUNK_SIZE // 2)
    full = back_up(repo, [disk], [set()], "full", None, T0)
    write(disk, dirty := set(), 5000, b"\x01" * 3000)
    log1 = back_up(repo, [disk], [dirty], "log", full, T0 + 10 * US + 250_000)
    write(disk, dirty := set(), CHUNK_SIZE + 7, b"\x02" * 100)
    log2 = back_up(repo, [disk], [dirty], "log", log1, T0 + 10 * US + 750_000)
    return repo, disk, (full, log1, log2)


def test_tree_names_as_of_and_new_points(tmp_path):
    repo, disk, (full, log1, log2) = fill(tmp_path / "r", random.Random(1))
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    names = [n for n, _ in tree.readdir(vm.ino)]
    # the second point in a second gets the fewest digits that make its name new
    assert names == ["at", "latest", "2026-11-24T18:59:30Z", "2026-11-24T18:59:40Z", "2026-11-24T18:59:40.7Z"]
    assert tree.readlink(tree.lookup(vm.ino, "latest").ino) == "2026-11-24T18:59:40.7Z"
    at = tree.lookup(vm.ino, "at")
    assert tree.readdir(at.ino) == []
    for text, expected in [("2026-11-24T18:59:40.2Z", "2026-11-24T18:59:40Z"),  # as of 40.2xxxxx: log1
                           ("2026-11-24T18:59:40Z", "2026-11-24T18:59:40Z"),  # a point's name: that point
                           ("2026-11-24T18:59:40.9Z", "2026-11-24T18:59:40.7Z"),
                           ("2026-11-24T19:59:35+01:00", "2026-11-24T18:59:30Z"),
                           (str(T0 // US + 5), "2026-11-24T18:59:30Z")]:
        assert tree.readlink(tree.lookup(at.ino, text).ino) == "../" + expected, text
    for bad in ("2026-11-24T18:59:29Z", "2026-11-24T18:59:35", "soon"):
        with pytest.raises(NoSuchEntry):
            tree.lookup(at.ino, bad)
    by_uuid = tree.lookup(ROOT_INO, ".by-uuid")  # a path to the VM that no name clash changes
    assert [n for n, _ in tree.readdir(by_uuid.ino)] == [VM]
    assert tree.readlink(tree.lookup(by_uuid.ino, VM).ino) == "../m"
    with pytest.raises(NoSuchEntry):
        tree.lookup(by_uuid.ino, "00000000-0000-0000-0000-000000000000")
    point = tree.lookup(vm.ino, "2026-11-24T18:59:40Z")
    assert [n for n, _ in tree.readdir(point.ino)] == ["vda.raw", "point.json", "domain.xml", "files"]
    raw = tree.lookup(point.ino, "vda.raw")
    assert raw.size == len(disk)
    with pytest.raises(NotADirectory):
        tree.lookup(raw.ino, "x")
    # a point committed later appears, appended: earlier offsets stay valid
    write(disk, dirty := set(), 0, b"\x03")
    back_up(repo, [disk], [dirty], "log", log2, T0 + 20 * US)
    assert [n for n, _ in tree.readdir(vm.ino)][:5] == names
    assert tree.readlink(tree.lookup(vm.ino, "latest").ino) == "2026-11-24T18:59:50Z"
    newest = tree.lookup(tree.lookup(vm.ino, "2026-11-24T18:59:50Z").ino, "vda.raw")
    assert tree.open(newest.ino).read(0, 10) == bytes(disk[:10])
    # another point in that same second: the name printed before keeps naming its point
    p4 = repo.points(VM)[-1]
    write(disk, dirty := set(), 1, b"\x04")
    back_up(repo, [disk], [dirty], "log", p4, T0 + 20 * US + 500_000)
    assert [n for n, _ in tree.readdir(vm.ino)][5:] == ["2026-11-24T18:59:50Z", "2026-11-24T18:59:50.5Z"]
    assert tree.readlink(tree.lookup(at.ino, "2026-11-24T18:59:50Z").ino) == "../2026-11-24T18:59:50Z"
    assert repo.point_at("m", "2026-11-24T18:59:50Z").point == p4.point
    p = tree.lookup(tree.lookup(vm.ino, "2026-11-24T18:59:50.5Z").ino, "vda.raw")
    assert tree.open(p.ino).read(0, 3) == bytes(disk[:3])
    repo.close()


def test_points_from_before_names_were_stored_keep_their_names(tmp_path):
    """Unnamed records (an older repository) are named as they were; the
    next point in their second, or a prune there, stores those names."""
    repo, disk, (full, log1, log2) = fill(tmp_path / "r", random.Random(1))
    with repo.write_txn() as txn:
        for p in repo.points(VM):
            txn.put(schema.point_key(p.point), dataclasses.replace(p, name="").encode(), db=repo.db["points"])
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    old = ["2026-11-24T18:59:30Z", "2026-11-24T18:59:40.2Z", "2026-11-24T18:59:40.7Z"]
    assert [n for n, _ in tree.readdir(vm.ino)][2:] == old
    write(disk, dirty := set(), 0, b"\x05")
    new = back_up(repo, [disk], [dirty], "log", log2, T0 + 10 * US + 900_000)
    # the names of that second are stored now; the other second's point keeps its unstored name
    assert [p.name for p in repo.points(VM)] == [""] + old[1:] + [new.name] and new.name not in old
    assert [n for n, _ in tree.readdir(vm.ino)][2:] == old + [new.name]
    assert repo.point_at("m", "2026-11-24T18:59:40.2Z").point == log1.point


def test_corrupt_chunk_gives_eio_for_its_range_only(tmp_path):
    repo, disk, points = fill(tmp_path / "r", random.Random(2))
    # flip one stored byte of the full's second chunk, in its second 64 KiB piece
    with repo.env.begin() as txn:
        key = txn.get(schema.full_key(points[0].chain, 0, 1), db=repo.db["full_index"])
        loc = ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))
    repo.close()
    pack = tmp_path / "r" / "chunks" / f"pack-{loc.pack:08d}"
    at = loc.offset + schema.piece_table_len(loc.raw_len) + 64 * 1024 + 1000  # random data: raw pieces
    with open(pack, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    with mounted(tmp_path / "r", tmp_path / "mnt") as mnt:
        path = mnt / "m" / "latest" / "vda.raw"
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == bytes(disk[:4096])
            assert os.pread(fd, 4096, 2 * CHUNK_SIZE) == bytes(disk[2 * CHUNK_SIZE:2 * CHUNK_SIZE + 4096])
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, CHUNK_SIZE + 64 * 1024)
            assert e.value.errno == errno.EIO
            # the same chunk's other pieces still read
            assert os.pread(fd, 4096, CHUNK_SIZE + 128 * 1024) == bytes(disk[CHUNK_SIZE + 128 * 1024:][:4096])
        finally:
            os.close(fd)
    log = (tmp_path / "r" / "mount.log").read_text()
    assert "piece 1: content does not match its hash" in log and "disk vda" in log


def test_kill_9_of_the_mount_then_umount_and_mount_again(tmp_path):
    repo, disk, _ = fill(tmp_path / "r", random.Random(3))
    repo.close()
    mnt = tmp_path / "mnt"
    with mounted(tmp_path / "r", mnt):
        pid = int(subprocess.run(["pgrep", "-f", f"mount {mnt} --foreground"], capture_output=True,
                                 text=True, check=True).stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the mount daemon to die")
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN
        r = run_rpofs("mount", mnt, repo=tmp_path / "r", check=False)
        assert r.returncode == 1 and "daemon died" in r.stderr
        run_rpofs("umount", mnt)
        run_rpofs("mount", mnt, repo=tmp_path / "r")
        with open(mnt / "m" / "latest" / "vda.raw", "rb") as f:
            assert f.read() == bytes(disk)


def test_du_of_a_disk_shows_what_is_stored_and_df_the_repositorys_filesystem(tmp_path):
    repo, disk, (full, log1, log2) = fill(tmp_path / "r", random.Random(4))
    # 2 MiB of random data stored raw, the zero half MiB not at all, plus two small log blocks
    assert 2 * schema.CHUNK_SIZE < log2.stats["disk_bytes"]["vda"] < 2 * schema.CHUNK_SIZE + 3 * 65536
    assert full.stats["disk_bytes"]["vda"] <= log1.stats["disk_bytes"]["vda"] <= log2.stats["disk_bytes"]["vda"]
    repo.close()
    with mounted(tmp_path / "r", tmp_path / "mnt") as mnt:
        st = os.stat(mnt / "m" / "latest" / "vda.raw")
        assert st.st_size == len(disk) and st.st_blocks * 512 == -(-log2.stats["disk_bytes"]["vda"] // 512) * 512
        # df: the repository's filesystem as it is (monitoring alarms on "100 % used")
        shown, real = os.statvfs(mnt), os.statvfs(tmp_path / "r")
        assert (shown.f_blocks, shown.f_frsize, shown.f_files) == (real.f_blocks, real.f_frsize, real.f_files)
        assert abs(shown.f_bavail - real.f_bavail) <= real.f_blocks // 100  # others may write meanwhile
        assert 0 < shown.f_bavail <= shown.f_bfree < shown.f_blocks


def test_listing_a_point_opens_no_guest_filesystem(tmp_path, monkeypatch):
    """ls -l of a point directory must not parse its disks' volumes: point.json
    is listed unsized (ttl 0, read to its end with direct I/O) until read."""
    repo, disk, (full, log1, log2) = fill(tmp_path / "r", random.Random(1))
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    point = tree.lookup(vm.ino, "2026-11-24T18:59:40Z")
    parsed = []
    real_notes = tree.guest.notes
    monkeypatch.setattr(tree.guest, "notes", lambda p: parsed.append(p.point) or real_notes(p))
    monkeypatch.setattr(tree.guest, "disk", lambda *a: parsed.append("disk") or pytest.fail("a disk was parsed"))
    listed = dict(tree.readdir(point.ino))
    for name in listed:
        tree.lookup(point.ino, name)
    assert parsed == [] and listed["point.json"].unsized and listed["point.json"].ttl == 0
    monkeypatch.undo()
    content = tree.open(listed["point.json"].ino)
    body = content.read(0, 1 << 20)
    assert content.direct_io and json.loads(body)["kind"] == "log"
    after = tree.getattr(listed["point.json"].ino)  # worked out once read: its own size from then on
    assert not after.unsized and after.size == len(body)
    repo.close()
