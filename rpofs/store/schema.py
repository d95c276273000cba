"""The repository's format, version 6. This module is the spec: every LMDB
sub-database, its key and value layout, and the invariants. Nothing else builds
or reads keys by hand: every key is made by a function here (point_key,
vm_point_key, full_key, log_key, app_key, ship_key, protection_key, vm_key)
and taken apart by its read_* twin; a range scan starts at a prefix made
here (vm_prefix, chain_prefix, log_block_prefix, or a key) and walks with
scan / scan_keys / scan_keys_back, which stop where the prefix does; meta's
keys are the META_* constants.

    REPO/catalog/     LMDB environment (the relation store), sub-databases below
    REPO/chunks/      append-only pack files, pack-00000001 ... (rpofs.store.packs
                      is the only code that touches them)
    REPO/lock         flock: shared by backups, exclusive for prune, defrag,
                      forget, upgrade (rpofs.store.repo)
    REPO/locks/<vm uuid>.lock   one backup of a VM at a time (rpofs.store.vmlock)
    REPO/holds/*.json points something outside the catalog reads (rpofs.store.holds)
    REPO/verify.json  the last verify's results (rpofs.store.verify)
    REPO/store.json   where the packs are when in an object store (rpofs.store.storeconf)
    REPO/push.json    a `store push` under way: its claim (rpofs.store.push)
    REPO/run/         what `rpofs run` made (rpofs.recover.instant)
    REPO/journal/<vm uuid>/<session, 16 hex>/seg-*.jnl
                      continuous protection's write journal: segments the
                      journal server appends (their format: rpofs.store.journal)
    REPO/ingest-status.json, REPO/mount.log   the daemons' status and log
Only the catalog and the packs hold points; the rest is locks and the state
of the processes that use them.

Every reference from the catalog into the packs is listed by rpofs.store.refs.

Integers in keys are big-endian so that LMDB's byte order is numeric order.

Granularity
    CHUNK_SIZE (1 MiB)  a full backup stores one chunk per CHUNK_SIZE of disk;
                        the full index costs one entry per non-zero chunk.
    BLOCK_SIZE (64 KiB) a log backup stores one chunk per changed block: QEMU's
                        dirty-bitmap granularity for qcow2 with 64 KiB clusters.
    CHUNK_SIZE is a multiple of BLOCK_SIZE. The last chunk and the last block
    of a disk are short when the disk size is not a multiple of them.

Sub-databases
    meta        META_FORMAT b"format" -> the format, decimal text: b"6"
                    (format_value(FORMAT); read_format)
                META_NEXT_POINT b"next_point", META_NEXT_PACK b"next_pack"
                    -> u32: the number the next point, the next pack file
                    gets; 1 at init
                META_NEXT_SHIP b"next_ship" -> u32: the next shipment's
                    number; absent until the first shipment (then 1)
                META_PRUNED b"pruned" -> u32: bumped by every prune that
                    removed points and every forget, so that a running mount
                    reads its lists again; absent: 0
                META_GC_PENDING b"gc_pending" -> u32 1 while a garbage
                    collection that was started has not finished
                    (rpofs.store.gc); absent otherwise
                META_ENCRYPTION b"encryption" -> the key record (JSON),
                    present only in an encrypted repository (see Encryption)
    vms         vm uuid (16 bytes: vm_key) -> JSON {"name": last known name}
                    (sealed in an encrypted repository)
    points      point no (u32) -> JSON point record (see PointRecord)
                    (sealed in an encrypted repository)
    vm_points   vm uuid (16) | time_us (u64) | point no (u32) -> b""
                    every point of a VM in time order: one range scan lists them
    full_index  chain (u32) | disk (u16) | chunk no (u32) -> chunk key (32)
                    a full backup's data; an absent chunk is all zeros
    log_index   chain (u32) | disk (u16) | block no (u32) | ~point (u32)
                    -> where the block's bytes are: pack (u32) | offset (u48)
                       | stored length - 1 (u16); empty: the block became all
                       zeros. No codec: a block stored as long as it is raw is
                       raw, a shorter one is zstd (see chunks.encode)
                    the as-of index: one entry per block changed by a log point;
                    the newest change of block B at or before point P is the
                    first key >= (chain, disk, B, ~P) if its prefix is (chain,
                    disk, B): one B-tree seek, whatever the number of logs.
                    A log block's place is in its entry, not in `chunks`: 34
                    bytes a block with LMDB's node header, instead of some 115
                    (format 1 kept a key here and a `chunks` row). Its key is in the pack record header
                    just before it, and readers verify the bytes against it.
                    Log blocks are not deduplicated (a block rewritten with the
                    same bytes is stored again); full chunks are.
    chunks      chunk key (32) -> pack (u32) | offset (u64) | stored length (u32)
                              | raw length (u32) | codec (u8)
                    full chunks, the points' XML (domain, checkpoint), their
                    boot state (PointRecord.firmware) and shipped application
                    bytes: what is deduplicated.
                    The codec tells the record kind: CODEC_RAW / CODEC_ZSTD
                    a whole chunk, CODEC_PIECES a pieced full chunk (below)

    apps        vm uuid (16) | app name (UTF-8, the rest of the key) -> JSON AppRecord: an
                    application whose log the ingester ships from inside the
                    guest, with where each of its files' streams stands
                    (sealed in an encrypted repository)
    ships       vm uuid (16) | time_us (u64) | ship no (u32) -> JSON ShipRecord
                    one per shipment (an "app point"), time order per VM like
                    vm_points; ship numbers come from meta b"next_ship"
                    (sealed in an encrypted repository)

    outbox      seq (u64) -> a batch (below): the changes of one write
                    transaction of a repository in an object store, queued
                    in that same transaction until rpofs.store.publish has
                    put them in the store; empty in a local repository
                    (present in every repository of this format, it came
                    with hosts and changed no other layout)

    borrowed    chunk key (32) -> Borrow: a full chunk this host's fulls use
                    and that another host of the store holds, not stored here
                    (cross-host dedup, docs/OBJECTSTORE.md "Dedup across
                    hosts"): the lender's host name | where the record is in
                    the lender's packs, as the lender's `chunks` row said when
                    it was borrowed (a lender's compaction may move it since;
                    its replica says where). A key is in `chunks` or here,
                    never both. Empty in a local repository.
    condemned   chunk key (32) -> Condemned: a `chunks` row nothing of this
                    host's uses, not deleted yet because another host might
                    be borrowing it (rpofs.store.lending): a time after it
                    was condemned, and one by which this host's publication
                    held the condemnation (each 0 until a collection stamps it). Empty in a
                    local repository (it collects at once).

    protection  vm uuid (16) | session start time_us (u64) -> JSON
                    ProtectionSession: one period of continuous protection
                    (an active mirror into the journal server), its state and
                    the span of time its journal can be read at
                    (sealed in an encrypted repository)

Publication (a repository in an object store; rpofs.store.publish,
docs/OBJECTSTORE.md)
    meta META_NEXT_SEQ b"next_seq" -> u64: the next batch's seq (absent: 1)
         META_PUBLISHING b"publishing" -> JSON {"snapshot": seq, "bytes":
             its size, "since": bytes of logs published after it}: when
             the next compacted snapshot is due (local: never published)
         META_FOLLOWED b"followed" -> u64: in a replica of another host's
             catalog (or a catalog taken over), the last seq applied
         META_DRAINED b"drained" -> u64 time_us: every commit before it is
             published (set by a publication that emptied the outbox;
             rpofs.store.lending's collection reads it)
         META_COLLECTED b"collected" -> u64 time_us: the last collection
             (rpofs.store.gc: one is due every COLLECT_EVERY_S)
    A batch (encode_batch / decode_batch) is seq (u64) | time_us (u64) |
    count (u32) then `count` changes, each kind (u8: 1 put, 2 delete) | the
    sub-database's index in DATABASES (u8) | key length (u16) | key, and for
    a put value length (u32) | value. Every change a write transaction
    made through Repository.write_txn is in its batch, in order, except
    the outbox's own and the meta keys above: applied in seq order to a
    copy of the catalog as of the previous batch, it gives the catalog as
    of this one.

Continuous protection (format 6; rpofs.protect, docs/PROTECT.md)
    While a session is protected, every write QEMU completed for the guest
    is a record in the session's journal, durable before QEMU was answered.
    The journal is folded into ordinary points (PointRecord.origin
    "journal"): the session's first fold is a full, the disks as the
    mirror's first pass left them at ready_us; each later one a log of
    the blocks the records since the previous fold touched. A disk as of
    an instant T of the session (ready_us <= T <= its end) is its newest
    fold at or before T with the session's records after that fold up to
    T applied in journal order (rpofs.protect.view).

Applications (format 5; rpofs.apps, docs/APPS.md)
    A shipment holds the bytes an application appended to its log files
    since the previous one (a SQLite WAL's committed frames, an append-only
    file's new bytes), each file's as one chunk in `chunks` named by the
    record's ShippedFile.key. Its time is when its read finished. Its base
    is the block point it extends: the newest block point at or before it
    whose disks hold the application's files in a state the shipped stream
    continues (rpofs.apps.relate); None with `waiting` saying why while
    there is none, and such a shipment is never read. A file's stream is
    a lineage of generations (a WAL's salts; a file's identity); each
    generation is shipped from its start, so an app point reads its base's
    copy plus the shipments of the lineage from the base's time on. A
    shipment goes when its base point goes (prune), with the VM (forget).

A chain is numbered by its full point's number; disk numbers are positions in
the full's disk list, which every log of the chain shares. Point numbers grow
with commit order; within a VM they grow with time, so ~point orders a chain's
log entries newest first.

Pack records (REPO/chunks/pack-*): PACK_HEADER (key, codec, raw length, stored
length) then the stored bytes; the catalog points at the stored bytes.
    whole (CODEC_RAW, CODEC_ZSTD)
                the chunk's bytes, zstd-compressed when that is shorter. Key:
                blake3-256 of the raw bytes. Log blocks, the points' XML and
                boot state, shipped application bytes, and the full chunks of
                formats 2 and 3 (until `rpofs upgrade`).
    pieced (CODEC_PIECES)   a full chunk of format 3
                cut into PIECE_SIZE (64 KiB) pieces, the last one short when
                the chunk is; stored: the piece table, then the pieces in order.
                The table has one PIECE_ENTRY per piece (their number follows
                from the raw length): blake3-256 of the piece's raw bytes |
                stored length - 1 (u16) | codec (u8: CODEC_RAW, or CODEC_ZSTD
                when that is shorter), 35 bytes, 560 for a 1 MiB chunk. A
                piece's place is the table's length plus the stored lengths of
                the pieces before it.
                Key: blake3 in key-derivation mode with the context
                PIECES_KEY_CONTEXT over the pieces' hashes concatenated. The
                context keeps it apart from every whole record's key: a plain
                blake3 of the hashes is the key of whatever chunk consists of
                those 512 bytes, and dedup by key would hand out its bytes.
                Equal content gives equal keys, so full chunks stay
                deduplicated, but a chunk stored whole (format 2) and pieced
                (format 3) have different keys: a full taken after the upgrade
                stores its chunks again, once.
                Why: a random 4 KiB read through the mount read, decompressed
                and hashed a whole 1 MiB chunk; now it reads the table (cached
                once read) and the one piece it touches, each verified (the
                table against the key, the piece against its entry), while a
                whole-chunk read is still one read of the record.

Every read verifies what it returns against the key. All-zero data is never
stored.

Encryption (optional, chosen at init: `rpofs init --encrypt`)
    An encrypted repository is a repository of this format with
    meta/encryption present (encryption came with format 4 and is not a
    format of its own); every other byte layout above holds, with these
    differences. rpofs.store.crypto
    implements all of it; nothing else imports `cryptography`.
    Key record  meta/encryption, JSON: {"version": 1, "repository": 16 random
                bytes (hex), "kdf": "scrypt", "n": 32768, "r": 8, "p": 1,
                "salt": 16 bytes (hex), "cipher": "aes-256-gcm", "wrapped":
                the sealed master key (hex), "fingerprint": 8 bytes (hex)}.
                The master key is 32 random bytes, sealed (as a unit, below)
                under the key scrypt derives from the passphrase (32 MiB,
                ~0.12 s on the bench machine: every open pays it once), AAD
                b"rpofs master key v1\0" | repository. The fingerprint is
                blake3 derive_key("rpofs 2025 key fingerprint v1", master)
                [:8]: it names the key (rpofs status) and checks a master key
                handed over directly (the mount's --key-fd). A record of
                another version, kdf or cipher is refused, never guessed at.
                Changing the passphrase (rpofs key change) rewraps the
                master key only: a new salt and wrapped, the same
                repository and fingerprint, replaced in one transaction.
    Subkeys     blake3 derive_key(context, master), contexts "rpofs 2025
                chunk ids v1" (id key), "... pieces key v1", "... pack
                records v1" (packs key), "... catalog values v1", "...
                journal records v1" (journal key).
    Journal     continuous protection's write journal (REPO/journal/): the
                server gets the master key through a pipe and stores every
                write's data sealed under the journal key, AAD the record's
                header (rpofs.store.journal, MAGIC_SEALED); headers (disk,
                offset, length, time) stay in clear, as the catalog's keys do.
    Chunk keys  keyed blake3 under the id key: a whole record's key, a log
                block's key and every piece hash in a piece table. A pieced
                chunk's key is keyed blake3 under the pieces key over its
                piece hashes (a key of its own, as PIECES_KEY_CONTEXT keeps
                it apart in an unencrypted repository). Equal content has
                equal keys in one repository (full chunks deduplicate as
                before); two repositories share no keys, and a key says
                nothing about content to anyone without the key.
    A sealed unit  nonce (12 random bytes) | AES-256-GCM ciphertext | tag
                (16): SEAL_OVERHEAD = 28 bytes more than its plaintext.
    Pack records  PACK_HEADER stays in clear (key, codec, raw and stored
                length: the key is keyed, so it reveals nothing; codec and
                lengths leak sizes and compressibility, as restic's and
                borg's do). The stored bytes are sealed in units: a whole
                record (CODEC_RAW, CODEC_ZSTD) is one unit; a pieced record
                is its table as one unit, then each piece as one unit, so a
                4 KiB read still opens only the table and one piece. AAD:
                the record's key (32) | pack (u32) | the unit's offset in
                the pack (u64): a record moved or copied elsewhere, a unit
                swapped with another, or one under another record's header
                fails to open. Each pack has its own AES key: keyed blake3
                of the pack number (u32) under the packs key. Pack numbers
                are never reused, so random nonces stay far below
                AES-GCM's bound of 2^32 messages a key however big the
                repository grows. Whatever copies a record (compaction,
                defrag, upgrade) reads its plaintext (ChunkReader.verified)
                and PackWriter.append seals it anew for its new place.
    Lengths     The catalog keeps plaintext stored lengths (log_index values
                hold stored length - 1 in a u16 and derive the codec from
                stored == raw, so they could not grow). A record's span in
                its pack is computed: record_span(loc, SEAL_OVERHEAD) =
                PACK_HEADER + stored + 28 x units, units = 1, or 1 +
                piece_count(raw_len) for CODEC_PIECES; piece i of a pieced
                record starts 28 x (i + 1) bytes later than its plaintext
                place. ChunkReader.record_len is the one function callers
                use (gc, defrag, materialize's runs, upgrade's room check).
    Catalog values  the values of the SEALED sub-databases, `vms`, `points`,
                `apps`, `ships` and `protection` (they hold VM names, disks,
                XML keys, guest paths, checkpoint names), are sealed units
                under the catalog subkey (Repository.seal_value /
                open_value, encode_point / encode_name), AAD =
                the sub-database's name | 0x00 | the LMDB key: a value
                moved to another entry fails. Everything else stays in
                clear: LMDB keys (VM uuids, point numbers, times, chains, app names,
                disk and block numbers, protection sessions' start times),
                `vm_points` values (empty), `full_index` values (keyed chunk
                keys), `log_index` and `chunks` values (places and plaintext
                lengths), meta's format and counters. So the catalog shows how many
                VMs and points there are, when points were taken, how big
                disks are and which blocks changed when, but no name, no
                XML and no content.
    Verification  A unit that opens was sealed by a holder of the master key
                for that record key at that place; a wrong key, a flipped
                bit or a moved record fails to open (CorruptChunk for pack
                data: the mount answers EIO; one RpofsError line for a
                catalog value or the key record), never wrong bytes. Whole
                reads (ChunkReader.read, verified: compaction, upgrade,
                verify) still hash the content against its key. The mount's
                hot path (read_range's pieces, read_run_into's log blocks)
                does not hash a raw piece or block again once it opened:
                the tag is that check (restic likewise relies on its MAC
                when reading); zstd pieces are hashed after decompression.
    Not covered  The catalog's structure is not authenticated: someone who
                can write REPO/catalog can drop entries or point an index
                entry at another stored block of the same repository (not
                make up content, nor read any). Files outside catalog/,
                chunks/ and journal/ are not encrypted: REPO/lock, REPO/locks/ (VM uuids),
                the ingester's status file and REPO/run/ (rpofs run's
                records name VMs), mount.log. The master key lives in the
                memory of every process that opened the repository.

Format history
    1   log blocks had a chunk key in log_index and a `chunks` row each.
        Refused.
    2   log_index entries hold their block's place (12 bytes); full chunks
        are whole records.
    3   new full chunks are stored pieced (CODEC_PIECES); a format-2
        repository became 3 with its first pieced commit, keeping its whole
        full chunks.
    4   every full chunk is pieced: `full_index` names CODEC_PIECES records
        only (whole records hold log blocks, the points' XML and boot state).
        Formats 2 and 3 are refused by every command but `rpofs upgrade`
        (rpofs.store.upgrade), which re-pieces their whole full chunks and
        sets the format in one transaction. Encryption at rest (optional,
        meta/encryption) came with format 4; it changed no other layout and
        no format number.
    5   `apps` and `ships` (application logs shipped from the guest). A
        format-4 repository is upgraded by creating the two empty
        sub-databases and setting the format, in one transaction; 2 and 3
        go through 4's upgrade first.
    6   `protection` (continuous protection, sealed in an encrypted
        repository) and PointRecord.origin. A format-4 or -5 repository is
        upgraded by creating the missing sub-databases and setting the
        format, in one transaction; 2 and 3 go through 4's upgrade first,
        in the same run. Every command but `rpofs upgrade` refuses a
        repository of another format than FORMAT (one of UPGRADES_FROM
        with the command that converts it); `rpofs upgrade` converts
        UPGRADES_FROM and refuses the rest (format 1 among them).

Commit order: pack data fsync'ed first, then one LMDB write transaction adds
the chunk locations, the index entries and the point. A crash leaves at most
unreferenced pack data; a point is visible only when complete.
"""

import json
import struct
import uuid as uuidlib
from dataclasses import MISSING, asdict, dataclass, field, fields

import orjson

FORMAT = 6                 # what init writes and Repository.open accepts
UPGRADES_FROM = (2, 3, 4, 5)   # what `rpofs upgrade` converts to FORMAT
CHUNK_SIZE = 1 << 20
BLOCK_SIZE = 1 << 16
BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE

DATABASES = ("meta", "vms", "points", "vm_points", "full_index", "log_index", "chunks", "apps", "ships", "protection",
             "outbox", "borrowed", "condemned")   # appended only: a batch names a sub-database by its index
SEALED = ("vms", "points", "apps", "ships", "protection")  # values sealed in an encrypted repository

# meta's keys (their values: see the spec above)
META_FORMAT = b"format"
META_NEXT_POINT = b"next_point"
META_NEXT_PACK = b"next_pack"
META_NEXT_SHIP = b"next_ship"
META_PRUNED = b"pruned"
META_GC_PENDING = b"gc_pending"
META_ENCRYPTION = b"encryption"  # the key record of an encrypted repository
META_NEXT_SEQ = b"next_seq"      # publication (see "Publication")
META_PUBLISHING = b"publishing"
META_FOLLOWED = b"followed"
META_DRAINED = b"drained"
META_COLLECTED = b"collected"
UNPUBLISHED = ("outbox",)        # sub-databases whose changes are never published
UNPUBLISHED_META = (META_NEXT_SEQ, META_PUBLISHING, META_FOLLOWED, META_DRAINED, META_COLLECTED)

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_PIECES = 2   # a pieced full chunk: piece table, then the pieces (see above)

PIECE_SIZE = BLOCK_SIZE
PIECE_ENTRY = struct.Struct(">32sHB")  # blake3 of the raw piece, stored length - 1, codec
PIECES_KEY_CONTEXT = "rpofs full chunk pieces v1"

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_BATCH = struct.Struct(">QQI")
_CHANGE = struct.Struct(">BBH")
PUT, DELETE = 1, 2
_VM_POINT = struct.Struct(">16sQI")
_FULL_KEY = struct.Struct(">IHI")
_PROTECTION = struct.Struct(">16sQ")
_LOG_KEY = struct.Struct(">IHII")
_CHUNK_LOC = struct.Struct(">IQIIB")
_CONDEMNED = struct.Struct(">QQ")
PACK_HEADER = struct.Struct(">32sBII")  # key, codec, raw length, stored length
"""Each record in a pack file: PACK_HEADER then the stored bytes. The catalog
points at the stored bytes; the header lets a repair tool rebuild `chunks`."""
SEAL_OVERHEAD = 28      # a sealed unit: nonce (12) | AES-256-GCM ciphertext | tag (16)


def u32(n: int) -> bytes:
    """A meta counter's value."""
    return _U32.pack(n)


def read_u32(b: bytes) -> int:
    return _U32.unpack(b)[0]


def u64(n: int) -> bytes:
    """A u64 meta counter's value; an outbox key (a batch's seq)."""
    return _U64.pack(n)


def read_u64(b) -> int:
    return _U64.unpack(bytes(b))[0]


outbox_key, read_outbox_key = u64, read_u64


@dataclass(frozen=True)
class Change:
    """One put (value set) or delete (value None) of a write transaction."""
    db: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True)
class Batch:
    seq: int
    time_us: int
    changes: list


def encode_batch(batch: Batch) -> bytes:
    out = [_BATCH.pack(batch.seq, batch.time_us, len(batch.changes))]
    for c in batch.changes:
        out.append(_CHANGE.pack(PUT if c.value is not None else DELETE, DATABASES.index(c.db), len(c.key)))
        out.append(c.key)
        if c.value is not None:
            out += [_U32.pack(len(c.value)), c.value]
    return b"".join(out)


def decode_batch(data) -> Batch:
    """The batch in `data` (exactly); ValueError if it is not one."""
    view = memoryview(data)
    try:
        seq, time_us, count = _BATCH.unpack_from(view, 0)
        at, changes = _BATCH.size, []
        for _ in range(count):
            kind, db, klen = _CHANGE.unpack_from(view, at)
            at += _CHANGE.size
            key = bytes(view[at:at + klen])
            at += klen
            value = None
            if kind == PUT:
                (vlen,) = _U32.unpack_from(view, at)
                value = bytes(view[at + 4:at + 4 + vlen])
                at += 4 + vlen
            elif kind != DELETE:
                raise ValueError(f"change kind {kind}")
            if len(key) != klen or (value is not None and len(value) != vlen):
                raise ValueError("truncated")
            changes.append(Change(DATABASES[db], key, value))
    except (struct.error, IndexError) as e:
        raise ValueError(str(e)) from None
    if at != len(view):
        raise ValueError(f"{len(view) - at} bytes after the last change")
    return Batch(seq, time_us, changes)


def format_value(fmt: int) -> bytes:
    """meta/format's value for format `fmt`."""
    return str(fmt).encode()


def read_format(value) -> int:
    return int(value)


def vm_key(vm: str) -> bytes:
    """A VM (its uuid, text) as it is in keys: 16 bytes, its key in `vms`
    and the first field of its keys in vm_points, apps, ships, protection."""
    return uuidlib.UUID(vm).bytes


def read_vm_key(key) -> str:
    """The VM (uuid, text) of a `vms` key, or of a key's vm field."""
    return str(uuidlib.UUID(bytes=bytes(key)))


def vm_prefix(vm: bytes) -> bytes:
    """What every vm_points, apps, ships and protection key of the VM
    (vm_key) starts with: its entries there, in key order, by one scan."""
    assert len(vm) == 16
    return bytes(vm)


def chain_prefix(chain: int) -> bytes:
    """What every full_index and log_index key of the chain starts with."""
    return _U32.pack(chain)


def point_key(point: int) -> bytes:
    return _U32.pack(point)


def vm_point_key(vm: bytes, time_us: int, point: int) -> bytes:
    return _VM_POINT.pack(vm, time_us, point)


def read_vm_point_key(key: bytes) -> tuple[bytes, int, int]:
    return _VM_POINT.unpack(key)


def app_key(vm: bytes, app: str) -> bytes:
    return vm + app.encode()


def read_app_key(key: bytes) -> tuple[bytes, str]:
    return bytes(key[:16]), bytes(key[16:]).decode()


def ship_key(vm: bytes, time_us: int, ship: int) -> bytes:
    return _VM_POINT.pack(vm, time_us, ship)


def read_ship_key(key: bytes) -> tuple[bytes, int, int]:
    return _VM_POINT.unpack(key)


def protection_key(vm: bytes, started_us: int) -> bytes:
    return _PROTECTION.pack(vm, started_us)


def read_protection_key(key: bytes) -> tuple[bytes, int]:
    return _PROTECTION.unpack(key)


def full_key(chain: int, disk: int, chunk: int) -> bytes:
    return _FULL_KEY.pack(chain, disk, chunk)


def read_full_key(key: bytes) -> tuple[int, int, int]:
    """(chain, disk, chunk no) of a full_index key."""
    return _FULL_KEY.unpack(key)


def log_key(chain: int, disk: int, block: int, point: int) -> bytes:
    return _LOG_KEY.pack(chain, disk, block, 0xFFFFFFFF - point)


def log_block_prefix(chain: int, disk: int, block: int) -> bytes:
    """What every log_index key of one block starts with: its entries, newest first."""
    return _LOG_KEY.pack(chain, disk, block, 0)[:_LOG_KEY.size - 4]


def read_log_key(key: bytes) -> tuple[int, int, int, int]:
    """(chain, disk, block, point) of a log_index key."""
    chain, disk, block, inverted = _LOG_KEY.unpack(key)
    return chain, disk, block, 0xFFFFFFFF - inverted


# -- range scans: the entries whose key starts with a prefix made above -----------

def scan(cur, prefix: bytes, start: bytes | None = None):
    """(key, value) of every entry of cursor `cur`'s sub-database whose key
    starts with `prefix`, in key order, from the first key at or after
    `start` (a key that starts with `prefix`; default: the prefix itself).
    The cursor is moved."""
    if cur.set_range(prefix if start is None else start):
        for key, value in cur.iternext():
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key, value


def scan_keys(cur, prefix: bytes, start: bytes | None = None):
    """The keys `scan` would give, without reading their values."""
    if cur.set_range(prefix if start is None else start):
        for key in cur.iternext(values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key


def scan_keys_back(cur, prefix: bytes):
    """The keys that start with `prefix`, last first (a VM's newest point
    first). The cursor is moved."""
    after = _successor(prefix)
    found = after is not None and cur.set_range(after)
    found = cur.prev() if found else cur.last()
    while found:
        key = bytes(cur.key())
        if not key.startswith(prefix):
            return
        yield key
        found = cur.prev()


def _successor(prefix: bytes) -> bytes | None:
    """The least key greater than every key that starts with `prefix`;
    None: there is none (the prefix is all 0xff)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True)
class ChunkLocation:
    pack: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int

    def encode(self) -> bytes:
        return _CHUNK_LOC.pack(self.pack, self.offset, self.stored_len, self.raw_len, self.codec)

    @classmethod
    def decode(cls, b: bytes) -> "ChunkLocation":
        return cls(*_CHUNK_LOC.unpack(b))


@dataclass(frozen=True)
class Borrow:
    """A `borrowed` value: the host that holds the chunk, and where."""
    host: str
    loc: ChunkLocation

    def encode(self) -> bytes:
        name = self.host.encode()
        return bytes((len(name),)) + name + self.loc.encode()

    @classmethod
    def decode(cls, b) -> "Borrow":
        b = bytes(b)
        n = b[0]
        return cls(b[1:1 + n].decode(), ChunkLocation.decode(b[1 + n:]))


@dataclass(frozen=True)
class Condemned:
    """A `condemned` value (rpofs.store.gc): times in microseconds."""
    since_us: int          # a time after the condemnation committed (0 until a collection stamps it)
    published_us: int      # a time by which this host's publication held the condemnation; 0: not known yet

    def encode(self) -> bytes:
        return _CONDEMNED.pack(self.since_us, self.published_us)

    @classmethod
    def decode(cls, b) -> "Condemned":
        return cls(*_CONDEMNED.unpack(bytes(b)))


def log_value(loc: ChunkLocation | None) -> bytes:
    """A log_index value: where the block's record is (12 bytes); None: zeros."""
    if loc is None:
        return b""
    assert 0 < loc.stored_len <= BLOCK_SIZE and loc.offset < 1 << 48
    return loc.pack.to_bytes(4, "big") + loc.offset.to_bytes(6, "big") + (loc.stored_len - 1).to_bytes(2, "big")


def read_log_value(value: bytes, raw_len: int) -> ChunkLocation | None:
    """The block's location; None: zeros. Its raw length is the block's
    (BLOCK_SIZE, less for a disk's last block; 0 when only the place is
    wanted), and its codec follows: stored as long as raw is raw, shorter is
    zstd (chunks.encode compresses only when that is smaller)."""
    if not value:
        return None
    stored = int.from_bytes(value[10:12], "big") + 1
    return ChunkLocation(int.from_bytes(value[:4], "big"), int.from_bytes(value[4:10], "big"), stored, raw_len,
                         CODEC_RAW if stored == raw_len else CODEC_ZSTD)


def piece_count(raw_len: int) -> int:
    """Pieces of a pieced chunk of raw_len bytes."""
    return -(-raw_len // PIECE_SIZE)


def piece_table_len(raw_len: int) -> int:
    """Bytes of a pieced chunk's table: it starts the record's stored bytes."""
    return piece_count(raw_len) * PIECE_ENTRY.size


def sealed_units(loc: "ChunkLocation") -> int:
    """Units a record is sealed in, in an encrypted repository: a whole
    record one, a pieced one its table and each piece."""
    return 1 + piece_count(loc.raw_len) if loc.codec == CODEC_PIECES else 1


def record_span(loc: "ChunkLocation", overhead: int) -> int:
    """Bytes a record takes in its pack: its header and stored bytes, each
    sealed unit `overhead` longer (0: unencrypted, SEAL_OVERHEAD: encrypted).
    The catalog keeps the plaintext stored length; this is the one place
    that knows what a record costs on disk (ChunkReader.record_len)."""
    return PACK_HEADER.size + loc.stored_len + overhead * sealed_units(loc)


def pack_name(pack: int) -> str:
    return f"pack-{pack:08d}"


@dataclass(frozen=True)
class DiskRecord:
    target: str           # "vda"
    size: int             # virtual size in bytes
    source: str = ""      # image path on the host when backed up (informational)


@dataclass(frozen=True)
class PointRecord:
    """One recovery point. Stored as JSON in `points`; also point.json's body."""
    point: int
    vm: str               # uuid, canonical text form
    vm_name: str
    kind: str             # "full" | "log"
    time_us: int          # the instant the disks were captured
    chain: int            # the full point this point belongs to (itself for a full)
    parent: int | None    # the previous point of the chain (None for a full)
    consistency: str      # "crash-consistent" | "filesystems-frozen"
    disks: tuple[DiskRecord, ...]
    checkpoint: str       # the libvirt checkpoint created with this point ("" if none)
    domain_xml: str       # chunk key (hex) of the domain XML captured with the point
    reason: str = ""      # why this is a full (first backup, chain broken, asked, interval)
    stats: dict = field(default_factory=dict)
    checkpoint_xml: str = ""  # chunk key (hex) of the checkpoint's libvirt XML, to redefine it
    warnings: tuple[str, ...] = ()  # e.g. why a point meant to be frozen is crash-consistent
    # What the VM needs to boot besides its disks, read with the point: chunk
    # keys (hex) by kind, "nvram" (the UEFI variable store, <os><nvram>) and
    # "tpm" (swtpm's state file). {} : the VM has neither. None: the point
    # was taken before rpofs captured them (recovered with fresh ones).
    firmware: dict | None = None
    # The point's name (its directory in the mount), chosen at commit and
    # never changed: rpofs.timefmt.new_point_name. "" in points committed
    # before names were stored (rpofs.timefmt.point_names names them).
    name: str = ""
    # Where its disks came from: "" a libvirt backup job, "journal" a fold of
    # continuous protection's journal (stats["journal"] says which session
    # and span).
    origin: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, b: bytes) -> "PointRecord":
        """The record, built without the frozen dataclass's __init__ (whose
        object.__setattr__ per field took 60 % of decoding: a mount lists a
        VM's every point, 86,400 a day at 1 s points). As strict: a field
        missing without a default, or one this format does not know, is a
        TypeError; a field added since the record was written gets its default."""
        try:
            d = orjson.loads(b)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"point record: {e}") from None
        keys = d.keys()
        if not (keys <= _POINT_FIELDS and _POINT_REQUIRED <= keys):
            raise TypeError(f"point record fields: {sorted(keys - _POINT_FIELDS) or sorted(_POINT_REQUIRED - keys)}")
        d["disks"] = tuple([_disk(x) for x in d["disks"]])
        if "warnings" in d:
            d["warnings"] = tuple(d["warnings"])
        record = object.__new__(cls)
        fields_ = record.__dict__
        fields_.update(_POINT_DEFAULTS)
        if "stats" not in d:
            fields_["stats"] = {}
        fields_.update(d)
        return record

    def disk_index(self, target: str) -> int:
        for i, d in enumerate(self.disks):
            if d.target == target:
                return i
        raise KeyError(target)


_POINT_FIELDS = frozenset(f.name for f in fields(PointRecord))
_POINT_DEFAULTS = {f.name: f.default for f in fields(PointRecord) if f.default is not MISSING}
_POINT_REQUIRED = frozenset(f.name for f in fields(PointRecord)
                            if f.default is MISSING and f.default_factory is MISSING)
_DISK_FIELDS = frozenset(f.name for f in fields(DiskRecord))


def _disk(x: dict) -> DiskRecord:
    if not (x.keys() <= _DISK_FIELDS and "target" in x and "size" in x):
        raise TypeError(f"disk record fields: {sorted(x)}")
    disk = object.__new__(DiskRecord)
    disk.__dict__["source"] = ""
    disk.__dict__.update(x)
    return disk


@dataclass(frozen=True)
class ShippedFile:
    """The bytes one shipment added to one file's stream: [offset, offset +
    length) of generation `generation` of lineage `lineage`, stored as chunk
    `key` (hex; "" when length is 0)."""
    path: str             # the file in the guest (for SQLite: the -wal file)
    lineage: int          # a new lineage starts where the previous one cannot be continued
    generation: str       # SQLite: the WAL's salts (hex); files: "1", "2", ... per rotation
    offset: int
    length: int
    key: str = ""


@dataclass(frozen=True)
class ShipRecord:
    """One shipment of an application's logs: an app point. Stored as JSON
    in `ships`; point.json's body for an app point."""
    ship: int
    vm: str               # uuid
    app: str
    kind: str             # "sqlite" | "files"
    time_us: int          # when its read finished
    name: str             # its directory in the mount, fixed at commit (as a point's)
    files: tuple[ShippedFile, ...]
    base: int | None      # the block point it extends; None: waiting for one
    chain: int | None     # the base's chain (None while waiting)
    waiting: str = ""     # why there is no base
    reads_from: int = 0   # time_us of the oldest shipment of the app that reading it
                          # needs (prune keeps those, rpofs.apps.relate)
    stats: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, b: bytes) -> "ShipRecord":
        d = json.loads(bytes(b))
        d["files"] = tuple(ShippedFile(**x) for x in d["files"])
        return cls(**d)


@dataclass(frozen=True)
class StreamState:
    """Where one file's stream stands after the last shipment (the shipper
    goes on from here after a restart)."""
    path: str
    lineage: int
    generation: str
    offset: int           # bytes of the generation shipped
    checksum: tuple[int, int] = (0, 0)  # SQLite: the WAL's running checksum at offset
    header: str = ""      # SQLite: the generation's WAL header (hex), to scan on and to
                          # tell SQLite's restart of the WAL (salt-1 and checkpoint
                          # sequence + 1) from a new file
    tail: str = ""        # files: the last (up to 64) bytes shipped, hex: identity check


@dataclass(frozen=True)
class AppRecord:
    """An application of a VM whose logs are shipped, and its streams."""
    name: str
    kind: str             # "sqlite" | "files"
    path: str             # as configured: the database, or a glob of files
    location: dict        # where its files are in the block points: {"mountpoint", "disk", "volume"}
    streams: tuple[StreamState, ...] = ()
    next_lineage: int = 1

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, b: bytes) -> "AppRecord":
        d = json.loads(bytes(b))
        d["streams"] = tuple(StreamState(**{**x, "checksum": tuple(x["checksum"])}) for x in d["streams"])
        return cls(**d)

    def stream(self, path: str) -> StreamState | None:
        return next((s for s in self.streams if s.path == path), None)


@dataclass(frozen=True)
class ProtectionSession:
    """One period of continuous protection of a VM (rpofs.protect): its
    journal directory is REPO/journal/<vm>/<started_us as 16 hex digits>."""
    vm: str                       # uuid
    started_us: int
    disks: tuple[DiskRecord, ...]
    state: str = "starting"       # starting (the mirror's first pass) | protected | ended
    ready_us: int = 0             # every disk's mirror ready: the journal is complete from here
    ended_us: int = 0             # when it was seen ended (0 while it lasts)
    last_us: int = 0              # an ended session's newest record: its journal reads up to here
    reason: str = ""              # why it ended
    checkpoint: str = ""          # what the next fold records as its checkpoint (confirmed: the
                                  # mirror was seen running well after it was made)
    pending: tuple[tuple[str, int], ...] = ()  # (checkpoint, made at us) not yet confirmed
    folded_us: int = 0            # the newest fold's time
    server_pid: int = 0
    journal_from_us: int = 0      # records up to here may be gone (retention): an instant
                                  # reads only from a fold at or after it

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, b: bytes) -> "ProtectionSession":
        d = json.loads(bytes(b))
        d["disks"] = tuple(DiskRecord(**x) for x in d["disks"])
        d["pending"] = tuple(tuple(x) for x in d["pending"])
        return cls(**d)

    @property
    def directory_name(self) -> str:
        return f"{self.started_us:016x}"
