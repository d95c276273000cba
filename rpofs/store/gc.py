"""Garbage collection: the pack data nothing refers to any more, freed.

Prune, forget and defrag leave garbage behind (a removed point's chunks, a
moved block's old copy); a killed backup leaves a pack nothing refers to.
What counts as referenced is rpofs.store.refs's to say; this module frees the
rest, in crash-safe steps, always under the repository's exclusive lock (no
backup may be between finding a chunk stored and committing its reference):

1. inside the caller's write transaction, `drop_unused_chunks` removes the
   `chunks` rows nothing names and `mark` sets meta/gc_pending;
2. after that commit, `collect`: `delete_dead_packs` deletes the packs
   nothing is in, `compact` copies what is in use out of packs that are
   mostly garbage (each record read and verified first), fsyncs the copy,
   re-points the catalog in one transaction, and only then deletes the old
   packs; then gc_pending is cleared.
A crash or a full disk anywhere leaves a consistent catalog and, at worst,
pack data nothing refers to; gc_pending still set makes the next prune
collect it even when it removes nothing.

In an object store shared by hosts, step 1 leaves the unused `chunks`
rows (another host may be borrowing them) and deletes the unused
`borrowed` rows (given back); `collect` first condemns, uncondemns and
sweeps by rpofs.store.lending's protocol. A collection is also due there
every COLLECT_EVERY_S without anything removed here, so chunks given back
by other hosts and condemnations waiting out their grace are seen to.
"""

import contextlib
import logging
import time

from ..errors import ChunkError
from . import refs, schema
from .schema import ChunkLocation

log = logging.getLogger(__name__)

COMPACT_BELOW = 0.5   # compact a pack when less than half of it is in use
COLLECT_EVERY_S = 600  # in an object store shared by hosts: a collection at least this often (with a prune)


@contextlib.contextmanager
def new_pack(repo):
    """A new pack for records copied out of others (compaction, defrag,
    upgrade): removed when the work fails or wrote nothing, else closed. The
    caller syncs it before its transaction refers to it."""
    writer = repo.begin_pack()
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise
    if writer.bytes_written:
        writer.close()
    else:
        writer.discard()


def mark(repo, txn) -> None:
    """Step 1: a collection is due; cleared when `collect` finishes."""
    txn.put(schema.META_GC_PENDING, schema.u32(1), db=repo.db["meta"])


def pending(repo) -> bool:
    """Whether a collection was started and did not finish (killed, disk
    full), or, in an object store shared by hosts, the last one is older
    than COLLECT_EVERY_S."""
    with repo.env.begin(db=repo.db["meta"]) as txn:
        if txn.get(schema.META_GC_PENDING) is not None:
            return True
        last = txn.get(schema.META_COLLECTED)
    return repo.lenders() is not None and (last is None or
                                           time.time() - schema.read_u64(last) / 1e6 > COLLECT_EVERY_S)


def collect(repo, progress=None) -> tuple[int, int]:
    """Steps 2 and 3, from the catalog as it is now (the exclusive lock is
    held: nothing changes it meanwhile); returns (packs deleted, packs
    compacted). In an object store shared by hosts, the condemned chunks
    that may go are swept first."""
    if repo.lenders() is not None:
        from . import lending
        seen = lending.census(repo)

        def unused(txn):
            return refs.unused_chunks(repo, txn)
        lending.sweep(repo, seen, repo.store_conf.grace, unused)
        if seen.alone:   # no host to wait for: the condemnations published, then swept at once
            repo.publish()
            lending.sweep(repo, seen, repo.store_conf.grace, unused)
    with repo.env.begin() as txn:
        live = refs.bytes_in_use(repo, txn)
    deleted = delete_dead_packs(repo, live)
    compacted = compact(repo, live, progress)
    with repo.write_txn() as txn:
        txn.delete(schema.META_GC_PENDING, db=repo.db["meta"])
    if repo.lenders() is not None:
        with repo.write_txn(publish=False) as txn:
            txn.put(schema.META_COLLECTED, schema.u64(time.time_ns() // 1000), db=repo.db["meta"])
    return deleted, compacted


def drop_unused_chunks(repo, txn) -> int:
    """Step 1: delete the `chunks` rows nothing names (in an object store
    shared by hosts: left to `collect`, see above) and the `borrowed` rows
    nothing names; returns how many chunks nothing here uses now."""
    used = refs.used_chunk_keys(repo, txn)
    dead = refs.unused_chunks(repo, txn, used)
    for key in refs.unused_borrows(repo, txn, used):
        txn.delete(key, db=repo.db["borrowed"])
    if repo.lenders() is not None:
        return len(dead)
    cur = txn.cursor(db=repo.db["chunks"])
    for key in dead:
        cur.set_key(key)
        cur.delete()
    return len(dead)


def delete_dead_packs(repo, live: dict[int, int]) -> int:
    """Step 2: no backup runs (the lock), so a pack with nothing in use is
    garbage: a removed point's, or a killed backup's. Returns how many."""
    dead = [pack for pack in repo.packs.list() if pack not in live]
    for pack in dead:
        repo.packs.delete(pack)
    return len(dead)


def compact(repo, live: dict[int, int], progress=None) -> int:
    """Step 3; returns how many packs were compacted. progress: a
    rpofs.progress.Progress, told the bytes copied."""
    sparse = {pack for pack in repo.packs.list()
              if pack in live and live[pack] < COMPACT_BELOW * repo.packs.size(pack)}
    if not sparse:
        return 0
    if progress is not None:
        progress.set(0, sum(live[pack] for pack in sparse))
    chunks: dict[bytes, tuple[int, ChunkLocation]] = {}   # chunk key -> (old pack, new place)
    blocks: dict[bytes, tuple[int, ChunkLocation]] = {}   # log_index key -> (old pack, new place)
    broken: set[int] = set()

    def copy(key, loc):
        """The record copied to the new pack, checked first: never copy damage
        silently (a damaged pack keeps everything where it is)."""
        if loc.pack in broken:
            return None
        try:
            key, stored = repo.reader.verified(key, loc)
        except ChunkError as e:
            log.error("pack %d not compacted: %s", loc.pack, e)
            broken.add(loc.pack)
            return None
        if progress is not None:
            progress.add(refs.record_len(repo, loc))
        return loc.pack, writer.append(key, loc.codec, loc.raw_len, stored)

    with new_pack(repo) as writer:
        with repo.env.begin() as txn:
            for key, value in txn.cursor(db=repo.db["chunks"]):
                loc = ChunkLocation.decode(value)
                if loc.pack in sparse and (done := copy(bytes(key), loc)):
                    chunks[bytes(key)] = done
            sizes = refs.disk_sizes(repo, txn)
            for lkey, value in txn.cursor(db=repo.db["log_index"]):
                chain, disk, block, _ = schema.read_log_key(lkey)
                loc = schema.read_log_value(value, refs.block_len(sizes, chain, disk, block))
                if loc is not None and loc.pack in sparse and (done := copy(None, loc)):
                    blocks[bytes(lkey)] = done
        writer.sync()
        with repo.write_txn() as txn:
            for key, (old_pack, new) in chunks.items():
                if old_pack not in broken:
                    txn.put(key, new.encode(), db=repo.db["chunks"])
            for lkey, (old_pack, new) in blocks.items():
                if old_pack not in broken:
                    txn.put(lkey, schema.log_value(new), db=repo.db["log_index"])
    done = 0
    for pack in sorted(sparse - broken):
        repo.packs.delete(pack)  # a mount reading it through an older snapshot finds the data again
        done += 1
    return done
