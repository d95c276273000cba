"""Continuous protection's write journal as bytes and files, without a
server or libvirt: segment files written by hand and scanned as they grow,
cut short and damaged (rpofs.store.journal), and the server's writer
(rpofs.protect.server.JournalWriter) driven by hand under a clock that goes
back. Only temporary files. The journal server as a process, spoken to
with libnbd, is test_protect_server's.
"""

import os
import random
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpofs.errors import ChunkError
from rpofs.store import journal as rec
from rpofs.protect import server as srv

pytestmark = pytest.mark.pure

T0 = 1_700_000_000_000_000
W, Z = rec.KIND_WRITE, rec.KIND_ZERO
H = rec.RECORD_HEADER.size


# -- segments written by hand --------------------------------------------------------

@dataclass
class Op:
    kind: int
    disk: int
    offset: int
    length: int
    time_us: int
    data: bytes = b""

    def key(self):
        return (self.kind, self.disk, self.offset, self.length, self.time_us)


def encode_batch(ops: list[Op]) -> bytes:
    """One batch as the server writes it: its records, then the commit mark
    carrying the batch's newest time."""
    out = [rec.encode(o.kind, o.disk, o.offset, o.data, o.time_us, None if o.kind == W else o.length)
           for o in ops]
    out.append(rec.encode(rec.KIND_COMMIT, 0, 0, b"", max(o.time_us for o in ops)))
    return b"".join(out)


def make_batches(rnd: random.Random, shapes: list[list[tuple]]) -> list[list[Op]]:
    """Batches from (kind, disk, offset, length) shapes, with times as the
    server gives them: non-decreasing inside a batch, every batch later than
    the one before."""
    t = T0
    out = []
    for shape in shapes:
        batch = []
        for kind, disk, offset, length in shape:
            t += rnd.choice([0, 0, 1, 7, 1000])
            data = rnd.randbytes(length) if kind == W else b""
            batch.append(Op(kind, disk, offset, length, t, data))
        out.append(batch)
        t += 1 + rnd.randrange(3)
    return out


def layout(batches: list[list[Op]]) -> tuple[bytes, list[int]]:
    """The segment's bytes and where each batch ends in it."""
    blob, ends = b"", []
    for b in batches:
        blob += encode_batch(b)
        ends.append(len(blob))
    return blob, ends


def expected(batches: list[list[Op]], n: int) -> list[tuple]:
    return [o.key() for b in batches[:n] for o in b]


def keys(scan: rec.Scan) -> list[tuple]:
    return [(r.kind, r.disk, r.offset, r.length, r.time_us) for r in scan.records]


def check_data(scan: rec.Scan, batches: list[list[Op]]) -> None:
    ops = [o for b in batches for o in b]
    for r, o in zip(scan.records, ops):
        assert rec.read_data(r) == (o.data if o.kind == W else bytes(o.length))


shape = st.tuples(st.sampled_from([W, W, Z]), st.integers(0, 3), st.integers(0, 1 << 40), st.integers(1, 600))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.lists(shape, min_size=1, max_size=4), min_size=1, max_size=6),
       cuts=st.lists(st.floats(0, 1), max_size=12), seed=st.integers(0, 2**32))
def test_a_growing_segment_yields_only_whole_batches(tmp_path_factory, shapes, cuts, seed):
    """A segment appended in arbitrary pieces (as write() lands while a scan
    reads) and scanned on from Scan.end after each piece: every scan holds
    exactly the batches whose commit mark is in, never part of one; a short
    tail is not damage (torn stays False)."""
    rnd = random.Random(seed)
    batches = make_batches(rnd, shapes)
    blob, ends = layout(batches)
    path = str(tmp_path_factory.mktemp("seg") / rec.segment_name(T0))
    state = rec.scan(path)  # the file does not exist yet
    assert state.records == [] and state.end == 0 and not state.torn
    points = sorted({int(c * len(blob)) for c in cuts} | {len(blob)})
    written = 0
    with open(path, "wb") as f:
        for p in points:
            f.write(blob[written:p])
            f.flush()
            written = p
            state = rec.scan(path, state)
            whole = sum(1 for e in ends if e <= written)
            assert keys(state) == expected(batches, whole)
            assert state.end == (ends[whole - 1] if whole else 0) and not state.torn
            fresh = rec.scan(path)  # a scan from the start agrees with the incremental one
            assert keys(fresh) == keys(state) and fresh.end == state.end
    assert state.end == len(blob)
    check_data(state, batches)


def test_a_batch_is_taken_only_at_its_commit_mark(tmp_path):
    rnd = random.Random(1)
    b1, b2 = make_batches(rnd, [[(W, 0, 0, 100), (Z, 1, 4096, 1 << 20)], [(W, 0, 50, 10), (W, 1, 7, 3)]])
    path = str(tmp_path / rec.segment_name(T0))
    whole1 = encode_batch(b1)
    body2 = encode_batch(b2)[:-H]  # b2's records without its mark: being written
    mark2 = encode_batch(b2)[-H:]
    with open(path, "wb") as f:
        f.write(whole1[:-H])
    state = rec.scan(path)
    assert state.records == [] and state.end == 0 and not state.torn
    with open(path, "ab") as f:
        f.write(whole1[-H:])
    state = rec.scan(path, state)
    assert keys(state) == expected([b1], 1) and state.end == len(whole1)
    with open(path, "ab") as f:
        f.write(body2)
    state = rec.scan(path, state)
    assert keys(state) == expected([b1], 1) and state.end == len(whole1) and not state.torn
    with open(path, "ab") as f:
        f.write(mark2)
    state = rec.scan(path, state)
    assert keys(state) == expected([b1, b2], 2) and state.end == os.path.getsize(path)
    check_data(state, [b1, b2])
    again = rec.scan(path, state)  # nothing new: nothing added twice
    assert keys(again) == expected([b1, b2], 2)
    # the journal's order across batches: its records by time
    times = [o.time_us for o in b1 + b2]
    assert [r.time_us for r in state.records if times[0] < r.time_us <= times[2]] == \
        [t for t in times if times[0] < t <= times[2]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_tail_cut_at_every_byte_of_the_last_batch_keeps_the_earlier_batches(tmp_path, seed):
    rnd = random.Random(seed)
    batches = make_batches(rnd, [[(W, 0, 0, 200)], [(Z, 1, 1 << 30, 1 << 20), (W, 0, 9, 33)],
                                 [(W, 2, 65535, 257), (Z, 0, 3, 5), (W, 1, 0, 1)]])
    blob, ends = layout(batches)
    path = str(tmp_path / rec.segment_name(T0))
    for cut in range(ends[-2], len(blob) + 1):
        with open(path, "wb") as f:
            f.write(blob[:cut])
        s = rec.scan(path)
        whole = 3 if cut == len(blob) else 2
        assert keys(s) == expected(batches, whole), cut
        assert s.end == ends[whole - 1] and not s.torn, cut
    check_data(s, batches)


@pytest.mark.parametrize("seed", [4, 5])
def test_a_flipped_bit_stops_the_scan_at_its_record(tmp_path, seed):
    """Damage anywhere in a record (header, hash or data) ends the scan there:
    the batches before it are the journal, the damaged batch and all after
    it are not. The one damage a scan cannot tell from a tail still being
    written: a write record's length grown past the end of the file."""
    rnd = random.Random(seed)
    batches = make_batches(rnd, [[(W, 0, 0, 40), (Z, 1, 0, 4096)], [(W, 1, 100, 64), (W, 0, 3, 17)],
                                 [(Z, 0, 0, 65536)], [(W, 2, 5, 31)]])
    blob, ends = layout(batches)
    starts = [0] + ends[:-1]
    path = str(tmp_path / rec.segment_name(T0))
    for pos in range(len(blob)):
        for bit in sorted(rnd.sample(range(8), 2)):
            damaged = bytearray(blob)
            damaged[pos] ^= 1 << bit
            with open(path, "wb") as f:
                f.write(damaged)
            s = rec.scan(path)
            hit = max(i for i, st_ in enumerate(starts) if st_ <= pos)  # the batch damaged
            assert keys(s) == expected(batches, hit), (pos, bit)
            assert s.end == (ends[hit - 1] if hit else 0)
            # which record, and was its length field hit?
            at = starts[hit]
            ops = batches[hit] + [None]
            for o in ops:
                size = H + (o.length if o is not None and o.kind == W else 0)
                if pos < at + size:
                    break
                at += size
            in_length = at + 16 <= pos < at + 20
            if o is not None and o.kind == W and in_length:
                new_len = int.from_bytes(damaged[at + 16:at + 20], "big")
                runs_off = new_len <= rec.MAX_RECORD and at + H + new_len > len(blob)
                assert s.torn == (not runs_off), (pos, bit)
            else:
                assert s.torn, (pos, bit)


def test_read_data_verifies_again(tmp_path):
    rnd = random.Random(6)
    batches = make_batches(rnd, [[(W, 0, 10, 5000), (Z, 0, 0, 70000), (W, 1, 0, 3)]])
    path = str(tmp_path / rec.segment_name(T0))
    with open(path, "wb") as f:
        f.write(encode_batch(batches[0]))
    s = rec.scan(path)
    w, z, w2 = s.records
    assert rec.read_data(w) == batches[0][0].data
    assert rec.read_data(z) == bytes(70000)
    cache = rec.RecordCache(2)
    assert cache.get(w2) == batches[0][2].data
    # a data byte flipped after the scan: the read fails, never returns it
    with open(path, "r+b") as f:
        f.seek(w.data_pos + 4999)
        last = f.read(1)
        f.seek(w.data_pos + 4999)
        f.write(bytes([last[0] ^ 0x10]))
    with pytest.raises(ChunkError):
        rec.read_data(w)
    buf = bytearray(b"\xaa" * 8000)
    with pytest.raises(ChunkError):
        rec.apply(buf, 0, w, rec.RecordCache())
    # its header damaged: the same
    with open(path, "r+b") as f:
        f.seek(w.data_pos + 4999)
        f.write(last)
    assert rec.read_data(w) == batches[0][0].data
    with open(path, "r+b") as f:
        f.seek(w.data_pos - H + 20)  # time_us
        f.write(b"\xff")
    with pytest.raises(ChunkError):
        rec.read_data(w)
    # the segment cut short or gone: ChunkError too
    with open(path, "r+b") as f:
        f.truncate(w.data_pos + 100)
    with pytest.raises(ChunkError):
        rec.read_data(w)
    os.unlink(path)
    with pytest.raises(ChunkError):
        rec.read_data(w2)
    # a zero record reads as zeros (it has no data to lose); the cache still has w2
    assert rec.read_data(rec.Record(Z, 0, 0, 70000, 1, path, 0, b"")) == bytes(70000)
    assert cache.get(w2) == batches[0][2].data
    buf = bytearray(b"\x01" * 100)
    rec.apply(buf, 1000, rec.Record(Z, 0, 1050, 70000, 1, path, 0, b""), cache)
    assert buf == b"\x01" * 50 + bytes(50)


def test_max_record(tmp_path):
    with pytest.raises(AssertionError):
        rec.encode(W, 0, 0, bytes(rec.MAX_RECORD + 1), T0)
    with pytest.raises(AssertionError):
        rec.encode(W, 0, 0, b"", T0)
    with pytest.raises(AssertionError):
        rec.encode(Z, 0, 0, b"", T0, 0)
    big = os.urandom(rec.MAX_RECORD)
    path = str(tmp_path / rec.segment_name(T0))
    good = rec.encode(W, 0, 0, big, T0) + rec.encode(rec.KIND_COMMIT, 0, 0, b"", T0)
    # a record claiming more than MAX_RECORD of data, its hash right: never taken
    head = rec._HASHED.pack(rec.MAGIC, W, 0, 0, 0, rec.MAX_RECORD + 1, T0 + 1)
    data = bytes(rec.MAX_RECORD + 1)
    import blake3
    h = blake3.blake3(head)
    h.update(data)
    over = head + h.digest() + data + rec.encode(rec.KIND_COMMIT, 0, 0, b"", T0 + 1)
    with open(path, "wb") as f:
        f.write(good + over)
    s = rec.scan(path)
    assert [r.length for r in s.records] == [rec.MAX_RECORD] and s.torn and s.end == len(good)
    assert rec.read_data(s.records[0]) == big


def test_segment_names_sort_by_time(tmp_path):
    times = [T0 + 5, T0, T0 + (1 << 20), 1, 0xFFFF_FFFF_FFFF]
    for t in times:
        open(tmp_path / rec.segment_name(t), "wb").close()
    open(tmp_path / "server.log", "wb").close()
    found = rec.segments(str(tmp_path))
    assert [rec.segment_start(os.path.basename(p)) for p in found] == sorted(times)
    assert rec.segments(str(tmp_path / "none")) == []


# -- the server's writer, under a clock that goes back ----------------------------

def raw_batches(path: str) -> list[tuple[list[tuple], int]]:
    """(records, the commit mark's time) of each committed batch of a
    segment, parsed here without rec.scan: the server's group commit as it
    wrote it."""
    with open(path, "rb") as f:
        data = f.read()
    pos, out, current = 0, [], []
    while pos + H <= len(data):
        magic, kind, disk, _, offset, length, t, _ = rec.RECORD_HEADER.unpack_from(data, pos)
        assert magic == rec.MAGIC
        n = length if kind == W else 0
        if pos + H + n > len(data):
            break
        if kind == rec.KIND_COMMIT:
            out.append((current, t))
            current = []
        else:
            current.append((kind, disk, offset, length, t))
        pos += H + n
    return out


def journal_under_a_clock(tmp_path, monkeypatch):
    """The server's Journal driven by hand under a clock that goes back:
    two writes taken in together, two more while their commit runs (held
    until they are in); every batch in a segment of its own
    (SEGMENT_BYTES 1). The segments' paths."""
    import trio

    clock = iter([1000, 900, 500, 2000])
    monkeypatch.setattr(srv, "now_us", lambda: next(clock))
    monkeypatch.setattr(srv, "SEGMENT_BYTES", 1)
    monkeypatch.setattr(srv, "INLINE_BATCH", 0)  # commits on a worker thread: the loop takes in meanwhile
    release = threading.Event()
    original = srv.JournalWriter._write_durably

    started = threading.Event()

    def held(self, batch, batch_us):
        started.set()
        release.wait(10)
        return original(self, batch, batch_us)

    monkeypatch.setattr(srv.JournalWriter, "_write_durably", held)
    directory = str(tmp_path / "j")

    async def main():
        journal = srv.JournalWriter(directory)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.run_commits)
            first = [journal.take(W, 0, 0, b"a", 1), journal.take(Z, 1, 10, b"", 5)]
            await trio.to_thread.run_sync(started.wait, 10)   # the commit of those two has started, and is held
            third = journal.take(W, 0, 2, b"c", 1)
            fourth = journal.take(W, 0, 3, b"d", 1)
            release.set()
            for e in first:
                await e.wait()
            await third.wait()
            await fourth.wait()
            assert journal.failed is None
            nursery.cancel_scope.cancel()

    trio.run(main)
    return rec.segments(directory)


def test_batch_times_never_go_back_whatever_the_clock_does(tmp_path, monkeypatch):
    paths = journal_under_a_clock(tmp_path, monkeypatch)
    batches = [b for p in paths for b in raw_batches(p)]
    assert [[r[4] for r in b] for b, _ in batches] == [[1000, 1000], [1001, 2000]]
    assert [mark for _, mark in batches] == [1000, 2000]
    assert len(paths) == 2
    # what drop_journal counts on: a segment's records are older than the next segment's name
    first = rec.scan(paths[0]).records
    assert max(r.time_us for r in first) < rec.segment_start(os.path.basename(paths[1]))


def test_a_segment_name_is_the_first_time_it_holds(tmp_path, monkeypatch):
    for path in journal_under_a_clock(tmp_path, monkeypatch):
        start = rec.segment_start(os.path.basename(path))
        assert all(r.time_us >= start for r in rec.scan(path).records), path
