"""The top of the tree: the VMs and their points.

    /                           Root
    /<vm>/                      VmDir: one per VM, its name ("<name>.<uuid8>" when names clash)
    /<vm>/latest -> <time>      Latest: the newest point
    /<vm>/<time>/               PointDir: a block point (its files: rpofs.mount.pointfiles,
                                guestnodes, appnodes); beside them app points (appnodes)
                                and journal instants (journalnodes)
    /<vm>/at/<any time>         AtDir, AtLink: -> ../<time>, the newest point of any kind
                                at or before it; at/ lists nothing
    /.by-uuid/<vm uuid>         ByUuid, UuidLink: -> ../<vm>
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..timefmt import format_time
from .appnodes import AppPointDir, AppsDir
from .guestnodes import FilesDir
from .journalnodes import JournalPointDir
from .nodes import DIR_MODE, LINK_MODE, VOLATILE_TTL, Attr, Node
from .pointfiles import DiskImage, DomainXml, PointJson

if TYPE_CHECKING:
    from .tree import Tree

BY_UUID = ".by-uuid"


class _OwnDir(Node):
    """A directory of rpofs's own, as old as the mount."""
    __slots__ = ()

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, tree.mounted_at * 1000, VOLATILE_TTL)


class _OwnLink(Node):
    """latest, at/ and .by-uuid/ links, answered from memory."""
    __slots__ = ()
    own_link = True

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, LINK_MODE, len(self.readlink(tree)), tree.mounted_at * 1000, VOLATILE_TTL)


@dataclass(frozen=True, slots=True)
class Root(_OwnDir):
    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        if name == BY_UUID:
            return [(BY_UUID, ByUuid())]
        return [(BY_UUID, ByUuid())] + [(n, VmDir(uuid)) for n, uuid in tree.vm_dirs(name)]


@dataclass(frozen=True, slots=True)
class ByUuid(_OwnDir):
    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        if name is not None:
            tree.view(name)  # raises NoSuchEntry for an unknown VM
            return [(name, UuidLink(name))]
        return [(u, UuidLink(u)) for u in tree.vm_uuids()]


@dataclass(frozen=True, slots=True)
class UuidLink(_OwnLink):
    uuid: str

    def readlink(self, tree: "Tree") -> str:
        return "../" + tree.vm_dir(self.uuid)


@dataclass(frozen=True, slots=True)
class VmDir(Node):
    uuid: str

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, tree.view(self.uuid).newest()[1] * 1000, VOLATILE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        view = tree.view(self.uuid)
        points = zip(view.names, view.points) if name is None else [(name, view.by_name.get(name))]
        ships = view.ships if name is None else [view.ship_by_name.get(name)]
        if name is None:
            instants = [(format_time(t, 6), t) for t in view.instants]
        else:
            t = tree.instant(view, name) if name not in view.by_name and name not in view.ship_by_name else None
            instants = [] if t is None else [(name, t)]
        return ([("at", AtDir(self.uuid)), ("latest", Latest(self.uuid))]
                + [(n, PointDir(p.point)) for n, p in points if p is not None]
                + [(s.name, AppPointDir(s.ship)) for s in ships if s is not None]
                + [(n, JournalPointDir(self.uuid, t)) for n, t in instants])


@dataclass(frozen=True, slots=True)
class Latest(_OwnLink):
    uuid: str

    def readlink(self, tree: "Tree") -> str:
        return tree.view(self.uuid).newest()[0]


@dataclass(frozen=True, slots=True)
class AtDir(_OwnDir):
    """Lists nothing; any time names its newest point at or before it."""
    uuid: str

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        if name is None:
            return []
        tree.at(self.uuid, name)  # raises NoSuchEntry if nothing is that old
        return [(name, AtLink(self.uuid, name))]


@dataclass(frozen=True, slots=True)
class AtLink(_OwnLink):
    uuid: str
    text: str

    def readlink(self, tree: "Tree") -> str:
        return "../" + tree.at(self.uuid, self.text)


@dataclass(frozen=True, slots=True)
class PointDir(Node):
    point: int

    def attr(self, tree: "Tree", ino: int) -> Attr:  # its content never changes, but prune may remove it
        return Attr(ino, DIR_MODE, 0, tree.when(self.point), VOLATILE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        no = self.point
        point = tree.point(no)[1]
        disks = [(f"{d.target}.raw", DiskImage(no, d.target)) for d in point.disks]
        apps = [("apps", AppsDir(no, 0))] if tree.view(point.vm).has_apps else []
        return disks + [("point.json", PointJson(no)), ("domain.xml", DomainXml(no)), ("files", FilesDir(no))] + apps
