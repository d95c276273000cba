"""Pack I/O: the one interface through which every byte of pack data is
written, read, listed and deleted.

A pack is an append-only sequence of records (rpofs.store.schema: PACK_HEADER
then the stored bytes) numbered by `meta/next_pack`. Nothing above this module
knows that a pack is a file: the chunk reader and writer, prune, defrag,
verify and upgrade all go through a PackStore, so a second backend
(rpofs.store.objectpacks: one object per pack in an S3 store) implements
these operations and nothing else changes.

A PackStore may want packs of a bounded size (`target`): PackWriter then
starts a new pack once the current one would pass it, and tells the full
one's PackFile `finish()` so it can start making it durable (an object store
uploads it while the next one fills).

LocalPacks keeps packs as files REPO/chunks/pack-NNNNNNNN. A process keeps at
most OPEN_PACKS of them open (a repository holds a pack per backup session,
far more than a process may open); a descriptor in use by one thread is
closed only when that thread is done with it.
"""

import collections
import contextlib
import os
import threading

from ..durable import sync_dir
from ..errors import PackMissing, RpofsError
from . import storeconf
from .schema import pack_name

OPEN_PACKS = 256


class PackFile:
    """A pack being written: records written at the places their writer
    reserved, then sync() before the catalog refers to it."""

    def write_at(self, offset: int, parts: list) -> None:
        """Write `parts` one after another at `offset`: a writer that reserved
        the place (PackWriter, whose threads seal records in parallel) fills
        it; the pack is complete once every reserved place is written."""
        raise NotImplementedError

    def finish(self) -> None:
        """No more writes will come: durability may start (sync() waits for it)."""

    def sync(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Close and remove: nothing refers to it."""
        raise NotImplementedError


class PackStore:
    """The operations on packs. Reads of a pack that is gone raise PackMissing.
    target: the size a pack should not grow past (None: a writer keeps one
    pack, however large)."""

    target: int | None = None

    def create(self, pack: int) -> PackFile:
        raise NotImplementedError

    def read(self, pack: int, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the pack)."""
        raise NotImplementedError

    def read_into(self, pack: int, offset: int, buffers: list) -> int:
        """Fill `buffers` in order from `offset`; returns the bytes read."""
        raise NotImplementedError

    def advise(self, pack: int, offset: int, length: int) -> None:
        """A read of that span comes soon: start fetching it."""
        raise NotImplementedError

    def size(self, pack: int) -> int:
        raise NotImplementedError

    def usage(self, pack: int) -> int:
        """Bytes the pack takes on its storage (allocated, not apparent)."""
        raise NotImplementedError

    def list(self) -> list[int]:
        """Every pack there is, in number order."""
        raise NotImplementedError

    def delete(self, pack: int) -> None:
        """Gone for new readers; a reader that already has it open may finish."""
        raise NotImplementedError

    def uncached(self) -> "PackStore":
        """The same packs read where they are kept, past any local cache
        (verify --read-data checks what another reader would get)."""
        return self

    def close(self) -> None:
        raise NotImplementedError


def pwrite_all(fd: int, parts: list, offset: int, path: str) -> None:
    """Write `parts` one after another at `offset`, all of them or an RpofsError."""
    total = sum(len(p) for p in parts)
    try:
        done = os.pwritev(fd, parts, offset)
        if done < total:  # a short write: the next one raises the reason (e.g. ENOSPC)
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + total - len(rest))
                rest = rest[n:]
    except OSError as e:
        raise RpofsError(f"writing {path}: {e.strerror}") from None


class LocalPackFile(PackFile):
    def __init__(self, path: str, directory: str):
        self.path = path
        self._dir = directory
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RpofsError(f"creating {path}: {e.strerror}") from None

    def write_at(self, offset: int, parts: list) -> None:
        pwrite_all(self._fd, parts, offset, self.path)

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
            sync_dir(self._dir)
        except OSError as e:
            raise RpofsError(f"syncing {self.path}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LocalPacks(PackStore):
    """Packs as files in one directory (REPO/chunks)."""

    def __init__(self, directory: str):
        self.directory = directory
        # REPO/store.json appearing means `rpofs store push` moved the repository into an object store
        # after this process opened it (rpofs.store.push): a pack written here now would be in no store
        self._moved = os.path.join(os.path.dirname(os.path.abspath(directory)), storeconf.NAME)
        self._fds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # pack -> [fd, users]
        self._lock = threading.Lock()

    def path(self, pack: int) -> str:
        return os.path.join(self.directory, pack_name(pack))

    def create(self, pack: int) -> PackFile:
        if os.path.exists(self._moved):
            raise RpofsError(f"{os.path.dirname(self._moved)} was moved into an object store (rpofs store push) "
                             f"after this process opened it: start it again (nothing written)")
        return LocalPackFile(self.path(pack), self.directory)

    @contextlib.contextmanager
    def _open(self, pack: int):
        with self._lock:
            entry = self._fds.get(pack)
            if entry is None:
                try:
                    entry = self._fds[pack] = [os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC), 0]
                except FileNotFoundError:
                    raise PackMissing(f"pack file {self.path(pack)} is missing") from None
            self._fds.move_to_end(pack)
            entry[1] += 1
            while len(self._fds) > OPEN_PACKS:
                old = self._fds.popitem(last=False)[1]
                old[1] -= 1  # its own reference: closed here or by its last user
                if old[1] < 0:
                    os.close(old[0])
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] < 0:  # evicted while in use
                    os.close(entry[0])

    def read(self, pack: int, offset: int, length: int) -> bytes:
        with self._open(pack) as fd:
            return os.pread(fd, length, offset)

    def read_into(self, pack: int, offset: int, buffers: list) -> int:
        with self._open(pack) as fd:
            return os.preadv(fd, buffers, offset)

    def advise(self, pack: int, offset: int, length: int) -> None:
        with self._open(pack) as fd:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def size(self, pack: int) -> int:
        try:
            return os.stat(self.path(pack)).st_size
        except FileNotFoundError:
            raise PackMissing(f"pack file {self.path(pack)} is missing") from None

    def usage(self, pack: int) -> int:
        try:
            return os.stat(self.path(pack)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def list(self) -> list[int]:
        return sorted(int(e.name[5:]) for e in os.scandir(self.directory)
                      if e.name.startswith("pack-") and e.name[5:].isdigit())

    def delete(self, pack: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(pack))
        with self._lock:  # a new reader opens it afresh (and finds it gone)
            entry = self._fds.pop(pack, None)
            if entry is not None:
                entry[1] -= 1
                if entry[1] < 0:
                    os.close(entry[0])

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
