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

The nodes are in rpofs.mount.nodes (their base, Attr) and one module per
kind: points (the VMs and their points), pointfiles (a point's disks,
point.json, domain.xml), guestnodes (files/), appnodes (apps/, app points),
journalnodes (journal instants). The Tree here numbers them (inodes),
keeps the catalog's view of each VM, and hands each operation to its node;
nodes ask the Tree through its public methods only.

Pure and synchronous: no pyfuse3 here, so tests can walk the tree without
mounting. Thread-safe: the FUSE adapter calls it from worker threads.
Inode numbers are stable for the life of the mount; the point list is re-read
from the catalog at most once per REFRESH_S, so new points show up in a
running mount, and read whole again after a prune, so removed ones go (a
point directory's name is revalidated like the VM directory for that).
"""

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from ..errors import BadTime, RpofsError
from ..memory import no_collection
from ..store import protection, shipments
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import PointRecord, ShipRecord
from ..timefmt import US, format_time, parse_as_of, point_names
from .guestnodes import GuestNode
from .nodes import Attr, Node, NoSuchEntry, guest_attr
from .points import Root

ROOT_INO = 1
REFRESH_S = 1.0


@dataclass
class VmView:
    """A VM's points of every kind as the tree lists them (Tree.view)."""
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


@dataclass(frozen=True)
class Moment:
    """What VM@TIME names, resolved exactly as at/ resolves it: `rpofs cp`,
    `restore`, `restore --vm` and `run` all take TIME through this, so no
    command answers with another instant than the mount shows."""
    tree: "Tree"
    text: str              # as given
    name: str              # the entry at/<text> links to
    kind: str              # "point" (a block point), "app" (an app point), "journal" (a journal instant)
    point: PointRecord     # whose disks and domain.xml it shows: the block point; an app point's base;
                           # for a journal instant its stand-in (Tree.instant_point)
    ship: ShipRecord | None = None

    def reader(self, target: str, whole: bool = False):
        """The disk `target` as of this moment (read(offset, length), size,
        extents); whole: read from start to end once (a restore: the
        repository's streaming reader)."""
        return self.tree.disk_reader(self.point, target, whole)

    @property
    def exact(self) -> bool:
        """Whether TIME was this moment's own name (else: the newest at or before it)."""
        return self.text == self.name

    def described(self) -> str:
        what = {"point": "the point", "app": "the app point", "journal": "the journal instant"}[self.kind]
        return f"{what} {self.name}"

    def note(self) -> str:
        """What TIME was taken as, for a person ("" when it named it exactly)."""
        if (self.exact or self.text == "latest") and self.kind == "point":
            return ""  # what was asked for, by its name or as the newest
        said = (f"{self.text} is {self.described()}, the newest at or before it" if not self.exact
                else f"{self.text} is {self.described()}")
        if self.kind == "app":
            said += f" (its disks are its base point's, {self.point.name or self.point.point})"
        return said


class Tree:
    def __init__(self, repo: Repository, refresh_s: float = REFRESH_S, journal_spacing_s: float = 1.0):
        self.repo = repo
        self._refresh_s = refresh_s
        self._spacing_us = max(1, int(journal_spacing_s * US))
        self._journal = None
        self._lock = threading.RLock()
        self._loaded_at = float("-inf")
        self._vms: dict[str, VmView] = {}       # directory name -> view
        self._vm_dir: dict[str, str] = {}        # uuid -> directory name
        self._points: dict[int, tuple[str, PointRecord]] = {}  # point -> (name, record)
        self._ino: dict[Node, int] = {Root(): ROOT_INO}
        self._node: dict[int, Node] = {ROOT_INO: Root()}
        self.mounted_at = int(time.time() * 1e6)  # µs: the time of rpofs's own directories
        self._pruned = repo.pruned_count()
        self._notes: dict[int, dict] = {}  # point -> point.json's "files"
        self._ships: dict[int, ShipRecord] = {}  # app points by shipment number
        self._guest = None
        self._apps = None
        # journal instants read as points (files/, apps/, cp, restore): stand-in
        # point numbers below zero, stable for the tree's life
        self._instant_no: dict[tuple[str, int], int] = {}
        self._instant_of: dict[int, tuple[str, int]] = {}

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
                    # its keys: the nodes of files/; its disks: points' and journal instants'
                    self._guest = GuestFiles(self.repo, GuestNode, self.disk_reader)
                guest = self._guest
        return guest

    # -- the catalog, re-read at most once per refresh period ---------------------

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
                view = known.get(uuid) or VmView(uuid)
                with no_collection():   # a day of 1 s points is 86,400 records at the first listing
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

    def _refresh_ships(self, view: VmView) -> None:
        """The VM's app points from where they may still change on."""
        since = view.ships_stable_us
        fresh = list(shipments.ships(self.repo, view.uuid, since_us=since))
        view.take_ships(fresh, since)
        view.ships_stable_us = view.points[-1].time_us
        self._ships.update((s.ship, s) for s in fresh if s.base is not None)
        view.has_apps = view.has_apps or bool(view.ships) or bool(shipments.apps(self.repo, view.uuid))

    def _refresh_journal(self, view: VmView) -> None:
        """A protected VM's journal scanned on, and its instants to list."""
        if not view.journal and not protection.of_vm(self.repo, view.uuid):
            return
        view.journal = self.journal.refresh(view.uuid)
        view.instants = self.journal.instants(view.journal, view.points, self._spacing_us)

    # -- what the nodes ask (rpofs.mount.points and the other kinds) --------------

    def vm_dirs(self, name: str | None = None) -> list[tuple[str, str]]:
        """(directory name, uuid) of each VM, by name; with `name`, that one's
        if there is such a VM directory."""
        self._refresh()
        with self._lock:
            views = sorted(self._vms.items()) if name is None else [(name, self._vms.get(name))]
        return [(n, v.uuid) for n, v in views if v is not None]

    def vm_uuids(self) -> list[str]:
        """Every VM's uuid, sorted."""
        self._refresh()
        with self._lock:
            return sorted(self._vm_dir)

    def vm_dir(self, uuid: str) -> str:
        """A VM's directory name; NoSuchEntry for an unknown VM."""
        self.view(uuid)
        with self._lock:
            return self._vm_dir[uuid]

    def view(self, uuid: str) -> VmView:
        """A VM's points as listed; NoSuchEntry for an unknown VM."""
        self._refresh()
        with self._lock:
            name = self._vm_dir.get(uuid)
            if name is None:
                raise NoSuchEntry(f"VM {uuid}")
            return self._vms[name]

    def point(self, no: int) -> tuple[str, PointRecord]:
        """A point's name and record; NoSuchEntry once it is pruned. A
        number below zero is a journal instant's stand-in (instant_point)."""
        if no < 0:
            with self._lock:
                found = self._instant_of.get(no)
            if found is None:
                raise NoSuchEntry(f"point {no}")
            record = self.instant_point(*found)
            return record.name, record
        with self._lock:
            found = self._points.get(no)
        if found is None:
            raise NoSuchEntry(f"point {no}")
        return found

    def when(self, no: int) -> int:
        """A point's time in ns: the mtime of everything in it."""
        return self.point(no)[1].time_us * 1000

    def ship(self, no: int) -> ShipRecord:
        """An app point's record; NoSuchEntry once it is pruned."""
        with self._lock:
            found = self._ships.get(no)
        if found is None:
            raise NoSuchEntry(f"app point {no}")
        return found

    def instant(self, view: VmView, name: str) -> int | None:
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

    def at(self, uuid: str, text: str) -> str:
        """The name at/<text> links to: a point's name names it; any other
        time, its newest point of any kind (block, app, journal instant) at
        or before; NoSuchEntry if there is none."""
        view = self.view(uuid)
        if text in view.by_name or text in view.ship_by_name or self.instant(view, text) is not None:
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

    def instant_point(self, uuid: str, time_us: int) -> PointRecord:
        """A journal instant as a point: its base point's record with the
        instant's time and disks, numbered below zero (never a stored
        point's number), so that files/, apps/ and the readers take it as
        they take a point; disk_reader reads it through the journal.
        NoSuchEntry when no journal covers it."""
        session, base = self.journal_base(uuid, time_us)
        with self._lock:
            no = self._instant_no.get((uuid, time_us))
            if no is None:
                no = self._instant_no[(uuid, time_us)] = -(len(self._instant_no) + 1)
                self._instant_of[no] = (uuid, time_us)
        return dataclasses.replace(base, point=no, time_us=time_us, name=format_time(time_us, 6),
                                   consistency="crash-consistent", disks=session.session.disks, origin="journal",
                                   checkpoint="", checkpoint_xml="")

    def disk_reader(self, point: PointRecord, target: str, whole: bool = False):
        """A disk of a point, or of a journal instant's stand-in; whole: to
        be read once from start to end (Repository.streaming_reader)."""
        if point.point >= 0:
            return DiskReader(self.repo, point, target, self.repo.streaming_reader() if whole else None)
        uuid, time_us = self._instant_of[point.point]
        session, base = self.journal_base(uuid, time_us)
        return self.journal.reader(session, base, time_us, target)

    def moment(self, uuid: str, text: str) -> Moment:
        """What `text` names for the VM, as at/<text> does ("latest": the
        newest of any kind). BadTime when text is not a time, NoSuchEntry
        when nothing is at or before it."""
        view = self.view(uuid)
        if text != "latest" and text not in view.by_name and text not in view.ship_by_name \
                and self.instant(view, text) is None:
            parse_as_of(text)  # BadTime, as the commands have always said it
        name = self.as_of(uuid, text)
        if name in view.by_name:
            return Moment(self, text, name, "point", view.by_name[name])
        if name in view.ship_by_name:
            ship = view.ship_by_name[name]
            return Moment(self, text, name, "app", self.point(ship.base)[1], ship)
        t = self.instant(view, name)
        if t is None:
            raise NoSuchEntry(f"no point of {uuid} at or before {text}")
        return Moment(self, text, name, "journal", self.instant_point(uuid, t))

    def journal_base(self, uuid: str, time_us: int):
        """(session view, base point) an instant of the VM's journal reads
        from; NoSuchEntry when it cannot be read (no journal covers it)."""
        view = self.view(uuid)
        found = self.journal.base(view.journal, view.points, time_us) if view.journal else None
        if found is None:
            raise NoSuchEntry(f"no journal of {uuid} covers {format_time(time_us, 6)}")
        return found

    def notes_known(self, no: int) -> bool:
        """Whether notes() of the point was worked out (point.json's size is
        known without parsing the guest filesystems)."""
        with self._lock:
            return no in self._notes

    def notes(self, point: PointRecord) -> dict:
        """point.json's "files": what files/ shows of each disk, worked out once."""
        with self._lock:
            notes = self._notes.get(point.point)
        if notes is None:
            notes = self.guest.notes(point)
            with self._lock:
                self._notes[point.point] = notes
        return notes

    # -- the operations: each the node's own --------------------------------------

    def getattr(self, ino: int) -> Attr:
        return self._node_of(ino).attr(self, ino)

    def lookup(self, parent: int, name: str) -> Attr:
        return self.getattr(self._inode(self._node_of(parent).lookup(self, name)))

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """Entries in a stable order: new points are appended at the end."""
        node = self._node_of(ino)
        with no_collection():
            return [(name, self._listed(child)) for name, child in node.children(self)]

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

    # -- for rpofs cp (rpofs.mount.copy) ------------------------------------------

    def as_of(self, uuid: str, text: str) -> str:
        """The name of the point `text` names in at/ ("latest": the newest)."""
        return self.view(uuid).newest()[0] if text == "latest" else self.at(uuid, text)

    # -- helpers ------------------------------------------------------------------

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


def resolve(repo: Repository, vm_ref: str, when: str, tree: Tree | None = None) -> Moment:
    """VM@TIME as every command takes it: the VM by name or UUID, TIME as
    at/ resolves it (a point's name, "latest", or any time: the newest point
    of any kind at or before it). UnknownVM, BadTime or one clear line."""
    uuid, name = repo.find_vm(vm_ref)
    tree = tree or Tree(repo)
    try:
        return tree.moment(uuid, when)
    except NoSuchEntry:
        raise BadTime(f"{name} has no point at or before {when}") from None


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
