"""`rpofs forget VM`: a decommissioned VM's points and the data only it used
go; another VM's points, sharing some of its chunks, read the same; a hold
refuses it; a running mount and `rpofs status` drop the VM (a real LMDB and
pack files, a real FUSE mount)."""

import json
import os
import random
import uuid

import pytest

from rpofs.store import holds, schema
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, DiskRecord
from rpofs.timefmt import US
from synth import VM, write
from test_prune import check_repository
from vmlab import mounted, run_rpofs, wait_for

pytestmark = pytest.mark.fuse

OTHER = str(uuid.UUID(int=8))


def back_up(repo, vm, name, disk, dirty, parent, time_us):
    """synth.back_up for any VM: a full when parent is None, else a log of the dirty blocks."""
    with repo.begin_writer() as w:
        if parent is None:
            for c in range(0, len(disk), CHUNK_SIZE):
                w.put_full_chunk(0, c // CHUNK_SIZE, bytes(disk[c:c + CHUNK_SIZE]))
        else:
            for b in sorted(dirty):
                w.put_log_block(0, b, bytes(disk[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]))
        xml, _ = w.put_chunk(f"<domain><name>{name}</name></domain>".encode())
        return w.commit(vm=vm, vm_name=name, time_us=time_us, parent=parent, consistency="crash-consistent",
                        disks=[DiskRecord("vda", len(disk))], checkpoint="", domain_xml=xml.hex())


@pytest.fixture
def two_vms(tmp_path):
    """VM "m": a full and three logs; VM "other": a full sharing m's first chunk."""
    rnd = random.Random(3)
    path = str(tmp_path / "r")
    repo = Repository.init(path)
    disk = bytearray(rnd.randbytes(3 * CHUNK_SIZE))
    points = [back_up(repo, VM, "m", disk, None, None, 1 * US)]
    for i in range(3):
        write(disk, dirty := set(), i * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        points.append(back_up(repo, VM, "m", disk, dirty, points[-1], (2 + i) * US))
    other = bytearray(disk[:CHUNK_SIZE]) + bytearray(rnd.randbytes(CHUNK_SIZE))
    kept = back_up(repo, OTHER, "other", other, None, None, 10 * US)
    repo.close()
    return path, points, (kept, bytes(other))


def test_forget_removes_the_vm_and_only_its_data(two_vms, tmp_path):
    path, points, (kept, other) = two_vms
    with mounted(path, str(tmp_path / "mnt")) as mnt:
        assert sorted(os.listdir(mnt)) == [".by-uuid", "m", "other"]
        dry = run_rpofs("--repo", path, "forget", "m", "--dry-run")
        assert "would remove all 4 points" in dry.stdout and len(dry.stdout.splitlines()) == 5
        assert len(json.loads(run_rpofs("--repo", path, "points", "m", "--json").stdout)) == 4

        r = run_rpofs("--repo", path, "forget", "m")
        assert r.returncode == 0 and "m: forgotten; 4 points removed" in r.stdout, r.stderr
        wait_for(lambda: sorted(os.listdir(mnt)) == [".by-uuid", "other"], 2.5, "the forgotten VM to leave the mount")
        assert os.listdir(os.path.join(mnt, ".by-uuid")) == [OTHER]
        with open(os.path.join(mnt, "other", "latest", "vda.raw"), "rb") as f:
            assert f.read() == other
    gone = run_rpofs("--repo", path, "points", "m", check=False)
    assert gone.returncode == 1 and "no VM 'm'" in gone.stderr
    status = json.loads(run_rpofs("--repo", path, "status", "--json").stdout)
    assert [v["name"] for v in status["vms"]] == ["other"]
    repo = Repository.open(path)
    try:
        assert [uuid for uuid, _ in repo.vms()] == [OTHER]
        assert DiskReader(repo, kept, "vda").read(0, len(other)) == other  # the shared chunk stayed
        check_repository(repo)  # every reference resolves, no pack without live data
        with repo.env.begin() as txn:  # nothing of m's chain is left in the index
            chains = {schema.read_full_key(k)[0] for k in txn.cursor(db=repo.db["full_index"]).iternext(values=False)}
            assert chains == {kept.chain}
            assert txn.stat(repo.db["log_index"])["entries"] == 0
    finally:
        repo.close()


def test_forget_refuses_a_held_point_and_unknown_vms(two_vms):
    path, points, _ = two_vms
    repo = Repository.open(path)
    holder = "run-54d30a12-7c1e-4a57-9a0e-0c3f6f4e2b11"  # as rpofs run names its hold
    holds.put(repo, holds.Hold(holder, VM, points[2].point, "VM m-0001 runs on it", "m-0001"))
    repo.close()
    for args in (["m"], ["m", "--dry-run"]):
        r = run_rpofs("--repo", path, "forget", *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("rpofs: cannot forget m: VM m-0001 runs on one of its points"), r.stderr
        assert "run-54d30a12" not in r.stderr and "rpofs run --stop m-0001" in r.stderr  # commands that work
    assert len(json.loads(run_rpofs("--repo", path, "points", "m", "--json").stdout)) == 4
    holds.drop(path, holder)
    r = run_rpofs("--repo", path, "forget", "nosuch", check=False)
    assert r.returncode == 1 and "no VM 'nosuch'" in r.stderr
    run_rpofs("--repo", path, "forget", "m")
    run_rpofs("--repo", path, "forget", "other")
    repo = Repository.open(path)
    try:
        assert repo.vms() == [] and os.listdir(repo.chunks_dir) == []  # nothing left at all
    finally:
        repo.close()
