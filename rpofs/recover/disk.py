"""`rpofs restore VM@TIME:DISK DEST`: one disk as of TIME, resolved as the
mount's at/ resolves it (a point, an app point's base, or a journal instant:
rpofs.mount.tree.resolve), written by rpofs.store.restore."""

from ..errors import RpofsError
from ..mount.tree import Moment, resolve
from ..store.repo import Repository
from ..store.restore import check_destination, parse_disk_ref, write_disk


def restore_disk(repo: Repository, source: str, dest: str, force: bool = False,
                 progress=None) -> tuple[Moment, int, int]:
    """(what TIME named, the disk's size, bytes written)."""
    vm, when, target = parse_disk_ref(source)
    check_destination(dest, force)
    moment = resolve(repo, vm, when)
    disks = [d.target for d in moment.point.disks]
    if target not in disks:
        raise RpofsError(f"{moment.described()} has no disk {target} (it has {', '.join(disks)})")
    size, written = write_disk(moment.reader(target, whole=True), dest, force, progress)
    return moment, size, written
