"""Pure: the domain XML of a recovered VM, made from the one captured with a
point (rpofs.recover.domainxml), the marker read back from it
(rpofs.virt.marker), and the names recovery picks."""

from xml.etree import ElementTree as ET

import pytest

from rpofs.ingest.daemon import _runs_on_a_point
from rpofs.recover import domainxml
from rpofs.recover.boot import default_name
from rpofs.recover.domainxml import BadDomainXml, NewDisk, Recovery, prepare
from rpofs.store.schema import PointRecord
from rpofs.virt.marker import marker_of

pytestmark = pytest.mark.pure

CAPTURED = """<domain type='kvm'>
  <name>db1</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='MiB'>512</memory>
  <os firmware='efi'><type arch='x86_64'>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/db1'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/db1-data.qcow2'/><backingStore/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/images/scratch.raw'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/tools.iso'/><target dev='sda' bus='sata'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    <serial type='file'><source path='/var/log/db1-console.log'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/db1-console.log'/><target type='serial' port='0'/></console>
    <graphics type='vnc' port='5901' autoport='no'/>
  </devices>
</domain>"""


def recovery(**kw) -> Recovery:
    base = dict(name="db1-0941", uuid="99999999-8888-7777-6666-555555555555",
                disks=(NewDisk("vda", "/run/a.qcow2", "qcow2"), NewDisk("vdb", "/run/b.qcow2", "qcow2")),
                workdir="/run", nvram="/run/db1-0941_VARS.fd",
                marker={"kind": "run", "vm": "11111111-2222-3333-4444-555555555555", "point": 7})
    base.update(kw)
    return Recovery(**base)


def test_a_copy_gets_a_new_identity_its_disks_and_its_own_files():
    done = prepare(CAPTURED, recovery())
    root = ET.fromstring(done.xml)
    assert root.findtext("name") == "db1-0941"
    assert root.findtext("uuid") == "99999999-8888-7777-6666-555555555555"
    assert root.find("./devices/interface/mac") is None  # libvirt makes a new one
    disks = {d.find("target").get("dev"): d for d in root.findall("./devices/disk")}
    assert sorted(disks) == ["sda", "vda", "vdb"]  # vdc not in the point: left out, never shared
    assert disks["vda"].get("type") == "file" and disks["vda"].find("source").get("file") == "/run/a.qcow2"
    assert disks["vda"].find("driver").get("type") == "qcow2"
    assert disks["vda"].find("driver").get("cache") == "none"  # the rest of the driver kept
    assert disks["vdb"].find("backingStore") is None
    assert disks["sda"].find("source").get("file") == "/iso/tools.iso"  # media kept
    assert any("vdc" in note for note in done.notes)
    assert {s.get("path") for s in root.findall("./devices/serial/source") + root.findall("./devices/console/source")} \
        == {"/run/db1-0941-db1-console.log"}
    vnc = root.find("./devices/graphics")
    assert vnc.get("autoport") == "yes" and vnc.get("port") is None
    assert root.findtext("./os/nvram") == "/run/db1-0941_VARS.fd"
    assert marker_of(done.xml) == {"kind": "run", "vm": "11111111-2222-3333-4444-555555555555",
                                             "point": "7"}


def test_no_network_and_replace_keep_what_they_should():
    copy = ET.fromstring(prepare(CAPTURED, recovery(network=False)).xml)
    assert copy.find("./devices/interface") is None
    same = ET.fromstring(prepare(CAPTURED, recovery(new_identity=False, name="db1",
                                                    uuid="11111111-2222-3333-4444-555555555555",
                                                    marker={})).xml)
    assert same.find("./devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"
    assert same.find("./devices/serial/source").get("path") == "/var/log/db1-console.log"
    assert same.find("metadata") is None


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(BadDomainXml, match="cannot be read"):
        prepare("<domain><name>x", recovery())
    with pytest.raises(BadDomainXml, match="no disk vdb"):
        prepare(CAPTURED.replace("dev='vdb'", "dev='vdx'"), recovery())
    missing = tmp_path / "vmlinuz"
    with pytest.raises(BadDomainXml, match=f"kernel {missing}"):
        prepare(CAPTURED.replace("<type arch", f"<kernel>{missing}</kernel><type arch"), recovery())
    missing.write_bytes(b"k")
    prepare(CAPTURED.replace("<type arch", f"<kernel>{missing}</kernel><type arch"), recovery())


def test_relocate_moves_the_run_s_files_and_drops_the_marker():
    xml = prepare(CAPTURED, recovery()).xml
    moved, pairs = domainxml.relocate(xml, "/run", "/images")
    root = ET.fromstring(moved)
    assert root.findtext("./os/nvram") == "/images/db1-0941_VARS.fd"
    assert root.find("./devices/serial/source").get("path") == "/images/db1-0941-db1-console.log"
    assert marker_of(moved) is None
    assert ("/run/db1-0941_VARS.fd", "/images/db1-0941_VARS.fd") in pairs


def test_default_names_are_the_vm_and_the_point_s_time_made_unique():
    point = PointRecord(point=3, vm="u", vm_name="db1", kind="full", time_us=1_795_000_000_123_456, chain=3,
                        parent=None, consistency="crash-consistent", disks=(), checkpoint="", domain_xml="")
    taken = {"db1-1106", "db1-1106-2"}
    assert default_name(point, taken.__contains__) == "db1-1106-3"
    assert default_name(point, lambda n: False) == "db1-1106"


class _Dom:
    def __init__(self, xml):
        self._xml = xml

    def xml(self):
        return self._xml


def test_the_ingester_leaves_vms_running_on_a_point_alone():
    running_on_point = prepare(CAPTURED, recovery()).xml
    assert _runs_on_a_point(_Dom(running_on_point))
    assert not _runs_on_a_point(_Dom(domainxml.relocate(running_on_point, "/run", "/images")[0]))
    assert not _runs_on_a_point(_Dom(CAPTURED))
