"""A real FUSE mount of a repository filled without libvirt: errors become
EIO for the damaged range only, a killed daemon, du and df. The tree it
shows, without FUSE: test_tree.py."""

import errno
import os
import random
import signal
import subprocess

import pytest

from rpofs.store import schema
from rpofs.store.schema import CHUNK_SIZE, ChunkLocation
from synth import three_points
from vmlab import mounted, run_rpofs, wait_for

pytestmark = pytest.mark.fuse


def test_corrupt_chunk_gives_eio_for_its_range_only(tmp_path):
    repo, disk, points = three_points(tmp_path / "r", random.Random(2))
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
    repo, disk, _ = three_points(tmp_path / "r", random.Random(3))
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
    repo, disk, (full, log1, log2) = three_points(tmp_path / "r", random.Random(4))
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


