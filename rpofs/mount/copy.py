"""`rpofs cp VM@TIME:DISK/VOLUME/PATH DEST`: a guest file (or, with -r, a
directory) out of a recovery point, without a mount, through the same reader
as the mount's files/. `VM@TIME:apps/APP/FILE` (or `apps/APP` with -r): an
application's file as of TIME, as the mount's apps/ shows it (rpofs.apps),
through the mount's own tree: this sits above the tree, beside the FUSE
adapter."""

import os
import stat

from ..errors import RpofsError
from ..files.filesystems import Entry
from ..files.guest import GuestFiles, GuestKey
from ..store.repo import Repository
from ..store.schema import PointRecord
from .appnodes import AppDir
from .nodes import NoSuchEntry
from .points import VmDir
from .tree import Moment, Tree, resolve

COPY_BLOCK = 1 << 20


def parse_source(text: str) -> tuple[str, str, list[str]]:
    """VM@TIME:DISK/VOLUME/PATH -> (vm, time, [disk, volume, path parts...])."""
    vm, at, rest = text.partition("@")
    # the time has colons of its own, the path has slashes: the separator is
    # the last colon before the first slash
    cut = rest.rfind(":", 0, rest.find("/") if "/" in rest else len(rest))
    when, path = rest[:max(cut, 0)], rest[cut + 1:]
    parts = [p for p in path.split("/") if p]
    if cut < 0 or not at or not vm or not when or len(parts) < 2:
        raise RpofsError(f"cannot read {text!r}: expected VM@TIME:DISK/VOLUME/PATH, "
                         f"e.g. web1@2026-11-24T10:40:00Z:vda/1/etc/nginx/nginx.conf")
    return vm, when, parts


def copy_out(repo: Repository, source: str, dest: str, recursive: bool = False, force: bool = False) -> int:
    """Copy; the number of files written. An existing DEST (or DEST/NAME when
    DEST is a directory) is refused unless force, as `rpofs restore` does."""
    vm, when, parts = parse_source(source)
    tree = Tree(repo)
    moment = resolve(repo, vm, when, tree)  # exactly what at/<when> shows, journal instants included
    if parts[0] == "apps":
        return _copy_app(tree, moment, source, parts[1:], dest, recursive, force)
    point = moment.point
    disk, volume, path = parts[0], parts[1], parts[2:]
    if disk not in [d.target for d in point.disks]:
        raise RpofsError(f"the point has no disk {disk} (it has {', '.join(d.target for d in point.disks)})")
    guest = GuestFiles(repo, GuestKey, tree.disk_reader)
    key, entry = guest.root(point, disk, volume)
    for name in path:
        if not entry.is_dir:
            raise RpofsError(f"{source}: {entry.name or '/'} is not a directory")
        children = guest.children(key)
        if name not in children:
            raise RpofsError(f"{source}: no {name!r} in {entry.name or '/'}")
        key, entry = guest.remember(guest.fs_of(key), point, disk, volume, children[name])
    if entry.is_dir and not recursive:
        raise RpofsError(f"{source} is a directory: copy it with -r")
    if os.path.isdir(dest):
        dest = os.path.join(dest, entry.name or volume)
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise RpofsError(f"{parent}: no such directory")
    if os.path.lexists(dest) and not force:
        raise RpofsError(f"{dest} exists (--force to replace it)")
    return _copy(guest, point, key, entry, dest)


def _copy_app(tree: Tree, moment: Moment, source: str, parts: list[str], dest: str,
              recursive: bool, force: bool) -> int:
    """apps/APP/FILE (or apps/APP with -r) as of the moment at/ names,
    walked through the mount's own tree (rpofs.mount.tree), without a mount."""
    try:
        node = VmDir(moment.point.vm).lookup(tree, moment.name)
        node = node.lookup(tree, "apps")
        for name in parts:
            node = node.lookup(tree, name)
    except NoSuchEntry as e:
        raise RpofsError(f"{source}: no such app file ({e})") from None
    files = [node] if not isinstance(node, AppDir) else [child for _, child in node.children(tree)]
    if isinstance(node, AppDir) and not recursive:
        raise RpofsError(f"{source} is a directory: copy it with -r")
    if isinstance(node, AppDir):
        os.makedirs(dest, exist_ok=True)
    written = 0
    for f in files:
        target = os.path.join(dest, f.name) if os.path.isdir(dest) else dest
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise RpofsError(f"{parent}: no such directory")
        if os.path.lexists(target):
            if not force:
                raise RpofsError(f"{target} exists (--force to replace it)")
            _make_room(target, False)
        reader, size = f.open(tree), f.attr(tree, 0).size
        with open(target + ".part", "wb") as out:
            for offset in range(0, size, COPY_BLOCK):
                out.write(reader.read(offset, min(COPY_BLOCK, size - offset)))
        os.rename(target + ".part", target)
        written += 1
    return written


def _make_room(dest: str, is_dir: bool) -> None:
    """With --force: what is at dest goes, unless it is a directory a
    directory is copied into (a symbolic link there is replaced, never followed)."""
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
        os.unlink(dest)
    elif os.path.isdir(dest) and not is_dir:
        raise RpofsError(f"{dest} is a directory: it is not replaced by a file")


def _copy(guest: GuestFiles, point: PointRecord, key: GuestKey, entry: Entry, dest: str) -> int:
    written = 0
    if os.path.lexists(dest):
        _make_room(dest, entry.is_dir)
    if entry.is_link:
        os.symlink(guest.readlink(key), dest)
        _own(dest, entry)
        return 1
    if entry.is_dir:
        os.makedirs(dest, exist_ok=True)
        for child in guest.children(key).values():
            child_key, child = guest.remember(guest.fs_of(key), point, key.target, key.volume, child)
            written += _copy(guest, point, child_key, child, os.path.join(dest, child.name))
    elif stat.S_ISREG(entry.mode):
        source = guest.open(key)
        with open(dest, "wb") as out:
            for offset in range(0, entry.size, COPY_BLOCK):
                out.write(source.read(offset, COPY_BLOCK))
        written = 1
    else:
        return 0  # devices, fifos and sockets are not data
    _own(dest, entry)
    os.chmod(dest, stat.S_IMODE(entry.mode))
    os.utime(dest, ns=(entry.atime_ns, entry.mtime_ns))
    return written


def _own(dest: str, entry: Entry) -> None:
    """Owners as in the guest when root copies (as cp -a would); before chmod,
    which chown would undo for set-id bits."""
    if os.geteuid() == 0:
        os.lchown(dest, entry.uid, entry.gid)
