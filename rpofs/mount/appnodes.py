"""The applications (docs/APPS.md) as the mount shows them, read through
rpofs.apps.view (Tree.apps).

    <block point>/apps/<app>/<file>    AppsDir, AppDir, AppFile: the applications as
                                       the point holds them (a VM with apps only)
    /<vm>/<time>/                      AppPointDir: one per app point (a shipment of an
                                       app's log): its base block point's disks,
                                       domain.xml and files/, its own point.json
                                       (AppPointJson), and apps/ as of it
"""

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .guestnodes import FilesDir
from .nodes import DIR_MODE, FILE_MODE, IMMUTABLE_TTL, VOLATILE_TTL, Attr, Bytes, Node, NoSuchEntry
from .pointfiles import DiskImage, DomainXml

if TYPE_CHECKING:
    from .tree import Tree


@dataclass(frozen=True, slots=True)
class AppPointDir(Node):
    """An app point: its base block point's disks, domain.xml and files/,
    its own point.json, and apps/ as of it."""
    ship: int

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, tree.ship(self.ship).time_us * 1000, VOLATILE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        ship = tree.ship(self.ship)
        base = tree.point(ship.base)[1]
        disks = [(f"{d.target}.raw", DiskImage(base.point, d.target)) for d in base.disks]
        return disks + [("point.json", AppPointJson(self.ship)), ("domain.xml", DomainXml(base.point)),
                        ("files", FilesDir(base.point)), ("apps", AppsDir(base.point, self.ship))]


@dataclass(frozen=True, slots=True)
class AppPointJson(Node):
    ship: int

    def content(self, tree: "Tree") -> bytes:
        from ..apps.view import app_point_json
        ship = tree.ship(self.ship)
        return (json.dumps(app_point_json(ship, tree.point(ship.base)[1]), indent=2) + "\n").encode()

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, FILE_MODE, len(self.content(tree)), tree.ship(self.ship).time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: "Tree") -> Bytes:
        return Bytes(self.content(tree))


@dataclass(frozen=True, slots=True)
class AppsDir(Node):
    """The VM's applications as of a point: a block point (ship 0) or an app point."""
    point: int   # the block point (an app point's base)
    ship: int    # 0: the block point itself

    def when(self, tree: "Tree") -> int:
        return tree.ship(self.ship).time_us if self.ship else tree.point(self.point)[1].time_us

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, self.when(tree) * 1000, IMMUTABLE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        apps = tree.apps.apps(tree.point(self.point)[1].vm)
        return [(a.name, AppDir(self.point, self.ship, a.name)) for a in apps if name is None or a.name == name]


@dataclass(frozen=True, slots=True)
class AppDir(Node):
    """One application's files as of the point (rpofs.apps.view)."""
    point: int
    ship: int
    app: str

    def files(self, tree: "Tree") -> dict:
        base = tree.point(self.point)[1]
        app = next((a for a in tree.apps.apps(base.vm) if a.name == self.app), None)
        if app is None:
            raise NoSuchEntry(self.app)
        if not self.ship:
            return tree.apps.view(base.vm, base, None, app)
        ship = tree.ship(self.ship)
        return tree.apps.at(base.vm, base, ship.time_us, app, own=ship)

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, AppsDir(self.point, self.ship).when(tree) * 1000, IMMUTABLE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        return [(n, AppFile(self.point, self.ship, self.app, n)) for n in self.files(tree)
                if name is None or n == name]


@dataclass(frozen=True, slots=True)
class AppFile(Node):
    point: int
    ship: int
    app: str
    name: str

    def _file(self, tree: "Tree"):
        found = AppDir(self.point, self.ship, self.app).files(tree).get(self.name)
        if found is None:
            raise NoSuchEntry(self.name)
        return found

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, FILE_MODE, self._file(tree).size, AppsDir(self.point, self.ship).when(tree) * 1000,
                    IMMUTABLE_TTL)

    def open(self, tree: "Tree"):
        return self._file(tree).reader
