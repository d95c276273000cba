"""Real level: a UEFI VM with an emulated TPM (OVMF, swtpm; no OS needed).
Its variable store and TPM state are captured with every point and come
back with `rpofs run` and `rpofs restore --vm`, byte for byte; a point taken
before rpofs captured them is recovered with a fresh store, and says so."""

import json
import os
import subprocess
import uuid

import libvirt
import pytest

from rpofs.store import schema
from rpofs.store.repo import Repository
from vmlab import URI, points_json, run_rpofs

pytestmark = pytest.mark.libvirt

XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/></disk>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
</devices></domain>"""


@pytest.fixture
def efi_vm(tmp_path):
    disk = tmp_path / "efi.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    conn = libvirt.open(URI)
    dom = conn.defineXML(XML.format(name=f"rpofs-fw-{uuid.uuid4().hex[:8]}", disk=disk))
    dom.create()
    yield dom
    for d in conn.listAllDomains(0):
        if d.name().startswith(dom.name()):
            for call in (d.destroy, lambda: d.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_TPM
                    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)):
                try:
                    call()
                except libvirt.libvirtError:
                    pass
    conn.close()


def captured(repo, vm: str) -> dict[str, bytes]:
    r = Repository.open(str(repo))
    try:
        point = next(r.newest_points(r.find_vm(vm)[0]))
        return {kind: r.read_chunk(bytes.fromhex(key)) for kind, key in point.firmware.items()}
    finally:
        r.close()


def tpm_file(dom_uuid: str) -> str:
    return f"/var/lib/libvirt/swtpm/{dom_uuid}/tpm2/tpm2-00.permall"


def test_uefi_store_and_tpm_state_come_back(tmp_path, efi_vm):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    run_rpofs("backup", efi_vm.name(), repo=repo)
    point = points_json(repo, efi_vm.name())[-1]
    assert point["firmware"] == ["nvram", "tpm"] and not point["warnings"]
    held = captured(repo, efi_vm.name())
    source_nvram = next(line.split(">")[1].split("<")[0] for line in efi_vm.XMLDesc(0).splitlines()
                        if "<nvram" in line)
    with open(source_nvram, "rb") as f:
        assert len(held["nvram"]) == len(f.read())  # a whole OVMF variable store
    with open(tpm_file(efi_vm.UUIDString()), "rb") as f:
        assert len(held["tpm"]) == len(f.read())

    conn = libvirt.open(URI)
    try:
        name = run_rpofs("run", f"{efi_vm.name()}@latest", "--no-start", repo=repo).stdout.strip()
        copy = conn.lookupByName(name)
        nvram = next(line.split(">")[1].split("<")[0] for line in copy.XMLDesc(0).splitlines() if "<nvram" in line)
        with open(nvram, "rb") as f:
            assert f.read() == held["nvram"]
        assert os.stat(nvram).st_mode & 0o077 == 0
        with open(tpm_file(copy.UUIDString()), "rb") as f:
            assert f.read() == held["tpm"]
        copy.create()  # the firmware and swtpm take them
        assert copy.isActive()
        run_rpofs("run", "--stop", name, repo=repo)
        assert not os.path.exists(nvram) and not os.path.exists(tpm_file(copy.UUIDString()))

        images = tmp_path / "images"
        images.mkdir()
        restored = f"{efi_vm.name()}-r"
        run_rpofs("restore", f"{efi_vm.name()}@latest", "--vm", "--name", restored, "--dir", images, repo=repo)
        dom = conn.lookupByName(restored)
        with open(images / f"{restored}_VARS.fd", "rb") as f:
            assert f.read() == held["nvram"]
        with open(tpm_file(dom.UUIDString()), "rb") as f:
            assert f.read() == held["tpm"]
        dom.create()
        assert dom.isActive()
    finally:
        conn.close()


def test_a_point_without_boot_state_gets_a_fresh_store_and_says_so(tmp_path, efi_vm):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    run_rpofs("backup", efi_vm.name(), repo=repo)
    # as a point taken before rpofs captured boot state: firmware None
    r = Repository.open(str(repo))
    try:
        point = next(r.newest_points(r.find_vm(efi_vm.name())[0]))
        body = json.loads(point.encode())
        del body["firmware"]
        with r.write_txn() as txn:
            txn.put(schema.point_key(point.point), json.dumps(body).encode(), db=r.db["points"])
    finally:
        r.close()
    assert points_json(repo, efi_vm.name())[-1]["firmware"] is None
    out = run_rpofs("run", f"{efi_vm.name()}@latest", "--name", f"{efi_vm.name()}-old", repo=repo)
    assert "fresh one" in out.stderr and "new TPM" in out.stderr
    conn = libvirt.open(URI)
    try:
        assert conn.lookupByName(f"{efi_vm.name()}-old").isActive()  # libvirt filled it from the template
    finally:
        conn.close()
    run_rpofs("run", "--stop", f"{efi_vm.name()}-old", repo=repo)
