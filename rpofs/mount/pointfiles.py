"""The files of a block point: its disks, point.json and domain.xml (an app
point and a journal instant show some of them too).

    <disk>.raw      DiskImage: the disk at that instant
    point.json      PointJson: the point record, with what files/ shows
    domain.xml      DomainXml: the VM definition captured with the point
"""

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..store.materialize import DiskReader
from ..store.schema import PointRecord
from ..timefmt import format_time
from .nodes import FILE_MODE, IMMUTABLE_TTL, Attr, Node, SmallFile

if TYPE_CHECKING:
    from .tree import Tree


@dataclass(frozen=True, slots=True)
class DiskImage(Node):
    point: int
    target: str

    def attr(self, tree: "Tree", ino: int) -> Attr:
        _, p = tree.point(self.point)
        stored = p.stats.get("disk_bytes", {}).get(self.target)  # so du shows what is stored
        return Attr(ino, FILE_MODE, p.disks[p.disk_index(self.target)].size, p.time_us * 1000, IMMUTABLE_TTL,
                    stored=stored)

    def open(self, tree: "Tree") -> DiskReader:
        return DiskReader(tree.repo, tree.point(self.point)[1], self.target)


@dataclass(frozen=True, slots=True)
class PointJson(SmallFile):
    point: int
    direct_io = True  # listed unsized (Attr.unsized)

    def attr(self, tree: "Tree", ino: int) -> Attr:
        when = tree.when(self.point)
        if not tree.notes_known(self.point):  # its size needs what files/ shows: not worked out to list or stat a point
            return Attr(ino, FILE_MODE, 0, when, 0.0, unsized=True)
        return SmallFile.attr(self, tree, ino)

    def content(self, tree: "Tree") -> bytes:
        """With what files/ shows of each disk, worked out once."""
        name, point = tree.point(self.point)
        return point_json(name, point, tree.notes(point))


@dataclass(frozen=True, slots=True)
class DomainXml(SmallFile):
    point: int

    def content(self, tree: "Tree") -> bytes:
        return tree.repo.read_chunk(bytes.fromhex(tree.point(self.point)[1].domain_xml))


def point_json(name: str, p: PointRecord, files: dict | None = None) -> bytes:
    """point.json and `rpofs points --json`: a stable, documented shape; the
    mount's adds `files` (what files/ shows of each disk)."""
    body = {
        "name": name,
        "time": format_time(p.time_us, 6),
        "point": p.point,
        "vm": {"uuid": p.vm, "name": p.vm_name},
        "kind": p.kind,
        "chain": p.chain,
        "parent": p.parent,
        "consistency": p.consistency,
        "disks": [{"target": d.target, "size": d.size, "source": d.source} for d in p.disks],
        "checkpoint": p.checkpoint,
        "reason": p.reason,
        "warnings": list(p.warnings),
        "firmware": sorted(p.firmware) if p.firmware is not None else None,
        "stats": p.stats,
        "origin": p.origin or "backup",
    }
    if files is not None:
        body["files"] = files
    return (json.dumps(body, indent=2) + "\n").encode()
