"""Real level, two hosts on one store: VMs backed up by `rpofs backup` on
host kvm1 and kvm2 (separate repository directories against one bucket of a
real Ceph RGW), each host reading the other's VM through the command line
and a real FUSE mount that follows new points; then kvm1 lost and a new
machine taking it over, carrying on the VM's chain from its checkpoint.
Every disk compared byte for byte with a model of the guest's writes."""

import json
import shutil
import uuid

import pytest

from vmlab import Model, TestVM, make_qcow2, points_json, run_rpofs, seeded_content, wait_for

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 6 * MiB + 4096


@pytest.fixture
def two_vms(tmp_path):
    made = []
    for i in range(2):
        content = seeded_content(SIZE, 40 + i)
        path = str(tmp_path / f"disk{i}.qcow2")
        make_qcow2(path, bytes(content))
        vm = TestVM(f"rpofs-hosts-{uuid.uuid4().hex[:8]}", [(path, "qcow2")])
        made.append(Model(vm, [content]))
    yield made
    for model in made:
        model.vm.destroy()


def disk_at(mnt, vm: str, point: str) -> bytes:
    with open(mnt / vm / point / "vda.raw", "rb") as f:
        return f.read()


def test_each_host_reads_the_others_vm_and_a_new_machine_takes_one_over(tmp_path, store_url, two_vms):
    web, db = two_vms
    kvm1, kvm2, kvm3 = tmp_path / "kvm1", tmp_path / "kvm2", tmp_path / "kvm3"
    run_rpofs("init", "--store", store_url, "--host", "kvm1", "--cache-size", "64M", repo=kvm1)
    run_rpofs("init", "--store", store_url, "--host", "kvm2", "--cache-size", "64M", repo=kvm2)
    truth = {}
    run_rpofs("backup", web.vm.name, repo=kvm1)
    truth[points_json(kvm1, web.vm.name)[-1]["name"]] = web.snapshot()[0]
    web.write(0, MiB + 512, 70_000 - 70_000 % 512, 0x5a)
    run_rpofs("backup", web.vm.name, repo=kvm1)
    truth[points_json(kvm1, web.vm.name)[-1]["name"]] = web.snapshot()[0]
    run_rpofs("backup", db.vm.name, repo=kvm2)

    # kvm2 sees web on kvm1 (found by its name), and kvm1 sees db on kvm2
    seen = points_json(kvm2, web.vm.name)
    assert [p["name"] for p in seen] == list(truth) and [p["kind"] for p in seen] == ["full", "log"]
    assert [p["kind"] for p in points_json(kvm1, db.vm.name)] == ["full"]
    hosts = {h["name"]: h for h in json.loads(run_rpofs("hosts", "--json", repo=kvm2).stdout)}
    assert (hosts["kvm1"]["vms"], hosts["kvm1"]["points"], hosts["kvm2"]["points"]) == (1, 2, 1)
    out = tmp_path / "db.raw"
    run_rpofs("restore", f"{db.vm.name}@latest:vda", out, repo=kvm1)
    assert out.read_bytes() == db.snapshot()[0]

    # kvm1's VMs mounted on kvm2: every point byte-exact, and a new one appears
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_rpofs("--host", "kvm1", "mount", mnt, repo=kvm2, timeout=60)
    try:
        for name, disk in truth.items():
            assert disk_at(mnt, web.vm.name, name) == disk
        web.write(0, 4 * MiB, 8192, 0x6b)
        run_rpofs("backup", web.vm.name, repo=kvm1)  # published as the command closes the repository
        newest = points_json(kvm1, web.vm.name)[-1]["name"]
        truth[newest] = web.snapshot()[0]
        wait_for(lambda: (mnt / web.vm.name / newest).exists(), timeout=20, what="the new point in kvm2's mount")
        assert disk_at(mnt, web.vm.name, newest) == truth[newest]
    finally:
        run_rpofs("umount", mnt, repo=kvm2, timeout=60)

    # kvm1 is lost; kvm3 takes it over and carries on web's chain from its checkpoint
    shutil.rmtree(kvm1)
    done = run_rpofs("init", "--store", store_url, "--host", "kvm1", "--take-over", repo=kvm3, check=False)
    assert done.returncode == 1 and "looks alive" in done.stderr
    run_rpofs("init", "--store", store_url, "--host", "kvm1", "--take-over", "--force", repo=kvm3)
    web.write(0, 2 * MiB, 4096, 0x7c)
    out = run_rpofs("backup", web.vm.name, repo=kvm3).stdout
    assert ": log point " in out, out
    points = points_json(kvm3, web.vm.name)
    truth[points[-1]["name"]] = web.snapshot()[0]
    assert [p["kind"] for p in points] == ["full", "log", "log", "log"]
    assert len({p["chain"] for p in points}) == 1
    for name, disk in truth.items():
        restored = tmp_path / "web.raw"
        run_rpofs("restore", f"{web.vm.name}@{name}:vda", restored, "--force", repo=kvm2)
        assert restored.read_bytes() == disk, name
