"""pyfuse3, and only here: a thin adapter from FUSE requests to vfs.Tree.

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
from .vfs import Attr, NoSuchEntry, NotADirectory, NotASymlink, Tree

log = logging.getLogger(__name__)

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

    async def _meta_call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._meta)

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.st_mode = a.mode
        e.st_nlink = 2 if a.is_dir else 1
        e.st_uid, e.st_gid = self._uid, self._gid
        e.st_size = a.size
        e.st_blksize = 1 << 20
        e.st_blocks = 0
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_us * 1000
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
            return os.fsencode(await self._meta_call(self.tree.readlink, inode))

    async def opendir(self, inode, ctx):
        with _errors(f"opendir {inode}"):
            attr = await self._meta_call(self.tree.getattr, inode)
            if not attr.is_dir:
                raise NotADirectory(str(inode))
            return inode

    async def readdir(self, fh, start_id, token):
        with _errors(f"readdir {fh}"):
            entries = await self._meta_call(self.tree.readdir, fh)
            # offsets are positions + 1: stable, since new points are appended
            for i, (name, attr) in enumerate(entries[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), i):
                    return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        with _errors(f"open {inode}"):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            content = await self._meta_call(self.tree.open, inode)
            with self._fh_lock:
                fh = self._next_fh
                self._next_fh += 1
                self._handles[fh] = content
            # points never change: let the kernel keep their pages
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        with _errors(f"read fh {fh} at {off}+{size}"):
            content = self._handles[fh]
            return await trio.to_thread.run_sync(content.read, off, size, limiter=self._data)

    async def release(self, fh):
        self._handles.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list):
        pass  # inodes live as long as the mount; the tree is small
