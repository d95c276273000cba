"""Which of a domain's disks rpofs covers: a backup's chains and continuous
protection's mirrors cover the same choice (every disk, chosen targets, or
the disk(s) holding a guest mountpoint), each disk qcow2.

Here, below both, because both use it: rpofs.ingest.backup (a point's disks)
and rpofs.protect.protector (the disks mirrored into the journal). The
ingester's configuration (rpofs.ingest.config) and the command line build a
DiskChoice; this module only reads the domain, through rpofs.virt.client."""

from dataclasses import dataclass

from ..errors import RpofsError, UnsupportedDisk
from ..store.schema import DiskRecord
from .client import Domain, DomainInfo


@dataclass(frozen=True)
class DiskChoice:
    """Which disks a VM's chains cover: every disk, chosen targets, or the
    disk(s) holding a guest mountpoint (asked of the guest agent)."""
    targets: tuple[str, ...] = ()       # empty with no mountpoint: every disk
    mountpoint: str = ""


def chosen_disks(dom: Domain, info: DomainInfo, choice: DiskChoice, purpose: str) -> list[DiskRecord]:
    """The disks a VM's chains cover (backups, and continuous protection:
    purpose "back up" or "protect"), each qcow2: log backups and protection's
    fallback need its dirty bitmaps."""
    targets = choice.targets
    if choice.mountpoint:
        targets = tuple(dom.disks_of_mountpoint(choice.mountpoint))
    by_target = {d.target: d for d in info.disks}
    for t in targets:
        if t not in by_target:
            raise RpofsError(f"VM {info.name} has no disk {t} (it has {', '.join(by_target) or 'none'})")
    chosen = [d for d in info.disks if not targets or d.target in targets]
    if not chosen:
        raise RpofsError(f"VM {info.name} has no disks to {purpose}")
    for d in chosen:
        if d.format != "qcow2":
            raise UnsupportedDisk(
                f"disk {d.target} of {info.name} is {d.format}: log backups need qcow2 (dirty bitmaps); "
                f"convert it with 'qemu-img convert -O qcow2' and point the VM at the copy, "
                f"or leave it out with --disk")
    return [DiskRecord(d.target, d.size, d.source) for d in chosen]
