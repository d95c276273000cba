"""Dedup across hosts: a host borrows the full chunks another host of its
store holds, and a host's collection never deletes a chunk another host
may be borrowing (docs/OBJECTSTORE.md, "Dedup across hosts").

Borrowing (Lenders, for the host that backs up): a full chunk the host
does not hold is looked up in the replicas of the other hosts' catalogs
(followed when older than FRESH_S); when one holds it in `chunks` and has
not condemned it, the backup records `borrowed[K] = Borrow(host, where)`
instead of storing it. Before the point commits, every new borrow is
confirmed against a replica followed at that moment; a chunk the lender
has condemned since is copied from the lender into this host's packs, and
one it has already deleted fails the backup (one line: back up again).
Only hosts of one key space borrow: unencrypted hosts, or encrypted ones
whose master key is this host's (the replica opens with it).

Collecting (Census and sweep, for the host that lends): a `chunks` row
nothing of the host's own uses is not deleted but condemned (schema,
`condemned`). It is deleted only when all of these hold:
  * the condemnation is published (a collection after the host's
    publication was drained past it sets `published_us`), and GRACE
    (store.json "grace", default an hour) has passed since then;
  * every other host's lease says its publication was drained at or after
    published_us + GRACE, and the replica of it, followed after reading
    that lease, borrows nothing under that key.
Why that suffices: a host confirms a borrow with a replica followed just
before its commit. If that follow came after the condemnation was
published, it saw it and did not borrow. If it came before, the commit is
earlier than published_us + GRACE (minus clock skew up to GRACE / 2 and a
confirmation shorter than GRACE / 2), so a drained time past it means the
commit is published, and the replica shows the borrow, which uncondemns
the key. A host alone in its store deletes a condemned chunk as soon as
the condemnation is published: a host that joins claims its name before
it ever follows, so it either was listed by the census or follows after
the condemnation was published. Nothing waits on a lock between hosts and
no backup is ever blocked; a host that stops publishing (down, cut off)
holds back sweeping until it publishes again: garbage kept, never a chunk
lost.
"""

import dataclasses
import logging
import threading
import time

from ..errors import ChunkError, KeyRequired, PackMissing, RpofsError, WrongKey
from . import hosts, schema
from .crypto import MasterKey
from .schema import Borrow, Condemned

log = logging.getLogger(__name__)

FRESH_S = 60       # a lender's replica followed longer ago than this is followed before it lends


class Lenders:
    """The other hosts' replicas this host borrows from and lends to,
    opened on first use and kept open with the repository (thread-safe).
    One per repository: LMDB allows an environment open once per process."""

    def __init__(self, repo):
        self.repo = repo
        self._lock = threading.RLock()
        self._replicas: dict[str, object] = {}     # host -> its replica (a Repository), open
        self.refused: set[str] = set()             # hosts of another key space
        self.shared: set[str] = set()              # replicas open elsewhere in this process (not ours to close)
        self._looked = float("-inf")               # when hosts were last listed and followed

    def names(self) -> list[str]:
        """The store's other hosts."""
        return [n for n in hosts.host_names(self.repo.packs.bucket) if n != self.repo.host]

    def replica(self, name: str, follow: bool = True):
        """Host `name`'s replica, followed now (when `follow`); None when it
        is of another key space (it neither lends nor borrows here).
        Raises a StoreError when the store cannot be read."""
        with self._lock:
            if name in self.refused:
                return None
            replica = self._replicas.get(name)
            if replica is not None:
                if follow:
                    replica.follow()
                return replica
            path = hosts.ensure_replica(self.repo.path, self.repo.store_conf, name)
            replica = type(self.repo).opened(path)   # (a mount of every host has it open already)
            if replica is not None:
                self.shared.add(name)
                if follow:
                    replica.follow()
            try:
                replica = replica or type(self.repo).open(path, keys=MasterKey(self.repo.keys.master)
                                                          if self.repo.keys else None)
            except (WrongKey, KeyRequired):
                self.refused.add(name)
                return None
            mine, theirs = self.repo.keys, replica.keys
            if (mine is None) != (theirs is None) or mine and mine.fingerprint != theirs.fingerprint:
                if name not in self.shared:
                    replica.close()
                self.refused.add(name)
                return None
            self._replicas[name] = replica
            return replica

    def _refresh(self, force: bool = False) -> None:
        """Every other host's replica open and followed within FRESH_S."""
        with self._lock:
            if not force and time.monotonic() - self._looked < FRESH_S:
                return
            for name in self.names():
                try:
                    self.replica(name)
                except RpofsError as e:   # the store unreachable, a damaged catalog: no borrowing from it now
                    log.info("chunks of host %s are not borrowed: %s", name, e)
            self._looked = time.monotonic()

    def find(self, key: bytes) -> Borrow | None:
        """Where another host holds chunk `key`, uncondemned; None if none does."""
        self._refresh()
        with self._lock:
            replicas = list(self._replicas.items())
        for name, replica in replicas:
            found = holds(replica, key)
            if found is not None:
                return Borrow(name, found)
        return None

    def confirm(self, borrows: dict[bytes, Borrow]) -> dict[bytes, Borrow | None]:
        """The borrows, each checked against its lender's replica followed
        now: with its current place, or None when the lender no longer
        lends it (condemned or deleted since)."""
        followed = {}
        for name in {b.host for b in borrows.values()}:
            followed[name] = self.replica(name)    # a StoreError fails the backup: it cannot confirm
        out = {}
        for key, borrow in borrows.items():
            replica = followed[borrow.host]
            loc = holds(replica, key) if replica is not None else None
            out[key] = Borrow(borrow.host, loc) if loc is not None else None
        return out

    def close(self) -> None:
        with self._lock:
            for name, replica in self._replicas.items():
                if name not in self.shared:
                    replica.close()
            self._replicas.clear()


def place(repo, key: bytes):
    """Where chunk `key` is in `repo`'s packs (condemned or not); None if it has no row."""
    with repo.env.begin(db=repo.db["chunks"]) as txn:
        row = txn.get(key)
    return schema.ChunkLocation.decode(row) if row is not None else None


def holds(repo, key: bytes):
    """The place of chunk `key` in `repo`'s packs when it lends it (a row
    in `chunks`, not condemned); None otherwise."""
    with repo.env.begin() as txn:
        row = txn.get(key, db=repo.db["chunks"])
        if row is None or txn.get(key, db=repo.db["condemned"]) is not None:
            return None
        return schema.ChunkLocation.decode(row)


def copy_from_lender(repo, writer, key: bytes, borrow: Borrow) -> schema.ChunkLocation:
    """A borrowed chunk the lender condemned meanwhile, stored here after
    all (read from the lender, verified, appended to `writer`)."""
    reader = repo.lender_reader(borrow.host)
    try:
        try:
            key, stored = reader.verified(key, borrow.loc)
        except PackMissing:   # moved by the lender's compaction since: its replica says where
            key, stored = reader.verified(key, repo.relocate_borrowed(borrow.host, key))
    except ChunkError as e:
        raise RpofsError(f"chunk {key.hex()[:16]}, borrowed from host {borrow.host}, was collected there "
                         f"during this backup ({e}): nothing recorded; back up again") from None
    return writer.append(key, borrow.loc.codec, borrow.loc.raw_len, stored)


# -- the lender's side: what others borrow, and when a condemned chunk may go -------

@dataclasses.dataclass(frozen=True)
class Census:
    """What the other hosts say, gathered before a collection's transaction."""
    borrowed: frozenset          # keys of this host's chunks some other host borrows
    drained_us: int              # the oldest of the other hosts' drained times (no other host: now)
    silent: tuple                # hosts whose drained time is unknown (they hold sweeping back)
    alone: bool = False          # the store has no other host: nothing can be borrowing


def census(repo) -> Census:
    """Each other host's lease read first, then its replica followed (so
    the replica holds every commit the lease says is published), and the
    keys it borrows from this host collected. A host whose catalog cannot
    be read now is silent (it holds sweeping back)."""
    lenders = repo.lenders()
    borrowed, drained, silent = set(), [], []
    names = lenders.names()
    for name in names:
        lease = hosts.read_lease(repo.packs.bucket, name)
        if lease is None or not lease.drained:
            silent.append(name)
            continue
        try:
            replica = lenders.replica(name)
        except RpofsError as e:
            log.warning("host %s's catalog cannot be read now: condemned chunks wait for it (%s)", name, e)
            silent.append(name)
            continue
        if replica is None:
            continue   # another key space: it cannot borrow from this host
        with replica.env.begin(db=replica.db["borrowed"]) as txn:
            for key, value in txn.cursor():
                if Borrow.decode(value).host == repo.host:
                    borrowed.add(bytes(key))
        drained.append(int(lease.drained * 1e6))
    now = time.time_ns() // 1000
    return Census(frozenset(borrowed), min(drained, default=now), tuple(silent), alone=not names)


def sweep(repo, seen: Census, grace_s: float, unused) -> int:
    """The lender's side of a collection (under the exclusive lock, no
    backup in flight). One write transaction: the `chunks` rows nothing of
    this host uses and no other host borrows condemned, condemned ones
    used or borrowed again uncondemned, those known published stamped so,
    and those past the bound above deleted (their bytes become garbage
    that compaction and dead-pack deletion free). Then a second one stamps
    the new condemnations with a time after the first committed (what a
    drained publication is compared with). unused(txn): the keys of the
    `chunks` rows nothing of this host's uses (rpofs.store.refs). Returns
    how many rows were deleted."""
    grace = int(grace_s * 1e6)
    with repo.env.begin(db=repo.db["meta"]) as txn:
        raw = txn.get(schema.META_DRAINED)
    own_drained = schema.read_u64(raw) if raw is not None else 0
    deleted = 0
    with repo.write_txn() as txn:
        now = time.time_ns() // 1000
        unused = set(unused(txn))
        rows = txn.cursor(db=repo.db["condemned"])
        for key, value in [(bytes(k), Condemned.decode(v)) for k, v in rows]:
            if key not in unused or key in seen.borrowed:
                txn.delete(key, db=repo.db["condemned"])
                continue
            if value.since_us and not value.published_us and own_drained >= value.since_us:
                value = Condemned(value.since_us, own_drained)   # known published now
                txn.put(key, value.encode(), db=repo.db["condemned"])
            due = value.published_us + grace
            if value.published_us and (seen.alone or now >= due and not seen.silent and seen.drained_us >= due):
                txn.delete(key, db=repo.db["chunks"])
                txn.delete(key, db=repo.db["condemned"])
                deleted += 1
        for key in unused - seen.borrowed:
            if txn.get(key, db=repo.db["condemned"]) is None and txn.get(key, db=repo.db["chunks"]) is not None:
                txn.put(key, Condemned(0, 0).encode(), db=repo.db["condemned"])
    with repo.write_txn() as txn:
        now = time.time_ns() // 1000
        rows = txn.cursor(db=repo.db["condemned"])
        for key, value in [(bytes(k), Condemned.decode(v)) for k, v in rows]:
            if not value.since_us:
                txn.put(key, Condemned(now, 0).encode(), db=repo.db["condemned"])
    return deleted
