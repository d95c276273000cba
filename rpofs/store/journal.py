"""The write journal's segment files: what the journal server appends and
what folding and the mount read. The format's spec.

    REPO/journal/<vm uuid>/seg-<first time_us, 16 hex>.jnl

A segment is a run of batches, each a run of records then a commit mark;
a record is RECORD_HEADER then, for a write, its data. The header holds:
magic, kind (write, zero or commit mark), disk (its position in
the protection's disk list), offset, length, time_us (when the server took
the write in: every record of a write the guest saw acknowledged has a time
at or before that acknowledgement, and none is earlier than the write's
issue) and blake3-256 over the header's other fields and the data. A record
is answered to QEMU only once it is durable (fdatasync of the segment), so a
crash can leave only unanswered records torn at a segment's tail: a scan
stops at the first record that does not verify and everything before it is
the journal. A server that starts again opens a new segment; it never
appends after a tail it did not write.

A batch is what one fdatasync made durable, written with one write(); its
records' times are later than every earlier batch's (the server keeps
them apart). A scan takes records only up to the last commit mark, so a
reader never sees part of a batch, and once it has seen a record with time
t it has seen every record with time <= t: an instant it can name never
changes.

Records are at most MAX_RECORD bytes of data: a larger write is journaled
as several records with one time, so a read through the mount verifies at
most that much to return a few bytes.

In an encrypted repository every record has magic MAGIC_SEALED and a
write's data is stored sealed (crypto.JournalSealer: nonce | AES-256-GCM
ciphertext | tag, SEAL_OVERHEAD bytes more than its length; AAD the header
without its hash). The header stays in clear (disk, offset, length, time:
what the catalog's clear keys show of points too) and its hash covers the
sealed bytes, so a scan finds torn tails and damage without the key; the
data is opened, with the tag as its check, when it is read.
"""

import collections
import contextlib
import os
import struct
import threading
from dataclasses import dataclass

import blake3

from ..errors import ChunkError
from .schema import SEAL_OVERHEAD, ProtectionSession

MAGIC = b"RPJ1"
MAGIC_SEALED = b"RPJ2"   # a record of an encrypted repository's journal: its data sealed
KIND_WRITE = 1
KIND_ZERO = 2
KIND_COMMIT = 3   # ends a batch: no data; its time is the batch's newest
RECORD_HEADER = struct.Struct(">4sBBHQIQ32s")  # magic, kind, disk, 0, offset, length, time_us, hash
_HASHED = struct.Struct(">4sBBHQIQ")            # the header without its hash
MAX_RECORD = 1 << 20
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jnl"


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled write (or zeroing) as the scan found it: where its data
    is in its segment file (data_pos; a zero record has none)."""
    kind: int
    disk: int
    offset: int
    length: int
    time_us: int
    segment: str          # the segment file's path
    data_pos: int
    digest: bytes
    sealed: bool = False  # its data is stored sealed (an encrypted repository's journal)

    @property
    def end(self) -> int:
        return self.offset + self.length


def encode(kind: int, disk: int, offset: int, data, time_us: int, length: int | None = None) -> bytes:
    """One record's bytes: header, then data for a write. length: for a
    zero record (data empty)."""
    head = encode_header(kind, disk, offset, data, time_us, length)
    return head + bytes(data) if kind == KIND_WRITE else head


def encode_header(kind: int, disk: int, offset: int, data, time_us: int, length: int | None = None) -> bytes:
    """A record's header (its hash covers data): what the server writes
    before the data it received, without copying that."""
    n = len(data) if kind == KIND_WRITE else (length or 0)
    assert (n > 0 or kind == KIND_COMMIT) and n <= (MAX_RECORD if kind == KIND_WRITE else 1 << 63)
    head = _HASHED.pack(MAGIC, kind, disk, 0, offset, n, time_us)
    h = blake3.blake3(head)
    if kind == KIND_WRITE:
        h.update(data)
    return head + h.digest()


def encode_sealed(kind: int, disk: int, offset: int, data, time_us: int, sealer,
                  length: int | None = None) -> tuple[bytes, bytes]:
    """(header, stored data) of a record of an encrypted repository's
    journal: a write's data sealed by `sealer` (crypto.JournalSealer)."""
    n = len(data) if kind == KIND_WRITE else (length or 0)
    assert (n > 0 or kind == KIND_COMMIT) and n <= (MAX_RECORD if kind == KIND_WRITE else 1 << 63)
    head = _HASHED.pack(MAGIC_SEALED, kind, disk, 0, offset, n, time_us)
    stored = sealer.seal(head, data) if kind == KIND_WRITE else b""
    return head + blake3.blake3(head + stored).digest(), stored


def segment_name(first_time_us: int) -> str:
    return f"{SEGMENT_PREFIX}{first_time_us:016x}{SEGMENT_SUFFIX}"


def segment_start(name: str) -> int:
    """The first time a segment can hold, from its name."""
    return int(name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)], 16)


def segments(directory: str) -> list[str]:
    """The journal's segment files, oldest first (paths)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in sorted(names)
            if n.startswith(SEGMENT_PREFIX) and n.endswith(SEGMENT_SUFFIX)]


@dataclass
class Scan:
    """A segment's verified records, scanned on from `end` as it grows."""
    path: str
    records: list[Record]
    end: int = 0          # bytes verified so far (up to the last commit mark)
    torn: bool = False    # stopped at a record that does not verify


def scan(path: str, state: Scan | None = None) -> Scan:
    """Verify a segment's batches from where `state` stopped (a live
    segment grows): each record is read whole and its hash checked, and a
    batch is taken at its commit mark. The scan stops at the first record
    that does not verify; a batch that is only short may still be being
    written and is read again next time."""
    state = state or Scan(path, [])
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return state
    with f:
        f.seek(state.end)
        pos, batch = state.end, []
        while True:
            head = f.read(RECORD_HEADER.size)
            if len(head) < RECORD_HEADER.size:
                return state
            magic, kind, disk, _, offset, length, time_us, digest = RECORD_HEADER.unpack(head)
            if magic not in (MAGIC, MAGIC_SEALED) or kind not in (KIND_WRITE, KIND_ZERO, KIND_COMMIT) \
                    or (kind == KIND_WRITE and length > MAX_RECORD):
                state.torn = True
                return state
            stored = _stored_len(magic, kind, length)
            data = f.read(stored) if stored else b""
            if len(data) < stored:
                return state
            h = blake3.blake3(head[:_HASHED.size])
            h.update(data)
            if h.digest() != digest:
                state.torn = True
                return state
            pos += RECORD_HEADER.size + len(data)
            if kind == KIND_COMMIT:
                state.records.extend(batch)
                state.end, batch = pos, []
            else:
                batch.append(Record(kind, disk, offset, length, time_us, path, pos - len(data), digest,
                                    magic == MAGIC_SEALED))


def _stored_len(magic: bytes, kind: int, length: int) -> int:
    """The bytes of data a record's header is followed by."""
    if kind != KIND_WRITE:
        return 0
    return length + SEAL_OVERHEAD if magic == MAGIC_SEALED else length


def read_data(record: Record, sealer=None) -> bytes:
    """A record's bytes, verified again against its hash (zeros for a zero
    record); a sealed one opened by `sealer` (the repository's
    keys.journal). A record that no longer verifies is a ChunkError: the
    read fails, never guesses."""
    if record.kind == KIND_ZERO:
        return bytes(record.length)
    where = f"journal record at {record.data_pos} of {record.segment}"
    if record.sealed and sealer is None:
        raise ChunkError(f"{where} is sealed: the repository's key is needed to read it")
    stored = _stored_len(MAGIC_SEALED if record.sealed else MAGIC, record.kind, record.length)
    try:
        with open(record.segment, "rb") as f:
            f.seek(record.data_pos - RECORD_HEADER.size)
            head = f.read(RECORD_HEADER.size)
            data = f.read(stored)
    except OSError as e:
        raise ChunkError(f"journal segment {record.segment}: {e.strerror or e}") from e
    h = blake3.blake3(head[:_HASHED.size])
    h.update(data)
    if len(data) != stored or h.digest() != record.digest:
        raise ChunkError(f"{where} does not verify")
    if record.sealed:
        data = sealer.open(head[:_HASHED.size], data, where)
        if len(data) != record.length:
            raise ChunkError(f"{where} opens to {len(data)} bytes, not {record.length}")
    return data


class RecordCache:
    """The data of the records read last, verified: consecutive blocks of a
    fold or a read through the mount use the same record (up to 1 MiB)."""

    def __init__(self, size: int = 32, sealer=None):
        self._size = size
        self._sealer = sealer   # an encrypted repository's keys.journal
        self._data: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: Record) -> bytes:
        key = (record.segment, record.data_pos)
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                return data
        data = read_data(record, self._sealer)
        with self._lock:
            self._data[key] = data
            if len(self._data) > self._size:
                self._data.popitem(last=False)
        return data


def apply(buf: bytearray, start: int, record: Record, cache: RecordCache) -> None:
    """Apply a record to buf, which holds the bytes from `start` on."""
    lo, hi = max(record.offset, start), min(record.end, start + len(buf))
    if lo >= hi:
        return
    if record.kind == KIND_ZERO:
        buf[lo - start:hi - start] = bytes(hi - lo)
    else:
        buf[lo - start:hi - start] = cache.get(record)[lo - record.offset:hi - record.offset]


# -- where a session's journal lives, and reading it whole ----------------------

JOURNAL_DIR = "journal"


def journal_dir(repo_path: str, session: ProtectionSession) -> str:
    return os.path.join(repo_path, JOURNAL_DIR, session.vm, session.directory_name)


def vm_journal_dir(repo_path: str, vm: str) -> str:
    return os.path.join(repo_path, JOURNAL_DIR, vm)


@dataclass
class JournalReader:
    """A session's journal, scanned (every record verified) on as it grows."""
    directory: str
    scans: dict

    damage: str = ""

    def records(self) -> list[Record]:
        """Every verified record, in order, up to the first damage: a record
        that does not verify anywhere but at the newest segment's end (where
        a crash leaves an unanswered batch torn) ends what can be read, and
        `damage` says where."""
        out = []
        paths = segments(self.directory)
        for i, path in enumerate(paths):
            found = self.scans[path] = scan(path, self.scans.get(path))
            out.extend(found.records)
            if i + 1 < len(paths) and (found.torn or found.end < _size(path)):
                self.damage = (f"journal segment {path} does not verify from byte {found.end} on: "
                               f"the journal reads up to its last record before that")
                break
        return out

    def torn_tail(self) -> str:
        """Where the newest segment stops verifying, if it does: a crash's
        unanswered batch when the server died, damage while it runs (it
        writes each batch whole)."""
        paths = segments(self.directory)
        scan = self.scans.get(paths[-1]) if paths else None
        return f"journal segment {paths[-1]} does not verify from byte {scan.end} on" if scan and scan.torn else ""

    def newest(self) -> int:
        """The newest record's time as last scanned (0: none)."""
        found = [s.records[-1].time_us for s in self.scans.values() if s.records]
        return max(found, default=0)

    def size(self) -> int:
        """Bytes of journal on disk."""
        total = 0
        for path in segments(self.directory):
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
        return total


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def reader(repo_path: str, session: ProtectionSession) -> JournalReader:
    """A reader of a protection session's journal."""
    return JournalReader(journal_dir(repo_path, session), {})
