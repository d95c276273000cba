"""Real level: the compatible-full rule when the chain breaks, and when it
only looks broken. A persistent libvirt VM; every point read back at the end."""

import subprocess
import uuid

import libvirt
import pytest

from vmlab import Model, TestVM, make_qcow2, mounted, points_json, run_rpofs, seeded_content

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 6 * MiB


@pytest.fixture
def lab(tmp_path):
    content = seeded_content(SIZE, 42)
    path = str(tmp_path / "vda.qcow2")
    make_qcow2(path, bytes(content))
    vm = TestVM(f"rpofs-chain-{uuid.uuid4().hex[:8]}", [(path, "qcow2")], persistent=True)
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    try:
        yield vm, Model(vm, [content]), repo, tmp_path
    finally:
        vm.destroy()


def backup(repo, vm, model, truth):
    run_rpofs("backup", vm.name, repo=repo)
    point = points_json(repo, vm.name)[-1]
    truth[point["point"]] = model.snapshot()
    return point


def test_chain_repair(lab):
    vm, model, repo, tmp = lab
    truth = {}
    assert backup(repo, vm, model, truth)["kind"] == "full"
    model.write(0, 1 * MiB, 64 << 10, 0x10)
    assert backup(repo, vm, model, truth)["kind"] == "log"

    # A clean stop (libvirt ends QEMU gracefully) keeps the bitmaps: a log is right.
    vm.dom.destroy()
    vm.dom.create()
    model.write(0, 2 * MiB + 512, 1000, 0x11)
    p = backup(repo, vm, model, truth)
    assert p["kind"] == "log", p["reason"]

    # Checkpoint metadata lost, bitmaps intact (VM moved or redefined): redefined, validated, a log.
    for cp in vm.dom.listAllCheckpoints():
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    model.write(0, 3 * MiB, 4096, 0x12)
    p = backup(repo, vm, model, truth)
    assert p["kind"] == "log", p["reason"]
    assert vm.checkpoints() == [p["checkpoint"]]

    # QEMU killed: the newest bitmaps are not trustworthy. A full, with the reason.
    model.write(0, 4 * MiB, 8192, 0x13)
    vm.flush(0)
    vm.kill_qemu()
    vm.dom.create()
    p = backup(repo, vm, model, truth)
    assert p["kind"] == "full" and "checkpoint inconsistent" in p["reason"], p["reason"]
    model.write(0, 5 * MiB, 512, 0x14)
    assert backup(repo, vm, model, truth)["kind"] == "log"

    # Killed and its metadata lost too: validation refuses the redefinition. A full.
    vm.flush(0)
    vm.kill_qemu()
    vm.dom.create()
    for cp in vm.dom.listAllCheckpoints():
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    p = backup(repo, vm, model, truth)
    assert p["kind"] == "full" and "cannot be redefined" in p["reason"], p["reason"]

    # A disk added (to the definition, then a clean restart): the disk set
    # changed. A full, with the reason, and a log after it.
    extra = str(tmp / "vdb.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", extra, "2M"], check=True)
    vm.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{extra}'/>"
        f"<target dev='vdb' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    vm.dom.destroy()
    vm.dom.create()
    model.disks.append(bytearray(2 * MiB))
    p = backup(repo, vm, model, truth)
    assert p["kind"] == "full" and "disks changed" in p["reason"], p["reason"]
    assert [d["target"] for d in p["disks"]] == ["vda", "vdb"]
    model.write(1, 4096, 4096, 0x15)
    assert backup(repo, vm, model, truth)["kind"] == "log"

    with mounted(repo, tmp / "mnt") as mnt:
        for p in points_json(repo, vm.name):
            for i, expected in enumerate(truth[p["point"]]):
                with open(mnt / vm.name / p["name"] / f"vd{chr(97 + i)}.raw", "rb") as f:
                    assert f.read() == expected, f"{p['name']} vd{chr(97 + i)}"
