"""pyfuse3, and only here: a thin adapter from FUSE requests to tree.Tree.

Every handler runs the tree's blocking work (LMDB, pack files, hashing) on a
worker thread through a named limiter, and every handler goes through
_errors(): domain errors become errno, anything unexpected is logged and
becomes EIO. No other exception ever leaves a handler.
"""

import contextlib
import errno
import logging
import os
import threading

import pyfuse3
import trio

from ..errors import ChunkError, RpofsError
from .nodes import Attr, NoSuchEntry, NotADirectory, NotASymlink
from .tree import Tree

log = logging.getLogger(__name__)

READDIR_ATTRS = 256  # entries per READDIRPLUS, inodes read, where entries get stat'ed

_ERRNO = ((NoSuchEntry, errno.ENOENT), (NotADirectory, errno.ENOTDIR), (NotASymlink, errno.EINVAL),
          (ChunkError, errno.EIO))


@contextlib.contextmanager
def _errors(what: str):
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except RpofsError as e:
        code = next((n for cls, n in _ERRNO if isinstance(e, cls)), errno.EIO)
        if code == errno.EIO:
            log.error("%s: %s", what, e)
        raise pyfuse3.FUSEError(code) from None
    except Exception:
        log.exception("%s failed unexpectedly", what)
        raise pyfuse3.FUSEError(errno.EIO) from None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, tree: Tree):
        super().__init__()
        self.tree = tree
        self._meta = trio.CapacityLimiter(4)   # catalog look-ups
        self._data = trio.CapacityLimiter(4)   # disk reads: LMDB + pack files + blake3
        self._handles: dict[int, object] = {}
        self._next_fh = 1
        self._fh_lock = threading.Lock()
        self._uid, self._gid = os.getuid(), os.getgid()

    def _new_handle(self, value) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = value
        return fh

    async def _meta_call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._meta)

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.st_mode = a.mode
        e.st_nlink = a.nlink if a.nlink is not None else (2 if a.is_dir else 1)
        e.st_uid = self._uid if a.uid is None else a.uid
        e.st_gid = self._gid if a.gid is None else a.gid
        e.st_size = a.size
        # glibc sizes readdir's getdents buffer by a directory's st_blksize: 32 KiB
        # batches (some 200 entries a READDIRPLUS) let a stat-per-entry tool's
        # lookups be seen early, so the rest of the listing comes whole (see readdir)
        e.st_blksize = 4096 if a.is_dir else 1 << 20
        e.st_blocks = 0 if a.is_dir else -(-(a.size if a.stored is None else a.stored) // 512)
        e.st_mtime_ns = a.mtime_ns
        e.st_atime_ns = a.mtime_ns if a.atime_ns is None else a.atime_ns
        e.st_ctime_ns = a.mtime_ns if a.ctime_ns is None else a.ctime_ns
        e.attr_timeout = e.entry_timeout = a.ttl
        e.generation = 0
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        with _errors(f"lookup {name!r}"):
            return self._entry(await self._meta_call(self.tree.lookup, parent_inode, os.fsdecode(name)))

    async def getattr(self, inode, ctx=None):
        with _errors(f"getattr {inode}"):
            return self._entry(await self._meta_call(self.tree.getattr, inode))

    async def readlink(self, inode, ctx):
        with _errors(f"readlink {inode}"):
            if self.tree.is_own_link(inode):  # a thread hop costs more than the answer
                return os.fsencode(self.tree.readlink(inode))
            return os.fsencode(await self._meta_call(self.tree.readlink, inode))

    async def opendir(self, inode, ctx):
        with _errors(f"opendir {inode}"):
            attr = await self._meta_call(self.tree.getattr, inode)
            if not attr.is_dir:
                raise NotADirectory(str(inode))
            return self._new_handle([inode, None])  # the listing is read on the first readdir

    # pyfuse3 answers only READDIRPLUS (no plain readdir, READDIRPLUS_AUTO off),
    # and the kernel applies each entry's attributes to the inode it may already
    # hold (fuse_direntplus_link -> fuse_change_attributes). Its "no attributes"
    # entry, node id 0, pyfuse3 cannot send (st_ino is both node id and d_ino).
    # So a guest entry whose inode was not read yet goes as a placeholder: inode
    # number, type bits, size 0, timeouts 0, LOOKUPed before anything trusts it.
    # Safe because "known?" is asked as the reply is built: an unknown inode was
    # never answered whole, so the kernel holds no true size to overwrite; and a
    # LOOKUP answered after this READDIRPLUS was sent raised the inode's
    # attr_version past it, so the kernel ignores the placeholder's attributes.
    async def readdir(self, fh, start_id, token):
        with _errors(f"readdir {fh}"):
            handle = self._handles[fh]
            if handle[1] is None or start_id == 0:
                # Listed once per pass: the kernel asks for a big directory in
                # many small readdir calls. Offsets are positions + 1, stable
                # because new points are appended.
                handle[1] = await self._meta_call(self.tree.readdir, handle[0])
            listing, end = handle[1], None
            if self.tree.wants_attrs(handle[0]):
                # its entries get stat'ed one by one (ls -l): a LOOKUP round trip
                # costs several inode reads, so read the next ones and send them
                # whole (and no more: a shorter reply just brings another READDIR)
                end = start_id + READDIR_ATTRS
                todo = [a.ino for _, a in listing[start_id:end] if not a.known]
                if todo:
                    await self._meta_call(self.tree.read_attrs, todo)
            for i, (name, attr) in enumerate(listing[start_id:end], start_id + 1):
                if not attr.known:
                    attr = self.tree.known_attr(attr.ino) or attr  # read since the listing?
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), i):
                    return

    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    async def open(self, inode, flags, ctx):
        with _errors(f"open {inode}"):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            content = await self._meta_call(self.tree.open, inode)
            if getattr(content, "direct_io", False):  # its listed size was not its own: read to its end
                return pyfuse3.FileInfo(fh=self._new_handle(content), direct_io=True)
            # points never change: let the kernel keep their pages
            return pyfuse3.FileInfo(fh=self._new_handle(content), keep_cache=True)

    async def read(self, fh, off, size):
        with _errors(f"read fh {fh} at {off}+{size}"):
            content = self._handles[fh]
            return await trio.to_thread.run_sync(content.read, off, size, limiter=self._data)

    async def release(self, fh):
        self._handles.pop(fh, None)

    async def statfs(self, ctx):
        """The repository's filesystem as it is (size, free, available to
        backups): what monitoring should watch. Not "100 % used", which a
        read-only mount of nothing but used bytes would read as."""
        with _errors("statfs"):
            try:
                fs = await self._meta_call(os.statvfs, self.tree.repo.path)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            s = pyfuse3.StatvfsData()
            s.f_bsize, s.f_frsize = fs.f_bsize, fs.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = fs.f_blocks, fs.f_bfree, fs.f_bavail
            s.f_files, s.f_ffree, s.f_favail = fs.f_files, fs.f_ffree, fs.f_favail
            s.f_namemax = 255
            return s

    async def forget(self, inode_list):
        pass  # inodes live as long as the mount; the tree is small
