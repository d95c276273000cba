"""Bad input: one clear line on stderr, a non-zero exit, nothing stored altered.
Real libvirtd, real LMDB, real mounts."""

import hashlib
import os
import subprocess
import uuid

import lmdb
import pytest

from rpofs.store import schema
from vmlab import TestVM, make_qcow2, make_raw, mounted, points_json, run_rpofs, seeded_content

pytestmark = pytest.mark.libvirt

MiB = 1 << 20


def fails(result, fragment):
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpofs: ") and fragment in lines[0], result.stderr


def repo_digest(repo) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(repo)):
        for name in sorted(files):
            if name == "lock.mdb" or name.endswith(".log") or os.path.basename(root) == "locks":
                continue  # reader slots, the mount log and the VM locks' holders: not stored data
            path = os.path.join(root, name)
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    run_rpofs("init", repo=path)
    return path


@pytest.fixture
def vm(tmp_path):
    path = str(tmp_path / "d.qcow2")
    make_qcow2(path, bytes(seeded_content(4 * MiB, 3)))
    machine = TestVM(f"rpofs-bad-{uuid.uuid4().hex[:8]}", [(path, "qcow2")])
    yield machine
    machine.destroy()


def test_no_repository(tmp_path):
    fails(run_rpofs("points", "x", repo=tmp_path / "nothing", check=False), "no rpofs repository")
    fails(run_rpofs("backup", "x", repo=tmp_path / "nothing", check=False), "no rpofs repository")


def test_init_twice_refused(repo):
    before = repo_digest(repo)
    fails(run_rpofs("init", repo=repo, check=False), "already holds a repository")
    assert repo_digest(repo) == before


def test_unknown_format_refused(repo):
    env = lmdb.open(str(repo / "catalog"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(schema.META_FORMAT, b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    before = repo_digest(repo)
    fails(run_rpofs("points", "x", repo=repo, check=False), "has format 99")
    assert repo_digest(repo) == before


def test_unknown_vm(repo):
    before = repo_digest(repo)
    fails(run_rpofs("backup", "no-such-vm-here", repo=repo, check=False), "no VM named 'no-such-vm-here'")
    fails(run_rpofs("points", "no-such-vm-here", repo=repo, check=False), "no VM 'no-such-vm-here'")
    assert repo_digest(repo) == before


def test_unknown_disk(repo, vm):
    fails(run_rpofs("backup", vm.name, "--disk", "vdz", repo=repo, check=False), "has no disk vdz")


def test_raw_disk_refused_with_advice(repo, tmp_path):
    path = str(tmp_path / "r.img")
    make_raw(path, 4 * MiB)
    machine = TestVM(f"rpofs-raw-{uuid.uuid4().hex[:8]}", [(path, "raw")])
    try:
        before = repo_digest(repo)
        r = run_rpofs("backup", machine.name, repo=repo, check=False)
        fails(r, "need qcow2")
        assert "qemu-img convert -O qcow2" in r.stderr
        assert repo_digest(repo) == before and machine.checkpoints() == []
    finally:
        machine.destroy()


def test_mountpoint_missing_or_busy(repo, tmp_path):
    fails(run_rpofs("mount", tmp_path / "absent", repo=repo, check=False), "does not exist")
    fails(run_rpofs("umount", tmp_path, check=False), "is not mounted")
    with mounted(repo, tmp_path / "mnt") as mnt:
        fails(run_rpofs("mount", mnt, repo=repo, check=False), "is busy")
        assert os.listdir(mnt) == [".by-uuid"]  # no VM yet


def test_mount_without_repository(tmp_path):
    (tmp_path / "mnt").mkdir()
    fails(run_rpofs("mount", tmp_path / "mnt", repo=tmp_path / "nothing", check=False), "no rpofs repository")
    assert not os.path.ismount(tmp_path / "mnt")


def test_full_disk_leaves_no_point_and_no_checkpoint(tmp_path, vm):
    """The repository on a 1 MiB tmpfs: the backup cannot fit. The job ends,
    the checkpoint it made is deleted, no point appears, and a later backup
    into a roomy repository works."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        run_rpofs("init", repo=small / "repo")
        r = run_rpofs("backup", vm.name, repo=small / "repo", check=False)
        fails(r, "No space left on device")
        assert vm.checkpoints() == []
        assert vm.dom.jobInfo()[0] == 0  # VIR_DOMAIN_JOB_NONE: the job was ended
        r = run_rpofs("points", vm.name, repo=small / "repo", check=False)
        fails(r, "no VM")  # nothing was recorded
        assert os.listdir(small / "repo" / "chunks") == []  # the unreferenced pack is gone
    finally:
        subprocess.run(["umount", str(small)], check=True)
    big = tmp_path / "big"
    run_rpofs("init", repo=big)
    run_rpofs("backup", vm.name, repo=big)
    assert [p["kind"] for p in points_json(big, vm.name)] == ["full"]
