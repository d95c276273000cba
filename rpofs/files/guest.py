"""The guest's own files of a point: for the mount's <point>/files/, for
`rpofs cp` and for the applications' files (rpofs.apps.relate).

    <disk>/<volume>/<path...>    volume: partition number, "0" = whole disk

GuestFiles remembers each guest file or directory it has seen under a key,
GuestKey(point, target, volume, ino) (`ino` is the filesystem's inode, so
hard links share one), or under a class with the same fields that its user
passes (the mount's nodes are the keys of its guest files). Entries seen by a lookup or
a listing are remembered, so getattr and open need not walk the filesystem
again. A listing gives names, inode numbers and types; an entry's other
attributes are parsed when first asked (getattr, lookup) and kept with the
remembered entry. A directory's names are cached (a few hundred
directories) so that lookups in a big directory do not list it again.
"""

import collections
import threading
from dataclasses import dataclass
from typing import Callable, Hashable

from ..errors import RpofsError
from .filesystems import Entry, Filesystem
from .volumes import DiskFiles, Volume, one_line
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import PointRecord

DIR_CACHE = 256
DISK_CACHE = 16
# lookups that must read the inode of an entry of one directory, after which
# its entries are taken to be stat'ed one by one (ls -l, cp -a, du: each stats
# a readdir batch, some 200 names, before reading on), so its listings read
# their inodes too; a few files opened there do not make it so
STAT_STORM = 32


class GuestFileError(RpofsError):
    """A guest file or directory that cannot be read (EIO for it alone)."""


@dataclass(frozen=True, slots=True)
class GuestKey:
    """A guest file or directory GuestFiles has seen: it holds its entry and
    filesystem."""
    point: int
    target: str
    volume: str
    ino: int  # the guest filesystem's


class GuestFiles:
    def __init__(self, repo: Repository, key: Callable[[int, str, str, int], Hashable] = GuestKey,
                 open_disk: Callable[[PointRecord, str], object] | None = None):
        self.repo = repo
        self._key = key  # key(point, target, volume, ino): what remember() makes
        # open_disk(point, target): a reader of the disk (read, size); a point's own by default,
        # the mount's tree gives one that also reads journal instants (their stand-in points)
        self._open_disk = open_disk or (lambda point, target: DiskReader(repo, point, target))
        self._lock = threading.RLock()
        self._disks: collections.OrderedDict[tuple, DiskFiles] = collections.OrderedDict()
        # node -> (entry, the filesystem that made it): its dissect handle is only
        # valid with that filesystem (and its lock), even if the disk's cache entry went
        self._entries: dict[GuestKey, tuple[Entry, Filesystem]] = {}
        self._dirs: collections.OrderedDict[GuestKey, dict[str, Entry]] = collections.OrderedDict()
        self._stat_lookups: dict[GuestKey, int] = {}  # directory -> lookups that read an inode

    def disk(self, point: PointRecord, target: str) -> DiskFiles:
        key = (point.point, target)
        with self._lock:
            files = self._disks.get(key)
            if files is None:
                reader = self._open_disk(point, target)
                files = self._disks[key] = DiskFiles(reader.read, reader.size,
                                                     f"point {point.point} ({point.vm_name}) disk {target}",
                                                     point.consistency != "filesystems-frozen")
                while len(self._disks) > DISK_CACHE:
                    self._disks.popitem(last=False)
            self._disks.move_to_end(key)
            return files

    def notes(self, point: PointRecord) -> dict:
        """Per disk, what files/ shows of it and why (for point.json): each
        volume found, whether its files are shown, and the note on it (an ext
        journal replayed, an XFS log not, why it cannot be read)."""
        out = {}
        for d in point.disks:
            files = self.disk(point, d.target)
            try:
                shown = files.volumes()
            except Exception as e:  # the disk's own data cannot be read
                out[d.target] = {"notes": [one_line(f"cannot read the disk's layout: {e}")], "volumes": []}
                continue
            volumes = [{"volume": v.name, "shown": True, "note": v.note} for v in shown]
            volumes += [{"volume": v.name, "shown": False, "note": v.note} for v in files.skipped]
            out[d.target] = {"notes": list(files.notes), "volumes": volumes}
        return out

    def volume(self, point: PointRecord, target: str, name: str) -> Volume | None:
        return next((v for v in self.disk(point, target).volumes() if v.name == name), None)

    def filesystem(self, point: PointRecord, target: str, volume: str) -> Filesystem:
        vol = self.volume(point, target, volume)
        fs = self.disk(point, target).filesystem(vol) if vol else None
        if fs is None:
            raise GuestFileError(vol.note if vol else self._no_volume(point, target, volume))
        return fs

    def _no_volume(self, point: PointRecord, target: str, volume: str) -> str:
        files = self.disk(point, target)
        shown = [v.name for v in files.volumes()]
        why = f": {'; '.join(files.notes)}" if files.notes else ""
        return (f"disk {target} has no volume {volume}" + (f" (it has {', '.join(shown)})" if shown else "")
                + why)

    def root(self, point: PointRecord, target: str, volume: str) -> tuple[GuestKey, Entry]:
        fs = self.filesystem(point, target, volume)
        with fs.lock:
            entry = _guarded(fs.root, "the root directory")
        return self.remember(fs, point, target, volume, entry)

    def remember(self, fs: Filesystem, point: PointRecord, target: str, volume: str,
                 entry: Entry) -> tuple[GuestKey, Entry]:
        node = self._key(point.point, target, volume, entry.ino)
        with self._lock:
            self._entries.setdefault(node, (entry, fs))
        return node, entry

    def entry(self, node: GuestKey) -> Entry:
        return self._known(node)[0]

    def looked_up(self, directory: GuestKey, child: GuestKey) -> None:
        """A lookup of `child` in `directory`, before its inode is read."""
        entry = self.remembered(child)
        if entry is not None and not entry.known:
            with self._lock:
                self._stat_lookups[directory] = self._stat_lookups.get(directory, 0) + 1

    def stats_wanted(self, directory: GuestKey) -> bool:
        """Whether the directory's entries get stat'ed one by one (STAT_STORM);
        takes no lock."""
        return self._stat_lookups.get(directory, 0) >= STAT_STORM

    def remembered(self, node) -> Entry | None:
        """The remembered entry (None for any other node); takes no lock (a
        dict read is atomic), for callers that must never wait."""
        known = self._entries.get(node)
        return known[0] if known else None

    def _known(self, node: GuestKey) -> tuple[Entry, Filesystem]:
        with self._lock:
            known = self._entries.get(node)
        if known is None:
            raise GuestFileError(f"guest file {node} was not looked up")
        return known

    def children(self, node: GuestKey) -> dict[str, Entry]:
        """A directory's entries by name, in the filesystem's order; remember()
        them with fs_of(node)."""
        with self._lock:
            cached = self._dirs.get(node)
            if cached is not None:
                self._dirs.move_to_end(node)
                return cached
        directory, fs = self._known(node)
        with fs.lock:
            listing = _guarded(lambda: {e.name: e for e in fs.children(directory)}, f"directory {directory.name!r}")
        with self._lock:
            self._dirs[node] = listing
            while len(self._dirs) > DIR_CACHE:
                self._dirs.popitem(last=False)
        return listing

    def fs_of(self, node: GuestKey) -> Filesystem:
        return self._known(node)[1]

    def readlink(self, node: GuestKey) -> str:
        entry, fs = self._known(node)
        with fs.lock:
            return _guarded(lambda: fs.readlink(entry), "a symbolic link")

    def open(self, node: GuestKey) -> "GuestFile":
        entry, fs = self._known(node)
        with fs.lock:
            stream = _guarded(lambda: fs.open(entry), f"file {entry.name!r}")
        return GuestFile(fs, stream, entry)


class GuestFile:
    """An open guest file: read(offset, length) through the filesystem's lock."""

    def __init__(self, fs: Filesystem, stream, entry: Entry):
        self._fs, self._stream, self._entry = fs, stream, entry

    def read(self, offset: int, length: int) -> bytes:
        with self._fs.lock:
            def read():
                self._stream.seek(offset)
                return self._stream.read(min(length, max(0, self._entry.size - offset)))
            data = _guarded(read, f"file {self._entry.name!r}")
        if len(data) != min(length, max(0, self._entry.size - offset)):
            raise GuestFileError(f"file {self._entry.name!r}: short read at {offset}")
        return data


def _guarded(fn, what: str):
    """dissect raises many kinds of errors on damaged metadata: one kind here."""
    try:
        return fn()
    except RpofsError:
        raise
    except Exception as e:
        raise GuestFileError(f"{what} cannot be read: {type(e).__name__}: {e}") from e



