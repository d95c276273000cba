"""Packs as objects in an S3 store, behind the PackStore seam.

A pack is one immutable object `PREFIX/hosts/HOST/packs/pack-NNNNNNNN` (each
host its own, rpofs.store.hosts); the catalog is local and published
(rpofs.store.publish); docs/OBJECTSTORE.md is the design.

Writing. A pack being written is a local file in REPO/staging/ (records land
at the places their writer reserved, from several threads, as in a local
pack). When its writer moves on to the next pack (PackWriter rolls over at
`target` bytes) or syncs, the file is uploaded whole by ONE PUT with
`If-None-Match: *` on a background thread, so the upload of one pack
overlaps the filling of the next; sync() returns once every pack is in the
store. "Durable" before the catalog's commit therefore means "in the
store": BackupWriter's ordering (packs durable, then one LMDB transaction)
holds unchanged. A staged file is flock'ed by its writer, so one left by a
killed process is told apart from one being written and removed when a
store is opened.

Reading: ranged GETs through a bounded local cache (BlockCache, REPO/cache/)
of BLOCK-aligned blocks. Measured against RGW here (tools/ceph-rgw, boto3,
one connection): a ranged GET costs ~2 ms for 64 KiB, ~3 ms for 256 KiB,
~4.5-5.5 ms for 1 MiB, ~21 ms for 4 MiB (~190 MiB/s). A cold 4 KiB read of a
pieced chunk needs its piece table and one 64 KiB piece, usually in two
blocks: 256 KiB blocks make that two ~3 ms GETs against two ~5 ms ones for
1 MiB blocks, while 64 KiB blocks would split most pieces over two blocks
and make a sequential reader send 16 requests a MiB (botocore spends ~0.5
ms of CPU on each, on 2 cores). So the cache keeps 256 KiB blocks but a
fetch takes every missing block of a run in one GET of up to MAX_FETCH:
a sequential reader (the mount advises 8 MiB ahead, restore reads whole
chunks) pays a request per 4 MiB, not per block. Concurrent readers of one
block wait on one fetch.
"""

import collections
import concurrent.futures
import contextlib
import fcntl
import itertools
import logging
import os
import threading
import time

import blake3

from ..errors import PackMissing, RpofsError, StoreConflict, StoreError
from .packs import PackFile, PackStore, pwrite_all
from .s3 import Bucket
from .schema import pack_name

log = logging.getLogger(__name__)

BLOCK = 256 << 10        # bytes a cache block holds (aligned in its pack); see above
MAX_FETCH = 4 << 20      # bytes one GET fetches at most (a run of missing blocks)
FETCHERS = 8             # GETs at once (prefetch and the blocks of one read)
UPLOADERS = 2            # PUTs at once: 1 thread 90-150 MiB/s, 4 threads 100-220 MiB/s on 2 cores
PACK_TARGET = 16 << 20   # a pack's size in the store: see docs/OBJECTSTORE.md ("Pack size")
STREAM_FETCH = 16 << 20  # bytes one GET of a streaming reader's read-ahead fetches at most (_Direct)
STREAM_AHEAD = 192 << 20  # bytes a streaming reader holds fetched ahead at most
HASH = 32                # a cache file starts with its block's blake3
DIR_BYTES = 4096         # what a pack's directory in the cache takes


class ObjectPackFile(PackFile):
    """A pack being written: staged in a local file, uploaded whole."""

    def __init__(self, store: "ObjectPacks", pack: int):
        self._store = store
        self.pack = pack
        self.path = os.path.join(store.staging, pack_name(pack))
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RpofsError(f"creating {self.path}: {e.strerror}") from None
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # ours while we live: see ObjectPacks._clean_staging
        self._upload: concurrent.futures.Future | None = None

    def write_at(self, offset: int, parts: list) -> None:
        pwrite_all(self._fd, parts, offset, self.path)

    def finish(self) -> None:
        """No more writes: start the upload (an empty pack is never uploaded)."""
        if self._upload is None and os.fstat(self._fd).st_size:
            self._upload = self._store._uploads.submit(self._put)

    def _put(self) -> None:
        size = os.fstat(self._fd).st_size
        data = bytearray(size)
        got = os.preadv(self._fd, [data], 0)
        if got != size:
            raise RpofsError(f"reading {self.path}: {got} of {size} bytes")
        try:
            self._store.bucket.put_new(self._store.key(self.pack), bytes(data))
        except StoreConflict:
            raise StoreConflict(f"{self._store.bucket.url}: {self._store.key(self.pack)} exists already: another "
                                f"machine writes this host now (taken over?); nothing of this backup is "
                                f"recorded", "PreconditionFailed", "") from None
        self._store._sizes[self.pack] = size

    def sync(self) -> None:
        """In the store when this returns (the catalog may refer to it)."""
        self.finish()
        if self._upload is not None:
            self._upload.result()

    def close(self) -> None:
        if self._fd >= 0:
            if self._upload is not None:
                with contextlib.suppress(BaseException):
                    self._upload.result()  # never leave an upload reading a closed fd
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Nothing refers to it: the staged file and any uploaded object go.
        An object that cannot be deleted now (the store unreachable) stays as
        garbage for the next collection (rpofs.store.gc lists the store)."""
        uploaded = False
        if self._upload is not None:
            self._upload.cancel()
            try:
                self._upload.result()
                uploaded = True
            except BaseException:
                pass
        self.close()
        if uploaded:
            try:
                self._store.delete(self.pack)
            except StoreError as e:
                log.warning("pack %s left in the store for the next collection: %s", pack_name(self.pack), e)


class BlockCache:
    """Pack blocks kept in REPO/cache/<pack>/<block>, at most `limit` bytes
    (allocated, 4 KiB units) however many processes share it.

    Nothing in it is trusted: a file is its block's blake3 then the block,
    and a process checks the whole block the first time it uses a file (and
    again whenever the file's inode, size or mtime changed); a block that
    does not match is removed and fetched again. Once checked, a read is one
    pread of the bytes wanted, as in a local pack, and the content check of
    every record (rpofs.store.chunks) still guards what it returns.

    The bound holds across processes: REPO/cache/.used counts the bytes,
    changed under an flock of REPO/cache/.lock; a block is counted before it
    is written, and a process that would pass the limit evicts first: it
    scans the directory (correcting the count) and removes the least
    recently used blocks (atime, set explicitly on use at most every
    TOUCH_S; mtime untouched) down to 90 % of the limit, so scans are rare.
    """

    TOUCH_S = 10
    CHECKED = 1 << 17     # blocks whose check a process remembers (32 GiB of blocks)

    def __init__(self, directory: str, limit: int, space: str = ""):
        self.directory = directory
        self.limit = limit
        self.space = space            # what this store's pack directories here start with
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lockfd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._used_path = os.path.join(directory, ".used")
        self._lock = threading.Lock()
        self._checked: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._tmp = itertools.count(1)
        self.hits = self.misses = self.refetched = 0

    def _path(self, pack: int, block: int) -> str:
        return os.path.join(self.directory, f"{self.space}{pack:08d}", f"{block:06d}")

    def has(self, pack: int, block: int) -> bool:
        return os.path.exists(self._path(pack, block))

    def read(self, pack: int, block: int, lo: int, hi: int) -> bytes | None:
        """Bytes [lo, hi) of the block (fewer when the block is shorter);
        None when it is not cached or did not match its hash."""
        path = self._path(pack, block)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                checked = self._checked.get((pack, block)) == ident
            if checked:
                data = os.pread(fd, hi - lo, HASH + lo)
            else:
                whole = os.pread(fd, st.st_size, 0)
                if len(whole) < HASH or blake3.blake3(memoryview(whole)[HASH:]).digest() != whole[:HASH]:
                    log.warning("cache block %s does not match its hash: fetched again", path)
                    self.refetched += 1
                    self._drop(path, st)
                    return None
                with self._lock:
                    self._checked[(pack, block)] = ident
                    if len(self._checked) > self.CHECKED:
                        self._checked.popitem(last=False)
                data = whole[HASH + lo:HASH + hi]
            now = time.time_ns()
            if now - st.st_atime_ns > self.TOUCH_S * 10**9:
                os.utime(fd, ns=(now, st.st_mtime_ns))  # recency for eviction; mtime (the identity) kept
            self.hits += 1
            return data
        finally:
            os.close(fd)

    def put(self, pack: int, block: int, data: bytes) -> None:
        """Keep a block just fetched (not when the cache cannot hold it)."""
        path = self._path(pack, block)
        need = _alloc(HASH + len(data))
        if need + DIR_BYTES > self.limit * 9 // 10:
            return
        tmp = self._reserve(need)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pwrite_all(fd, [blake3.blake3(data).digest(), data], 0, tmp)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            self._place(tmp, path)
            with self._lock:
                self._checked[(pack, block)] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except (OSError, RpofsError) as e:  # a full disk: the read goes on uncached
            log.warning("cache: block not kept: %s", e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._release(need)

    def drop_pack(self, pack: int) -> None:
        """Forget every block of a pack (deleted from the store)."""
        directory = os.path.join(self.directory, f"{self.space}{pack:08d}")
        with self._counted() as used, contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    used[0] -= entry.stat().st_blocks * 512
                    os.unlink(entry.path)
            os.rmdir(directory)
            used[0] -= DIR_BYTES

    def _drop(self, path: str, st: os.stat_result) -> None:
        with self._counted() as used, contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == st.st_ino:
                os.unlink(path)
                used[0] -= st.st_blocks * 512

    # -- the bound -------------------------------------------------------------

    @contextlib.contextmanager
    def _counted(self):
        """The shared byte count, under the cache's lock (threads and processes)."""
        with self._lock:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            try:
                try:
                    with open(self._used_path, "rb") as f:
                        used = int(f.read() or b"-1")
                except (FileNotFoundError, ValueError):
                    used = -1
                box = [used if used >= 0 else self._scan(self.limit)]
                yield box
                tmp = self._used_path + ".new"
                with open(tmp, "wb") as f:
                    f.write(b"%d" % max(0, box[0]))
                os.replace(tmp, self._used_path)
            finally:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _reserve(self, need: int) -> str:
        """Count `need` bytes, evicting first if they would pass the limit;
        returns the temporary file to write the block to, made while the
        count is locked and named with `need`: a scan by any process
        counts it at that size however much of it is written yet."""
        with self._counted() as used:
            if used[0] + need > self.limit:
                used[0] = self._scan(self.limit * 9 // 10 - need)
            used[0] += need
            n = next(self._tmp)  # (self._lock is held: _counted)
            tmp = os.path.join(self.directory, f".tmp-{os.getpid()}-{threading.get_ident()}-{n}-{need}")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return tmp

    def _place(self, tmp: str, path: str) -> None:
        """Rename a written block into its pack's directory, under the
        count's lock: a scan running beside an unlocked rename could miss
        the block in both places (its temporary name already gone, its
        directory listed before it arrived) and count a block too few —
        the cache passed its bound by one block in 1 of 5 runs so. A
        directory made here is counted here (a scan may have removed the
        pack's empty one since the block was reserved)."""
        with self._counted() as used:
            directory = os.path.dirname(path)
            if not os.path.isdir(directory):
                os.mkdir(directory, mode=0o700)
                used[0] += DIR_BYTES
            os.rename(tmp, path)
            if used[0] > self.limit:
                used[0] = self._scan(self.limit * 9 // 10)

    def _release(self, freed: int) -> None:
        with self._counted() as used:
            used[0] -= freed

    def used(self) -> int:
        """Bytes the cache takes now (a scan): its blocks' files, the
        directories of their packs, the blocks being written."""
        with self._counted() as used:
            used[0] = self._scan(1 << 62)
            return used[0]

    def _scan(self, goal: int) -> int:
        """Every block's allocated bytes counted (and each pack's directory);
        the least recently used removed until at most `goal` remain;
        temporary files counted at the size they were reserved for, those
        of writers that died (an hour old) removed. Returns the bytes left."""
        blocks, total, now = [], 0, time.time()
        for top in os.scandir(self.directory):
            if top.name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    if now - top.stat().st_mtime > 3600:
                        os.unlink(top.path)
                    else:
                        total += int(top.name.rsplit("-", 1)[1])
                continue
            if not top.is_dir():
                continue
            empty = True
            for entry in os.scandir(top.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    blocks.append((st.st_atime_ns, entry.path, st.st_blocks * 512))
                    total += st.st_blocks * 512
                    empty = False
            if empty:
                with contextlib.suppress(OSError):
                    os.rmdir(top.path)
                    continue
            total += DIR_BYTES
        if total > goal:
            blocks.sort()
            for _, path, size in blocks:
                if total <= goal:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    total -= size
        return total

    def close(self) -> None:
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1


def _scatter(data: bytes, buffers: list) -> int:
    """Copy data into buffers in order (read_into over a read); the bytes copied."""
    view, done = memoryview(data), 0
    for buf in buffers:
        n = min(len(buf), len(view) - done)
        if n <= 0:
            break
        memoryview(buf).cast("B")[:n] = view[done:done + n]
        done += n
    return done


def _alloc(n: int) -> int:
    return (n + 4095) // 4096 * 4096


class ObjectPacks(PackStore):
    """Packs in a bucket under a prefix; REPO/staging and REPO/cache local."""

    target = PACK_TARGET

    def __init__(self, bucket: Bucket, repo_path: str, cache_size: int, packs_dir: str, cache_dir: str,
                 cache_space: str = "", block: int = BLOCK):
        """packs_dir: where in the store the packs are (a host's, rpofs.store.hosts);
        cache_space: what the cache's names of these packs start with
        (several hosts' packs share one cache)."""
        self.bucket = bucket
        self.block = block
        self.packs_dir = packs_dir
        self.staging = os.path.join(repo_path, "staging")
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        self.cache = BlockCache(cache_dir, cache_size, cache_space)
        self._sizes: dict[int, int] = {}       # pack -> size: packs are immutable once in the store
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._prefetching = 0                   # bytes asked for by advise and not yet fetched
        self._fetchers = concurrent.futures.ThreadPoolExecutor(FETCHERS, thread_name_prefix="rpofs-get")
        self._uploads = concurrent.futures.ThreadPoolExecutor(UPLOADERS, thread_name_prefix="rpofs-put")
        self.gets = 0                           # GETs sent (the tests and the bench count them)
        self._clean_staging()

    def _clean_staging(self) -> None:
        """Staged packs whose writer died (no flock held): nothing refers to them."""
        for entry in os.scandir(self.staging):
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)
            except BlockingIOError:
                pass  # a live writer's
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)

    # -- writing -----------------------------------------------------------------

    def create(self, pack: int) -> PackFile:
        return ObjectPackFile(self, pack)

    # -- reading -----------------------------------------------------------------

    def read(self, pack: int, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        size = self._sizes.get(pack)
        if size is not None:
            length = min(length, size - offset)
            if length <= 0:
                return b""
        b = self.block
        first, last = offset // b, (offset + length - 1) // b
        parts: dict[int, bytes] = {}
        wanted = []
        for i in range(first, last + 1):
            lo, hi = max(offset, i * b) - i * b, min(offset + length, (i + 1) * b) - i * b
            data = self.cache.read(pack, i, lo, hi)
            if data is None:
                wanted.append(i)
            else:
                parts[i] = data
        if wanted:
            fetched = self._blocks(pack, wanted)
            for i in wanted:
                lo, hi = max(offset, i * b) - i * b, min(offset + length, (i + 1) * b) - i * b
                parts[i] = fetched[i][lo:hi]
        out = []
        for i in range(first, last + 1):
            out.append(parts[i])
            if len(parts[i]) < min(offset + length, (i + 1) * b) - max(offset, i * b):
                break  # the end of the pack
        return out[0] if len(out) == 1 else b"".join(out)

    def read_into(self, pack: int, offset: int, buffers: list) -> int:
        return _scatter(self.read(pack, offset, sum(len(buf) for buf in buffers)), buffers)

    def _blocks(self, pack: int, wanted: list[int]) -> dict[int, bytes]:
        """The blocks, fetched now (runs of them by one GET each, on the
        fetchers, the last run on this thread) unless a fetch of them is
        already under way, which is then waited for."""
        futures, mine = self._claim(pack, wanted)
        runs = _runs(mine, MAX_FETCH // self.block)
        for run in runs[:-1]:
            self._fetchers.submit(self._fetch_run, pack, run)
        if runs:
            self._fetch_run(pack, runs[-1])
        return {i: futures[i].result() for i in wanted}

    def _claim(self, pack: int, blocks: list[int]) -> tuple[dict, list[int]]:
        """A future for each block: one already under way, or a new one that
        the caller must fetch (the second list)."""
        futures, mine = {}, []
        with self._lock:
            for i in blocks:
                future = self._inflight.get((pack, i))
                if future is None:
                    future = self._inflight[(pack, i)] = concurrent.futures.Future()
                    mine.append(i)
                futures[i] = future
        return futures, mine

    def _fetch_run(self, pack: int, run: list[int], prefetch: bool = False) -> None:
        """One GET for consecutive blocks; each kept in the cache and handed
        to whoever waits for it."""
        b = self.block
        try:
            self.gets += 1
            data, size = self.bucket.get(self.key(pack), run[0] * b, (run[-1] + 1) * b)
            self._sizes[pack] = size
            blocks = [data[k * b:(k + 1) * b] for k in range(len(run))]
            for i, block in zip(run, blocks):
                self._settle(pack, i, block)  # readers go on while the blocks are written to the cache
            for i, block in zip(run, blocks):
                if block:
                    self.cache.put(pack, i, block)
        except BaseException as e:
            for i in run:
                self._settle(pack, i, None, e)
            if not prefetch:
                raise
        finally:
            if prefetch:
                with self._lock:
                    self._prefetching -= len(run) * b

    def _settle(self, pack: int, i: int, data, error=None) -> None:
        with self._lock:
            future = self._inflight.pop((pack, i), None)
        if future is not None and not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(data)

    def advise(self, pack: int, offset: int, length: int) -> None:
        """Fetch the span's blocks that are not cached, in the background.
        At most a quarter of the cache is asked for at once, so prefetched
        blocks are not evicted before they are read."""
        b = self.block
        size = self._sizes.get(pack)
        if size is not None:
            length = min(length, size - offset)
        if length <= 0:
            return
        cold = [i for i in range(offset // b, (offset + length - 1) // b + 1) if not self.cache.has(pack, i)]
        with self._lock:
            room = self.cache.limit // 4 - self._prefetching
            cold = cold[:max(0, room // b)]
            self._prefetching += len(cold) * b
        _, mine = self._claim(pack, cold)
        with self._lock:
            self._prefetching -= (len(cold) - len(mine)) * b
        for run in _runs(mine, MAX_FETCH // b):
            self._fetchers.submit(self._fetch_run, pack, run, True)

    def size(self, pack: int) -> int:
        size = self._sizes.get(pack)
        if size is None:
            size = self._sizes[pack] = self.bucket.size(self.key(pack))
        return size

    def usage(self, pack: int) -> int:
        try:
            return self.size(pack)
        except PackMissing:
            return 0

    def list(self) -> list[int]:
        found = {}
        for name, size in self.bucket.list(self.packs_dir).items():
            number = name[len(self.packs_dir) + 5:]
            if name.startswith(self.packs_dir + "pack-") and number.isdigit():
                found[int(number)] = size
        self._sizes = dict(found)
        return sorted(found)

    def key(self, pack: int) -> str:
        return self.packs_dir + pack_name(pack)

    def delete(self, pack: int) -> None:
        self.bucket.delete(self.key(pack))
        self._sizes.pop(pack, None)
        self.cache.drop_pack(pack)

    def uncached(self) -> PackStore:
        return _Direct(self)

    def close(self) -> None:
        self._fetchers.shutdown(wait=True, cancel_futures=True)
        self._uploads.shutdown(wait=True)
        self.cache.close()
        self.bucket.close()


class _Ahead:
    """A range of a pack a streaming reader was advised of, being fetched by one GET."""
    __slots__ = ("pack", "start", "stop", "future")

    def __init__(self, pack: int, start: int, stop: int):
        self.pack, self.start, self.stop = pack, start, stop
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class _Direct(PackStore):
    """The same packs read from the store itself, not through the cache:
    what verify --read-data checks (what another host would restore from),
    and what a restore reads (it reads each byte once). A read is a GET of
    just its bytes, unless `advise` asked for them ahead: then they come
    from one GET of up to STREAM_FETCH in flight on the fetchers (a restore
    advises the next window of chunks while it writes this one; a window's
    chunks lie one after another in a few packs, so ~16 GETs of 4 MiB
    become one of 16 MiB). What was fetched ahead is held in memory, at
    most STREAM_AHEAD, oldest dropped first (a read that finds it dropped
    GETs its bytes again)."""

    def __init__(self, packs: ObjectPacks):
        self._packs = packs
        self._lock = threading.Lock()
        self._ahead: collections.deque[_Ahead] = collections.deque()
        self._held = 0

    def read(self, pack: int, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._lock:
            ahead = next((a for a in self._ahead if a.pack == pack and a.start <= offset
                          and offset + length <= a.stop), None)
        if ahead is not None:
            try:
                data = ahead.future.result()
            except RpofsError:
                pass   # read it on its own: its own error, if it has one
            else:
                return bytes(data[offset - ahead.start:offset - ahead.start + length])
        self._packs.gets += 1
        return self._packs.bucket.get(self._packs.key(pack), offset, offset + length)[0]

    def read_into(self, pack: int, offset: int, buffers: list) -> int:
        return _scatter(self.read(pack, offset, sum(len(buf) for buf in buffers)), buffers)

    def advise(self, pack: int, offset: int, length: int) -> None:
        """Fetch [offset, offset + length) ahead, by GETs of STREAM_FETCH at most."""
        for at in range(offset, offset + length, STREAM_FETCH):
            ahead = _Ahead(pack, at, min(offset + length, at + STREAM_FETCH))
            with self._lock:
                if any(a.pack == pack and a.start <= ahead.start and ahead.stop <= a.stop for a in self._ahead):
                    continue
                while self._ahead and self._held + ahead.stop - ahead.start > STREAM_AHEAD:
                    old = self._ahead.popleft()
                    self._held -= old.stop - old.start
                self._ahead.append(ahead)
                self._held += ahead.stop - ahead.start
            self._packs._fetchers.submit(self._fetch, ahead)

    def _fetch(self, ahead: _Ahead) -> None:
        try:
            self._packs.gets += 1
            data = self._packs.bucket.get(self._packs.key(ahead.pack), ahead.start, ahead.stop)[0]
            ahead.future.set_result(memoryview(data))
        except BaseException as e:
            ahead.future.set_exception(e)

    def size(self, pack: int) -> int:
        return self._packs.bucket.size(self._packs.key(pack))

    def list(self) -> list[int]:
        return self._packs.list()

    def uncached(self) -> PackStore:
        return self


def _runs(blocks: list[int], longest: int) -> list[list[int]]:
    """Consecutive block numbers grouped, each group at most `longest` long."""
    runs: list[list[int]] = []
    for i in blocks:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < longest:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


DEFAULT_CACHE = 10 << 30   # bytes: the cache's bound when init is given none
