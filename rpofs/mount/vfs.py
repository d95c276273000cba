"""What the repository looks like as a filesystem — here and only here.

    /                                  Root
    /<vm>/                             VmDir: one per VM, its name ("<name>.<uuid8>" when names clash)
    /<vm>/latest -> <time>             Latest: the newest point
    /<vm>/<time>/                      PointDir: one per point (names fixed at commit: rpofs.timefmt)
        <disk>.raw                     DiskImage: the disk at that instant
        point.json                     PointJson: the point record
        domain.xml                     DomainXml: the VM definition captured with the point
        files/<disk>/<volume>/         FilesDir, FilesDisk, GuestNode: the guest's files (rpofs.files.guest)
        apps/<app>/<file>              AppsDir, AppDir, AppFile: the applications as the point holds
                                       them (a VM with apps only; rpofs.apps.view)
    /<vm>/<time>/                      AppPointDir: one per app point (a shipment of an app's log,
                                       docs/APPS.md): its base block point's disks, domain.xml and
                                       files/, its own point.json (AppPointJson), and apps/ as of it
    /<vm>/<time to the us>/            JournalPointDir: a continuously protected VM's disks as of an
                                       instant of its journal (rpofs.protect.view, docs/PROTECT.md):
                                       JournalDisk images, JournalPointJson, the base's domain.xml;
                                       one listed per journal_spacing of writes, any record's by name
    /<vm>/at/<any time> -> ../<time>   AtDir, AtLink: as-of, the newest point of any kind (block,
                                       app, journal instant) at or before it; at/ lists nothing
    /.by-uuid/<vm uuid> -> ../<vm>     ByUuid, UuidLink: a path that names the same VM however
                                       names clash or VMs are renamed (a recovered VM's overlays
                                       name their backing file through it, with the point's time
                                       to the microsecond in at/)

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
from ..store import protection, shipments
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import PointRecord, ShipRecord
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


class Node:
    """A node of the tree. Each kind is a frozen dataclass (slots) whose fields
    name the node, so equal nodes share an inode, with the operations on it;
    what a kind does not override is refused (a file has no children, a
    directory is no link). A new kind is one class here, and where it shows,
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


@dataclass
class _VmView:
    uuid: str
    points: list[PointRecord] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    by_name: dict[str, PointRecord] = field(default_factory=dict)
    # app points that can be read (a base), oldest first; those older than
    # ships_stable_us do not change any more (relate.rebase changes only app
    # points newer than the newest block point)
    ships: list[ShipRecord] = field(default_factory=list)
    ship_by_name: dict[str, ShipRecord] = field(default_factory=dict)
    ships_stable_us: int = 0
    has_apps: bool = False
    # a protected VM's journal (rpofs.protect.view): its sessions and the instants listed
    journal: list = field(default_factory=list)
    instants: list[int] = field(default_factory=list)

    def newest(self) -> tuple[str, int]:
        """The newest point's name and time, of any kind."""
        best = (self.names[-1], self.points[-1].time_us)
        if self.ships and self.ships[-1].time_us > best[1]:
            best = self.ships[-1].name, self.ships[-1].time_us
        if self.instants and self.instants[-1] > best[1]:
            best = format_time(self.instants[-1], 6), self.instants[-1]
        return best

    def take_ships(self, fresh: list[ShipRecord], since_us: int) -> None:
        """Replace the app points from since_us on with `fresh` (readable ones)."""
        keep = [s for s in self.ships if s.time_us < since_us]
        for s in self.ships[len(keep):]:
            self.ship_by_name.pop(s.name, None)
        self.ships = keep + [s for s in fresh if s.base is not None]
        self.ship_by_name.update((s.name, s) for s in self.ships)

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
    def __init__(self, repo: Repository, refresh_s: float = REFRESH_S, journal_spacing_s: float = 1.0):
        self.repo = repo
        self._refresh_s = refresh_s
        self._spacing_us = max(1, int(journal_spacing_s * US))
        self._journal = None
        self._lock = threading.RLock()
        self._loaded_at = float("-inf")
        self._vms: dict[str, _VmView] = {}       # directory name -> view
        self._vm_dir: dict[str, str] = {}        # uuid -> directory name
        self._points: dict[int, tuple[str, PointRecord]] = {}  # point -> (name, record)
        self._ino: dict[Node, int] = {Root(): ROOT_INO}
        self._node: dict[int, Node] = {ROOT_INO: Root()}
        self._mounted_at = int(time.time() * 1e6)
        self._pruned = repo.pruned_count()
        self._notes: dict[int, dict] = {}  # point -> point.json's "files"
        self._ships: dict[int, ShipRecord] = {}  # app points by shipment number
        self._guest = None
        self._apps = None

    @property
    def apps(self):
        """The applications' files as of points (rpofs.apps.view), made when first used."""
        apps = self._apps
        if apps is None:
            with self._lock:
                if self._apps is None:
                    from ..apps.view import AppViews
                    self._apps = AppViews(self.repo, self.guest)
                apps = self._apps
        return apps

    @property
    def journal(self):
        """Protected VMs' journals (rpofs.protect.view), made when first used."""
        with self._lock:
            if self._journal is None:
                from ..protect.view import JournalViews
                self._journal = JournalViews(self.repo)
            return self._journal

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
                self._ships.clear()
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
                self._refresh_ships(view)
                self._refresh_journal(view)
                dirname = safe_name(name if names.count(name) == 1 else f"{name}.{uuid[:8]}", uuid)
                views[dirname] = view
                dirs[uuid] = dirname
            self._vms, self._vm_dir = views, dirs
            self._loaded_at = time.monotonic()

    def _refresh_ships(self, view: _VmView) -> None:
        """The VM's app points from where they may still change on."""
        since = view.ships_stable_us
        fresh = list(shipments.ships(self.repo, view.uuid, since_us=since))
        view.take_ships(fresh, since)
        view.ships_stable_us = view.points[-1].time_us
        self._ships.update((s.ship, s) for s in fresh if s.base is not None)
        view.has_apps = view.has_apps or bool(view.ships) or bool(shipments.apps(self.repo, view.uuid))

    def _refresh_journal(self, view: _VmView) -> None:
        """A protected VM's journal scanned on, and its instants to list."""
        if not view.journal and not protection.of_vm(self.repo, view.uuid):
            return
        view.journal = self.journal.refresh(view.uuid)
        view.instants = self.journal.instants(view.journal, view.points, self._spacing_us)

    def journal_base(self, uuid: str, time_us: int):
        """(session view, base point) an instant of the VM's journal reads
        from; NoSuchEntry when it cannot be read (no journal covers it)."""
        view = self._view(uuid)
        found = self.journal.base(view.journal, view.points, time_us) if view.journal else None
        if found is None:
            raise NoSuchEntry(f"no journal of {uuid} covers {format_time(time_us, 6)}")
        return found

    def _instant(self, view: _VmView, name: str) -> int | None:
        """The journal instant a name names: a record's time to the microsecond."""
        if not view.journal or len(name) != 27:
            return None
        try:
            t = parse_as_of(name)
        except BadTime:
            return None
        if format_time(t, 6) != name or self.journal.change_at_or_before(view.journal, view.points, t) != t:
            return None
        return t

    def ship(self, no: int) -> ShipRecord:
        """An app point's record; NoSuchEntry once it is pruned."""
        with self._lock:
            found = self._ships.get(no)
        if found is None:
            raise NoSuchEntry(f"app point {no}")
        return found

    def stored_bytes(self) -> int:
        """What the repository takes on disk: its packs and its catalog."""
        return self.repo.stored_bytes()

    def inode_count(self) -> int:
        with self._lock:
            return len(self._ino)

    def _inode(self, node: Node) -> int:
        with self._lock:
            ino = self._ino.get(node)
            if ino is None:
                ino = self._ino[node] = len(self._ino) + 1
                self._node[ino] = node
            return ino

    def _node_of(self, ino: int) -> Node:
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

    def point(self, no: int) -> tuple[str, PointRecord]:
        """A point's name and record; NoSuchEntry once it is pruned."""
        with self._lock:
            found = self._points.get(no)
        if found is None:
            raise NoSuchEntry(f"point {no}")
        return found

    # -- the operations: each the node's own --------------------------------

    def getattr(self, ino: int) -> Attr:
        return self._node_of(ino).attr(self, ino)

    def lookup(self, parent: int, name: str) -> Attr:
        return self.getattr(self._inode(self._node_of(parent).lookup(self, name)))

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """Entries in a stable order: new points are appended at the end."""
        return [(name, self._listed(child)) for name, child in self._node_of(ino).children(self)]

    def known_attr(self, ino: int) -> Attr | None:
        """A guest entry's full attributes if already read, else None: never
        reads the disk and takes no lock (dict reads are atomic), so the FUSE
        adapter may ask on its event loop."""
        entry = self._entry(self._node.get(ino))
        return guest_attr(ino, entry) if entry is not None and entry.known else None

    def wants_attrs(self, ino: int) -> bool:
        """Whether a guest directory's entries get stat'ed (ls -l, cp -a, du),
        so its listing should read their inodes too. Takes no lock."""
        node = self._node.get(ino)
        return self._entry(node) is not None and self._guest.stats_wanted(node)

    def read_attrs(self, inos: list[int]) -> None:
        """Read the inodes of listed guest entries, so that known_attr has them.
        One that cannot be read is left for its own lookup to report."""
        for ino in inos:
            entry = self._entry(self._node.get(ino))
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
        return node is not None and node.own_link

    def readlink(self, ino: int) -> str:
        return self._node_of(ino).readlink(self)

    def open(self, ino: int):
        """Something with read(offset, length) -> bytes. O(1) for disks."""
        return self._node_of(ino).open(self)

    # -- helpers -------------------------------------------------------------

    def _listed(self, child: Node) -> Attr:
        """A child's attributes for a listing: a guest entry whose inode was
        not read yet gets only its type (a listing reads the directory alone)."""
        ino = self._inode(child)
        entry = self._entry(child)
        if entry is None:
            return self.getattr(ino)
        if entry.known:
            return guest_attr(ino, entry)
        return Attr(ino, entry.type, 0, 0, 0.0, 0, 0, 1, known=False)

    def _entry(self, node: Node | None):
        """The guest entry (rpofs.files.filesystems.Entry) a node is, if seen
        already, else None: takes no lock, and never makes the guest files."""
        guest = self._guest
        return guest.remembered(node) if guest is not None and node is not None else None

    def as_of(self, uuid: str, text: str) -> str:
        """The name of the point `text` names in at/ ("latest": the newest)."""
        return self._view(uuid).newest()[0] if text == "latest" else self._as_of(uuid, text)

    def _as_of(self, uuid: str, text: str) -> str:
        """A point's name names it; any other time, its newest point of
        either kind (block or app) at or before."""
        view = self._view(uuid)
        if text in view.by_name or text in view.ship_by_name or self._instant(view, text) is not None:
            return text
        try:
            bound = parse_as_of(text)
        except BadTime:
            raise NoSuchEntry(text) from None
        best, best_us = None, -1
        for name, p in zip(view.names, view.points):
            if p.time_us > bound:
                break
            best, best_us = name, p.time_us
        for s in reversed(view.ships):
            if s.time_us <= bound:
                if s.time_us > best_us:
                    best, best_us = s.name, s.time_us
                break
        if view.journal:
            t = self.journal.change_at_or_before(view.journal, view.points, bound)
            if t is not None and t > best_us:
                best = format_time(t, 6)
        if best is None:
            raise NoSuchEntry(f"no point of {uuid} at or before {text}")
        return best

    def _when(self, no: int) -> int:
        """A point's time in ns: the mtime of everything in it."""
        return self.point(no)[1].time_us * 1000


# -- the kinds of nodes --------------------------------------------------------

class _OwnDir(Node):
    """A directory of rpofs's own, as old as the mount."""
    __slots__ = ()

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, tree._mounted_at * 1000, VOLATILE_TTL)


class _OwnLink(Node):
    """latest, at/ and .by-uuid/ links, answered from memory."""
    __slots__ = ()
    own_link = True

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _LINK, len(self.readlink(tree)), tree._mounted_at * 1000, VOLATILE_TTL)


@dataclass(frozen=True, slots=True)
class Root(_OwnDir):
    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        if name == BY_UUID:
            return [(BY_UUID, ByUuid())]
        tree._refresh()
        with tree._lock:
            vms = sorted(tree._vms.items()) if name is None else [(name, tree._vms.get(name))]
        return [(BY_UUID, ByUuid())] + [(n, VmDir(v.uuid)) for n, v in vms if v is not None]


@dataclass(frozen=True, slots=True)
class ByUuid(_OwnDir):
    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        if name is not None:
            tree._view(name)  # raises NoSuchEntry for an unknown VM
            return [(name, UuidLink(name))]
        tree._refresh()
        with tree._lock:
            uuids = sorted(tree._vm_dir)
        return [(u, UuidLink(u)) for u in uuids]


@dataclass(frozen=True, slots=True)
class UuidLink(_OwnLink):
    uuid: str

    def readlink(self, tree: Tree) -> str:
        tree._view(self.uuid)
        with tree._lock:
            return "../" + tree._vm_dir[self.uuid]


@dataclass(frozen=True, slots=True)
class VmDir(Node):
    uuid: str

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, tree._view(self.uuid).newest()[1] * 1000, VOLATILE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        view = tree._view(self.uuid)
        points = zip(view.names, view.points) if name is None else [(name, view.by_name.get(name))]
        ships = view.ships if name is None else [view.ship_by_name.get(name)]
        if name is None:
            instants = [(format_time(t, 6), t) for t in view.instants]
        else:
            t = tree._instant(view, name) if name not in view.by_name and name not in view.ship_by_name else None
            instants = [] if t is None else [(name, t)]
        return ([("at", AtDir(self.uuid)), ("latest", Latest(self.uuid))]
                + [(n, PointDir(p.point)) for n, p in points if p is not None]
                + [(s.name, AppPointDir(s.ship)) for s in ships if s is not None]
                + [(n, JournalPointDir(self.uuid, t)) for n, t in instants])


@dataclass(frozen=True, slots=True)
class Latest(_OwnLink):
    uuid: str

    def readlink(self, tree: Tree) -> str:
        return tree._view(self.uuid).newest()[0]


@dataclass(frozen=True, slots=True)
class AtDir(_OwnDir):
    """Lists nothing; any time names its newest point at or before it."""
    uuid: str

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        if name is None:
            return []
        tree._as_of(self.uuid, name)  # raises NoSuchEntry if nothing is that old
        return [(name, AtLink(self.uuid, name))]


@dataclass(frozen=True, slots=True)
class AtLink(_OwnLink):
    uuid: str
    text: str

    def readlink(self, tree: Tree) -> str:
        return "../" + tree._as_of(self.uuid, self.text)


@dataclass(frozen=True, slots=True)
class PointDir(Node):
    point: int

    def attr(self, tree: Tree, ino: int) -> Attr:  # its content never changes, but prune may remove it
        return Attr(ino, _DIR, 0, tree._when(self.point), VOLATILE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        no = self.point
        point = tree.point(no)[1]
        disks = [(f"{d.target}.raw", DiskImage(no, d.target)) for d in point.disks]
        apps = [("apps", AppsDir(no, 0))] if tree._view(point.vm).has_apps else []
        return disks + [("point.json", PointJson(no)), ("domain.xml", DomainXml(no)), ("files", FilesDir(no))] + apps


@dataclass(frozen=True, slots=True)
class DiskImage(Node):
    point: int
    target: str

    def attr(self, tree: Tree, ino: int) -> Attr:
        _, p = tree.point(self.point)
        stored = p.stats.get("disk_bytes", {}).get(self.target)  # so du shows what is stored
        return Attr(ino, _FILE, p.disks[p.disk_index(self.target)].size, p.time_us * 1000, IMMUTABLE_TTL,
                    stored=stored)

    def open(self, tree: Tree) -> DiskReader:
        return DiskReader(tree.repo, tree.point(self.point)[1], self.target)


class _SmallFile(Node):
    """A file made whole in memory: its content(tree)."""
    __slots__ = ()
    direct_io = False

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _FILE, len(self.content(tree)), tree._when(self.point), IMMUTABLE_TTL)

    def open(self, tree: Tree) -> "_Bytes":
        return _Bytes(self.content(tree), self.direct_io)


@dataclass(frozen=True, slots=True)
class PointJson(_SmallFile):
    point: int
    direct_io = True  # listed unsized (Attr.unsized)

    def attr(self, tree: Tree, ino: int) -> Attr:
        when = tree._when(self.point)
        with tree._lock:
            known = self.point in tree._notes
        if not known:  # its size needs what files/ shows: not worked out to list or stat a point
            return Attr(ino, _FILE, 0, when, 0.0, unsized=True)
        return _SmallFile.attr(self, tree, ino)

    def content(self, tree: Tree) -> bytes:
        """With what files/ shows of each disk, worked out once."""
        name, point = tree.point(self.point)
        with tree._lock:
            notes = tree._notes.get(point.point)
        if notes is None:
            notes = tree.guest.notes(point)
            with tree._lock:
                tree._notes[point.point] = notes
        return point_json(name, point, notes)


@dataclass(frozen=True, slots=True)
class DomainXml(_SmallFile):
    point: int

    def content(self, tree: Tree) -> bytes:
        return tree.repo.read_chunk(bytes.fromhex(tree.point(self.point)[1].domain_xml))


@dataclass(frozen=True, slots=True)
class FilesDir(Node):
    point: int

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, tree._when(self.point), IMMUTABLE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        return [(d.target, FilesDisk(self.point, d.target)) for d in tree.point(self.point)[1].disks]


@dataclass(frozen=True, slots=True)
class FilesDisk(Node):
    """A disk's volumes, each the root GuestNode of its filesystem."""
    point: int
    target: str

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, tree._when(self.point), IMMUTABLE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        _, point = tree.point(self.point)
        volumes = tree.guest.disk(point, self.target).volumes()
        return [(v.name, tree.guest.root(point, self.target, v.name)[0]) for v in volumes
                if name is None or v.name == name]


@dataclass(frozen=True, slots=True)
class AppPointDir(Node):
    """An app point: its base block point's disks, domain.xml and files/,
    its own point.json, and apps/ as of it."""
    ship: int

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, tree.ship(self.ship).time_us * 1000, VOLATILE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        ship = tree.ship(self.ship)
        base = tree.point(ship.base)[1]
        disks = [(f"{d.target}.raw", DiskImage(base.point, d.target)) for d in base.disks]
        return disks + [("point.json", AppPointJson(self.ship)), ("domain.xml", DomainXml(base.point)),
                        ("files", FilesDir(base.point)), ("apps", AppsDir(base.point, self.ship))]


@dataclass(frozen=True, slots=True)
class AppPointJson(Node):
    ship: int

    def content(self, tree: Tree) -> bytes:
        from ..apps.view import app_point_json
        ship = tree.ship(self.ship)
        return (json.dumps(app_point_json(ship, tree.point(ship.base)[1]), indent=2) + "\n").encode()

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _FILE, len(self.content(tree)), tree.ship(self.ship).time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: Tree) -> "_Bytes":
        return _Bytes(self.content(tree))


@dataclass(frozen=True, slots=True)
class AppsDir(Node):
    """The VM's applications as of a point: a block point (ship 0) or an app point."""
    point: int   # the block point (an app point's base)
    ship: int    # 0: the block point itself

    def when(self, tree: Tree) -> int:
        return tree.ship(self.ship).time_us if self.ship else tree.point(self.point)[1].time_us

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, self.when(tree) * 1000, IMMUTABLE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        apps = tree.apps.apps(tree.point(self.point)[1].vm)
        return [(a.name, AppDir(self.point, self.ship, a.name)) for a in apps if name is None or a.name == name]


@dataclass(frozen=True, slots=True)
class AppDir(Node):
    """One application's files as of the point (rpofs.apps.view)."""
    point: int
    ship: int
    app: str

    def files(self, tree: Tree) -> dict:
        base = tree.point(self.point)[1]
        app = next((a for a in tree.apps.apps(base.vm) if a.name == self.app), None)
        if app is None:
            raise NoSuchEntry(self.app)
        if not self.ship:
            return tree.apps.view(base.vm, base, None, app)
        ship = tree.ship(self.ship)
        return tree.apps.at(base.vm, base, ship.time_us, app, own=ship)

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, AppsDir(self.point, self.ship).when(tree) * 1000, IMMUTABLE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        return [(n, AppFile(self.point, self.ship, self.app, n)) for n in self.files(tree)
                if name is None or n == name]


@dataclass(frozen=True, slots=True)
class AppFile(Node):
    point: int
    ship: int
    app: str
    name: str

    def _file(self, tree: Tree):
        found = AppDir(self.point, self.ship, self.app).files(tree).get(self.name)
        if found is None:
            raise NoSuchEntry(self.name)
        return found

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _FILE, self._file(tree).size, AppsDir(self.point, self.ship).when(tree) * 1000,
                    IMMUTABLE_TTL)

    def open(self, tree: Tree):
        return self._file(tree).reader


@dataclass(frozen=True, slots=True)
class JournalPointDir(Node):
    """A protected VM at an instant of its journal: the disks as of it,
    point.json, and the base point's domain.xml (rpofs.protect.view)."""
    uuid: str
    time_us: int

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _DIR, 0, self.time_us * 1000, VOLATILE_TTL)

    def children(self, tree: Tree, name: str | None = None) -> list[tuple[str, Node]]:
        session, base = tree.journal_base(self.uuid, self.time_us)
        disks = [(f"{d.target}.raw", JournalDisk(self.uuid, self.time_us, d.target)) for d in session.session.disks]
        return disks + [("point.json", JournalPointJson(self.uuid, self.time_us)),
                        ("domain.xml", DomainXml(base.point))]


@dataclass(frozen=True, slots=True)
class JournalDisk(Node):
    uuid: str
    time_us: int
    target: str

    def attr(self, tree: Tree, ino: int) -> Attr:
        session, _ = tree.journal_base(self.uuid, self.time_us)
        size = next(d.size for d in session.session.disks if d.target == self.target)
        return Attr(ino, _FILE, size, self.time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: Tree):
        session, base = tree.journal_base(self.uuid, self.time_us)
        return tree.journal.reader(session, base, self.time_us, self.target)


@dataclass(frozen=True, slots=True)
class JournalPointJson(Node):
    uuid: str
    time_us: int

    def content(self, tree: Tree) -> bytes:
        from ..protect.view import instant_json
        session, base = tree.journal_base(self.uuid, self.time_us)
        return (json.dumps(instant_json(session, base, self.time_us), indent=2) + "\n").encode()

    def attr(self, tree: Tree, ino: int) -> Attr:
        return Attr(ino, _FILE, len(self.content(tree)), self.time_us * 1000, IMMUTABLE_TTL)

    def open(self, tree: Tree) -> "_Bytes":
        return _Bytes(self.content(tree))


def guest_attr(ino: int, e) -> Attr:
    """A guest entry's attributes (rpofs.files.filesystems.Entry)."""
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
        "origin": p.origin or "backup",
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
