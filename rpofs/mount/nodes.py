"""A node of the mount's tree and its attributes: what every kind of node
(rpofs.mount.points, pointfiles, guestnodes, appnodes, journalnodes) is
made of. The tree (rpofs.mount.tree) numbers the nodes and hands each
operation to one."""

import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RpofsError

if TYPE_CHECKING:  # the tree is above its nodes: only named here
    from .tree import Tree

VOLATILE_TTL = 1.0      # root, VM dirs, latest, at/ links: they change
IMMUTABLE_TTL = 3600.0  # a point and its files never change


class NoSuchEntry(RpofsError):
    pass


class NotADirectory(RpofsError):
    pass


class NotASymlink(RpofsError):
    pass


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    size: int
    mtime_ns: int
    ttl: float
    uid: int | None = None      # None: the mounting user (rpofs's own nodes)
    gid: int | None = None
    nlink: int | None = None    # None: 2 for directories, 1 otherwise
    atime_ns: int | None = None  # None: mtime
    ctime_ns: int | None = None
    stored: int | None = None   # bytes it takes in storage (st_blocks); None: its size
    known: bool = True          # False: a guest entry listed before its inode was read:
                                # only ino and the type bits of mode are right, ttl is 0
    unsized: bool = False       # its size is not worked out until it is read (point.json, whose
                                # "files" needs the guest filesystems parsed): size 0, ttl 0,
                                # opened for direct I/O so that reads go to its end

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777


class Node:
    """A node of the tree. Each kind is a frozen dataclass (slots) whose fields
    name the node, so equal nodes share an inode, with the operations on it;
    what a kind does not override is refused (a file has no children, a
    directory is no link). A new kind is one class, and where it shows,
    its parent's children()."""
    __slots__ = ()
    own_link = False  # rpofs's own link: answered on the event loop (Tree.is_own_link)

    def attr(self, tree: "Tree", ino: int) -> Attr:
        raise NotImplementedError

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, "Node"]]:
        """A directory's (name, child) pairs in a stable order; with `name`, at
        least that one if it exists (a lookup need not list a guest directory
        again)."""
        raise NotADirectory(str(self))

    def lookup(self, tree: "Tree", name: str) -> "Node":
        for child_name, child in self.children(tree, name):
            if child_name == name:
                return child
        raise NoSuchEntry(name)

    def readlink(self, tree: "Tree") -> str:
        raise NotASymlink(str(self))

    def open(self, tree: "Tree"):
        raise NoSuchEntry(str(self))


class SmallFile(Node):
    """A file of a point made whole in memory: its content(tree)."""
    __slots__ = ()
    direct_io = False

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, FILE_MODE, len(self.content(tree)), tree.when(self.point), IMMUTABLE_TTL)

    def open(self, tree: "Tree") -> "Bytes":
        return Bytes(self.content(tree), self.direct_io)


class Bytes:
    def __init__(self, data: bytes, direct_io: bool = False):
        self._data = data
        self.direct_io = direct_io   # the size its attributes gave may not be its own (Attr.unsized)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]


def guest_attr(ino: int, e) -> Attr:
    """A guest entry's attributes (rpofs.files.filesystems.Entry)."""
    return Attr(ino, e.mode, e.size, e.mtime_ns, IMMUTABLE_TTL, e.uid, e.gid, e.nlink, e.atime_ns, e.ctime_ns)
