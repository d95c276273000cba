"""What the repository looks like as a filesystem — here and only here.

    /<vm>/                      one per VM: its name, "<name>.<uuid8>" when names clash
    /<vm>/latest -> <time>      the newest point
    /<vm>/<time>/               one per point (names fixed at commit: rpofs.timefmt)
        <disk>.raw              the disk at that instant
        point.json              the point record
        domain.xml              the VM definition captured with the point
        files/<disk>/<volume>/  the guest's files (rpofs.files.guest)
    /<vm>/at/<any time> -> ../<time>   as-of: the newest point at or before it;
                                 at/ lists nothing
    /.by-uuid/<vm uuid> -> ../<vm>     a path that names the same VM however
                                 names clash or VMs are renamed (a recovered
                                 VM's overlays name their backing file
                                 through it, with the point's time to the
                                 microsecond in at/)

Pure and synchronous: no pyfuse3 here, so tests can walk the tree without
mounting. Thread-safe: the FUSE adapter calls it from worker threads.
Inode numbers are stable for the life of the mount; the point list is re-read
from the catalog at most once per REFRESH_S, so new points show up in a
running mount, and read whole again after a prune, so removed ones go (a
point directory's name is revalidated like the VM directory for that).
"""

import json
import stat
import threading
import time
from dataclasses import dataclass, field

from ..errors import BadTime, RpofsError
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..timefmt import US, format_time, parse_as_of, point_names

ROOT_INO = 1
BY_UUID = ".by-uuid"
REFRESH_S = 1.0
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


_DIR = stat.S_IFDIR | 0o555
_FILE = stat.S_IFREG | 0o444
_LINK = stat.S_IFLNK | 0o777


@dataclass
class _VmView:
    uuid: str
    points: list[PointRecord] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    by_name: dict[str, PointRecord] = field(default_factory=dict)

    def extend(self, new: list[PointRecord]) -> int:
        """Append newer points; the index from which names were (re)made.
        Points carry their names (rpofs.timefmt); only unnamed points from
        before names were stored, sharing the first new point's second,
        are named again (to the names their records get on that commit)."""
        start = len(self.points)
        self.points.extend(new)
        second = new[0].time_us // US
        group = start
        while group > 0 and self.points[group - 1].time_us // US == second:
            group -= 1
        for name in self.names[group:start]:
            del self.by_name[name]
        tail = self.points[group:]
        self.names[group:] = point_names([p.time_us for p in tail], [p.name for p in tail])
        self.by_name.update(zip(self.names[group:], self.points[group:]))
        return group


class Tree:
    def __init__(self, repo: Repository, refresh_s: float = REFRESH_S):
        self.repo = repo
        self._refresh_s = refresh_s
        self._lock = threading.RLock()
        self._loaded_at = float("-inf")
        self._vms: dict[str, _VmView] = {}       # directory name -> view
        self._vm_dir: dict[str, str] = {}        # uuid -> directory name
        self._points: dict[int, tuple[str, PointRecord]] = {}  # point -> (name, record)
        self._ino: dict[tuple, int] = {("root",): ROOT_INO}
        self._node: dict[int, tuple] = {ROOT_INO: ("root",)}
        self._mounted_at = int(time.time() * 1e6)
        self._pruned = repo.pruned_count()
        self._notes: dict[int, dict] = {}  # point -> point.json's "files"
        self._guest = None

    @property
    def guest(self):
        """The guest files (rpofs.files, dissect), made when first used:
        importing them is 0.1 s of a mount's start, which `rpofs run` waits
        for before its VM can start."""
        guest = self._guest
        if guest is None:
            with self._lock:
                if self._guest is None:
                    from ..files.guest import GuestFiles
                    self._guest = GuestFiles(self.repo)
                guest = self._guest
        return guest

    # -- the catalog, re-read at most once per refresh period -------------

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._loaded_at < self._refresh_s:
                return
            vms = self.repo.vms()
            names = [n for _, n in vms]
            known = {view.uuid: view for view in self._vms.values()}
            pruned = self.repo.pruned_count()
            if pruned != self._pruned:  # points were removed: read every list again
                known, self._pruned = {}, pruned
                self._points.clear()
            views, dirs = {}, {}
            for uuid, name in vms:
                view = known.get(uuid) or _VmView(uuid)
                new = self.repo.points(uuid, after=view.points[-1] if view.points else None)
                if new:
                    renamed = view.extend(new)
                    for pname, p in zip(view.names[renamed:], view.points[renamed:]):
                        self._points[p.point] = (pname, p)
                if not view.points:
                    continue
                dirname = safe_name(name if names.count(name) == 1 else f"{name}.{uuid[:8]}", uuid)
                views[dirname] = view
                dirs[uuid] = dirname
            self._vms, self._vm_dir = views, dirs
            self._loaded_at = time.monotonic()

    def stored_bytes(self) -> int:
        """What the repository takes on disk: its packs and its catalog."""
        return self.repo.stored_bytes()

    def inode_count(self) -> int:
        with self._lock:
            return len(self._ino)

    def _inode(self, node: tuple) -> int:
        with self._lock:
            ino = self._ino.get(node)
            if ino is None:
                ino = self._ino[node] = len(self._ino) + 1
                self._node[ino] = node
            return ino

    def _node_of(self, ino: int) -> tuple:
        with self._lock:
            try:
                return self._node[ino]
            except KeyError:
                raise NoSuchEntry(f"inode {ino}") from None

    def _view(self, uuid: str) -> _VmView:
        self._refresh()
        with self._lock:
            name = self._vm_dir.get(uuid)
            if name is None:
                raise NoSuchEntry(f"VM {uuid}")
            return self._vms[name]

    def _point(self, no: int) -> tuple[str, PointRecord]:
        with self._lock:
            found = self._points.get(no)
        if found is None:
            raise NoSuchEntry(f"point {no}")
        return found

    # -- the operations ----------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        node = self._node_of(ino)
        kind = node[0]
        if kind == "root":
            return Attr(ino, _DIR, 0, self._mounted_at * 1000, VOLATILE_TTL)
        if kind == "vm":
            view = self._view(node[1])
            return Attr(ino, _DIR, 0, view.points[-1].time_us * 1000, VOLATILE_TTL)
        if kind in ("at", "byuuid"):
            return Attr(ino, _DIR, 0, self._mounted_at * 1000, VOLATILE_TTL)
        if kind in ("latest", "atlink", "uuidlink"):
            target = self.readlink(ino)
            return Attr(ino, _LINK, len(target), self._mounted_at * 1000, VOLATILE_TTL)
        _, point = self._point(node[1])
        when = point.time_us * 1000
        if kind == "point":  # its content never changes, but prune may remove it
            return Attr(ino, _DIR, 0, when, VOLATILE_TTL)
        if kind in ("files", "fdisk"):
            return Attr(ino, _DIR, 0, when, IMMUTABLE_TTL)
        if kind == "disk":
            size = point.disks[point.disk_index(node[2])].size
            stored = point.stats.get("disk_bytes", {}).get(node[2])  # so du shows what is stored
            return Attr(ino, _FILE, size, when, IMMUTABLE_TTL, stored=stored)
        if kind == "fnode":
            return _guest_attr(ino, self.guest.entry(node))  # parses the inode the first time
        if kind == "json":
            with self._lock:
                known = point.point in self._notes
            if not known:  # its size needs what files/ shows: not worked out to list or stat a point
                return Attr(ino, _FILE, 0, when, 0.0, unsized=True)
        return Attr(ino, _FILE, len(self._small_file(node)), when, IMMUTABLE_TTL)

    def lookup(self, parent: int, name: str) -> Attr:
        node = self._node_of(parent)
        kind = node[0]
        if kind == "root":
            if name == BY_UUID:
                return self.getattr(self._inode(("byuuid",)))
            self._refresh()
            with self._lock:
                view = self._vms.get(name)
            if view is None:
                raise NoSuchEntry(name)
            return self.getattr(self._inode(("vm", view.uuid)))
        if kind == "byuuid":
            self._view(name)  # raises NoSuchEntry for an unknown VM
            return self.getattr(self._inode(("uuidlink", name)))
        if kind == "vm":
            view = self._view(node[1])
            if name == "at":
                return self.getattr(self._inode(("at", view.uuid)))
            if name == "latest":
                return self.getattr(self._inode(("latest", view.uuid)))
            point = view.by_name.get(name)
            if point is None:
                raise NoSuchEntry(name)
            return self.getattr(self._inode(("point", point.point)))
        if kind == "at":
            self._as_of(node[1], name)  # raises NoSuchEntry if nothing is that old
            return self.getattr(self._inode(("atlink", node[1], name)))
        if kind in ("point", "files", "fdisk", "fnode"):
            for child_name, child in self._children(node, name):
                if child_name == name:
                    if kind == "fnode":
                        self.guest.looked_up(node, child)  # before getattr reads its inode
                    return self.getattr(self._inode(child))
            raise NoSuchEntry(name)
        raise NotADirectory(name)

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """Entries in a stable order: new points are appended at the end."""
        node = self._node_of(ino)
        kind = node[0]
        if kind == "root":
            self._refresh()
            with self._lock:
                views = sorted(self._vms.items())
            return ([(BY_UUID, self.getattr(self._inode(("byuuid",))))]
                    + [(name, self.getattr(self._inode(("vm", v.uuid)))) for name, v in views])
        if kind == "byuuid":
            self._refresh()
            with self._lock:
                uuids = sorted(self._vm_dir)
            return [(u, self.getattr(self._inode(("uuidlink", u)))) for u in uuids]
        if kind == "vm":
            view = self._view(node[1])
            entries = [("at", ("at", view.uuid)), ("latest", ("latest", view.uuid))]
            entries += [(n, ("point", p.point)) for n, p in zip(view.names, view.points)]
            return [(name, self.getattr(self._inode(child))) for name, child in entries]
        if kind == "at":
            return []
        if kind in ("point", "files", "fdisk", "fnode"):
            return [(name, self._listed(child)) for name, child in self._children(node)]
        raise NotADirectory(str(ino))

    def known_attr(self, ino: int) -> Attr | None:
        """A guest entry's full attributes if already read, else None: never
        reads the disk and takes no lock (dict reads are atomic), so the FUSE
        adapter may ask on its event loop."""
        node = self._node.get(ino)
        entry = self.guest.remembered(node) if node and node[0] == "fnode" else None
        return _guest_attr(ino, entry) if entry is not None and entry.known else None

    def wants_attrs(self, ino: int) -> bool:
        """Whether a guest directory's entries get stat'ed (ls -l, cp -a, du),
        so its listing should read their inodes too. Takes no lock."""
        node = self._node.get(ino)
        return bool(node) and node[0] == "fnode" and self.guest.stats_wanted(node)

    def read_attrs(self, inos: list[int]) -> None:
        """Read the inodes of listed guest entries, so that known_attr has them.
        One that cannot be read is left for its own lookup to report."""
        for ino in inos:
            node = self._node.get(ino)
            entry = self.guest.remembered(node) if node and node[0] == "fnode" else None
            if entry is not None and not entry.known:
                try:
                    entry.attrs
                except RpofsError:
                    pass

    def is_own_link(self, ino: int) -> bool:
        """latest and at/ links: answered from memory (and the catalog at most
        once per REFRESH_S), cheap enough to answer without a worker thread —
        the kernel asks for them on every path through them."""
        node = self._node.get(ino)
        return node is not None and node[0] in ("latest", "atlink", "uuidlink")

    def readlink(self, ino: int) -> str:
        node = self._node_of(ino)
        if node[0] == "latest":
            return self._view(node[1]).names[-1]
        if node[0] == "atlink":
            return "../" + self._as_of(node[1], node[2])
        if node[0] == "uuidlink":
            self._view(node[1])
            with self._lock:
                return "../" + self._vm_dir[node[1]]
        if node[0] == "fnode" and self.guest.entry(node).is_link:
            return self.guest.readlink(node)
        raise NotASymlink(str(ino))

    def open(self, ino: int):
        """Something with read(offset, length) -> bytes. O(1) for disks."""
        node = self._node_of(ino)
        if node[0] == "disk":
            return DiskReader(self.repo, self._point(node[1])[1], node[2])
        if node[0] in ("json", "xml"):
            return _Bytes(self._small_file(node), direct_io=node[0] == "json")
        if node[0] == "fnode" and not self.guest.entry(node).is_dir:
            return self.guest.open(node)
        raise NoSuchEntry(str(ino))

    # -- helpers -------------------------------------------------------------

    def _children(self, node: tuple, name: str | None = None) -> list[tuple[str, tuple]]:
        """A directory's (name, child node) pairs; with `name`, at least that
        one if it exists (a lookup need not list a guest directory again)."""
        kind, no = node[0], node[1]
        _, point = self._point(no)
        if kind == "point":
            children = [(f"{d.target}.raw", ("disk", no, d.target)) for d in point.disks]
            return children + [("point.json", ("json", no)), ("domain.xml", ("xml", no)), ("files", ("files", no))]
        if kind == "files":
            return [(d.target, ("fdisk", no, d.target)) for d in point.disks]
        if kind == "fdisk":
            volumes = self.guest.disk(point, node[2]).volumes()
            return [(v.name, self.guest.root(point, node[2], v.name)[0]) for v in volumes
                    if name is None or v.name == name]
        entry = self.guest.entry(node)
        if not entry.is_dir:
            raise NotADirectory(entry.name)
        listing = self.guest.children(node)
        fs = self.guest.fs_of(node)
        wanted = listing if name is None else ({name: listing[name]} if name in listing else {})
        return [(n, self.guest.remember(fs, point, node[2], node[3], e)[0]) for n, e in wanted.items()]

    def _listed(self, child: tuple) -> Attr:
        """A child's attributes for a listing: a guest entry whose inode was
        not read yet gets only its type (a listing reads the directory alone)."""
        ino = self._inode(child)
        entry = self.guest.remembered(child) if child[0] == "fnode" else None
        if entry is None:
            return self.getattr(ino)
        if entry.known:
            return _guest_attr(ino, entry)
        return Attr(ino, entry.type, 0, 0, 0.0, 0, 0, 1, known=False)

    def _as_of(self, uuid: str, text: str) -> str:
        """A point's name names it; any other time, its newest point at or before."""
        view = self._view(uuid)
        if text in view.by_name:
            return text
        try:
            bound = parse_as_of(text)
        except BadTime:
            raise NoSuchEntry(text) from None
        best = None
        for name, p in zip(view.names, view.points):
            if p.time_us > bound:
                break
            best = name
        if best is None:
            raise NoSuchEntry(f"no point of {uuid} at or before {text}")
        return best

    def _small_file(self, node: tuple) -> bytes:
        name, point = self._point(node[1])
        if node[0] == "json":  # with what files/ shows of each disk, worked out once
            with self._lock:
                notes = self._notes.get(point.point)
            if notes is None:
                notes = self.guest.notes(point)
                with self._lock:
                    self._notes[point.point] = notes
            return point_json(name, point, notes)
        return self.repo.read_chunk(bytes.fromhex(point.domain_xml))


def _guest_attr(ino: int, e) -> Attr:
    return Attr(ino, e.mode, e.size, e.mtime_ns, IMMUTABLE_TTL, e.uid, e.gid, e.nlink, e.atime_ns, e.ctime_ns)


def safe_name(name: str, uuid: str) -> str:
    """A VM name as a directory name: "%" and "/" percent-encoded, a leading
    "." too (no hidden or "." / ".." directories), and names over 200 bytes
    cut and ended with "~" and the UUID's first 8 digits."""
    name = name.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name.encode()) > 200:
        name = name.encode()[:190].decode(errors="ignore") + "~" + uuid[:8]
    return name


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
    }
    if files is not None:
        body["files"] = files
    return (json.dumps(body, indent=2) + "\n").encode()


class _Bytes:
    def __init__(self, data: bytes, direct_io: bool = False):
        self._data = data
        self.direct_io = direct_io   # the size its attributes gave may not be its own (Attr.unsized)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]
