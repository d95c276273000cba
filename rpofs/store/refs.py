"""Every reference from the catalog into the packs, in one place.

Two levels (rpofs.store.schema):
  * users of chunks — a `full_index` entry (a full's chunk of a disk), the
    chunk keys a point record names (its domain XML, its checkpoint XML, its
    boot state) and those a shipment names (an application's shipped log
    bytes, rpofs.apps) refer to a row of `chunks` by key;
  * places in packs — a row of `chunks` and a stored `log_index` entry (a log
    block) each refer to one pack record; a row of `borrowed` to one record
    in another host's packs (rpofs.store.lending), whose collection, not
    this host's, frees it.

Prune collects the `chunks` rows no user names and the packs no place is in;
defrag and compaction count the bytes still in use per pack; verify checks
that every user finds its row, that every place holds the record it expects,
and that no record is left that nothing refers to. All of them ask this
module, so a new kind of reference (an application's shipped log, a write
journal) is added here once and every one of them knows it.
"""

from typing import Iterator, NamedTuple

from . import schema
from .schema import BLOCK_SIZE, ChunkLocation, PointRecord
from .shipments import all_ships


class Ref(NamedTuple):
    """One reference to stored bytes, with who makes it. `key` is the chunk
    key the catalog names them by (see `keyed`); `loc` is where the record is
    (None: the key has no row in `chunks`)."""
    kind: str          # "full" | "log" | a point's own ("domain_xml", "checkpoint_xml", "firmware/nvram", ...)
                       # | "app" (a shipment's bytes)
    chain: int         # the chain the referring entry or point belongs to (app: its base's; -1 waiting)
    disk: int          # full and log: the disk's number in the chain; -1 for a point's own and app
    index: int         # full: chunk no; log: block no; -1 for a point's own; app: the file's place in the shipment
    point: int         # log: the point that changed the block; full: the chain; a point's own: that
                       # point; app: the shipment's number
    key: bytes | None  # None when not keyed
    loc: ChunkLocation | None
    lender: str = ""   # borrowed (schema: `borrowed`): the host whose packs hold it, loc in them

    @property
    def keyed(self) -> bool:
        """Whether the catalog names the bytes by their key: every kind but
        "log" (a log entry keeps only the block's place; its key is in its
        record's header, which a read checks the bytes against)."""
        return self.kind != "log"


def point_chunks(record: PointRecord) -> dict[str, bytes]:
    """The chunk keys a point record names, by what they hold."""
    out = {}
    if record.domain_xml:
        out["domain_xml"] = bytes.fromhex(record.domain_xml)
    if record.checkpoint_xml:
        out["checkpoint_xml"] = bytes.fromhex(record.checkpoint_xml)
    for kind, hexkey in sorted((record.firmware or {}).items()):
        out[f"firmware/{kind}"] = bytes.fromhex(hexkey)
    return out


def ship_chunks(record) -> list[bytes]:
    """The chunk keys a shipment (schema.ShipRecord) names, one per file it added bytes to."""
    return [bytes.fromhex(f.key) for f in record.files if f.key]


def used_chunk_keys(repo, txn) -> set[bytes]:
    """Every chunk key some full, point or shipment names."""
    used = {bytes(k) for k in txn.cursor(db=repo.db["full_index"]).iternext(keys=False)}
    for record in repo.all_points(txn):
        used.update(point_chunks(record).values())
    for ship in all_ships(repo, txn):
        used.update(ship_chunks(ship))
    return used


def unused_chunks(repo, txn, used: set[bytes] | None = None) -> list[bytes]:
    """Keys of `chunks` rows nothing names any more: garbage to collect."""
    used = used_chunk_keys(repo, txn) if used is None else used
    return [bytes(k) for k in txn.cursor(db=repo.db["chunks"]).iternext(values=False) if k not in used]


def unused_borrows(repo, txn, used: set[bytes]) -> list[bytes]:
    """Keys of `borrowed` rows nothing names any more: given back (the
    lender's collection then sees them unborrowed)."""
    return [bytes(k) for k in txn.cursor(db=repo.db["borrowed"]).iternext(values=False) if k not in used]


def record_len(repo, loc: ChunkLocation) -> int:
    """Bytes of a pack record in `repo`: its header and stored bytes, as
    sealed in an encrypted repository (the catalog keeps plaintext lengths)."""
    return repo.reader.record_len(loc)


def bytes_in_use(repo, txn) -> dict[int, int]:
    """Bytes per pack that a `chunks` row or a log entry refers to (with the
    records' headers). A pack absent from it holds nothing in use."""
    live: dict[int, int] = {}
    for value in txn.cursor(db=repo.db["chunks"]).iternext(keys=False):
        loc = ChunkLocation.decode(value)
        live[loc.pack] = live.get(loc.pack, 0) + record_len(repo, loc)
    for value in txn.cursor(db=repo.db["log_index"]).iternext(keys=False):
        loc = schema.read_log_value(value, 0)
        if loc is not None:
            live[loc.pack] = live.get(loc.pack, 0) + record_len(repo, loc)
    return live


def disk_sizes(repo, txn, unreadable: list | None = None) -> dict[tuple[int, int], int]:
    """(chain, disk) -> the disk's size, from each chain's full. unreadable:
    as Repository.all_points takes it."""
    out = {}
    for record in repo.all_points(txn, unreadable):
        if record.kind == "full":
            out.update({(record.chain, i): d.size for i, d in enumerate(record.disks)})
    return out


def block_len(sizes: dict[tuple[int, int], int], chain: int, disk: int, block: int) -> int:
    """Raw length of a log block (the disk's last one may be short); 0 when
    the chain's full is not there to say."""
    size = sizes.get((chain, disk))
    return 0 if size is None else min(BLOCK_SIZE, size - block * BLOCK_SIZE)


def log_refs(repo, txn, sizes: dict[tuple[int, int], int]) -> Iterator[Ref]:
    """Every stored log block (entries meaning "became zeros" refer to nothing)."""
    for key, value in txn.cursor(db=repo.db["log_index"]):
        chain, disk, block, point = schema.read_log_key(key)
        loc = schema.read_log_value(value, block_len(sizes, chain, disk, block))
        if loc is not None:
            yield Ref("log", chain, disk, block, point, None, loc)


def chunk_refs(repo, txn, unreadable: list | None = None) -> Iterator[Ref]:
    """Every use of a chunk: the fulls' chunks, then the points' own."""
    rows = txn.cursor(db=repo.db["chunks"])
    borrowed = txn.cursor(db=repo.db["borrowed"])

    def where(key: bytes) -> ChunkLocation | None:
        found = rows.get(key)
        return ChunkLocation.decode(found) if found is not None else None

    for key, value in txn.cursor(db=repo.db["full_index"]):
        chain, disk, chunk = schema.read_full_key(key)
        loc = where(value)
        if loc is None and (lent := borrowed.get(value)) is not None:
            lent = schema.Borrow.decode(lent)
            yield Ref("full", chain, disk, chunk, chain, bytes(value), lent.loc, lent.host)
            continue
        yield Ref("full", chain, disk, chunk, chain, bytes(value), loc)
    for record in repo.all_points(txn, unreadable):
        for kind, key in point_chunks(record).items():
            yield Ref(kind, record.chain, -1, -1, record.point, key, where(key))
    for ship in all_ships(repo, txn, unreadable):
        for index, f in enumerate(ship.files):
            if f.key:
                key = bytes.fromhex(f.key)
                yield Ref("app", ship.chain if ship.chain is not None else -1, -1, index, ship.ship, key, where(key))


def references(repo, txn, unreadable: list | None = None) -> Iterator[Ref]:
    """Every reference the catalog makes to pack data. unreadable: as
    Repository.all_points takes it (a damaged point record's own
    references cannot be listed)."""
    yield from chunk_refs(repo, txn, unreadable)
    yield from log_refs(repo, txn, disk_sizes(repo, txn, unreadable))
