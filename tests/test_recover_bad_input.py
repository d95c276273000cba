"""Bad input to `rpofs run` and `rpofs restore --vm`: one line on stderr, a
non-zero exit, and nothing left behind — no domain, no overlay, no hold, no
mount, no half-written disk. Real libvirtd (a VM without an OS), real LMDB,
real mounts."""

import contextlib
import os
import subprocess
import uuid

import libvirt
import pytest

from rpofs.store.repo import Repository
from rpofs.store.schema import CHUNK_SIZE, DiskRecord
from test_bad_input import fails
from vmlab import URI, TestVM, make_qcow2, points_json, run_rpofs, seeded_content

pytestmark = pytest.mark.libvirt

MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A VM without an OS, backed up once."""
    tmp = tmp_path_factory.mktemp("recover-bad")
    repo = tmp / "repo"
    run_rpofs("init", repo=repo)
    disk = str(tmp / "d.qcow2")
    make_qcow2(disk, bytes(seeded_content(8 * MiB, 5)))
    vm = TestVM(f"rpofs-rb-{uuid.uuid4().hex[:8]}", [(disk, "qcow2")])
    run_rpofs("backup", vm.name, repo=repo)
    conn = libvirt.open(URI)
    yield {"tmp": tmp, "repo": repo, "vm": vm, "conn": conn}
    conn.close()
    vm.destroy()


def nothing_left(lab, domains_before: set[str]) -> None:
    repo = lab["repo"]
    assert domains(lab) == domains_before
    assert not os.listdir(repo / "holds") if (repo / "holds").exists() else True
    run_dir = repo / "run"
    if run_dir.exists():
        assert sorted(os.listdir(run_dir)) in ([".lock"], [".lock", "mnt"])
    with open("/proc/self/mountinfo") as f:
        assert not any(str(repo) in line for line in f)


def domains(lab) -> set[str]:
    """This file's domains (others may come and go on the host meanwhile)."""
    return {d.name() for d in lab["conn"].listAllDomains(0) if d.name().startswith("rpofs-rb-")}


def test_run_refusals(lab):
    repo, vm = lab["repo"], lab["vm"]
    before = domains(lab)
    fails(run_rpofs("run", "nosuchvm@latest", repo=repo, check=False), "no VM 'nosuchvm'")
    fails(run_rpofs("run", f"{vm.name}@2001-01-01T00:00:00Z", repo=repo, check=False), "no point at or before")
    fails(run_rpofs("run", f"{vm.name}@yesterday", repo=repo, check=False), "cannot read time")
    fails(run_rpofs("run", vm.name, repo=repo, check=False), "expected VM@TIME")
    fails(run_rpofs("run", f"{vm.name}@latest", "--name", vm.name, repo=repo, check=False), "exists already")
    fails(run_rpofs("run", f"{vm.name}@latest", "--dir", lab["tmp"] / "nodir", repo=repo, check=False),
          "no such directory")
    fails(run_rpofs("run", "--stop", "nosuchrun", repo=repo, check=False), "no VM named 'nosuchrun'")
    fails(run_rpofs("run", "--move", "nosuchrun", "--dir", lab["tmp"], repo=repo, check=False),
          "no VM named 'nosuchrun'")
    fails(run_rpofs("run", repo=repo, check=False), "give VM@TIME")
    fails(run_rpofs("run", f"{vm.name}@latest", "--name", "x" * 300, repo=repo, check=False), "bytes long")
    fails(run_rpofs("run", f"{vm.name}@latest", "--name", "", repo=repo, check=False), "--name is empty")
    fails(run_rpofs("run", f"{vm.name}@latest", "--name", "a/b", repo=repo, check=False), "has no '/'")
    with read_only_dir(lab["tmp"] / "ro") as ro:
        fails(run_rpofs("run", f"{vm.name}@latest", "--dir", ro, repo=repo, check=False),
              "cannot write there (Read-only file system)")
    assert run_rpofs("run", "--list", "--json", repo=repo).stdout.strip() == "[]"
    nothing_left(lab, before)


@contextlib.contextmanager
def read_only_dir(path):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_run_mount_goes_with_the_last_run_vm(lab):
    """run A starts REPO/run/mnt, run B uses it too; stopping A keeps it for
    B, stopping B unmounts it (whichever run started it). A running run VM
    is neither backed up nor protected."""
    repo, vm = lab["repo"], lab["vm"]
    before = domains(lab)
    names = [run_rpofs("run", f"{vm.name}@latest", *(["--no-start"] if i else []), "--name", f"rpofs-rb-run{i}",
                       repo=repo).stdout.strip() for i in range(2)]
    mnt = str(repo / "run" / "mnt")
    assert _mounted(mnt)
    # a VM on a point reads the repository: one rule for backup and protect alike
    for command in ("backup", "protect"):
        fails(run_rpofs(command, names[0], repo=repo, check=False), "runs on a recovery point (rpofs run)")
    run_rpofs("run", "--stop", names[0], repo=repo)
    assert _mounted(mnt)
    run_rpofs("run", "--stop", names[1], repo=repo)
    assert not _mounted(mnt)
    nothing_left(lab, before)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_restore_vm_refusals(lab):
    repo, vm, tmp = lab["repo"], lab["vm"], lab["tmp"]
    before = domains(lab)
    out = tmp / "out"
    out.mkdir()
    fails(run_rpofs("restore", "nosuchvm@latest", "--vm", "--dir", out, repo=repo, check=False), "no VM")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--name", vm.name, "--dir", out, repo=repo,
                    check=False), "exists already")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--replace", "--force", repo=repo, check=False),
          "is running")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--replace", "--name", "x", repo=repo, check=False),
          "leave out --name")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--dir", tmp / "nodir", repo=repo, check=False),
          "no such directory")
    fails(run_rpofs("restore", f"{vm.name}@latest", "out.raw", "--vm", repo=repo, check=False), "no DEST")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--name", "", "--dir", out, repo=repo, check=False),
          "--name is empty")
    fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--name", "y" * 300, "--dir", out, repo=repo,
                    check=False), "bytes long")
    with read_only_dir(tmp / "ro-restore") as ro:
        fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--dir", ro, repo=repo, check=False),
              "cannot write there")
    fails(run_rpofs("restore", f"{vm.name}@latest:vda", str(out / "x.raw"), "--name", "y", repo=repo,
                    check=False), "goes with --vm")
    assert os.listdir(out) == []
    nothing_left(lab, before)


def test_restore_vm_without_room_writes_nothing(lab):
    repo, vm, tmp = lab["repo"], lab["vm"], lab["tmp"]
    small = tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        before = domains(lab)
        fails(run_rpofs("restore", f"{vm.name}@latest", "--vm", "--name", "rpofs-rb-roomless", "--dir", small,
                        repo=repo, check=False), "nothing was written")
        assert os.listdir(small) == []
        assert domains(lab) == before
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_point_whose_xml_libvirt_refuses(tmp_path):
    """The refusal names the element; run and restore --vm leave nothing."""
    repo_path = tmp_path / "repo"
    run_rpofs("init", repo=repo_path)
    repo = Repository.open(str(repo_path))
    try:
        with repo.begin_writer() as w:
            w.put_full_chunk(0, 0, os.urandom(CHUNK_SIZE))
            xml, _ = w.put_chunk(b"<domain type='qemu'><name>bad</name><memory>65536</memory><bogus/>"
                                 b"<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' "
                                 b"device='disk'><source file='/x'/><target dev='vda'/></disk></devices></domain>")
            w.commit(vm=str(uuid.UUID(int=99)), vm_name="bad", time_us=1_790_000_000_000_000, parent=None,
                     consistency="crash-consistent", disks=[DiskRecord("vda", CHUNK_SIZE)], checkpoint="",
                     domain_xml=xml.hex())
    finally:
        repo.close()
    conn = libvirt.open(URI)
    try:
        before = {d.name() for d in conn.listAllDomains(0) if d.name().startswith("bad")}
        fails(run_rpofs("run", "bad@latest", repo=repo_path, check=False), "bogus")
        out = tmp_path / "out"
        out.mkdir()
        fails(run_rpofs("restore", "bad@latest", "--vm", "--dir", out, repo=repo_path, check=False), "bogus")
        assert os.listdir(out) == []
        assert {d.name() for d in conn.listAllDomains(0) if d.name().startswith("bad")} == before
        assert not os.listdir(repo_path / "holds")
        assert sorted(os.listdir(repo_path / "run")) == [".lock", "mnt"]
        with open("/proc/self/mountinfo") as f:
            assert not any(str(repo_path) in line for line in f)
    finally:
        conn.close()
    assert points_json(repo_path, "bad")
