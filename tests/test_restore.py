"""`rpofs restore`: whole disks out of the repository without a mount (a
real LMDB and pack files; a real loop device for the block-device case)."""

import os
import random
import subprocess

import pytest

from rpofs.store import schema
from rpofs.store.schema import CHUNK_SIZE, ChunkLocation
from rpofs.timefmt import point_names
from test_mount import fill
from vmlab import run_rpofs

pytestmark = pytest.mark.lmdb


def test_every_point_restores_exactly_and_sparse(tmp_path):
    repo, disk, points = fill(tmp_path / "r", random.Random(4))
    states = [_read(repo, p, 0, len(disk)) for p in points]  # as the mount tests check them
    repo.close()
    names = point_names([p.time_us for p in points])
    for name, state in zip(names, states):
        out = tmp_path / f"{name}.raw"
        r = run_rpofs("--repo", tmp_path / "r", "restore", f"m@{name}:vda", out)
        assert out.read_bytes() == state, name
        assert r.stdout.strip() == f"{out}: {len(state)} bytes, {2 * CHUNK_SIZE} written"
        assert os.stat(out).st_blocks * 512 < len(state)  # the zero half-chunk is a hole
    assert (tmp_path / f"{names[-1]}.raw").read_bytes() == bytes(disk)
    assert not list(tmp_path.glob("*.part"))


def _read(repo, point, offset, length):
    from rpofs.store.materialize import DiskReader
    return bytes(DiskReader(repo, point, "vda").read(offset, length))


def test_restore_refuses_and_leaves_nothing_half_written(tmp_path):
    repo, disk, points = fill(tmp_path / "r", random.Random(5))
    with repo.env.begin() as txn:  # damage the full's second chunk
        key = txn.get(schema.full_key(points[0].chain, 0, 1), db=repo.db["full_index"])
        loc = ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))
    repo.close()
    with open(tmp_path / "r" / "chunks" / schema.pack_name(loc.pack), "r+b") as f:
        f.seek(loc.offset + 10)
        f.write(b"\x00\xff" * 8)
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"keep me")
    for args, says in [(["m@latest:vda", exists], "exists (--force"),
                       (["m@latest", tmp_path / "x"], "expected VM@TIME:DISK"),
                       (["m@latest:vdz", tmp_path / "x"], "no disk vdz"),
                       (["nosuch@latest:vda", tmp_path / "x"], "no VM 'nosuch'"),
                       (["m@2000-01-01T00:00:00Z:vda", tmp_path / "x"], "no point at or before"),
                       (["m@latest:vda", tmp_path / "bad.raw"], "does not match its key")]:
        r = run_rpofs("--repo", tmp_path / "r", "restore", *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and says in r.stderr, (args, r.stderr)
    assert exists.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.raw", "r"]


def test_restore_onto_a_block_device(tmp_path):
    repo, disk, points = fill(tmp_path / "r", random.Random(6))
    repo.close()
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\xee" * (len(disk) + 4096))  # old data where the disk has zeros
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    dev = dev.stdout.strip()
    try:
        run_rpofs("--repo", tmp_path / "r", "restore", "m@latest:vda", dev)
        with open(dev, "rb") as f:
            assert f.read(len(disk)) == bytes(disk)
            assert f.read() == b"\xee" * 4096  # nothing past the disk touched
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
