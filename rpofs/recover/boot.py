"""What recovering a VM needs besides its disks: a name, new images, and the
boot state captured with the point (UEFI variable store, TPM state)."""

import os
import tempfile
from dataclasses import dataclass, field

from .. import durable
from ..errors import RpofsError
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..timefmt import format_time
from ..virt.client import SWTPM_DIR, SWTPM_STATE
from . import domainxml


NAME_MAX_BYTES = 200  # files are named after a VM: <name>-<disk>.top.qcow2, <name>_VARS.fd, libvirt's
                      # <name>.log, each within a file name's 255 bytes


def check_name(name: str) -> str:
    """A name given for a recovered VM, checked before anything is made
    (libvirt and the files named after it would refuse it half way)."""
    if not name.strip():
        raise RpofsError("--name is empty: give a name, or leave --name out for the default (VM-HHMM)")
    if "/" in name or "\0" in name or name.startswith(".") or name != name.strip():
        raise RpofsError(f"--name {name!r}: a VM name has no '/', does not start with '.' and has no "
                         f"spaces around it")
    if len(name.encode()) > NAME_MAX_BYTES:
        raise RpofsError(f"--name is {len(name.encode())} bytes long: at most {NAME_MAX_BYTES} "
                         f"(rpofs and libvirt name files after it)")
    return name


def check_dir(path: str) -> str:
    """A directory given to write a recovered VM's files in, absolute,
    checked by writing there (permissions, a read-only filesystem) before
    anything is made."""
    folder = os.path.abspath(path)
    if not os.path.isdir(folder):
        raise RpofsError(f"--dir {folder}: no such directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".rpofs-probe-")
    except OSError as e:
        raise RpofsError(f"--dir {folder}: cannot write there ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return folder


def default_name(point: PointRecord, taken) -> str:
    """The VM's name and the point's UTC time as HHMM ("db1-0941"); "-2",
    "-3", ... when `taken(name)` says it is in use."""
    hhmm = format_time(point.time_us)[11:16].replace(":", "")
    base = f"{point.vm_name}-{hhmm}"
    name, n = base, 1
    while taken(name):
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass
class BootFiles:
    nvram: str = ""                                   # the variable store's path for the new domain
    files: list[str] = field(default_factory=list)    # files written (removed with the recovery)
    notes: list[str] = field(default_factory=list)
    tpm_state: bytes = b""
    tpm_version: str = "2.0"

    def place_tpm(self, domain_uuid: str) -> str:
        """Write the captured TPM state where libvirt's swtpm looks for the
        domain's (before its first start); the file written, or ""."""
        if not self.tpm_state:
            return ""
        path = os.path.join(SWTPM_DIR, domain_uuid, SWTPM_STATE.get(self.tpm_version, SWTPM_STATE["2.0"]))
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
        durable.write_file(path, self.tpm_state)
        return path


def place_boot_state(repo: Repository, point: PointRecord, captured_xml: str, workdir: str, name: str,
                     nvram_path: str = "") -> BootFiles:
    """Write the point's UEFI variable store to `nvram_path` (default
    workdir/<name>_VARS.fd) and read its TPM state for place_tpm. A point
    taken before rpofs captured them gets a fresh variable store (libvirt
    fills a missing one from the firmware's template) and says so."""
    boot = BootFiles()
    firmware = point.firmware
    if domainxml.uses_nvram(captured_xml):
        boot.nvram = nvram_path or os.path.join(workdir, f"{name}_VARS.fd")
        if firmware and "nvram" in firmware:
            durable.write_file(boot.nvram, repo.read_chunk(bytes.fromhex(firmware["nvram"])))
            boot.files.append(boot.nvram)
        else:
            boot.notes.append("the point holds no UEFI variable store (taken before rpofs captured it, "
                              "or unreadable then): the VM starts with a fresh one from the firmware's template")
    if domainxml.has_tpm(captured_xml):
        if firmware and "tpm" in firmware:
            boot.tpm_state = repo.read_chunk(bytes.fromhex(firmware["tpm"]))
            boot.tpm_version = domainxml.tpm_version(captured_xml)
        else:
            boot.notes.append("the point holds no TPM state (taken before rpofs captured it): "
                              "the VM starts with a new TPM")
    return boot

