"""`rpofs upgrade`: a repository of an earlier format converted in place.

Format 5 added two sub-databases to 4 (`apps`, `ships`: application logs,
rpofs.apps), format 6 one (`protection`: continuous protection,
rpofs.protect); they are created when the repository is opened, empty, and
the format is set in step 2's transaction. Format 4 differs from 2 and 3 in one
way (rpofs.store.schema, format history): every full chunk is pieced, so a cold random read through the mount
costs a piece, not a 1 MiB chunk, for old fulls too. A format-2 repository
holds only whole full chunks; a format-3 one still holds those it had when it
was format 2.

The conversion is crash-safe by the repository's usual order, under its
exclusive lock (no backup, prune or defrag meanwhile):
1. each whole full chunk is read and verified, cut into pieces and appended
   to new packs, which are fsync'ed;
2. one LMDB write transaction adds the pieced records, points every
   `full_index` entry at its pieced key, drops the `chunks` rows nothing
   names any more, and sets meta/format to 6;
3. garbage collection (rpofs.store.gc) deletes or compacts the packs the
   whole chunks leave mostly unused.
Killed before step 2 commits, the repository is the old format, intact, plus
new packs nothing refers to (garbage: verify reports them, the next prune or
upgrade frees them); after, it is format 6, complete. A whole chunk that no
longer verifies is left as it is (it reads EIO as before, and `rpofs verify`
names it); everything else is converted.

Room: the pieced copies are written before the whole chunks are freed, so
the repository's filesystem needs about their size free; that is checked
first. Cost: each old full chunk read and written once (measured in
docs/PERFORMANCE.md).
"""

import logging
import os
from dataclasses import dataclass

from ..errors import ChunkError, RpofsError
from . import gc, refs, schema
from .chunks import encode_pieces
from .repo import Repository
from .schema import CODEC_PIECES, FORMAT, ChunkLocation

log = logging.getLogger(__name__)


@dataclass
class UpgradeReport:
    old_format: int
    new_format: int
    chunks_converted: int = 0
    chunks_damaged: int = 0      # whole chunks that failed verification: left as they are
    bytes_written: int = 0
    packs_deleted: int = 0
    packs_compacted: int = 0

    def summary(self) -> str:
        if self.old_format == self.new_format:
            return f"already format {self.new_format}: nothing to do"
        text = (f"format {self.old_format} -> {self.new_format}: {self.chunks_converted} full chunks pieced "
                f"({self.bytes_written} bytes written); {self.packs_deleted} pack files deleted, "
                f"{self.packs_compacted} compacted")
        if self.chunks_damaged:
            text += f"; {self.chunks_damaged} damaged chunks left as they were (see rpofs verify)"
        return text


def whole_full_chunks(repo, txn) -> dict[bytes, ChunkLocation]:
    """The full chunks stored whole (formats 2 and 3), by key."""
    rows = txn.cursor(db=repo.db["chunks"])
    out = {}
    for key in txn.cursor(db=repo.db["full_index"]).iternext(keys=False):
        key = bytes(key)
        found = rows.get(key)
        if key not in out and found is not None:
            loc = ChunkLocation.decode(found)
            if loc.codec != CODEC_PIECES:
                out[key] = loc
    return out


def _check_room(repo, whole: dict[bytes, ChunkLocation]) -> None:
    need = sum(refs.record_len(repo, loc) for loc in whole.values())
    fs = os.statvfs(repo.chunks_dir)
    free = fs.f_bavail * fs.f_frsize
    if need > free:
        raise RpofsError(f"upgrade needs about {need} bytes free in {repo.chunks_dir} for the converted chunks "
                         f"(the old ones are freed after); {free} are")


def upgrade(path: str, progress=None, keys=None) -> UpgradeReport:
    """Convert the repository at `path` to FORMAT. progress: a
    rpofs.progress.Progress, told the bytes of whole chunks converted.
    keys: as Repository.open takes them (an encrypted repository is format
    4 from its start, but is opened like any other)."""
    repo = Repository.open(path, upgrading=True, keys=keys)
    try:
        with repo.exclusive():
            report = UpgradeReport(repo.format(), FORMAT)
            if report.old_format == FORMAT:
                if gc.pending(repo):  # a run killed between its commit and its collection: finish that
                    report.packs_deleted, report.packs_compacted = gc.collect(repo)
                return report
            with repo.env.begin() as txn:
                whole = whole_full_chunks(repo, txn)
            _check_room(repo, whole)
            if progress is not None:
                progress.set(0, sum(loc.raw_len for loc in whole.values()))
            _convert(repo, whole, report, progress)
            report.packs_deleted, report.packs_compacted = gc.collect(repo)
        return report
    finally:
        repo.close()


def _convert(repo, whole: dict[bytes, ChunkLocation], report: UpgradeReport, progress) -> None:
    """Steps 1 and 2."""
    new_keys: dict[bytes, bytes] = {}       # whole key -> pieced key
    placed: dict[bytes, ChunkLocation] = {}  # pieced key -> its record
    with gc.new_pack(repo) as writer:
        with repo.env.begin(db=repo.db["chunks"]) as txn:
            for key, loc in sorted(whole.items(), key=lambda item: (item[1].pack, item[1].offset)):
                try:
                    data = repo.reader.read(key, loc)
                except ChunkError as e:
                    log.error("full chunk %s left whole: %s", key.hex()[:16], e)
                    report.chunks_damaged += 1
                    continue
                hashes = repo.ids.piece_hashes(data)
                new = repo.ids.pieces_key(hashes)
                if new not in placed and txn.get(new) is None:
                    placed[new] = writer.append(new, CODEC_PIECES, len(data), encode_pieces(data, hashes))
                new_keys[key] = new
                report.chunks_converted += 1
                if progress is not None:
                    progress.add(loc.raw_len)
        report.bytes_written = writer.bytes_written
        writer.sync()
        with repo.write_txn() as txn:
            rows = txn.cursor(db=repo.db["chunks"])
            for key, loc in placed.items():
                rows.put(key, loc.encode(), overwrite=False)
            fulls = txn.cursor(db=repo.db["full_index"])
            changes = [(bytes(k), new_keys[bytes(v)]) for k, v in fulls if bytes(v) in new_keys]
            for full_key, new in changes:
                txn.put(full_key, new, db=repo.db["full_index"])
            gc.drop_unused_chunks(repo, txn)
            gc.mark(repo, txn)
            txn.put(schema.META_FORMAT, schema.format_value(FORMAT), db=repo.db["meta"])
