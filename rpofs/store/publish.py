"""The catalog published to the object store, and followed from it.

Why: with the packs in a store but the catalog only on the host, losing
the host loses every point. So every write transaction of a repository in
a store records its changes (Recorder) and queues them as one batch in the
`outbox` sub-database, in the same transaction (schema, "Publication"):
a commit and its batch are durable together, and a crash loses neither.
publish() then puts the queued batches into the store as immutable log
objects, PREFIX/hosts/NAME/log/<first seq>-<last seq> (zstd; sealed under
the catalog key when the repository is encrypted), and removes them from
the outbox once the store has them. Points are committed only after their
packs are in the store (BackupWriter), so a published point never refers
to a pack the store does not hold.

A log object is never changed. A publish killed after its PUT and before
the outbox was emptied puts the same batches again next time (under the
same name if no batch was added meanwhile, else an overlapping one):
followers apply each seq once, so overlaps are harmless.

Snapshots: once the logs published since the last snapshot outweigh half
of it (and at least SNAPSHOT_MIN), the catalog is copied compacted by
LMDB (one read transaction: a consistent copy) and put as
PREFIX/hosts/NAME/snap/<seq>, seq being the first batch it does not hold.
A new follower reads the newest snapshot and the logs after it, not the
whole history. The logs the new snapshot holds are deleted then (a
follower that still wanted one finds the logs no longer reach back and
reads the snapshot), and snapshots older than the previous one (kept for
a follower reading it meanwhile): what a follower lists and reads stays
bounded by a snapshot and the logs since.

Following (follow): a replica (another host's catalog here, or this
host's own on a machine that takes it over) applies every batch after the
last it applied, in seq order, one write transaction per log object,
META_FOLLOWED moved in the same transaction; it starts from the newest
snapshot when it is behind it and the logs no longer reach back to it.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import struct
import tempfile
import time

import lmdb

from ..errors import RpofsError, StoreConflict
from . import hosts, schema
from .chunks import compress, decompress
from .schema import Batch, Change

log = logging.getLogger(__name__)

MAX_LOG = 8 << 20            # bytes of batches one log object carries at most
SNAPSHOT_MIN = 4 << 20       # logs since the last snapshot before another is worth its PUT
MAX_UNPACKED = 64 << 30      # what a published object may decompress to at most
SNAPSHOT_OVER_LOGS = 16     # a replica further behind than this many log objects reads the snapshot
FETCH_LOGS = 8              # log objects GET at once, applied in one transaction
SEAL_CONTEXT = "published"   # the catalog sealer's "sub-database" for published objects


# -- recording a write transaction's changes ------------------------------------

class Recorder:
    """A write transaction that keeps a list of the changes made through it
    (Repository.write_txn hands it out in a repository that publishes).
    Everything else is the transaction's own."""

    def __init__(self, txn, names: dict):
        self._txn = txn
        self._names = names             # id(db handle) -> sub-database name
        self.changes: list[Change] = []

    def _name(self, db) -> str:
        try:
            return self._names[id(db)]
        except KeyError:
            raise RpofsError("a catalog write to a sub-database that is not the schema's") from None

    def note(self, db: str, key, value) -> None:
        if db in schema.UNPUBLISHED or (db == "meta" and bytes(key) in schema.UNPUBLISHED_META):
            return
        self.changes.append(Change(db, bytes(key), None if value is None else bytes(value)))

    def put(self, key, value, db=None, **kwargs):
        done = self._txn.put(key, value, db=db, **kwargs)
        if done:
            self.note(self._name(db), key, value)
        return done

    def delete(self, key, value=b"", db=None):
        done = self._txn.delete(key, value, db=db)
        if done:
            self.note(self._name(db), key, None)
        return done

    def cursor(self, db=None):
        return _RecordingCursor(self._txn.cursor(db=db), self, self._name(db))

    def __getattr__(self, name):
        if name in ("replace", "pop", "drop"):
            raise AttributeError(f"{name} is not recorded for publication: use put/delete")
        return getattr(self._txn, name)


class _RecordingCursor:
    def __init__(self, cur, recorder: Recorder, db: str):
        self._cur, self._recorder, self._db = cur, recorder, db

    def put(self, key, value, **kwargs):
        done = self._cur.put(key, value, **kwargs)
        if done:
            self._recorder.note(self._db, key, value)
        return done

    def delete(self, dupdata: bool = False):
        key = bytes(self._cur.key())
        done = self._cur.delete(dupdata)
        if done:
            self._recorder.note(self._db, key, None)
        return done

    def __iter__(self):
        return iter(self._cur)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._cur.close()

    def __getattr__(self, name):
        if name in ("replace", "pop", "putmulti"):
            raise AttributeError(f"{name} is not recorded for publication: use put/delete")
        return getattr(self._cur, name)


def enqueue(txn, db: dict, changes: list[Change]) -> None:
    """The changes as the next batch of the outbox, in the transaction
    that made them (txn: the raw transaction; db: the repository's handles)."""
    raw = txn.get(schema.META_NEXT_SEQ, db=db["meta"])
    seq = schema.read_u64(raw) if raw is not None else 1
    batch = Batch(seq, time.time_ns() // 1000, changes)
    txn.put(schema.outbox_key(seq), schema.encode_batch(batch), db=db["outbox"])
    txn.put(schema.META_NEXT_SEQ, schema.u64(seq + 1), db=db["meta"])


# -- publishing ---------------------------------------------------------------------

@dataclasses.dataclass
class Published:
    batches: int = 0
    objects: int = 0
    bytes: int = 0
    snapshot: bool = False


@dataclasses.dataclass(frozen=True)
class Backlog:
    batches: int
    oldest_us: int | None     # when the oldest batch not yet published was committed


def backlog(repo) -> Backlog:
    """What the outbox holds: the publication lag (rpofs status, metrics)."""
    with repo.env.begin(db=repo.db["outbox"]) as txn:
        count = txn.stat(repo.db["outbox"])["entries"]
        cur = txn.cursor()
        oldest = schema.decode_batch(cur.value()).time_us if count and cur.first() else None
    return Backlog(count, oldest)


def log_name(host: str, first: int, last: int) -> str:
    return f"{hosts.log_dir(host)}{first:016x}-{last:016x}"


def snap_name(host: str, seq: int) -> str:
    return f"{hosts.snap_dir(host)}{seq:016x}"


def _seal(keys, name: str, data: bytes) -> bytes:
    packed = compress(data)
    return keys.catalog.seal(SEAL_CONTEXT, name.encode(), packed) if keys else packed


def _unseal(keys, name: str, body: bytes) -> bytes:
    try:
        if keys:
            body = keys.catalog.open(SEAL_CONTEXT, name.encode(), body)
        return decompress(body, MAX_UNPACKED)
    except (ValueError, RpofsError) as e:
        raise RpofsError(f"published object {name} cannot be read (damaged, or of another key): {e}") from None


def publish(repo) -> Published:
    """Everything in the outbox put in the store, then a snapshot if one is
    due. Raises a StoreError (the batches stay queued for the next call) or
    TakenOver (rpofs.errors: another machine writes this host now)."""
    conf, bucket = repo.store_conf, repo.packs.bucket
    done = Published()
    started = time.time()   # every commit before it is in the outbox or published already
    if time.monotonic() - repo.lease_checked > hosts.LEASE_REFRESH_S:
        hosts.check_lease(bucket, conf.host, conf.instance, repo.drained_at)
        repo.lease_checked = time.monotonic()
    while True:
        frames, first, last = [], None, None
        with repo.env.begin(db=repo.db["outbox"]) as txn:
            size = 0
            for key, value in txn.cursor():
                if frames and size + len(value) > MAX_LOG:
                    break
                seq = schema.read_outbox_key(key)
                first = seq if first is None else first
                last = seq
                frames += [schema.u32(len(value)), bytes(value)]
                size += len(value) + 4
        if first is None:
            break
        name = log_name(conf.host, first, last)
        body = _seal(repo.keys, name, b"".join(frames))
        with contextlib.suppress(StoreConflict):  # put by an earlier try that was killed before it emptied the outbox
            bucket.put_new(name, body)
        with repo.write_txn(publish=False) as txn:
            for seq in range(first, last + 1):
                txn.delete(schema.outbox_key(seq), db=repo.db["outbox"])
            state = _state(txn, repo)
            state["since"] += len(body)
            _put_state(txn, repo, state)
        done.batches += last - first + 1
        done.objects += 1
        done.bytes += len(body)
    repo.drained_at = started   # the outbox was found empty: the next lease says so
    if done.batches:
        with repo.write_txn(publish=False) as txn:
            txn.put(schema.META_DRAINED, schema.u64(int(started * 1e6)), db=repo.db["meta"])
    with repo.env.begin(db=repo.db["meta"]) as txn:
        state = _state(txn, repo)
    if state["since"] >= max(SNAPSHOT_MIN, state["bytes"] // 2):
        done.bytes += snapshot(repo)
        done.snapshot = True
    return done


def _state(txn, repo) -> dict:
    raw = txn.get(schema.META_PUBLISHING, db=repo.db["meta"])
    return json.loads(bytes(raw)) if raw is not None else {"snapshot": 0, "bytes": 0, "since": 0}


def _put_state(txn, repo, state: dict) -> None:
    txn.put(schema.META_PUBLISHING, json.dumps(state).encode(), db=repo.db["meta"])


def snapshot(repo) -> int:
    """The catalog compacted into the store (see above); the bytes put.
    Logs and snapshots older than the previous snapshot are deleted."""
    conf, bucket = repo.store_conf, repo.packs.bucket
    work = tempfile.mkdtemp(prefix=".snapshot-", dir=repo.path)
    try:
        with repo.env.begin() as txn:
            raw = txn.get(schema.META_NEXT_SEQ, db=repo.db["meta"])
            seq = schema.read_u64(raw) if raw is not None else 1
            repo.env.copy(work, compact=True, txn=txn)
        with open(os.path.join(work, "data.mdb"), "rb") as f:
            data = f.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = snap_name(conf.host, seq)
    body = _seal(repo.keys, name, data)
    with contextlib.suppress(StoreConflict):
        bucket.put_new(name, body)
    with repo.write_txn(publish=False) as txn:
        previous = _state(txn, repo)["snapshot"]
        _put_state(txn, repo, {"snapshot": seq, "bytes": len(body), "since": 0})
    listing = _listing(bucket, conf.host)
    for s in listing.snapshots:
        if s < previous:
            bucket.delete(snap_name(conf.host, s))
    for first, last in listing.logs:
        if last < seq:   # the new snapshot holds them (a follower that still wanted one reads the snapshot)
            bucket.delete(log_name(conf.host, first, last))
    return len(body)


# -- following ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Listing:
    snapshots: list[int]
    logs: list[tuple[int, int]]   # (first, last), by first


def _listing(bucket, host: str) -> Listing:
    snaps, logs = [], []
    for name in bucket.list(hosts.snap_dir(host)):
        tail = name[len(hosts.snap_dir(host)):]
        with contextlib.suppress(ValueError):
            snaps.append(int(tail, 16))
    for name in bucket.list(hosts.log_dir(host)):
        first, _, last = name[len(hosts.log_dir(host)):].partition("-")
        with contextlib.suppress(ValueError):
            logs.append((int(first, 16), int(last, 16)))
    return Listing(sorted(snaps), sorted(logs))


@dataclasses.dataclass(frozen=True)
class Followed:
    applied: int            # batches applied now
    through: int            # the last seq the replica holds
    from_snapshot: bool


def followed(env, db: dict) -> int:
    with env.begin(db=db["meta"]) as txn:
        raw = txn.get(schema.META_FOLLOWED)
    return schema.read_u64(raw) if raw is not None else 0


def follow(env, db: dict, bucket, host: str, keys) -> Followed:
    """Host `host`'s published batches applied to the catalog in `env`
    (db: its handles). From the newest snapshot when the replica is behind
    it and the logs no longer reach back, or more than SNAPSHOT_OVER_LOGS
    log objects would be read instead (a new host: measured, its first
    `points` of 10,000 points took 72.6 s applying every log object since
    batch 1, 6.8 ms each, against 2.1 s on the host that has them). Log
    objects are fetched FETCH_LOGS at a time and applied in one write
    transaction per fetch."""
    through = followed(env, db)
    listing = _listing(bucket, host)
    from_snapshot = False
    newest = listing.snapshots[-1] if listing.snapshots else 0
    reachable = any(first <= through + 1 <= last for first, last in listing.logs)
    behind = sum(1 for first, last in listing.logs if last > through and first < newest)
    if newest - 1 > through and (not reachable or behind > SNAPSHOT_OVER_LOGS):
        name = snap_name(host, newest)
        _load_snapshot(env, db, _unseal(keys, name, bucket.get(name)[0]), newest - 1)
        through, from_snapshot = newest - 1, True
    todo, expect = [], through
    for first, last in listing.logs:
        if last <= expect:
            continue
        if first > expect + 1:
            log.warning("host %s: batches %d-%d are not in the store yet: followed to %d", host, expect + 1,
                        first - 1, expect)
            break
        todo.append(log_name(host, first, last))
        expect = last
    applied = 0
    with concurrent.futures.ThreadPoolExecutor(FETCH_LOGS) as pool:
        for at in range(0, len(todo), FETCH_LOGS):
            names = todo[at:at + FETCH_LOGS]
            bodies = pool.map(lambda name: _batches(_unseal(keys, name, bucket.get(name)[0]), name), names)
            with env.begin(write=True) as txn:
                through = _followed_in(txn, db)   # another process may have applied some meanwhile
                for name, batches in zip(names, bodies):
                    for batch in batches:
                        if batch.seq <= through:
                            continue
                        if batch.seq != through + 1:
                            raise RpofsError(f"published object {name}: batch {batch.seq} follows {through}: "
                                             f"damaged")
                        apply(txn, db, batch)
                        through = batch.seq
                        applied += 1
                txn.put(schema.META_FOLLOWED, schema.u64(through), db=db["meta"])
    return Followed(applied, through, from_snapshot)


def _followed_in(txn, db: dict) -> int:
    raw = txn.get(schema.META_FOLLOWED, db=db["meta"])
    return schema.read_u64(raw) if raw is not None else 0


def _batches(data: bytes, name: str) -> list[Batch]:
    out, at, view = [], 0, memoryview(data)
    try:
        while at < len(view):
            n = schema.read_u32(view[at:at + 4])
            out.append(schema.decode_batch(view[at + 4:at + 4 + n]))
            at += 4 + n
    except (ValueError, struct.error, IndexError) as e:
        raise RpofsError(f"published object {name} is damaged: {e}") from None
    return out


def apply(txn, db: dict, batch: Batch) -> None:
    for change in batch.changes:
        if change.value is None:
            txn.delete(change.key, db=db[change.db])
        else:
            txn.put(change.key, change.value, db=db[change.db])


def _load_snapshot(env, db: dict, data: bytes, through: int) -> None:
    """The catalog in `env` replaced by the snapshot's, in one transaction."""
    work = tempfile.mkdtemp(prefix=".snapshot-", dir=os.path.dirname(env.path()))
    try:
        with open(os.path.join(work, "data.mdb"), "wb") as f:
            f.write(data)
        snap = lmdb.open(work, readonly=True, lock=False, max_dbs=len(schema.DATABASES), subdir=True)
        try:
            with env.begin(write=True) as txn, snap.begin() as source:
                for name in schema.DATABASES:
                    if name in schema.UNPUBLISHED:
                        txn.drop(db[name], delete=False)
                        continue
                    txn.drop(db[name], delete=False)
                    try:
                        sdb = snap.open_db(name.encode(), txn=source, create=False)
                    except lmdb.NotFoundError:
                        continue
                    for key, value in source.cursor(db=sdb):
                        if name == "meta" and bytes(key) in schema.UNPUBLISHED_META:
                            continue
                        txn.put(key, value, db=db[name], append=True)
                txn.put(schema.META_FOLLOWED, schema.u64(through), db=db["meta"])
        finally:
            snap.close()
    except lmdb.Error as e:
        raise RpofsError(f"a published snapshot cannot be read: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
