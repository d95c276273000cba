"""Defragmenting: keep each chain's newest point as quick to read as a full.

A log backup stores the blocks it copied in a pack of its own, so after many
logs a point draws its 64 KiB blocks from as many packs, in no order. Read
cold, each is a seek of its own: on the bench machine 1,024 scattered blocks
take 60-100 ms however they are issued, the same 64 MiB in one file 25-37 ms.

Defragmenting copies the log blocks that a chain's newest point reads and that
lie in short runs (fewer than MIN_RUN blocks whose records follow one another
in one pack, in disk order) into a new pack, in (disk, block) order, and
points their log entries at the copies. What every point reads is unchanged, only where it
lies. Blocks already in long runs stay, so a block is rewritten about once,
not on every pass; the packs left mostly dead are compacted as prune does.

It runs under the repository's exclusive lock, like prune (the packs it
empties are deleted, and no backup may be between choosing and committing),
moving at most `budget` bytes a pass so backups wait about a second at most.
A reader holding an older snapshot finds a moved block again (PackMissing).
"""

import logging
from dataclasses import dataclass

from ..errors import ChunkError
from . import schema
from .prune import PruneReport, compact, delete_dead_packs, live_log_bytes, points_in
from .schema import BLOCK_SIZE, PACK_HEADER, ChunkLocation

log = logging.getLogger(__name__)

MIN_RUN = 16           # blocks: 1 MiB, a full chunk and a FUSE read; shorter runs are scattered
MIN_SCATTERED = 64     # blocks (or 1/16 of a small chain's disks): fewer cost too little to move
BUDGET = 256 << 20     # bytes of blocks moved per pass


@dataclass
class DefragReport:
    chains: int = 0              # chains whose blocks were moved
    blocks_moved: int = 0
    bytes_moved: int = 0
    scattered_left: int = 0      # scattered blocks not moved (over budget, or damaged)
    packs_deleted: int = 0
    packs_compacted: int = 0

    def summary(self) -> str:
        return (f"{self.blocks_moved} log blocks ({self.bytes_moved} bytes) moved in {self.chains} chains, "
                f"{self.scattered_left} scattered blocks left; {self.packs_deleted} pack files deleted, "
                f"{self.packs_compacted} compacted")


def scattered_blocks(entries: list[tuple]) -> list[tuple]:
    """Of a point's log blocks [(disk, block, location, ...), ...] in (disk,
    block) order, those in runs shorter than MIN_RUN. A run: blocks whose
    records follow one another in one pack, in disk order. Unchanged blocks
    between two do not end a run: they come from the full, and the reads of
    the pack still go forward."""
    out, run = [], []
    for entry in entries:
        if run:
            loc = run[-1][2]
            follows = entry[2].pack == loc.pack and entry[2].offset == loc.offset + loc.stored_len + PACK_HEADER.size
            if not follows:
                if len(run) < MIN_RUN:
                    out.extend(run)
                run = []
        run.append(entry)
    if len(run) < MIN_RUN:
        out.extend(run)
    return out


def _newest_blocks(repo, txn, sizes: list[int], chain: int) -> list[tuple]:
    """(disk, block, location, log_index key) of every stored log block the
    chain's newest point reads, in (disk, block) order. A block's entries come
    newest first, and every entry of a chain is at or before its newest point."""
    out, last = [], None
    cur = txn.cursor(db=repo.db["log_index"])
    prefix = schema.u32(chain)
    if cur.set_range(prefix):
        for key, value in cur:
            if key[:4] != prefix:
                break
            _, disk, block, _ = schema.read_log_key(key)
            if (disk, block) == last:
                continue
            last = (disk, block)
            loc = schema.read_log_value(value, min(BLOCK_SIZE, sizes[disk] - block * BLOCK_SIZE))
            if loc is not None:  # None: zeros, nothing stored to read
                out.append((disk, block, loc, bytes(key)))
    return out


def defrag(repo, vm: str, budget: int = BUDGET) -> DefragReport:
    report = DefragReport()
    with repo.exclusive():
        moves = []  # (log_index key, old location) to copy, chain by chain, newest chain first
        with repo.env.begin() as txn:
            fulls = [p for p in points_in(repo, txn, vm) if p.kind == "full"]
            for full in reversed(fulls):  # the newest chain first: its points are the most read
                sizes = [d.size for d in full.disks]
                scattered = scattered_blocks(_newest_blocks(repo, txn, sizes, full.chain))
                if len(scattered) < min(MIN_SCATTERED, sum(sizes) // BLOCK_SIZE // 16):
                    continue
                report.chains += 1
                for disk, block, loc, key in scattered:
                    if budget < loc.raw_len:
                        report.scattered_left += 1
                        continue
                    budget -= loc.raw_len
                    moves.append((key, loc))
        if moves:
            _move(repo, moves, report)
    return report


def _move(repo, moves: list[tuple[bytes, ChunkLocation]], report: DefragReport) -> None:
    """Copy the blocks, in the order given, to one new pack; re-point their
    entries in one transaction; then drop what that left dead."""
    writer = repo.begin_pack()
    placed = {}
    try:
        for key, loc in moves:
            try:
                block_key, stored = repo.reader.verified(None, loc)
            except ChunkError as e:  # a damaged block stays where it is, and says so when read
                log.error("log block not moved: %s", e)
                report.scattered_left += 1
                continue
            placed[key] = writer.append(block_key, loc.codec, loc.raw_len, stored)
            report.bytes_moved += loc.raw_len
        writer.sync()
        with repo.write_txn() as txn:
            for key, new in placed.items():
                txn.put(key, schema.log_value(new), db=repo.db["log_index"])
            live = live_log_bytes(repo, txn)
            for value in txn.cursor(db=repo.db["chunks"]).iternext(keys=False):
                loc = ChunkLocation.decode(value)
                live[loc.pack] = live.get(loc.pack, 0) + PACK_HEADER.size + loc.stored_len
    except BaseException:
        writer.discard()
        raise
    writer.close()
    if not placed:
        writer.discard()
    report.blocks_moved = len(placed)
    gc = PruneReport()
    delete_dead_packs(repo, live, gc)
    compact(repo, live, gc)
    report.packs_deleted, report.packs_compacted = gc.packs_deleted, gc.packs_compacted


def defrag_by_name(repo, vm_ref: str, budget: int = BUDGET) -> tuple[str, DefragReport]:
    """The VM by name or UUID as recorded in the repository."""
    uuid, name = repo.find_vm(vm_ref)
    return name, defrag(repo, uuid, budget)
