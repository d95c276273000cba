"""What recovering a VM needs besides its disks: a name, new images, and the
boot state captured with the point (UEFI variable store, TPM state)."""

import os
from dataclasses import dataclass, field

from .. import durable
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..timefmt import format_time
from ..virt.client import SWTPM_DIR, SWTPM_STATE
from . import domainxml


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

