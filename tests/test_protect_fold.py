"""Folding continuous protection's journal into points, reading instants
between them, and retention of both, without libvirt: a real repository
(LMDB, pack files) in a temporary directory, a protection session, and its
journal's segment files written by hand as the journal server writes them
(rpofs.store.journal: batches ending in a commit mark, every batch later
than the one before, a segment named by its first batch's time).

A model keeps every write in journal order: a point must read as the disks
after every record up to its time, an instant T as the disks after every
record up to T, and an instant that cannot be read (its base fold pruned,
the records it needs dropped) must say so, never read other bytes."""

import bisect
import os
import random
import uuid
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rpofs.errors import RpofsError
from rpofs.store import journal as rec, protection
from rpofs.protect.fold import FoldInput, fold, uncovered
from rpofs.protect.protector import drop_journal
from rpofs.store.journal import JournalReader
from rpofs.protect.view import JournalViews
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, DiskRecord, ProtectionSession

pytestmark = pytest.mark.lmdb

VM = str(uuid.UUID(int=0x5E55))
US = 1_000_000
HOUR = 3600 * US
T0 = 1_750_000_000 * US
XML = "<domain><name>m</name></domain>"
WHAT = FoldInput(VM, "m", XML, "", "")


@dataclass
class Rec:
    """One record as the model knows it (segment None: a write the journal
    did not see, between two sessions)."""
    time: int
    disk: int
    offset: int
    length: int
    data: bytes | None   # None: zeros
    segment: str | None

    @property
    def end(self) -> int:
        return self.offset + self.length


class Model:
    """Every write in the order it happened (the journals' records and the
    writes between sessions), and the disks they make at any instant."""

    def __init__(self, sizes: list[int], rnd: random.Random):
        self.sizes = sizes
        self.rnd = rnd
        self.recs: list[Rec] = []
        self.mark = T0           # the newest batch's time: the next is later
        self.directory = None    # the current session's journal
        self.segment = None      # the segment being appended
        self.segments: list[str] = []

    def new_journal(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self.segment = directory, None

    def batch(self, writes: list[tuple], gap: int = 0, new_segment: bool = False) -> int:
        """Append one batch (writes: (disk, offset, length, data or None)) as
        the server does: its records' times from the last batch's + 1 + gap
        on, never going back; a write above MAX_RECORD in several records
        with one time; a new segment named by the batch's time. The batch's
        time (its commit mark's)."""
        t = self.mark + 1 + gap
        blob, made = [], []
        for disk, offset, length, data in writes:
            t += self.rnd.choice([0, 0, 1, 5, 250])
            for i in range(0, length, rec.MAX_RECORD):
                n = min(rec.MAX_RECORD, length - i)
                piece = None if data is None else data[i:i + n]
                made.append(Rec(t, disk, offset + i, n, piece, ""))
                blob.append(rec.encode(rec.KIND_WRITE, disk, offset + i, piece, t) if piece is not None
                            else rec.encode(rec.KIND_ZERO, disk, offset + i, b"", t, n))
        blob.append(rec.encode(rec.KIND_COMMIT, 0, 0, b"", t))
        if self.segment is None or new_segment:
            self.segment = os.path.join(self.directory, rec.segment_name(t))
            self.segments.append(self.segment)
        with open(self.segment, "ab") as f:
            f.write(b"".join(blob))
        for r in made:
            r.segment = self.segment
        self.recs += made
        self.mark = t
        return t

    def unjournaled(self, writes: list[tuple], gap: int) -> int:
        """Writes no journal saw (the VM ran unprotected): in the model only."""
        t = self.mark + 1 + gap
        for disk, offset, length, data in writes:
            self.recs.append(Rec(t, disk, offset, length, data, None))
        self.mark = t
        return t

    def state(self, t: int) -> list[bytes]:
        disks = [bytearray(n) for n in self.sizes]
        for r in self.recs:
            if r.time > t:
                break
            disks[r.disk][r.offset:r.offset + r.length] = r.data if r.data is not None else bytes(r.length)
        return [bytes(d) for d in disks]

    def of(self, directory: str) -> list[Rec]:
        """The records of one session's journal (on disk or not)."""
        return [r for r in self.recs if r.segment and os.path.dirname(r.segment) == directory]

    def present(self) -> list[Rec]:
        return [r for r in self.recs if r.segment and os.path.exists(r.segment)]

    def gone(self) -> list[Rec]:
        return [r for r in self.recs if r.segment and not os.path.exists(r.segment)]

    def random_write(self) -> tuple:
        """Anywhere, any length: unaligned, across 64 KiB blocks, up to a disk's odd end."""
        rnd = self.rnd
        disk = rnd.randrange(len(self.sizes))
        size = self.sizes[disk]
        length = min(size, rnd.choice([1, 7, 512, 4096, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE - 5,
                                       rnd.randrange(1, 3 * BLOCK_SIZE)]))
        where = rnd.choice(["any", "boundary", "end"])
        if where == "boundary":  # straddling a 64 KiB block boundary
            offset = rnd.randrange(1, size // BLOCK_SIZE + 2) * BLOCK_SIZE - rnd.randrange(1, max(2, length))
        elif where == "end":
            offset = size - length
        else:
            offset = rnd.randrange(0, size)
        offset = max(0, min(offset, size - length))
        kind = rnd.choice(["data", "data", "zeros", "zero record"])
        data = rnd.randbytes(length) if kind == "data" else bytes(length) if kind == "zeros" else None
        return disk, offset, length, data

    def first_pass(self, batches: int, guest_writes: int) -> tuple[int, list[int]]:
        """The mirror's first pass: every byte of every disk written once,
        in pieces in any order (data, zeros as data, zero records), over
        `batches` batches with the guest's writes among them. (The time it
        is complete at, the batches' times.)"""
        rnd = self.rnd
        pieces = []
        for disk, size in enumerate(self.sizes):
            cuts = sorted({0, size} | {rnd.randrange(1, size) for _ in range(rnd.randrange(0, 5))})
            for lo, hi in zip(cuts, cuts[1:]):
                kind = rnd.choice(["data", "data", "zeros", "zero record"])
                data = rnd.randbytes(hi - lo) if kind == "data" else bytes(hi - lo) if kind == "zeros" else None
                pieces.append((disk, lo, hi - lo, data))
        pieces += [self.random_write() for _ in range(guest_writes)]
        rnd.shuffle(pieces)
        bounds = sorted(rnd.sample(range(1, len(pieces)), min(batches, len(pieces)) - 1)) if len(pieces) > 1 else []
        times = []
        for lo, hi in zip([0] + bounds, bounds + [len(pieces)]):
            times.append(self.batch(pieces[lo:hi], gap=rnd.choice([0, 10, US]), new_segment=rnd.random() < 0.3))
        return times[-1], times

    def covered(self, until: int) -> bool:
        """Whether the current journal's records up to until write every byte of every disk."""
        seen = [bytearray(n) for n in self.sizes]
        for r in self.recs:
            if r.time <= until and r.segment and os.path.dirname(r.segment) == self.directory:
                seen[r.disk][r.offset:r.offset + r.length] = b"\x01" * r.length
        return all(all(s) for s in seen)


def session_now(repo) -> ProtectionSession:
    return protection.of_vm(repo, VM)[-1]


def do_fold(repo, model: Model, until: int, parent, session: ProtectionSession, **changes):
    """A fold as the protector makes one: the journal scanned, the session's
    progress committed with the point."""
    after = replace(session, folded_us=until, **changes)
    journal = JournalReader(model.directory, {}).records()
    point = fold(repo, session if parent is None else after, journal, until, parent, WHAT,
                 also=lambda txn, record: protection.put(repo, txn, after))
    low = parent.time_us if parent is not None else -1
    assert point.time_us == until and point.origin == "journal"
    assert point.kind == ("full" if parent is None else "log")
    assert point.stats["journal"]["session"] == session.started_us
    assert point.stats["journal"]["records"] == sum(
        1 for r in model.of(model.directory) if low < r.time <= until)
    return point


def repair_backup(repo, model: Model, parent, time_us: int):
    """What the ingester takes after a session ended: a log of every block
    written since its parent (a libvirt backup's, origin ""; the checkpoint's
    bitmap has the writes the journal missed and those it has but were not
    folded)."""
    state = model.state(time_us)
    with repo.begin_writer() as w:
        for disk in range(len(model.sizes)):
            blocks = sorted({b for r in model.recs if r.disk == disk and parent.time_us < r.time <= time_us
                             for b in range(r.offset // BLOCK_SIZE, (r.end - 1) // BLOCK_SIZE + 1)})
            for b in blocks:
                w.put_log_block(disk, b, state[disk][b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
        xml, _ = w.put_chunk(XML.encode())
        return w.commit(vm=VM, vm_name="m", time_us=time_us, parent=parent, consistency="crash-consistent",
                        disks=list(parent.disks), checkpoint="", domain_xml=xml.hex())


class Oracle:
    """Which instants the views must read, from the sessions, the points
    kept and the records still on disk."""

    def __init__(self, repo, model: Model):
        self.model = model
        self.sessions = protection.of_vm(repo, VM)
        self.points = repo.points(VM)
        self.times = [p.time_us for p in self.points]
        self.present = {}   # session started_us -> its records on disk
        for s in self.sessions:
            self.present[s.started_us] = [r for r in model.of(rec.journal_dir(repo.path, s))
                                          if os.path.exists(r.segment)]

    def until(self, s: ProtectionSession) -> int | None:
        found = self.present[s.started_us]
        if not found:
            return None
        return min(found[-1].time, s.last_us) if s.state == "ended" else found[-1].time

    def base(self, t: int):
        i = bisect.bisect_right(self.times, t)
        return self.points[i - 1] if i else None

    def readable(self, t: int):
        """(session, base point) when instant t must read; else None."""
        for s in self.sessions:
            until = self.until(s)
            if s.ready_us and until is not None and s.ready_us <= t <= until:
                base = self.base(t)
                if base is not None and base.stats.get("journal", {}).get("session") == s.started_us \
                        and base.time_us >= s.journal_from_us:
                    return s, base
                return None
        return None


def check(repo, model: Model, views_of: JournalViews, made: dict, rnd: random.Random) -> None:
    """Every kept point reads as the model at its time; every instant asked
    reads as the model at it, or is refused exactly when it must be; the
    instants listed and found by name are the readable ones."""
    oracle = Oracle(repo, model)
    points = oracle.points
    assert {p.point for p in points} <= set(made)
    for p in points:
        assert made[p.point] == p.time_us
        want = model.state(p.time_us)
        for i, d in enumerate(p.disks):
            assert DiskReader(repo, p, d.target).read(0, model.sizes[i]) == want[i], (p.point, d.target)

    views = views_of.refresh(VM)
    gone = model.gone()
    journaled = [r.time for r in model.recs if r.segment]
    asked = set(rnd.sample(journaled, min(8, len(journaled))))
    for s in oracle.sessions:
        if s.ready_us:
            asked |= {s.ready_us - 1, s.ready_us, rnd.randint(s.ready_us, model.mark)}
        until = oracle.until(s)
        if until is not None:
            asked |= {until, until + 1, rnd.randint(s.ready_us or until, until)}
    asked |= {t + d for t in oracle.times for d in (-1, 0, 1)}
    for t in sorted(asked):
        found = views_of.base(views, points, t)
        expect = oracle.readable(t)
        if expect is None:
            assert found is None, (t, found and found[1])
            if oracle.base(t) is not None and any(s.ready_us and s.ready_us <= t <= (oracle.until(s) or 0)
                                                  for s in oracle.sessions):
                event("an instant refused: its base fold pruned, or older than the records kept")
            continue
        s, base = expect
        assert found is not None, (t, base, s)
        view, got = found
        assert view.session.started_us == s.started_us and got.point == base.point
        assert not [r for r in gone if base.time_us < r.time <= t]  # never across a record that is gone
        newest_fold = max((made[p] for p in made if made[p] <= t), default=None)
        event("an instant read" + (" across pruned folds" if base.time_us != newest_fold else ""))
        want = model.state(t)
        for d, disk in enumerate(s.disks):
            reader = views_of.reader(view, got, t, disk.target)
            assert bytes(reader.read(0, model.sizes[d])) == want[d], (t, disk.target)
            off = rnd.randrange(model.sizes[d])
            n = rnd.choice([1, 4095, BLOCK_SIZE + 3, 3 * BLOCK_SIZE])
            assert bytes(reader.read(off, n)) == want[d][off:off + n]
    # the instants listed: per session and spacing, the newest readable record that is not a point's time
    readable_records = sorted({r.time for rs in oracle.present.values() for r in rs
                               if oracle.readable(r.time) is not None})
    for spacing in (1, 1000, US, HOUR):
        windows = {}
        for t in readable_records:
            if t not in oracle.times:
                key = (oracle.readable(t)[0].started_us, t // spacing)
                windows[key] = max(windows.get(key, t), t)
        assert views_of.instants(views, points, spacing) == sorted(set(windows.values())), spacing
    # found by name: the newest readable record at or before a bound
    bounds = [t + d for t in rnd.sample(journaled, min(5, len(journaled))) for d in (-1, 0, 1)]
    for bound in bounds + [model.mark + 5]:
        i = bisect.bisect_right(readable_records, bound)
        assert views_of.change_at_or_before(views, points, bound) == (readable_records[i - 1] if i else None), bound


def drop(repo, model: Model, keep_within_us: int, now: int) -> None:
    """drop_journal on every session of the VM (as the ingester does), and
    what it must and must not have done."""
    for session in protection.of_vm(repo, VM):
        directory = rec.journal_dir(repo.path, session)
        mine = [p for p in model.segments if os.path.dirname(p) == directory]
        sizes = {p: os.path.getsize(p) for p in mine if os.path.exists(p)}
        before = [p for p in mine if p in sizes]
        freed = drop_journal(repo, session, keep_within_us, now)
        after = {p for p in mine if os.path.exists(p)}
        dropped = [p for p in before if p not in after]
        assert freed == sum(sizes[p] for p in dropped)
        assert before[:len(dropped)] == dropped            # oldest first: the journal stays a suffix
        if dropped:
            event("segments dropped" + (", all" if not after else ""))
        if session.state != "ended" and before:
            assert before[-1] in after                      # the segment being written stays
        saved = next(s for s in protection.of_vm(repo, VM) if s.started_us == session.started_us)
        horizon = min(session.folded_us if session.state != "ended" else session.last_us, now - keep_within_us)
        for r in model.of(directory):
            if r.segment in sizes and r.time > horizon:     # not folded, or young: kept
                assert os.path.exists(r.segment), (r.time, horizon)
        lost = [r.time for r in model.of(directory) if not os.path.exists(r.segment)]
        if lost:
            assert saved.journal_from_us >= max(lost)
        assert saved.journal_from_us >= session.journal_from_us
        assert replace(saved, journal_from_us=0) == replace(session, journal_from_us=0)


SIZES = [[262144], [196608, 200_000], [200_000, 1_100_003], [65536 * 3 + 1]]
GAPS = [0, 3, 999, US, 10 * 60 * US, HOUR]
tick = st.tuples(st.just("tick"), st.integers(1, 3), st.sampled_from(GAPS), st.booleans())  # a batch, then a fold
op = st.one_of(
    st.tuples(st.just("batch"), st.integers(1, 4), st.sampled_from(GAPS), st.booleans()),
    tick,
    tick,
    st.tuples(st.just("fold"), st.floats(0, 1), st.booleans(), st.booleans()),
    st.tuples(st.just("prune"), st.integers(1, 3), st.sampled_from([0, 0, 0, 1, 2]), st.sampled_from([0, 0, 0, 1, 3])),
    st.tuples(st.just("drop"), st.sampled_from([0, 1, 1000, US, HOUR, 100 * HOUR]),
              st.sampled_from([0, 1, US, HOUR])),
    st.tuples(st.just("check")),
)
session_plan = st.tuples(st.integers(1, 3), st.integers(0, 4), st.booleans(), st.lists(op, min_size=3, max_size=14))


def start(repo, model: Model, started: int, plan, made: dict, views_of, rnd):
    """A session: saved, its first pass journaled (a fold tried before it is
    complete is refused), folded into a full, then its ops."""
    first_batches, guest, early, ops = plan
    disks = tuple(DiskRecord(f"vd{chr(97 + i)}", n) for i, n in enumerate(model.sizes))
    session = protection.save(repo, ProtectionSession(VM, started, disks))
    model.new_journal(rec.journal_dir(repo.path, session))
    ready, times = model.first_pass(first_batches, guest)
    if early:  # a fold before the first pass is complete: refused while a byte is missing
        t = rnd.choice([times[0], rnd.randint(started, ready - 1)])
        if not model.covered(t):
            count = len(repo.points(VM))
            with pytest.raises(RpofsError):
                fold(repo, session, JournalReader(model.directory, {}).records(), t, None, WHAT)
            assert len(repo.points(VM)) == count
            event("a first fold refused: the first pass not complete")
    assert model.covered(ready)
    full = do_fold(repo, model, ready, None, session, state="protected", ready_us=ready)
    made[full.point] = ready
    check(repo, model, views_of, made, rnd)
    for o in ops:
        if o[0] in ("batch", "tick"):
            _, n, gap, new_segment = o
            model.batch([model.random_write() for _ in range(n)], gap, new_segment)
        if o[0] in ("fold", "tick"):
            _, where, newest, between = o if o[0] == "fold" else (o, 1.0, True, False)
            parent = next(repo.newest_points(VM))
            later = sorted({r.time for r in model.of(model.directory) if r.time > parent.time_us})
            if not later:
                continue
            k = len(later) - 1 if newest else int(where * (len(later) - 1))
            until = later[k]
            if between and k + 1 < len(later) and later[k + 1] - until > 1:
                until += rnd.randrange(1, later[k + 1] - until)  # between two records
            point = do_fold(repo, model, until, parent, session_now(repo))
            made[point.point] = until
        if o[0] == "prune":
            policy = Retention(last=o[1], hourly=o[2], within_s=o[3] * 600.0)
            if policy.keeps_everything():
                continue
            if prune(repo, VM, policy).points_removed:
                event("folds pruned")
        elif o[0] == "drop":
            drop(repo, model, o[1], model.mark + o[2])
        if o[0] in ("prune", "drop", "check"):
            check(repo, model, views_of, made, rnd)


def end(repo, model: Model, made: dict, fold_fails: bool) -> None:
    """As protector.end: what the journal holds since the last fold folded
    (or, when that fold fails, the session readable only up to its last
    fold), the session recorded as ended."""
    s = session_now(repo)
    parent = next(repo.newest_points(VM))
    mine = model.of(model.directory)
    newest = mine[-1].time
    ended = dict(state="ended", ended_us=model.mark + 1, reason="test", last_us=newest)
    if fold_fails:
        protection.save(repo, replace(s, **dict(ended, last_us=s.folded_us)))
    elif newest > parent.time_us:
        point = do_fold(repo, model, newest, parent, s, **ended)
        made[point.point] = newest
    else:
        protection.save(repo, replace(s, **ended))


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(sizes=st.sampled_from(SIZES), first=session_plan, ending=st.sampled_from(["no", "ends", "fold fails"]),
       second=st.none() | st.tuples(session_plan, st.integers(0, 3), st.booleans()), seed=st.integers(0, 2**32))
def test_folds_instants_and_retention_agree_with_the_model(tmp_path_factory, sizes, first, ending, second, seed):
    """One session (or two, one after the other, with writes no journal saw
    between them and maybe the backup that takes them): its folds, its
    instants, retention of points (prune) and of the journal (drop_journal)
    at random, all read against the model."""
    rnd = random.Random(seed)
    repo = Repository.init(str(tmp_path_factory.mktemp("repo")))
    try:
        model = Model(sizes, rnd)
        views_of = JournalViews(repo)   # one for the whole run, scanned on, as a mount's
        made = {}
        start(repo, model, T0 - 5 * US, first, made, views_of, rnd)
        if ending != "no" or second is not None:
            end(repo, model, made, ending == "fold fails")
            check(repo, model, views_of, made, rnd)
        if second is not None:
            plan, between, repair = second
            writes = [model.random_write() for _ in range(between)]
            t = model.unjournaled(writes, rnd.choice([1, US, HOUR]))
            if repair and writes:  # the backup the ingester takes at once after an end
                point = repair_backup(repo, model, next(repo.newest_points(VM)), t)
                made[point.point] = t
                event("a repair backup between sessions")
            model.mark += rnd.choice([1, US])
            start(repo, model, model.mark, plan, made, views_of, rnd)
            if ending != "no":
                end(repo, model, made, False)
            event("two sessions")
        check(repo, model, views_of, made, rnd)
        drop(repo, model, rnd.choice([0, HOUR]), model.mark + rnd.choice([1, 2 * HOUR]))
        check(repo, model, views_of, made, rnd)
        check(repo, model, JournalViews(repo), made, rnd)   # a mount started afresh agrees
    finally:
        repo.close()


# -- the first pass, and what a fold refuses ----------------------------------------

def hand_journal(repo, session, batches):
    """batches: lists of (disk, offset, length, data or None)."""
    model = Model([d.size for d in session.disks], random.Random(0))
    model.new_journal(rec.journal_dir(repo.path, session))
    for b in batches:
        model.batch(b)
    return model


@pytest.mark.parametrize("gap", ["first byte", "last byte", "middle", "second disk", "none"])
def test_a_first_pass_that_leaves_a_gap_is_refused(tmp_path, gap):
    sizes = [200_000, 3 * BLOCK_SIZE]
    repo = Repository.init(str(tmp_path / "r"))
    try:
        session = protection.save(repo, ProtectionSession(
            VM, T0, (DiskRecord("vda", sizes[0]), DiskRecord("vdb", sizes[1]))))
        rnd = random.Random(3)
        a = rnd.randbytes(sizes[0])
        pieces = {
            "first byte": [(0, 1, sizes[0] - 1)],
            "last byte": [(0, 0, sizes[0] - 1)],
            "middle": [(0, 0, 70_000), (0, 70_001, sizes[0] - 70_001)],
            "second disk": [(0, 0, sizes[0])],
            "none": [(0, 150_000, 50_000), (0, 0, 100_000), (0, 99_999, 50_002)],  # overlapping, any order
        }[gap]
        batch = [(d, o, n, a[o:o + n]) for d, o, n in pieces]
        if gap != "second disk":
            batch.append((1, 0, sizes[1], None))
        model = hand_journal(repo, session, [batch[:1], batch[1:]] if len(batch) > 1 else [batch])
        journal = JournalReader(model.directory, {}).records()
        found = uncovered(journal, session.disks)
        if gap == "none":
            assert found == ""
            point = fold(repo, session, journal, model.mark, None, WHAT)
            assert DiskReader(repo, point, "vda").read(0, sizes[0]) == a
            assert DiskReader(repo, point, "vdb").read(0, sizes[1]) == bytes(sizes[1])
            return
        assert found
        with pytest.raises(RpofsError):
            fold(repo, session, journal, model.mark, None, WHAT)
        assert repo.points(VM) == []
        # the records up to an earlier instant miss even more
        assert uncovered([r for r in journal if r.time_us <= model.recs[0].time], session.disks)
    finally:
        repo.close()


def test_a_fold_refuses_records_beyond_a_disk_and_changed_disks(tmp_path):
    repo = Repository.init(str(tmp_path / "r"))
    try:
        session = protection.save(repo, ProtectionSession(VM, T0, (DiskRecord("vda", 100_000),)))
        model = hand_journal(repo, session, [[(0, 0, 100_000, None)]])
        full = fold(repo, session, JournalReader(model.directory, {}).records(), model.mark, None, WHAT)
        # a record past the disk's end (a journal that does not belong to these disks)
        model.batch([(0, 99_000, 1001, b"x" * 1001)])
        with pytest.raises(RpofsError):
            fold(repo, session, JournalReader(model.directory, {}).records(), model.mark, full, WHAT)
        assert [p.point for p in repo.points(VM)] == [full.point]
        # the disks changed since the parent
        bigger = replace(session, disks=(DiskRecord("vda", 200_000),))
        with pytest.raises(RpofsError):
            fold(repo, bigger, JournalReader(model.directory, {}).records(), model.mark, full, WHAT)
        assert [p.point for p in repo.points(VM)] == [full.point]
        assert DiskReader(repo, full, "vda").read(0, 100_000) == bytes(100_000)
    finally:
        repo.close()
