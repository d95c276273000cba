"""A point's files/: the guest's own files, read by rpofs.files.guest.

    files/                             FilesDir(point): the disks
    files/<disk>/                      FilesDisk(point, target): the disk's volumes
    files/<disk>/<volume>/<path...>    GuestNode(point, target, volume, ino): a guest
                                       file or directory (volume: partition number,
                                       "0" = whole disk); `ino` is the filesystem's
                                       inode, so hard links share one

The tree's GuestFiles (Tree.guest) makes the GuestNodes: they are the keys
it remembers each entry under (in place of rpofs.files.guest.GuestKey).
Nothing here imports rpofs.files: the tree imports it when first needed
(it takes 0.1 s of a mount's start, which `rpofs run` waits for).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .nodes import DIR_MODE, IMMUTABLE_TTL, Attr, Node, NotADirectory, guest_attr

if TYPE_CHECKING:
    from ..files.guest import GuestFile
    from .tree import Tree


@dataclass(frozen=True, slots=True)
class FilesDir(Node):
    point: int

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, tree.when(self.point), IMMUTABLE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        return [(d.target, FilesDisk(self.point, d.target)) for d in tree.point(self.point)[1].disks]


@dataclass(frozen=True, slots=True)
class FilesDisk(Node):
    """A disk's volumes, each the root GuestNode of its filesystem."""
    point: int
    target: str

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, tree.when(self.point), IMMUTABLE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        _, point = tree.point(self.point)
        volumes = tree.guest.disk(point, self.target).volumes()
        return [(v.name, tree.guest.root(point, self.target, v.name)[0]) for v in volumes
                if name is None or v.name == name]


@dataclass(frozen=True, slots=True)
class GuestNode(Node):
    """A guest file or directory: made and remembered by the tree's
    GuestFiles, which holds its entry and filesystem."""
    point: int
    target: str
    volume: str
    ino: int  # the guest filesystem's, not the mount's

    def attr(self, tree: "Tree", ino: int) -> Attr:
        tree.point(self.point)  # NoSuchEntry once the point is pruned
        return guest_attr(ino, tree.guest.entry(self))  # parses the inode the first time

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        _, point = tree.point(self.point)
        guest = tree.guest
        entry = guest.entry(self)
        if not entry.is_dir:
            raise NotADirectory(entry.name)
        listing, fs = guest.children(self), guest.fs_of(self)
        wanted = listing if name is None else ({name: listing[name]} if name in listing else {})
        return [(n, guest.remember(fs, point, self.target, self.volume, e)[0]) for n, e in wanted.items()]

    def lookup(self, tree: "Tree", name: str) -> Node:
        child = Node.lookup(self, tree, name)
        tree.guest.looked_up(self, child)  # before getattr reads its inode
        return child

    def readlink(self, tree: "Tree") -> str:
        if not tree.guest.entry(self).is_link:
            return Node.readlink(self, tree)  # refused
        return tree.guest.readlink(self)

    def open(self, tree: "Tree") -> "GuestFile":
        if tree.guest.entry(self).is_dir:
            return Node.open(self, tree)  # refused
        return tree.guest.open(self)
