"""A recovered VM's definition, made from the domain XML captured with a
point. Pure: text in, text out, so every rule is tested without libvirt.

What changes, and why:
* name, and for a copy (not a --replace) a new UUID and new MAC addresses:
  the original may still run, and two domains must not share an identity
  on the host or on the network (libvirt makes new MACs where none is given);
* every backed-up disk points at its new image (an overlay over the point,
  or a restored image); its driver type follows the image;
* a disk the point does not hold is left out, never shared: the copy would
  write to the original's image;
* file-backed serial consoles and logs go to the recovery's own directory,
  so the copy does not append to the original's files;
* fixed VNC/SPICE ports become automatic (the original may hold them);
* the UEFI variable store gets a path of its own (filled from the point, or
  from the firmware's template when the point did not capture it);
* interfaces are dropped when asked (an isolated restore test);
* kernel and initrd files the XML names must exist: QEMU would fail later
  with a message about neither;
* a marker in <metadata> says which point a VM was recovered from, so the
  ingester and `rpofs run --list` know it without the repository (its
  namespace and its reader: rpofs.virt.marker).
"""

import os
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from ..errors import RpofsError
from ..virt.marker import MARKER_TAG


class BadDomainXml(RpofsError):
    pass


@dataclass(frozen=True)
class NewDisk:
    target: str          # "vda"
    path: str            # the image the recovered VM uses
    format: str          # "qcow2" | "raw"


@dataclass(frozen=True)
class Recovery:
    """What to make of the captured definition."""
    name: str
    uuid: str                       # the domain's UUID (a new one for a copy)
    disks: tuple[NewDisk, ...]
    workdir: str                    # where consoles and logs of the copy go
    new_identity: bool = True       # False for --replace: the same domain, its MACs
    network: bool = True            # False: drop every interface
    nvram: str = ""                 # the variable store's new path ("" : leave <nvram> as it is)
    marker: dict = field(default_factory=dict)  # attributes of the rpofs:recovery element; {}: none


@dataclass(frozen=True)
class Prepared:
    xml: str
    notes: tuple[str, ...]          # what was left out or changed that a user should know


def prepare(captured: str, rec: Recovery) -> Prepared:
    try:
        root = ET.fromstring(captured)
    except ET.ParseError as e:
        raise BadDomainXml(f"the point's domain XML cannot be read: {e}") from None
    if root.tag != "domain":
        raise BadDomainXml(f"the point's domain XML has <{root.tag}> at its top, not <domain>")
    notes = []
    _set_text(root, "name", rec.name)
    _set_text(root, "uuid", rec.uuid)
    if rec.new_identity:
        for iface in root.findall("./devices/interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    devices = root.find("devices")
    if devices is None:
        raise BadDomainXml("the point's domain XML has no <devices>")
    _disks(devices, rec, notes)
    if not rec.network:
        for iface in devices.findall("interface"):
            devices.remove(iface)
    if rec.new_identity:
        _consoles(devices, rec.workdir, rec.name)
    for graphics in devices.findall("graphics"):
        if graphics.get("autoport") == "no" or graphics.get("port") not in (None, "-1"):
            for attr in ("port", "tlsPort", "websocket"):
                graphics.attrib.pop(attr, None)
            graphics.set("autoport", "yes")
    _boot_files(root, rec, notes)
    if rec.marker:
        _mark(root, rec.marker)
    return Prepared(ET.tostring(root, encoding="unicode"), tuple(notes))


def _disks(devices: ET.Element, rec: Recovery, notes: list[str]) -> None:
    wanted = {d.target: d for d in rec.disks}
    seen = set()
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if disk.get("device", "disk") != "disk":
            continue  # cdrom, floppy, lun: media, kept as they are
        new = wanted.get(dev)
        if new is None:
            devices.remove(disk)
            notes.append(f"disk {dev} is not in the point: left out")
            continue
        seen.add(dev)
        disk.set("type", "file")
        for el in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(el)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", new.format)
        source = ET.Element("source", file=new.path)
        disk.insert(list(disk).index(driver) + 1, source)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise BadDomainXml(f"the point's domain XML has no disk {', '.join(missing)} "
                           f"(its <devices> name other disks)")


def _consoles(devices: ET.Element, workdir: str, name: str) -> None:
    """A copy's file-backed chardevs (serial, console, channel, parallel)
    and their <log> files: into workdir as <name>-<file name>."""
    for dev in devices:
        if dev.tag not in ("serial", "console", "channel", "parallel"):
            continue
        src = dev.find("source")
        if dev.get("type") == "file" and src is not None and src.get("path"):
            src.set("path", os.path.join(workdir, f"{name}-{os.path.basename(src.get('path'))}"))
        log = dev.find("log")
        if log is not None and log.get("file"):
            log.set("file", os.path.join(workdir, f"{name}-{os.path.basename(log.get('file'))}"))


def _boot_files(root: ET.Element, rec: Recovery, notes: list[str]) -> None:
    os_el = root.find("os")
    if os_el is None:
        return
    for tag in ("kernel", "initrd", "dtb"):
        el = os_el.find(tag)
        if el is not None and el.text and not os.path.exists(el.text.strip()):
            raise BadDomainXml(f"the point's domain XML boots the {tag} {el.text.strip()}, "
                               f"which does not exist on this host")
    loader = os_el.find("loader")
    if loader is not None and loader.text and not os.path.exists(loader.text.strip()):
        raise BadDomainXml(f"the point's domain XML boots the firmware {loader.text.strip()}, "
                           f"which does not exist on this host")
    nvram = os_el.find("nvram")
    uses_store = nvram is not None or (loader is not None and loader.get("type") == "pflash") \
        or os_el.get("firmware") == "efi"
    if rec.nvram and uses_store:
        if nvram is None:
            nvram = ET.SubElement(os_el, "nvram")
        nvram.text = rec.nvram


def _mark(root: ET.Element, attrs: dict) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(MARKER_TAG):
        metadata.remove(old)
    ET.SubElement(metadata, MARKER_TAG, {k: str(v) for k, v in attrs.items()})


def uses_nvram(xml: str) -> bool:
    """Whether the definition boots UEFI with a variable store."""
    os_el = ET.fromstring(xml).find("os")
    if os_el is None:
        return False
    loader = os_el.find("loader")
    return (os_el.find("nvram") is not None or os_el.get("firmware") == "efi"
            or (loader is not None and loader.get("type") == "pflash"))


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(1 if tag == "uuid" else 0, el)
    el.text = text


def has_tpm(xml: str) -> bool:
    return ET.fromstring(xml).find("./devices/tpm/backend[@type='emulator']") is not None


def tpm_version(xml: str) -> str:
    backend = ET.fromstring(xml).find("./devices/tpm/backend[@type='emulator']")
    return backend.get("version", "2.0") if backend is not None else "2.0"


def relocate(xml: str, old_dir: str, new_dir: str) -> tuple[str, list[tuple[str, str]]]:
    """A moved VM's definition for its next boot: every file it names under
    old_dir (the run's own directory: consoles, logs, the variable store)
    moved to new_dir, and rpofs's marker removed. Returns the XML and the
    (old, new) paths, so the caller copies the files that must carry over."""
    root = ET.fromstring(xml)
    moved = []
    old_dir = old_dir.rstrip("/") + "/"

    def move(path: str) -> str:
        if not path.startswith(old_dir):
            return path
        new = os.path.join(new_dir, os.path.basename(path))
        moved.append((path, new))
        return new

    for el in root.iter():
        for attr in ("path", "file"):
            if el.tag in ("source", "log") and el.get(attr):
                el.set(attr, move(el.get(attr)))
    nvram = root.find("./os/nvram")
    if nvram is not None and nvram.text:
        nvram.text = move(nvram.text.strip())
    metadata = root.find("metadata")
    if metadata is not None:
        for el in metadata.findall(MARKER_TAG):
            metadata.remove(el)
    return ET.tostring(root, encoding="unicode"), moved
