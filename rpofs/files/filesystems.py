"""Guest filesystems, read in-process with the dissect libraries: dissect, and
only here. Each filesystem is adapted to one small shape, Entry, so the mount
and `rpofs cp` need not know which filesystem they walk.

Nothing is mounted and nothing is written: the filesystems are read from a
file-like view of a materialized disk, lazily: a directory is read when it is
listed (its own blocks only, where its entries carry the file type), an inode
when its attributes are asked, a file when it is read.
"""

import stat
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from ..errors import RpofsError


class FsError(RpofsError):
    """The filesystem cannot be read here (damaged, or not one we know)."""


@dataclass(frozen=True, slots=True)
class Attrs:
    """What a stat shows beyond the name, inode number and type."""
    mode: int          # st_mode: type and permission bits
    size: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int


class Entry:
    """A directory entry. Its name, inode number and file type come from the
    directory's own blocks; the rest (attrs: mode bits, size, owner, times,
    nlink) is parsed from the inode on first use and kept, so that listing a
    big directory does not read every inode.

    `handle` is the dissect object behind it; None where ino finds it again
    (a parsed inode costs kilobytes: a big directory keeps none)."""

    __slots__ = ("name", "ino", "type", "handle", "_fs", "_attrs")

    def __init__(self, name: str, ino: int, type: int, handle: Any = None, *,
                 attrs: Attrs | None = None, fs: "Filesystem | None" = None):
        self.name = name
        self.ino = ino     # the filesystem's own inode number: hard links share it
        self.type = type   # stat.S_IFMT bits
        self.handle = handle
        self._fs = fs      # parses attrs when they were not given
        self._attrs = attrs

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, ino={self.ino}, type={self.type:o}, attrs={self._attrs!r})"

    @property
    def known(self) -> bool:
        """Whether attrs are already parsed (reading them now costs nothing)."""
        return self._attrs is not None

    @property
    def attrs(self) -> Attrs:
        attrs = self._attrs
        if attrs is None:  # two threads may both parse: same answer, no harm
            attrs = self._attrs = self._fs.attrs(self)
        return attrs

    @property
    def mode(self) -> int:
        # the type stays the one the listing gave, even if a damaged inode
        # disagrees: the kernel must never see an inode change type
        return self.type | stat.S_IMODE(self.attrs.mode)

    size = property(lambda self: self.attrs.size)
    uid = property(lambda self: self.attrs.uid)
    gid = property(lambda self: self.attrs.gid)
    atime_ns = property(lambda self: self.attrs.atime_ns)
    mtime_ns = property(lambda self: self.attrs.mtime_ns)
    ctime_ns = property(lambda self: self.attrs.ctime_ns)
    nlink = property(lambda self: self.attrs.nlink)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.type)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.type)


class Filesystem:
    """One opened filesystem. dissect objects share a file position, so every
    call holds the filesystem's lock."""

    def __init__(self):
        self.lock = threading.RLock()

    def root(self) -> Entry:
        raise NotImplementedError

    def children(self, entry: Entry) -> Iterator[Entry]:
        raise NotImplementedError

    def attrs(self, entry: Entry) -> Attrs:
        """An entry's attributes, where its listing left them out."""
        raise NotImplementedError

    def node(self, entry: Entry):
        """The dissect object of an entry."""
        return entry.handle

    def open(self, entry: Entry) -> BinaryIO:
        return self.node(entry).open()

    def readlink(self, entry: Entry) -> str:
        return self.node(entry).link


def _posix(node, nlink) -> Attrs:
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
    return Attrs(mode, node.size if not stat.S_ISDIR(mode) else 0, uid, gid, node.atime_ns,
                 node.mtime_ns, node.ctime_ns, nlink)


class _InodeFilesystem(Filesystem):
    """ext, XFS and Btrfs: entries found again by inode number. Subclasses
    open the filesystem and say where the link count is, what type a
    directory entry gave, and how a directory lists (name, node) pairs."""

    def _entry(self, name, node) -> Entry:
        kind = self._listed_type(node)
        if kind is None:  # the directory does not say (ext without filetype, XFS without ftype)
            attrs = self._attrs(node)
            return Entry(name, node.inum, stat.S_IFMT(attrs.mode), attrs=attrs)
        return Entry(name, node.inum, kind, fs=self)

    def _attrs(self, node) -> Attrs:
        return _posix(node, self._nlink(node.inode))

    def _listed_type(self, node) -> int | None:
        # dissect keeps the directory entry's type before parsing the inode
        # (node.filetype would parse it when the entry had none)
        return getattr(node, "_filetype", None) or None

    def attrs(self, entry: Entry) -> Attrs:
        with self.lock:
            try:
                return self._attrs(self.node(entry))
            except Exception as e:  # dissect raises many kinds on damaged metadata
                raise FsError(f"inode {entry.ino} ({entry.name!r}) cannot be read: {type(e).__name__}: {e}") from e

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
        from dissect.extfs.c_ext import c_ext
        self.fs = ExtFS(fh)
        self._typed = bool(self.fs.sb.s_feature_incompat & c_ext.EXT2_FEATURE_INCOMPAT_FILETYPE)
        self._inline = c_ext.EXT4_INLINE_DATA_FL
        self._big_inodes = self.fs.sb.s_inode_size > 128  # with the times' extra bits (as dissect reads them)
        self._tables: dict[int, int] = {}  # block group -> its inode table's first block
        self._block: tuple[int, bytes] = (-1, b"")

    def _nlink(self, inode) -> int:
        return inode.i_links_count

    def _attrs(self, node) -> Attrs:
        # dissect's parse of a whole ext4_inode costs some 15 µs, most of what a
        # stat per entry (ls -l) costs; these fields, unpacked from the inode
        # table's block, are the same numbers (tested against dissect's)
        try:
            raw = self._raw_inode(node.inum)
        except Exception:  # let dissect read it, and say what is wrong
            return super()._attrs(node)
        mode, uid, size, atime, ctime, mtime, _, gid, nlink = _EXT_INODE.unpack_from(raw)
        size_high, = _U32.unpack_from(raw, 108)
        uid_high, gid_high = _EXT_IDS_HIGH.unpack_from(raw, 120)
        ctime_x, mtime_x, atime_x = _EXT_TIMES_EXTRA.unpack_from(raw, 132) if self._big_inodes else (0, 0, 0)
        return Attrs(mode, 0 if stat.S_ISDIR(mode) else size | size_high << 32, uid | uid_high << 16,
                     gid | gid_high << 16, _ext_ns(atime, atime_x), _ext_ns(mtime, mtime_x),
                     _ext_ns(ctime, ctime_x), nlink)

    def _raw_inode(self, inum: int) -> bytes:
        """The inode's bytes, where dissect's INode.inode reads them; the last
        inode table block read is kept (a directory's inodes are mostly
        neighbours)."""
        sb, block_size = self.fs.sb, self.fs.block_size
        group, index = divmod(inum - 1, sb.s_inodes_per_group)
        table = self._tables.get(group)
        if table is None:
            desc = self.fs._read_group_desc(group)
            table = self._tables[group] = desc.bg_inode_table_lo | getattr(desc, "bg_inode_table_hi", 0) << 32
        offset = table * block_size + index * sb.s_inode_size
        start = offset - offset % block_size
        if self._block[0] != start:
            self.fs.fh.seek(start)
            self._block = (start, self.fs.fh.read(block_size))
        raw = self._block[1][offset - start:offset - start + sb.s_inode_size]
        if len(raw) < (144 if self._big_inodes else 128):
            raise FsError(f"inode {inum} is past the end of the device")
        return raw

    def children(self, entry: Entry) -> Iterator[Entry]:
        directory = self.node(entry)
        if not self._typed or directory.inode.i_flags & self._inline:
            yield from super().children(entry)
            return
        for name, ino, kind in self._dirents(directory):
            if name in (".", ".."):
                continue
            if kind is None:  # a type the entry does not give: the inode says
                yield self._entry(name, self.fs.get_inode(ino, name))
            else:
                yield Entry(name, ino, kind, fs=self)

    def _dirents(self, directory) -> Iterator[tuple[str, int, int | None]]:
        """(name, inode, type) as dissect's INode.iterdir walks them (the
        same bounds and checks), but parsed with struct from 1 MiB reads:
        dissect's two stream reads per entry cost more than all the rest of
        a listing."""
        fh, size, inodes = directory.open(), directory.size, self.fs.sb.s_inodes_count
        offset, base, data = 0, 0, b""
        while offset < size - 12:
            at = offset - base
            if at + 8 > len(data):
                fh.seek(offset)
                base, at, data = offset, 0, fh.read(_DIR_READ)
                if len(data) < 8:
                    return
            ino, rec_len, name_len, ftype = _EXT_DIRENT.unpack_from(data, at)
            if rec_len == 0:  # damaged: what came before stands (as in dissect)
                return
            if 0 < ino < inodes:
                if at + 8 + name_len > len(data):
                    fh.seek(offset)
                    base, at, data = offset, 0, fh.read(_DIR_READ)
                name = data[at + 8:at + 8 + name_len].decode(errors="surrogateescape")
                yield name, ino, _EXT_TYPES.get(ftype)
            offset += rec_len


_EXT_DIRENT = struct.Struct("<IHBB")  # ext2_dir_entry_2: inode, rec_len, name_len, file_type
# ext4_inode: i_mode, i_uid, i_size_lo, i_atime, i_ctime, i_mtime, i_dtime, i_gid, i_links_count;
# at 108 i_size_high, at 120 i_uid_high and i_gid_high, at 132 i_[cma]time_extra
_EXT_INODE = struct.Struct("<HHIIIIIHH")
_U32 = struct.Struct("<I")
_EXT_IDS_HIGH = struct.Struct("<HH")
_EXT_TIMES_EXTRA = struct.Struct("<III")
_EXT_TYPES = {1: stat.S_IFREG, 2: stat.S_IFDIR, 3: stat.S_IFCHR, 4: stat.S_IFBLK, 5: stat.S_IFIFO,
              6: stat.S_IFSOCK, 7: stat.S_IFLNK}
_DIR_READ = 1 << 20


def _ext_ns(seconds: int, extra: int) -> int:
    """A time and its extra field (epoch bits, nanoseconds << 2), as dissect reads them."""
    return (seconds | (extra & 3) << 32) * 1_000_000_000 + (extra >> 2)


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
        from dissect.btrfs.c_btrfs import FT_MAP
        self.fs = Btrfs(fh)
        self._types = FT_MAP

    def _nlink(self, inode) -> int:
        return inode.nlink

    def _listed_type(self, node) -> int | None:
        return self._types.get(getattr(node, "_type", None))  # the dir item's type

    def node(self, entry: Entry):
        return self.fs.root.subvolume.inode(entry.ino)

    def _listing(self, directory):
        return directory.iterdir()


class FatFilesystem(Filesystem):
    """FAT12/16/32: no owners, no links; every file readable, directories listable.
    A FAT directory entry holds all there is to know: entries come whole."""

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
        attrs = Attrs(mode, 0 if directory else node.size, 0, 0, ns[0], ns[1], ns[2], 1)
        return Entry(name, ino, stat.S_IFMT(mode), node, attrs=attrs)

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
    """Entries come whole: the type and size need the MFT record anyway."""

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
        attrs = Attrs(mode, size, 0, 0, ns[0], ns[1], ns[2], 1)
        return Entry(name, record.segment, stat.S_IFMT(mode), record, attrs=attrs)

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
