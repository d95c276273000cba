"""`rpofs store push`: a local repository moved into an object store as one
host of it (docs/OBJECTSTORE.md, "Moving a local repository into a store").

Why in steps: a repository holds GiBs to TiBs of packs, so the move takes
hours, must survive being killed at any moment, and should not stop backups
while the packs travel. The repository is a working local one until one
durable write (REPO/store.json) makes it a store repository, and a working
store one from then on:

 a. claim. REPO/push.json (Claim: store, host, instance, cache size) is
    written durably first, then the store and the host are claimed as init
    claims them (hosts.claim_store; hosts.claim_host with that instance, an
    encrypted repository's key record in host.json). Run again after a
    crash, push.json says which claim is this push's: a host whose lease
    (or, before its lease was written, whose host.json) names its instance
    is ours and the push goes on; a host still missing is claimed now; any
    other is refused.
 b. upload. Every pack file REPO/chunks/pack-N is put as
    hosts/NAME/packs/pack-N, by one conditional PUT each (streamed from
    the file), under the repository's shared lock: prune and defrag cannot
    delete a pack under the upload, backups go on. The packs are listed
    under the exclusive lock, at a moment no backup is writing one, so
    every file listed is whole; those that come later are put in c. An
    object already there with the file's size is an earlier run's (a PUT
    is atomic: an object is a whole pack or absent); another size is not
    this repository's pack and stops the push.
 c. switch. Under the exclusive lock (no backup between its packs and its
    commit): the packs that came since are put, the objects of packs
    deleted since their upload (a prune) are removed, the catalog is made
    ready to publish (below), and REPO/store.json is written durably. That
    write is the switch: before it a local repository with some of its
    packs copied, after it a store repository.
 d. publish. The repository, opened again (reading through the store now),
    puts its catalog as a snapshot (publish.snapshot): its history has no
    outbox batches, so a follower can start only from a snapshot.
 e. remove. The local pack files the store holds at their size are
    deleted, then push.json. Killed between c and e, the repository works
    as a store repository whose packs are also still local; push run again
    does d and e.

Publication from the switch on: the catalog's next batch number is
skipped once, standing for the history before the push, which no log
object carries. So the first snapshot is past it, and a follower, finding
no log that reaches back to batch 1, starts from that snapshot; batches
committed after the switch (a backup) are published as usual.

A process that opened the repository before the switch (the ingester, a
mount) would go on writing and reading REPO/chunks. So c refuses while
another process has the catalog open, and holds LMDB's own lock of the
catalog while it writes store.json, so a process opening it then waits and
finds the repository in the store; LocalPacks refuses to start a pack once
store.json is there.
"""

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import time

from ..durable import read_json, sync_dir, write_file
from ..errors import NoRepository, PackMissing, RpofsError, StoreConflict, StoreError
from . import hosts, publish, schema, storeconf
from .objectpacks import DEFAULT_CACHE, UPLOADERS
from .packs import LocalPacks
from .repo import Repository
from .s3 import Bucket, StoreUrl
from .schema import FORMAT, pack_name

CLAIM = "push.json"     # REPO/push.json: a push under way
MAX_PUT = 5 << 30       # bytes one PUT may carry (S3's limit; RGW's rgw_max_put_size by default)
_PUT, _FOUND, _GONE = "put", "found", "gone"   # what became of one pack's upload


@dataclasses.dataclass(frozen=True)
class Claim:
    """REPO/push.json: where the repository is being pushed, and this push's
    claim on the host (the instance its lease names). The cache size is
    kept too, so that a push resumed without --cache-size writes the one
    it was started with."""
    store: str
    host: str
    instance: str
    cache_size: int


@dataclasses.dataclass
class PushReport:
    repo: str
    store: str
    host: str
    uploaded: int = 0          # packs put by this run
    uploaded_bytes: int = 0
    found: int = 0             # packs in the store already: put by a run that was interrupted
    dropped: int = 0           # objects of packs deleted locally since their upload (a prune meanwhile)
    removed: int = 0           # local pack files removed once the store held them
    removed_bytes: int = 0
    already: bool = False      # pushed before (or made in this store by init): nothing to do

    def summary(self) -> str:
        if self.already:
            return f"{self.repo} is host {self.host} of {self.store} already: nothing to do"
        text = (f"{self.repo} is host {self.host} of {self.store} now: {self.uploaded} packs uploaded "
                f"({self.uploaded_bytes} bytes)")
        if self.found:
            text += f", {self.found} found there from an interrupted push"
        if self.dropped:
            text += f", {self.dropped} deleted again (pruned meanwhile)"
        return (text + f"; catalog published; {self.removed} local pack files removed ({self.removed_bytes} "
                f"bytes): reads go through the cache")


def read_claim(repo_path: str) -> Claim | None:
    """REPO/push.json, or None when no push is under way."""
    where = os.path.join(repo_path, CLAIM)
    raw = read_json(where)
    if raw is None:
        return None
    try:
        claim = Claim(raw["store"], raw["host"], raw["instance"], raw["cache_size"])
        ok = all(isinstance(v, str) and v for v in (claim.store, claim.host, claim.instance)) and \
            isinstance(claim.cache_size, int) and claim.cache_size >= 0
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise RpofsError(f'{where} is not a push\'s claim (expected {{"store", "host", "instance", "cache_size"}})')
    return claim


def push(repo_path: str, store: str, host: str | None = None, cache_size: int | None = None, keys=None,
         progress=None) -> PushReport:
    """The local repository at repo_path moved into `store` (s3://BUCKET/PREFIX)
    as host `host` (default: this machine's short name), or the push that a
    crash interrupted finished (see above). keys: an encrypted repository's
    (crypto.KeySource); progress: a rpofs.progress.Progress, told the bytes
    uploaded."""
    url = str(StoreUrl.parse(store))
    name = hosts.check_name(host) if host is not None else None
    if not os.path.isdir(os.path.join(repo_path, "catalog")):
        raise NoRepository(f"no rpofs repository at {repo_path}")
    with _one_push(repo_path):
        conf, claim = storeconf.read(repo_path), read_claim(repo_path)
        if conf is not None and (claim is None or conf.replica or
                                 (conf.store, conf.host, conf.instance) != (claim.store, claim.host, claim.instance)):
            return _in_a_store(repo_path, conf, url, name)
        if claim is not None and (claim.store != url or name not in (None, claim.host)):
            raise RpofsError(f"{repo_path} is being pushed to {claim.store} as host {claim.host} ({CLAIM}): run "
                             f"that push again to finish it")
        fresh = claim is None
        if fresh:
            claim = Claim(url, name or hosts.default_name(), hosts.new_instance(),
                          DEFAULT_CACHE if cache_size is None else cache_size)
        report = PushReport(repo_path, claim.store, claim.host)
        with hosts.open_bucket(claim.store) as bucket:
            uploads = _Uploads(LocalPacks(os.path.join(repo_path, "chunks")), bucket, claim, report, progress)
            try:
                if conf is None:
                    _move(repo_path, claim, fresh, claim.cache_size if cache_size is None else cache_size, keys,
                          uploads)
                _finish(repo_path, keys, uploads)
            finally:
                uploads.packs.close()
        return report


def _in_a_store(repo_path: str, conf: storeconf.StoreConf, url: str, name: str | None) -> PushReport:
    """A repository in a store with no push of it under way: pushed there
    before (nothing to do), else refused."""
    if not conf.replica and conf.store == url and name in (None, conf.host):
        return PushReport(repo_path, conf.store, conf.host, already=True)
    what = f"host {conf.host}'s catalog as this machine follows it" if conf.replica else f"host {conf.host}"
    raise RpofsError(f"{repo_path} is in an object store already ({what} of {conf.store}): nothing written")


@contextlib.contextmanager
def _one_push(repo_path: str):
    """One push of a repository at a time: two would each claim the host
    under an instance of their own and take each other's push.json away.
    An flock of the repository's directory (gone with the process)."""
    fd = os.open(repo_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RpofsError(f"another push of {repo_path} is running") from None
        yield
    finally:
        os.close(fd)


# -- a: the claim ---------------------------------------------------------------------

def _write_claim(repo_path: str, claim: Claim) -> None:
    write_file(os.path.join(repo_path, CLAIM), json.dumps(dataclasses.asdict(claim)).encode() + b"\n")


def _drop_claim(repo_path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(repo_path, CLAIM))
    sync_dir(repo_path)


def _claim(repo_path: str, claim: Claim, fresh: bool, bucket: Bucket, key_record: bytes | None) -> None:
    """The store and the host ours (step a), push.json written first. A
    refusal drops a new push.json: the store holds nothing of this push. A
    store failure once the host's claim was sent keeps it: host.json may be
    there, and only push.json's instance tells a run again that it is ours.
    Run again, the host is claimed if it is missing (killed before its
    claim), carried on if it is ours, refused if not."""
    if fresh:
        _write_claim(repo_path, claim)
    try:
        hosts.claim_store(bucket, FORMAT)
    except BaseException:
        if fresh:
            _drop_claim(repo_path)
        raise
    try:
        hosts.claim_host(bucket, claim.host, claim.instance, key_record)
        return
    except StoreError:
        raise
    except RpofsError:              # host.json is there: ours (an earlier run's, or a PUT retried), or not
        if not _ours(bucket, claim):
            if not fresh:
                raise RpofsError(f"{claim.store} has a host {claim.host} that this push did not claim: remove "
                                 f"{os.path.join(repo_path, CLAIM)} and push under another --host") from None
            _drop_claim(repo_path)
            raise
    hosts.write_lease(bucket, claim.host, claim.instance)


def _ours(bucket: Bucket, claim: Claim) -> bool:
    """Whether the store's host is this push's: its lease names the claim's
    instance, or, when it has no lease yet (a claim killed between its two
    PUTs), its host.json does."""
    record = hosts.read_host(bucket, claim.host)
    if record is None:
        return False
    lease = hosts.read_lease(bucket, claim.host)
    holder = lease.instance if lease is not None and lease.instance else record.instance
    return holder == claim.instance


# -- b and c: the packs uploaded, then the switch -----------------------------------------

def _move(repo_path: str, claim: Claim, fresh: bool, cache_size: int, keys, uploads: "_Uploads") -> None:
    """Steps a to c: the repository in the store when this returns."""
    packs, bucket = uploads.packs, uploads.bucket
    repo = Repository.open(repo_path, keys=keys)
    closed = False
    try:
        for pack in packs.list():   # before anything is written
            _fits(packs, pack, packs.size(pack))
        _claim(repo_path, claim, fresh, bucket, repo.key_record)
        with repo.exclusive():      # no backup writing a pack: every file listed is whole
            listed = packs.list()
        with repo.shared():         # no prune or defrag deletes one meanwhile; backups go on
            uploads.put(listed)
        with repo.exclusive():      # no backup meanwhile, from its first pack to its commit
            local = packs.list()
            uploads.put(local)
            for pack in set(_stored(bucket, claim.host)) - set(local):
                bucket.delete(_key(claim.host, pack))
                uploads.done.discard(pack)
                uploads.report.dropped += 1
            with repo.write_txn() as txn:
                _ready_to_publish(repo, txn)
            repo.close()
            closed = True
            with _catalog_to_ourselves(repo_path):
                storeconf.write(repo_path, storeconf.StoreConf(claim.store, cache_size, claim.host, claim.instance))
    finally:
        if not closed:
            repo.close()


def _fits(packs: LocalPacks, pack: int, size: int) -> None:
    if size > MAX_PUT:
        raise RpofsError(f"{packs.path(pack)} is {size / (1 << 30):.1f} GiB: a pack goes into the store by one "
                         f"PUT, of at most {MAX_PUT >> 30} GiB, and local packs do not roll over at a size yet: "
                         f"this repository cannot be pushed")


def _key(host: str, pack: int) -> str:
    return hosts.packs_dir(host) + pack_name(pack)


def _stored(bucket: Bucket, host: str) -> dict[int, int]:
    """{pack: size} of the host's pack objects."""
    base = hosts.packs_dir(host) + "pack-"
    return {int(name[len(base):]): size for name, size in bucket.list(base).items()
            if name[len(base):].isdigit()}


class _Uploads:
    """Local packs put in the store, UPLOADERS at a time, each from its file
    by one conditional PUT; the lease refreshed meanwhile (a push of TiBs
    outlasts it by far) and found still ours. Remembers which packs it
    knows to be in the store, so each is counted once in the report."""

    def __init__(self, packs: LocalPacks, bucket: Bucket, claim: Claim, report: PushReport, progress):
        self.packs, self.bucket, self.claim, self.report, self.progress = packs, bucket, claim, report, progress
        self.done: set[int] = set()
        self._lease_at = time.monotonic()

    def put(self, numbers: list[int]) -> None:
        """Every pack of `numbers` in the store, but those deleted locally
        meanwhile (pruned between their listing and the lock)."""
        stored = _stored(self.bucket, self.claim.host)
        todo: dict[int, int] = {}   # pack -> size
        for pack in numbers:
            if pack in self.done:
                continue
            try:
                size = self.packs.size(pack)
            except PackMissing:     # pruned since it was listed
                continue
            if pack not in stored:
                _fits(self.packs, pack, size)
                todo[pack] = size
            elif stored[pack] == size:
                self.report.found += 1
                self.done.add(pack)
            else:
                raise self._not_ours(pack, stored[pack], size)
        if not todo:
            return
        if self.progress is not None:
            self.progress.set(self.progress.done, self.progress.total + sum(todo.values()))
        pool = concurrent.futures.ThreadPoolExecutor(UPLOADERS, thread_name_prefix="rpofs-push")
        try:
            running = {pool.submit(self._put, pack, size): pack for pack, size in todo.items()}
            for future in concurrent.futures.as_completed(running):
                pack, outcome = running[future], future.result()
                if outcome is not _GONE:
                    self.done.add(pack)
                if outcome is _PUT:
                    self.report.uploaded += 1
                    self.report.uploaded_bytes += todo[pack]
                elif outcome is _FOUND:
                    self.report.found += 1
                if self.progress is not None:
                    self.progress.add(todo[pack])
                if time.monotonic() - self._lease_at > hosts.LEASE_REFRESH_S:
                    hosts.check_lease(self.bucket, self.claim.host, self.claim.instance)
                    self._lease_at = time.monotonic()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, pack: int, size: int) -> str:
        """One pack put (on an upload thread): _PUT, _FOUND (put meanwhile at
        its size), or _GONE (its file deleted since it was listed)."""
        key = _key(self.claim.host, pack)
        try:
            f = open(self.packs.path(pack), "rb")
        except FileNotFoundError:
            return _GONE
        with f:
            try:
                self.bucket.put_new(key, f)
                return _PUT
            except StoreConflict:   # by whom, its size says
                there = self.bucket.size(key)
                if there != size:
                    raise self._not_ours(pack, there, size) from None
                return _FOUND

    def _not_ours(self, pack: int, there: int, size: int) -> RpofsError:
        return RpofsError(f"{self.claim.store}: {_key(self.claim.host, pack)} holds {there} bytes, "
                          f"{self.packs.path(pack)} {size}: that object is not this repository's pack; "
                          f"nothing more uploaded")


def _ready_to_publish(repo: Repository, txn) -> None:
    """The catalog's publication started afresh (step c, in a local
    repository's transaction, so nothing is recorded): the next batch number
    skipped (the history before the push: only a snapshot carries it, see
    above); any outbox and publication state from elsewhere dropped (a
    local repository has none)."""
    meta = repo.db["meta"]
    raw = txn.get(schema.META_NEXT_SEQ, db=meta)
    seq = schema.read_u64(raw) if raw is not None else 1
    txn.put(schema.META_NEXT_SEQ, schema.u64(seq + 1), db=meta)
    txn.delete(schema.META_PUBLISHING, db=meta)
    txn.drop(repo.db["outbox"], delete=False)


@contextlib.contextmanager
def _catalog_to_ourselves(repo_path: str):
    """No other process has the catalog open while the body runs: refused in
    one line if one has it (it opened the repository as a local one and would
    go on using REPO/chunks), else LMDB's own lock of the catalog held, so a
    process opening it meanwhile waits (in lmdb.open) and then finds the
    repository as the body left it. LMDB holds that lock (a POSIX lock on
    byte 0 of lock.mdb) in every process that has the catalog open; this
    process must not have it open: closing a descriptor of lock.mdb drops
    the process's own POSIX locks on it, LMDB's among them."""
    lock = os.path.join(repo_path, "catalog", "lock.mdb")
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RpofsError(f"{repo_path} is open in another process{_holders(fd)}: stop it (the ingester, a "
                             f"mount, a command), then run the push again; what is uploaded stays") from None
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
    finally:
        os.close(fd)


def _holders(fd: int) -> str:
    """" (pid 123: rpofs ingest ...)": the processes with a lock on the file
    (/proc/locks), to say which to stop; "" when that cannot be told."""
    try:
        inode = os.fstat(fd).st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    pids = []
    for line in lines:
        fields = line.replace("->", " ").split()
        for i, field in enumerate(fields):
            parts = field.split(":")
            if len(parts) == 3 and parts[2] == str(inode) and fields[i - 1].isdigit():
                pid = int(fields[i - 1])
                if pid not in pids and pid != os.getpid():
                    pids.append(pid)
    shown = []
    for pid in pids[:3]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
            command = " ".join(w.decode(errors="replace") for w in words if w)[:60]
        except OSError:
            command = ""
        shown.append(f"pid {pid}" + (f": {command}" if command else ""))
    return f" ({'; '.join(shown)})" if shown else ""


# -- d and e: published, then the local packs removed -------------------------------------

def _finish(repo_path: str, keys, uploads: _Uploads) -> None:
    """Steps d and e, on a repository that is in the store (store.json
    written). A local pack the store lacks (none should: the switch put
    every one) is put first, so a pack file is deleted only once the store
    holds it at its size."""
    local, claim, report = uploads.packs, uploads.claim, uploads.report
    uploads.put(local.list())
    with Repository.open(repo_path, keys=keys) as repo:
        publish.snapshot(repo)
    stored = _stored(uploads.bucket, claim.host)
    for pack in local.list():
        size = local.size(pack)
        if stored.get(pack) != size:
            raise RpofsError(f"{local.path(pack)} is not in {claim.store} at its size: kept; run the push again")
        usage = local.usage(pack)
        local.delete(pack)
        report.removed += 1
        report.removed_bytes += usage
    sync_dir(local.directory)
    _drop_claim(repo_path)
