"""Continuous protection's journal server (rpofs.protect.server) run as its
own process, as protector.start_server runs it (or serve() on a thread of
this one), and spoken to with libnbd over its unix socket: what it answers
against the journal it wrote; killed, stopped, restarted, its disk full (a
1 MiB tmpfs mounted for the test: root) or hung. The level of test_faults,
which also kills processes and fills a tmpfs: no LMDB here, but the
repository's journal as the server writes it, no FUSE, no libvirt. The
journal's format alone is test_protect_records's.
"""

import contextlib
import errno
import os
import random
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from rpofs.store import journal as rec
from rpofs.protect import server as srv
from rpofs.timefmt import now_us
from test_protect_records import raw_batches

try:
    import nbd
except ImportError:  # Debian's python3-libnbd
    nbd = None

pytestmark = pytest.mark.lmdb

needs_nbd = pytest.mark.skipif(nbd is None, reason="libnbd's Python binding (python3-libnbd) is not installed")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, Z = rec.KIND_WRITE, rec.KIND_ZERO


class Server:
    """rpofs.protect.server as protector.start_server runs it: its own
    process, on a unix socket (in a short directory of its own: a unix
    socket's path is at most 107 bytes)."""

    def __init__(self, directory: str, exports: dict[str, int], log_path: str, master: bytes | None = None):
        self.directory = directory
        self.sockdir = tempfile.mkdtemp(prefix="rpj-")
        self.socket = os.path.join(self.sockdir, "s")
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        key_args, fds = [], ()
        if master is not None:  # as protector.start_server hands it over: a pipe
            r, w = os.pipe()
            os.write(w, master)
            os.close(w)
            key_args, fds = [f"--key-fd={r}"], (r,)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpofs.protect.server", directory, self.socket] + key_args
                + [f"{name}={size}" for name, size in exports.items()], pass_fds=fds,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=REPO_ROOT)
        for fd in fds:
            os.close(fd)
        deadline = time.monotonic() + 20
        while True:  # the socket file appears at bind(), before listen(): wait until it answers
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError), socketlib.socket(socketlib.AF_UNIX) as s:
                s.connect(self.socket)
                break
            assert time.monotonic() < deadline, "the journal server did not start"
            time.sleep(0.02)

    def connect(self, export: str, **opts) -> "nbd.NBD":
        h = nbd.NBD()
        if "flags" in opts:
            h.set_handshake_flags(opts["flags"])
        h.set_export_name(export)
        h.connect_unix(self.socket)
        return h

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def segments(self) -> list[str]:
        return rec.segments(self.directory)

    def records(self) -> list[rec.Record]:
        out = []
        for path in self.segments():
            s = rec.scan(path)
            assert not s.torn, path
            out.extend(s.records)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.sockdir, ignore_errors=True)


@contextlib.contextmanager
def running(directory, exports, log_path, master=None):
    s = Server(str(directory), exports, str(log_path), master)
    try:
        yield s
    finally:
        s.close()


@dataclass
class Write:
    disk: int
    offset: int
    length: int
    data: bytes | None    # None: a zeroing

    def records(self) -> list[tuple]:
        """What the journal must hold for it: a write in records of at most MAX_RECORD."""
        if self.data is None:
            return [(Z, self.disk, self.offset, self.length, bytes(self.length))]
        return [(W, self.disk, self.offset + i, min(rec.MAX_RECORD, self.length - i),
                 self.data[i:i + rec.MAX_RECORD]) for i in range(0, self.length, rec.MAX_RECORD)]


def wait_listening(sock: str, timeout_s: float = 10.0) -> None:
    """Until the server accepts connections: its socket file appears at
    bind(), before listen(), so the file alone does not say it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socketlib.socket(socketlib.AF_UNIX) as s:
            s.connect(sock)
            return
        assert time.monotonic() < deadline, f"nothing listens on {sock}"
        time.sleep(0.01)


def random_writes(rnd: random.Random, disk: int, size: int, n: int, big: bool = False) -> list[Write]:
    out = []
    for _ in range(n):
        length = rnd.choice([1, 512, 4096, 65536, rnd.randrange(1, 200_000)]
                            + ([rec.MAX_RECORD + 4097, 2 * rec.MAX_RECORD + 1] if big else []))
        length = min(length, size)
        offset = rnd.randrange(0, size - length + 1)
        zero = rnd.random() < 0.25
        out.append(Write(disk, offset, length, None if zero else rnd.randbytes(length)))
    return out


def replay(found: list[rec.Record], sizes: list[int], sealer=None) -> list[bytearray]:
    disks = [bytearray(n) for n in sizes]
    for r in found:
        disks[r.disk][r.offset:r.end] = rec.read_data(r, sealer)
    return disks


def model(writes: list[Write], sizes: list[int]) -> list[bytearray]:
    disks = [bytearray(n) for n in sizes]
    for w in writes:
        disks[w.disk][w.offset:w.offset + w.length] = w.data if w.data is not None else bytes(w.length)
    return disks


def check_journal(found: list[rec.Record], per_disk: dict[int, list[Write]], sealer=None) -> None:
    """Every write's records, in the order it was sent on its connection,
    with its data; nothing else."""
    for disk, writes in per_disk.items():
        want = [x for w in writes for x in w.records()]
        got = [(r.kind, r.disk, r.offset, r.length, rec.read_data(r, sealer)) for r in found if r.disk == disk]
        assert [g[:4] for g in got] == [x[:4] for x in want]
        assert all(g[4] == x[4] for g, x in zip(got, want))
    assert {r.disk for r in found} <= set(per_disk)
    times = [r.time_us for r in found]
    assert times == sorted(times)


def check_batches(directory: str) -> int:
    """The group commit's shape: inside a batch times do not go back and the
    mark carries the newest; every batch is later than the one before, across
    segments too. The number of batches."""
    last_mark = -1
    n = 0
    for path in rec.segments(directory):
        for records_, mark in raw_batches(path):
            assert records_, "a batch with no records"
            times = [r[4] for r in records_]
            assert times == sorted(times) and mark == times[-1]
            assert times[0] > last_mark
            last_mark = mark
            n += 1
    return n


def aio_run(h, writes: list[Write], results: list, base: int = 0) -> None:
    """Send every write at once on h, then wait for all: results[base + i] is
    0, or the error's name (ENOTCONN: no answer before the connection went)."""
    buffers, pending = [], {}
    for i, w in enumerate(writes):
        if w.data is None:
            cookie = h.aio_zero(w.length, w.offset)
        else:
            buffers.append(nbd.Buffer.from_bytearray(bytearray(w.data)))
            cookie = h.aio_pwrite(buffers[-1], w.offset)
        pending[cookie] = base + i
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for cookie, i in list(pending.items()):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                results[i] = e.errno or str(e)
                del pending[cookie]
                continue
            if done:
                results[i] = 0
                del pending[cookie]
        if pending:
            try:
                h.poll(100)
            except nbd.Error:
                if h.aio_is_dead() or h.aio_is_closed():
                    for i in pending.values():
                        results[i] = results[i] if results[i] is not None else "ENOTCONN"
                    return
    assert not pending, "writes not answered in 60 s"


@needs_nbd
def test_exports_sizes_and_handshakes(tmp_path):
    sizes = {"vda": 3 * rec.MAX_RECORD + 5, "vdb": 200_000}
    with running(tmp_path / "j", sizes, tmp_path / "server.log") as s:
        for name, size in sizes.items():
            h = s.connect(name)
            assert h.get_size() == size and h.can_zero() and h.can_flush() and not h.can_trim()
            h.shutdown()
            # NBD_OPT_EXPORT_NAME (what a client without fixed newstyle sends), with and without the zeroes
            for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
                h = s.connect(name, flags=flags)
                assert h.get_size() == size
                h.shutdown()
        for flags in (nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE | nbd.HANDSHAKE_FLAG_NO_ZEROES, 0):
            with pytest.raises(nbd.Error):
                s.connect("vdc", flags=flags)
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(s.socket)
        listed = []
        assert h.opt_list(lambda name, description: listed.append(name)) == 2
        assert listed == ["vda", "vdb"]
        h.set_export_name("nope")
        with pytest.raises(nbd.Error):
            h.opt_go()
        h.set_export_name("vdb")
        h.opt_go()
        assert h.get_size() == 200_000
        h.shutdown()
        assert s.records() == []  # nothing written: no record, no batch
        assert s.proc.poll() is None


@needs_nbd
def test_answered_writes_are_in_the_journal_in_order(tmp_path):
    """One connection, writes one after another: each write's records are in
    the journal once it is answered, with its data, stamped between its
    issue and its answer; reads are refused; what the protocol lets a client
    get wrong is refused and not journaled."""
    rnd = random.Random(11)
    size = 3 * rec.MAX_RECORD + 12345
    with running(tmp_path / "j", {"vda": size}, tmp_path / "server.log") as s:
        h = s.connect("vda")
        writes = random_writes(rnd, 0, size, 30, big=True)
        seen = 0
        for w in writes:
            before = now_us()
            if w.data is None:
                h.zero(w.length, w.offset)
            else:
                h.pwrite(w.data, w.offset)
            after = now_us()
            found = s.records()  # answered: already in the journal
            new = found[seen:]
            assert [(r.kind, r.disk, r.offset, r.length) for r in new] == [x[:4] for x in w.records()]
            assert all(before <= r.time_us <= after for r in new)
            assert len({r.time_us for r in new}) == 1  # one write, one time (however many records)
            seen = len(found)
        h.flush()
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 0)
        assert e.value.errno == "EIO"
        # what libnbd would refuse itself, sent anyway
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 10, size - 5)      # beyond the disk
        with pytest.raises(nbd.Error):
            h.trim(4096, 0)                     # not advertised
        h.pwrite(b"", 0)                        # nothing to journal
        h.pwrite(b"y", size - 1)                # the last byte: fine
        writes.append(Write(0, size - 1, 1, b"y"))
        h.shutdown()
        found = s.records()
        check_journal(found, {0: writes})
        assert replay(found, [size]) == model(writes, [size])
        assert check_batches(s.directory) == len(writes)  # one at a time: a batch each


@needs_nbd
def test_an_encrypted_repositorys_journal_holds_its_writes_sealed(tmp_path):
    """The server given the master key (through a pipe) seals every write's
    data: the segments hold no plaintext, the records read back with the
    key and only with it, a flipped byte is found by the scan (no key
    needed) and a record opened with another key fails."""
    from rpofs.errors import ChunkError
    from rpofs.store.crypto import Keys
    master, other = os.urandom(32), os.urandom(32)
    rnd = random.Random(12)
    size = 2 * rec.MAX_RECORD + 4096
    marker = b"PLAINTEXT-MARKER" * 64
    with running(tmp_path / "j", {"vda": size}, tmp_path / "server.log", master) as s:
        h = s.connect("vda")
        writes = random_writes(rnd, 0, size, 12, big=True) + [Write(0, 8192, len(marker), marker)]
        for w in writes:
            if w.data is None:
                h.zero(w.length, w.offset)
            else:
                h.pwrite(w.data, w.offset)
        h.shutdown()
        found = s.records()
    assert found and all(r.sealed for r in found)
    sealer = Keys(master, "test").journal
    check_journal(found, {0: writes}, sealer)
    assert replay(found, [size], sealer) == model(writes, [size])
    [segment] = rec.segments(s.directory)
    with open(segment, "rb") as f:
        body = f.read()
    assert marker[:64] not in body
    writes_found = [r for r in found if r.kind == rec.KIND_WRITE]
    with pytest.raises(ChunkError, match="key is needed"):
        rec.read_data(writes_found[0])
    with pytest.raises(ChunkError, match="does not decrypt"):
        rec.read_data(writes_found[0], Keys(other, "test").journal)
    damaged = bytearray(body)
    damaged[writes_found[-1].data_pos + 100] ^= 1
    with open(segment, "wb") as f:
        f.write(damaged)
    assert rec.scan(segment).torn


@needs_nbd
def test_concurrent_writes_on_two_disks_are_group_committed(tmp_path):
    """Two connections (vda, vdb) with many writes in flight each: every one
    answered, in the journal in the order its connection sent it, fewer
    batches than writes, each batch later than the one before, and the
    journal replayed onto zeros is the disks the writes made."""
    rnd = random.Random(12)
    sizes = [2 * rec.MAX_RECORD + 4097, 200_000]
    per_disk = {0: random_writes(rnd, 0, sizes[0], 120, big=True), 1: random_writes(rnd, 1, sizes[1], 150)}
    results = [None] * (len(per_disk[0]) + len(per_disk[1]))
    with running(tmp_path / "j", {"vda": sizes[0], "vdb": sizes[1]}, tmp_path / "server.log") as s:
        handles = [s.connect("vda"), s.connect("vdb")]
        threads = [threading.Thread(target=aio_run, args=(handles[0], per_disk[0], results, 0)),
                   threading.Thread(target=aio_run, args=(handles[1], per_disk[1], results, len(per_disk[0])))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert results == [0] * len(results)
        for h in handles:
            h.flush()
            h.shutdown()
        found = s.records()
        check_journal(found, per_disk)
        assert replay(found, sizes) == model(per_disk[0] + per_disk[1], sizes)
        batches = check_batches(s.directory)
        assert batches < len(results), "no write shared a commit"
        assert s.proc.poll() is None


@needs_nbd
def test_a_server_killed_mid_stream_loses_no_answered_write(tmp_path):
    """SIGKILL while writes are in flight: the journal is a prefix of what was
    sent (scan ends at the torn tail, if any), and holds every write that was
    answered."""
    rnd = random.Random(13)
    size = 8 << 20
    writes = random_writes(rnd, 0, size, 400)
    results = [None] * len(writes)
    with running(tmp_path / "j", {"vda": size}, tmp_path / "server.log") as s:
        h = s.connect("vda")
        t = threading.Thread(target=aio_run, args=(h, writes, results))
        t.start()
        deadline = time.monotonic() + 30
        while sum(r == 0 for r in results) < 50 and time.monotonic() < deadline:
            time.sleep(0.001)
        s.proc.send_signal(signal.SIGKILL)
        t.join(90)
        assert s.proc.wait(10) == -signal.SIGKILL
        found = []
        for path in s.segments():
            sc = rec.scan(path)
            assert not sc.torn  # a cut tail is short, not damaged
            found.extend(sc.records)
    answered = [i for i, r in enumerate(results) if r == 0]
    assert len(answered) >= 50
    sent = [x for w in writes for x in w.records()]
    assert [(r.kind, r.disk, r.offset, r.length) for r in found] == [x[:4] for x in sent[:len(found)]]
    assert all(rec.read_data(r) == x[4] for r, x in zip(found, sent))
    assert len(found) >= len([x for i in answered for x in writes[i].records()])
    assert max(answered) < len(found)  # one record a write here (no write above MAX_RECORD)


@needs_nbd
def test_a_restarted_server_appends_a_new_segment_later_in_time(tmp_path):
    rnd = random.Random(14)
    size = 1 << 20
    directory = tmp_path / "j"
    all_writes = []
    for run in range(2):
        with running(directory, {"vda": size}, tmp_path / "server.log") as s:
            h = s.connect("vda")
            writes = random_writes(rnd, 0, size, 10)
            for w in writes:
                if w.data is None:
                    h.zero(w.length, w.offset)
                else:
                    h.pwrite(w.data, w.offset)
            h.shutdown()
            all_writes += writes
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(10) == 0
            assert len(s.segments()) == run + 1
            found = s.records()
    check_journal(found, {0: all_writes})
    check_batches(str(directory))
    assert replay(found, [size]) == model(all_writes, [size])


def sigterm_after_writes(tmp_path):
    with running(tmp_path / "j", {"vda": 1 << 20, "vdb": 4096}, tmp_path / "server.log") as s:
        h = s.connect("vda")
        h.pwrite(b"abc", 100)
        h2 = s.connect("vdb")  # a connection left open
        time.sleep(0.1)
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(10)
        found = s.records()
        del h, h2
        return rc, found, s.log(), os.path.exists(s.socket)


@needs_nbd
def test_sigterm_stops_the_server_with_exit_code_0(tmp_path):
    """server.main turns SIGTERM into sys.exit(0) (protector.stop_server
    sends it): exit code 0, never -15, the journal intact."""
    rc, found, _, _ = sigterm_after_writes(tmp_path)
    assert rc == 0
    assert [(r.offset, r.length) for r in found] == [(100, 3)] and rec.read_data(found[0]) == b"abc"


@needs_nbd
def test_sigterm_stops_the_server_without_tracebacks(tmp_path):
    """A stop is a cancel inside trio, not SystemExit out of its event loop
    (which abandoned the run: tracebacks in server.log at every stop, the
    connections never closed)."""
    rc, _, log, _ = sigterm_after_writes(tmp_path)
    assert rc == 0
    assert "Traceback" not in log and "abandoned" not in log, log


@needs_nbd
def test_the_server_ends_when_its_mirrors_are_gone(tmp_path):
    """QEMU's mirror stays connected while the job runs: once every client
    that chose an export has left and none came back within MIRROR_GONE_S,
    the VM is gone and the server ends (exit 0, journal intact). A client
    that leaves and comes back in time, and probes that choose no export,
    do not end it."""
    with running(tmp_path / "j", {"vda": 1 << 20, "vdb": 1 << 20}, tmp_path / "server.log") as s:
        probe = nbd.NBD()
        probe.set_opt_mode(True)
        probe.connect_unix(s.socket)
        probe.opt_abort()
        h = s.connect("vda")
        h.pwrite(b"abc", 100)
        h.shutdown()
        h = s.connect("vdb")  # back at once: still serving (the exit below counts from the last leave)
        h.pwrite(b"def", 200)
        h.shutdown()
        left = time.monotonic()
        assert s.proc.wait(timeout=srv.MIRROR_GONE_S + 20) == 0
        assert time.monotonic() - left >= srv.MIRROR_GONE_S - 0.5
        assert [(r.disk, r.offset) for r in s.records()] == [(0, 100), (1, 200)]
        assert "every mirror left" in s.log() and "Traceback" not in s.log()


def mount_tmpfs(path: str, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs (root needed): {e} {detail.decode(errors='replace')}")


def unmount(path: str) -> None:
    for _ in range(50):
        if subprocess.run(["umount", path], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", path], capture_output=True)


@needs_nbd
@pytest.mark.parametrize("full_from_the_start", [False, True])
def test_a_full_disk_answers_errors_and_the_server_exits(tmp_path, full_from_the_start):
    """The journal's filesystem (a 1 MiB tmpfs) fills up under 64 writes in
    flight, or is full before the first: a write is answered OK only when it
    is in the journal, the write that did not fit is answered ENOSPC, a
    later one is refused too, and the server exits (code 1: a journal with a
    hole must not grow). Writes queued behind the failing commit are
    answered with its error too, none is left unanswered."""
    full = str(tmp_path / "full")
    mount_tmpfs(full, "1m")
    try:
        if full_from_the_start:
            with open(os.path.join(full, "filler"), "wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(65536))
        rnd = random.Random(15)
        size = 16 << 20
        writes = [Write(0, i * 65536, 65536, rnd.randbytes(65536)) for i in range(64)]
        results = [None] * len(writes)
        with running(os.path.join(full, "j"), {"vda": size}, tmp_path / "server.log") as s:
            h = s.connect("vda")
            late = s.connect("vda")
            t = threading.Thread(target=aio_run, args=(h, writes, results))
            t.start()
            deadline = time.monotonic() + 30
            while not any(r not in (None, 0) for r in results) and time.monotonic() < deadline:
                time.sleep(0.001)
            with pytest.raises(nbd.Error) as e:  # once failed, at once
                late.pwrite(b"late", size - 4)
            late_errno = e.value.errno
            t.join(90)
            assert s.proc.wait(20) == 1
            assert "No space left on device" in s.log()
            found = []
            for path in s.segments():
                sc = rec.scan(path)
                assert not sc.torn  # the batch that did not fit is a short tail
                found.extend(sc.records)
            data = [rec.read_data(r) for r in found]
    finally:
        unmount(full)
    ok = [i for i, r in enumerate(results) if r == 0]
    errors = {r for r in results if r != 0}
    assert "ENOSPC" in errors and (not ok if full_from_the_start else ok), results
    assert errors <= {"ENOSPC", "EIO"}, errors
    assert late_errno in ("ENOSPC", "EIO"), late_errno
    # the journal holds exactly the writes answered OK, in order, with their data
    assert [(r.offset, r.length) for r in found] == [(writes[i].offset, 65536) for i in ok]
    assert ok == list(range(len(ok)))
    assert all(d == writes[i].data for d, i in zip(data, ok))


def in_process_server(directory, socket_path, exports, outcome, **serve_kw):
    """serve() under trio.run on this thread; outcome['token'], ['scope'] to
    stop it, ['exit'] how it ended. serve_kw: serve()'s (stall_s, on_stall)."""
    import trio

    async def main():
        with trio.CancelScope() as scope:
            outcome["token"] = trio.lowlevel.current_trio_token()
            outcome["scope"] = scope
            await srv.serve(directory, socket_path, srv.parse_exports(exports), **serve_kw)

    try:
        trio.run(main)
        outcome["exit"] = "returned"
    except BaseException as e:  # noqa: BLE001 - serve() ends a failed journal with SystemExit
        outcome["exit"] = e


@needs_nbd
def test_every_write_of_a_failed_journal_is_answered_with_an_error(tmp_path, monkeypatch):
    """Deterministic: the second commit fails with ENOSPC after 0.3 s (a slow
    full disk); a write sent 0.1 s into it is answered with that error too,
    not left to the connection closing (as it was before 5acf131)."""
    original = srv.JournalWriter._write_durably
    calls = []

    def failing(self, batch, batch_us):
        calls.append(batch_us)
        if len(calls) == 2:
            time.sleep(0.3)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return original(self, batch, batch_us)

    monkeypatch.setattr(srv.JournalWriter, "_write_durably", failing)
    monkeypatch.setattr(srv, "INLINE_BATCH", 0)  # the commit on a worker: the loop takes the next write in
    sockdir = tempfile.mkdtemp(prefix="rpj-")
    sock = os.path.join(sockdir, "s")
    outcome = {}
    t = threading.Thread(target=in_process_server, args=(str(tmp_path / "j"), sock, ["vda=1048576"], outcome))
    t.start()
    try:
        wait_listening(sock)
        h = nbd.NBD()
        h.set_export_name("vda")
        h.connect_unix(sock)
        h.pwrite(b"a" * 100, 0)                     # commit 1: fine
        results = [None, None]
        first = threading.Thread(target=aio_run, args=(h, [Write(0, 4096, 10, b"b" * 10)], results, 0))
        first.start()                               # commit 2: fails after 0.3 s
        time.sleep(0.1)
        second = nbd.NBD()                          # its own connection: answered on its own
        second.set_export_name("vda")
        second.connect_unix(sock)
        try:
            second.pwrite(b"c" * 10, 8192)          # taken in while commit 2 runs
            results[1] = 0
        except nbd.Error as e:
            results[1] = e.errno or str(e)
        first.join(10)
        t.join(10)
        assert results[0] == "ENOSPC"
        assert results[1] in ("ENOSPC", "EIO"), results
    finally:
        if t.is_alive():
            import trio
            trio.from_thread.run_sync(outcome["scope"].cancel, trio_token=outcome["token"])
            t.join(10)
        shutil.rmtree(sockdir, ignore_errors=True)


@needs_nbd
def test_a_commit_that_hangs_lets_the_mirror_go(tmp_path, monkeypatch):
    """A disk that hangs an fdatasync would hold the guest's writes: after
    the stall time the watchdog shuts the connections down (QEMU then fails
    the mirror and the guest writes on) and ends the server."""
    import trio
    original = srv.JournalWriter._write_durably
    calls, stalled = [], threading.Event()

    def hanging(self, batch, first_us):
        calls.append(first_us)
        if len(calls) == 2:
            self.commit_since = time.monotonic()
            stalled.wait(10)   # hung until the watchdog has acted
            raise OSError(errno.EIO, "hung disk (simulated)")
        return original(self, batch, first_us)

    monkeypatch.setattr(srv.JournalWriter, "_write_durably", hanging)
    sockdir = tempfile.mkdtemp(prefix="rpj-")
    sock = os.path.join(sockdir, "s")
    outcome = {}
    t = threading.Thread(target=in_process_server, args=(str(tmp_path / "j"), sock, ["vda=1048576"], outcome),
                         kwargs={"stall_s": 0.5, "on_stall": stalled.set}, daemon=True)
    t.start()
    try:
        wait_listening(sock)
        h = nbd.NBD()
        h.set_export_name("vda")
        h.connect_unix(sock)
        h.pwrite(b"a" * 4096, 0)                 # commit 1
        started = time.monotonic()
        with pytest.raises(nbd.Error):
            h.pwrite(b"b" * 4096, 4096)          # commit 2 hangs: the connection is shut down
        assert time.monotonic() - started < 5 and stalled.wait(5)  # it shuts the socket first
    finally:
        stalled.set()
        if "scope" in outcome:
            trio.from_thread.run_sync(outcome["scope"].cancel, trio_token=outcome["token"])
        t.join(10)
        shutil.rmtree(sockdir, ignore_errors=True)
