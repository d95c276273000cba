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
A full chunk that logs changed at least half of would be read and verified
whole for the few blocks still its own: those are filled — copied into the
same pack, in order, under log entries at the chain's newest point.

It runs under the repository's exclusive lock, like prune (the packs it
empties are deleted, and no backup may be between choosing and committing),
moving at most `budget` bytes a pass so backups wait about a second at most.
A reader holding an older snapshot finds a moved block again (PackMissing).
"""

import logging
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ChunkError
from . import gc, schema
from .chunks import encode
from .repo import any_nonzero, points_in
from .schema import BLOCK_SIZE, BLOCKS_PER_CHUNK, ChunkLocation

log = logging.getLogger(__name__)

MIN_RUN = 16           # blocks: 1 MiB, a full chunk and a FUSE read; shorter runs are scattered
MIN_SCATTERED = 64     # blocks (or 1/16 of a small chain's disks): fewer cost too little to move
BUDGET = 256 << 20     # bytes of blocks moved per pass
BY_HAND = 1 << 62      # `rpofs defrag` by hand: all of it in one pass


@dataclass
class DefragReport:
    chains: int = 0              # chains whose blocks were moved
    blocks_moved: int = 0
    blocks_filled: int = 0       # unchanged blocks copied out of mostly changed full chunks
    bytes_moved: int = 0
    scattered_left: int = 0      # blocks not moved or filled (over budget, or damaged)
    packs_deleted: int = 0
    packs_compacted: int = 0

    def summary(self) -> str:
        return (f"{self.blocks_moved} log blocks moved and {self.blocks_filled} unchanged blocks filled in "
                f"({self.bytes_moved} bytes) in {self.chains} chains, "
                f"{self.scattered_left} scattered blocks left; {self.packs_deleted} pack files deleted, "
                f"{self.packs_compacted} compacted")


class LogBlock(NamedTuple):
    """A stored log block the chain's newest point reads. Moved when it is
    scattered: its record copied to the new pack (checked against the key in
    its header first) and its log entry pointed at the copy."""
    disk: int
    block: int
    entry: bytes            # its log_index key
    loc: ChunkLocation      # where its record is now


class Fill(NamedTuple):
    """An unchanged block of a full chunk that logs changed at least half of:
    copied out of the chunk to the new pack, under a new log entry at the
    chain's newest point (an empty one when the block is zeros)."""
    disk: int
    block: int
    entry: bytes            # the log_index key it is written under
    chunk: bytes            # the full chunk's key


def scattered_blocks(blocks: list[LogBlock], record_len) -> list[LogBlock]:
    """Of a point's stored log blocks in (disk, block) order, those in runs
    shorter than MIN_RUN; record_len(location): the bytes a record takes in
    its pack (ChunkReader.record_len). A run: blocks whose records follow one
    another in one pack, in disk order. Unchanged blocks between two do not
    end a run: they come from the full, and the reads of the pack still go
    forward."""
    out, run = [], []
    for item in blocks:
        if run:
            loc = run[-1].loc
            follows = item.loc.pack == loc.pack and item.loc.offset == loc.offset + record_len(loc)
            if not follows:
                if len(run) < MIN_RUN:
                    out.extend(run)
                run = []
        run.append(item)
    if len(run) < MIN_RUN:
        out.extend(run)
    return out


def _newest_blocks(repo, txn, sizes: list[int], chain: int) -> tuple[list[LogBlock], set[tuple[int, int]]]:
    """What the chain's newest point reads from its logs: every stored
    block, in (disk, block) order, and the (disk, block) of every block a log
    changed (zeros too). A block's entries come newest first, and every entry
    of a chain is at or before its newest point."""
    out, changed = [], set()
    cur = txn.cursor(db=repo.db["log_index"])
    for key, value in schema.scan(cur, schema.chain_prefix(chain)):
        _, disk, block, _ = schema.read_log_key(key)
        if (disk, block) in changed:
            continue
        changed.add((disk, block))
        loc = schema.read_log_value(value, min(BLOCK_SIZE, sizes[disk] - block * BLOCK_SIZE))
        if loc is not None:  # None: zeros, nothing stored to read
            out.append(LogBlock(disk, block, bytes(key), loc))
    return out, changed


def _fills(repo, txn, chain: int, newest: int, sizes: list[int], changed: set[tuple[int, int]]) -> list[Fill]:
    """The unchanged blocks of the full's chunks that logs changed at least
    half of, to be written as of the chain's newest point: read as they are,
    such a chunk is read and verified whole for the few blocks still its own."""
    per_chunk: dict[tuple[int, int], int] = {}
    for disk, block in changed:
        chunk = (disk, block // BLOCKS_PER_CHUNK)
        per_chunk[chunk] = per_chunk.get(chunk, 0) + 1
    fulls = txn.cursor(db=repo.db["full_index"])
    out = []
    for (disk, chunk_no), count in sorted(per_chunk.items()):
        first = chunk_no * BLOCKS_PER_CHUNK
        blocks = range(first, min(first + BLOCKS_PER_CHUNK, -(-sizes[disk] // BLOCK_SIZE)))
        if count * 2 < len(blocks) or count == len(blocks):
            continue
        key = fulls.get(schema.full_key(chain, disk, chunk_no))
        if key is None:  # the full has zeros there: reading them costs nothing
            continue
        out.extend(Fill(disk, b, schema.log_key(chain, disk, b, newest), bytes(key))
                   for b in blocks if (disk, b) not in changed)
    return out


def defrag(repo, vm: str, budget: int = BUDGET, progress=None) -> DefragReport:
    """progress: a rpofs.progress.Progress (set, add), told the bytes moved."""
    report = DefragReport()
    with repo.exclusive():
        work: list[LogBlock | Fill] = []   # what goes to the new pack, in disk order
        with repo.env.begin() as txn:
            points = points_in(repo, txn, vm)
            newest_of = {p.chain: p.point for p in points}  # oldest first: the last one wins
            for full in reversed([p for p in points if p.kind == "full"]):  # the newest chain first
                newest = newest_of[full.chain]
                if newest == full.point:
                    continue  # no logs: it reads like a full
                sizes = [d.size for d in full.disks]
                stored, changed = _newest_blocks(repo, txn, sizes, full.chain)
                moves = scattered_blocks(stored, repo.reader.record_len)
                fills = _fills(repo, txn, full.chain, newest, sizes, changed)
                if len(moves) + len(fills) < min(MIN_SCATTERED, sum(sizes) // BLOCK_SIZE // 16):
                    continue
                report.chains += 1
                for item in sorted(moves + fills, key=lambda item: (item.disk, item.block)):
                    if budget < BLOCK_SIZE:
                        report.scattered_left += 1
                        continue
                    budget -= BLOCK_SIZE
                    work.append(item)
        if work:
            _write(repo, work, report, progress)
    return report


def _write(repo, work: list[LogBlock | Fill], report: DefragReport, progress=None) -> None:
    """Copy the blocks, in the order given, to one new pack; point their
    entries there in one transaction; then drop what that left dead."""
    placed = {}  # log_index key -> its new value
    if progress is not None:
        progress.set(0, len(work) * BLOCK_SIZE)
    with gc.new_pack(repo) as writer:
        for item in work:
            if progress is not None:
                progress.add(BLOCK_SIZE)
            try:
                if isinstance(item, LogBlock):  # moved; the catalog keeps no key for it, its header does
                    block_key, stored = repo.reader.verified(None, item.loc)
                    placed[item.entry] = schema.log_value(writer.append(block_key, item.loc.codec,
                                                                        item.loc.raw_len, stored))
                    report.blocks_moved += 1
                    report.bytes_moved += item.loc.raw_len
                else:  # a Fill: copied out of the full's chunk
                    start = (item.block % BLOCKS_PER_CHUNK) * BLOCK_SIZE  # of a pieced chunk, its one piece is read
                    data = repo.read_chunk_range(item.chunk, start, start + BLOCK_SIZE)
                    loc = None
                    if any_nonzero(data):  # an all-zero block needs no bytes: an empty entry says zeros
                        codec, stored = encode(data)
                        loc = writer.append(repo.ids.chunk_key(data), codec, len(data), stored)
                    placed[item.entry] = schema.log_value(loc)
                    report.blocks_filled += 1
                    report.bytes_moved += len(data)
            except ChunkError as e:  # damage stays where it is, and says so when read
                log.error("block not moved: %s", e)
                report.scattered_left += 1
        writer.sync()
        with repo.write_txn() as txn:
            for key, value in placed.items():
                txn.put(key, value, db=repo.db["log_index"])
            gc.mark(repo, txn)
    report.packs_deleted, report.packs_compacted = gc.collect(repo)


def defrag_by_name(repo, vm_ref: str, budget: int = BUDGET, progress=None) -> tuple[str, DefragReport]:
    """The VM by name or UUID as recorded in the repository. progress(name):
    a Progress for that VM's defrag (or None)."""
    uuid, name = repo.find_vm(vm_ref)
    if progress is None:
        return name, defrag(repo, uuid, budget)
    with progress(name) as shown:
        return name, defrag(repo, uuid, budget, shown)
