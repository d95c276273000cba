"""Guest filesystems, read in-process with the dissect libraries: dissect, and
only here. Each filesystem is adapted to one small shape, Entry, so the mount
and `rpofs cp` need not know which filesystem they walk.

Nothing is mounted and nothing is written: the filesystems are read from a
file-like view of a materialized disk, lazily (a directory is read when it is
listed, a file when it is read).
"""

import stat
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from ..errors import RpofsError


class FsError(RpofsError):
    """The filesystem cannot be read here (damaged, or not one we know)."""


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    mode: int          # st_mode: type and permission bits
    size: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    ino: int           # the filesystem's own inode number: hard links share it
    handle: Any        # the dissect object behind it; None where ino finds it again
                       # (a parsed inode costs kilobytes: a big directory keeps none)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


class Filesystem:
    """One opened filesystem. dissect objects share a file position, so every
    call holds the filesystem's lock."""

    def __init__(self):
        self.lock = threading.RLock()

    def root(self) -> Entry:
        raise NotImplementedError

    def children(self, entry: Entry) -> Iterator[Entry]:
        raise NotImplementedError

    def node(self, entry: Entry):
        """The dissect object of an entry."""
        return entry.handle

    def open(self, entry: Entry) -> BinaryIO:
        return self.node(entry).open()

    def readlink(self, entry: Entry) -> str:
        return self.node(entry).link


def _posix(name, node, ino, nlink) -> Entry:
    """ext, XFS and Btrfs inodes answer the same questions the same way."""
    inode = node.inode
    mode = getattr(node, "mode", None)
    if mode is None:
        mode = inode.di_mode if hasattr(inode, "di_mode") else inode.i_mode
    uid = getattr(node, "uid", None)
    if uid is None:
        uid = inode.di_uid if hasattr(inode, "di_uid") else inode.i_uid | (getattr(inode, "i_uid_high", 0) << 16)
        gid = inode.di_gid if hasattr(inode, "di_gid") else inode.i_gid | (getattr(inode, "i_gid_high", 0) << 16)
    else:
        gid = node.gid
    return Entry(name, mode, node.size if not stat.S_ISDIR(mode) else 0, uid, gid, node.atime_ns,
                 node.mtime_ns, node.ctime_ns, nlink, ino, None)


class _InodeFilesystem(Filesystem):
    """ext, XFS and Btrfs: entries found again by inode number. Subclasses
    open the filesystem and say where the link count is and how a directory
    lists (name, node) pairs."""

    def _entry(self, name, node) -> Entry:
        return _posix(name, node, node.inum, self._nlink(node.inode))

    def root(self) -> Entry:
        return self._entry("", self.fs.root)

    def node(self, entry: Entry):
        return self.fs.get_inode(entry.ino)

    def children(self, entry: Entry) -> Iterator[Entry]:
        for name, node in self._listing(self.node(entry)):
            if name not in (".", ".."):
                yield self._entry(name, node)

    def _listing(self, directory):
        return ((node.filename, node) for node in directory.iterdir())


class ExtFilesystem(_InodeFilesystem):
    def __init__(self, fh: BinaryIO):
        super().__init__()
        from dissect.extfs import ExtFS
        self.fs = ExtFS(fh)

    def _nlink(self, inode) -> int:
        return inode.i_links_count


class XfsFilesystem(_InodeFilesystem):
    def __init__(self, fh: BinaryIO):
        super().__init__()
        from dissect.xfs import XFS
        self.fs = XFS(fh)

    def _nlink(self, inode) -> int:
        return inode.di_nlink


class BtrfsFilesystem(_InodeFilesystem):
    def __init__(self, fh: BinaryIO):
        super().__init__()
        from dissect.btrfs import Btrfs
        self.fs = Btrfs(fh)

    def _nlink(self, inode) -> int:
        return inode.nlink

    def node(self, entry: Entry):
        return self.fs.root.subvolume.inode(entry.ino)

    def _listing(self, directory):
        return directory.iterdir()


class FatFilesystem(Filesystem):
    """FAT12/16/32: no owners, no links; every file readable, directories listable."""

    def __init__(self, fh: BinaryIO):
        super().__init__()
        from dissect.fat import FATFS
        self.fs = FATFS(fh)

    def _entry(self, name, node) -> Entry:
        directory = node.is_directory()
        mode = (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | (0o444 if node.is_readonly() else 0o644))
        ns = [int(t.timestamp() * 1e9) if t else 0 for t in (node.atime, node.mtime, node.ctime)]
        # files share no cluster; an empty file has none, its path names it
        ino = node.cluster or (hash(node.path) & (1 << 62) - 1 | 1 << 62)
        return Entry(name, mode, 0 if directory else node.size, 0, 0, ns[0], ns[1], ns[2], 1, ino, node)

    def root(self) -> Entry:
        return self._entry("", self.fs.root)

    def children(self, entry: Entry) -> Iterator[Entry]:
        for node in entry.handle.iterdir():
            if node.name not in (".", "..") and not node.is_volume_id():
                yield self._entry(_fat_name(node), node)

    def readlink(self, entry: Entry) -> str:
        raise FsError("FAT has no symbolic links")


def _fat_name(node) -> str:
    """The name as Linux and Windows show it: a short name whose NT flags say
    "lower case" (base 0x08, extension 0x10) is shown in lower case."""
    if node.ldirents or node.name != node.short_name:
        return node.name
    flags = node.dirent.DIR_NTRes
    base, dot, ext = node.short_name.partition(".")
    return (base.lower() if flags & 0x08 else base) + dot + (ext.lower() if flags & 0x10 else ext)


class NtfsFilesystem(Filesystem):
    def __init__(self, fh: BinaryIO):
        super().__init__()
        from dissect.ntfs import NTFS
        self.fs = NTFS(fh)

    def _entry(self, name, record) -> Entry:
        directory = record.is_dir()
        if record.is_symlink():
            mode = stat.S_IFLNK | 0o777
        else:
            mode = (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | 0o644)
        info = record.attributes.STANDARD_INFORMATION
        si = info[0] if info else None
        ns = [si.last_access_time_ns, si.last_modification_time_ns, si.last_change_time_ns] if si else [0, 0, 0]
        size = 0 if directory or record.is_symlink() else record.size()
        return Entry(name, mode, size, 0, 0, ns[0], ns[1], ns[2], 1, record.segment, record)

    def root(self) -> Entry:
        return self._entry("", self.fs.mft.root)

    def children(self, entry: Entry) -> Iterator[Entry]:
        for index_entry in entry.handle.iterdir(ignore_dos=True):
            name = index_entry.attribute.file_name
            if name in (".",) or name.startswith("$"):
                continue  # NTFS's own metadata files are not the guest's files
            yield self._entry(name, index_entry.dereference())

    def readlink(self, entry: Entry) -> str:
        return entry.handle.reparse_point_substitute_name


# (name, probe, class): probe(first bytes) says whether the filesystem is there
_PROBES = (
    ("ext", lambda b: b[1080:1082] == b"\x53\xef", ExtFilesystem),
    ("xfs", lambda b: b[0:4] == b"XFSB", XfsFilesystem),
    ("ntfs", lambda b: b[3:11] == b"NTFS    ", NtfsFilesystem),
    ("btrfs", lambda b: b[0x10040:0x10048] == b"_BHRfS_M", BtrfsFilesystem),
    ("fat", lambda b: b[510:512] == b"\x55\xaa" and (b[54:59] == b"FAT12" or b[54:59] == b"FAT16"
                                                       or b[82:87] == b"FAT32"), FatFilesystem),
)
PROBE_BYTES = 0x10048


def open_filesystem(fh: BinaryIO) -> Filesystem | None:
    """The filesystem at the start of fh, or None when there is none we know."""
    fh.seek(0)
    head = fh.read(PROBE_BYTES)
    for name, probe, cls in _PROBES:
        if probe(head):
            try:
                return cls(fh)
            except Exception as e:  # dissect raises many kinds on damaged metadata
                raise FsError(f"{name} filesystem cannot be read: {e}") from e
    return None
