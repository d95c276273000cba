"""A continuously protected VM's journal instants (docs/PROTECT.md) as the
mount shows them, read through rpofs.protect.view (Tree.journal).

    /<vm>/<time to the us>/    JournalPointDir: the VM's disks as of an instant of
                               its journal: JournalDisk images, JournalPointJson,
                               the base's domain.xml, files/ and apps/ as the
                               disks hold them at the instant (through its stand-in
                               point, Tree.instant_point); one listed per
                               journal_spacing of writes, any record's by name
"""

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .nodes import DIR_MODE, FILE_MODE, IMMUTABLE_TTL, VOLATILE_TTL, Attr, Bytes, Node
from .appnodes import AppsDir
from .guestnodes import FilesDir
from .pointfiles import DomainXml

if TYPE_CHECKING:
    from .tree import Tree


@dataclass(frozen=True, slots=True)
class JournalPointDir(Node):
    """A protected VM at an instant of its journal: the disks as of it,
    point.json, and the base point's domain.xml (rpofs.protect.view)."""
    uuid: str
    time_us: int

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, DIR_MODE, 0, self.time_us * 1000, VOLATILE_TTL)

    def children(self, tree: "Tree", name: str | None = None) -> list[tuple[str, Node]]:
        session, base = tree.journal_base(self.uuid, self.time_us)
        stand_in = tree.instant_point(self.uuid, self.time_us).point
        disks = [(f"{d.target}.raw", JournalDisk(self.uuid, self.time_us, d.target)) for d in session.session.disks]
        out = disks + [("point.json", JournalPointJson(self.uuid, self.time_us)),
                       ("domain.xml", DomainXml(base.point)), ("files", FilesDir(stand_in))]
        if tree.view(self.uuid).has_apps:
            out.append(("apps", AppsDir(stand_in, 0)))
        return out


@dataclass(frozen=True, slots=True)
class JournalDisk(Node):
    uuid: str
    time_us: int
    target: str

    def attr(self, tree: "Tree", ino: int) -> Attr:
        session, _ = tree.journal_base(self.uuid, self.time_us)
        size = next(d.size for d in session.session.disks if d.target == self.target)
        return Attr(ino, FILE_MODE, size, self.time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: "Tree"):
        session, base = tree.journal_base(self.uuid, self.time_us)
        return tree.journal.reader(session, base, self.time_us, self.target)


@dataclass(frozen=True, slots=True)
class JournalPointJson(Node):
    uuid: str
    time_us: int

    def content(self, tree: "Tree") -> bytes:
        from ..protect.view import instant_json
        session, base = tree.journal_base(self.uuid, self.time_us)
        return (json.dumps(instant_json(session, base, self.time_us), indent=2) + "\n").encode()

    def attr(self, tree: "Tree", ino: int) -> Attr:
        return Attr(ino, FILE_MODE, len(self.content(tree)), self.time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: "Tree") -> Bytes:
        return Bytes(self.content(tree))
