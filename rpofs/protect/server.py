"""The journal server: the NBD target of a protected VM's active mirrors.

One process per protected VM, on a unix socket, one export per disk (named
by its target, "vda"). QEMU's mirror in write-blocking mode completes a
guest write only when this server has answered it, and QEMU 7.2 passes
neither flushes nor FUA to a mirror target (docs/PROTECT.md): so a write or
zeroing is answered only once its record is durable in the journal. Writes
that arrive while a sync runs wait for the next one (group commit): one
fdatasync answers every write taken in before it started. A small batch is
synced on the event loop (a worker thread's round trip cost more than a
4 KiB write's fdatasync), a big one on a worker while the loop takes in
the next.

It speaks the fixed-newstyle handshake (NBD_OPT_GO, NBD_OPT_EXPORT_NAME,
NBD_OPT_LIST) and simple replies: the subset QEMU's NBD client needs. Reads
are refused (EIO): a mirror never reads its target, and the journal is not
a disk.

A write that cannot be made durable (a full disk, an I/O error) is answered
with an error: QEMU then fails the mirror job and the guest runs on (the
write is in its disk; the daemon's repair backup takes it, docs/PROTECT.md).
The server exits after such an error: a journal with a hole must not grow.

Started by rpofs.protect.protector (start_server), detached from the
process that starts it: it outlives a daemon killed with -9, and the mirror
with it:
    python -m rpofs.protect.server DIR SOCKET [--key-fd=FD] vda=SIZE [vdb=SIZE ...]
"""

import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import NamedTuple

import trio

from ..durable import sync_dir
from ..timefmt import now_us
from ..store.journal import (KIND_COMMIT, KIND_WRITE, KIND_ZERO, MAX_RECORD, encode, encode_header, encode_sealed,
                             segment_name)

log = logging.getLogger("rpofs.protect.server")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_WRITE_ZEROES | CAN_MULTI_CONN. No TRIM: a
# discarded range's content is undefined, so it is not journaled (QEMU 7.2 does not
# pass a guest's discard to a mirror target anyway).
TRANSMISSION_FLAGS = 1 | 4 | 8 | 64 | 256
MAX_PAYLOAD = 32 << 20
SEGMENT_BYTES = 256 << 20  # a new segment after this many bytes
INLINE_BATCH = 256 << 10   # a batch up to this size is written and synced on the event loop
STALL_S = 8.0              # a commit that has not returned after this: the mirror is let go (Watchdog; within the guest's 10 s bound)
MIRROR_GONE_S = 10.0       # no client attached for this long after the last left: QEMU is gone, so is the server

_REQUEST = struct.Struct(">IHHQQI")
_OPTION = struct.Struct(">QII")
_REPLY = struct.Struct(">IIQ")


class Export(NamedTuple):
    """One disk served: what its writes are journaled as, and its size."""
    disk: int        # the disk's number in the journal's records (its place on the command line)
    size: int        # bytes; a write past it is refused


class JournalWriter:
    """The segment being appended and the group commit in front of it."""

    def __init__(self, directory: str, sealer=None):
        self.directory = directory
        self.sealer = sealer   # an encrypted repository's keys.journal: every record's data sealed
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.fd = -1
        self.size = 0
        self.last_us = 0
        self.floor_us = 0    # the next record's earliest time: later than every batch taken
        self.first_us = 0    # the pending batch's first record's time
        self.pending_bytes = 0
        self.commit_since = 0.0   # monotonic time the running commit started (0: none runs)
        self.pending: list[bytes] = []
        self.waiters: list[trio.Event] = []
        self.wake = trio.Event()
        self.failed: OSError | None = None

    def take(self, kind: int, disk: int, offset: int, data, length: int) -> trio.Event:
        """Queue a write (or zeroing) for the next commit; the event is set
        once it is durable (or the journal failed: self.failed)."""
        self.last_us = max(self.last_us, self.floor_us, now_us())  # never backwards, whatever the clock does
        if not self.pending:
            self.first_us = self.last_us  # the batch's first record: a new segment is named by it
        if kind == KIND_WRITE:
            view = memoryview(data)
            for i in range(0, length, MAX_RECORD):
                piece = view[i:i + MAX_RECORD]
                if self.sealer is not None:
                    self.pending += encode_sealed(kind, disk, offset + i, piece, self.last_us, self.sealer)
                else:
                    self.pending += (encode_header(kind, disk, offset + i, piece, self.last_us), piece)
        elif self.sealer is not None:
            self.pending.append(encode_sealed(kind, disk, offset, b"", self.last_us, self.sealer, length)[0])
        else:
            self.pending.append(encode_header(kind, disk, offset, b"", self.last_us, length))
        self.pending_bytes += length if kind == KIND_WRITE else 0
        done = trio.Event()
        self.waiters.append(done)
        self.wake.set()
        return done

    async def run_commits(self) -> None:
        """Forever: write what is pending, fdatasync, answer it."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            batch, waiters = self.pending, self.waiters
            self.pending, self.waiters = [], []
            if not batch:
                continue
            batch_us, first_us, size = self.last_us, self.first_us, self.pending_bytes
            self.pending_bytes = 0
            batch.append(encode(KIND_COMMIT, 0, 0, b"", batch_us))
            self.floor_us = batch_us + 1  # what is taken in from now on is a later batch
            try:
                if size <= INLINE_BATCH:
                    # a small batch costs less than the trip to a worker thread and back
                    # (most of a 4 KiB write's time, measured); what arrives meanwhile
                    # waits in the socket and makes the next batch
                    self._write_durably(batch, first_us)
                else:   # a big one: the loop takes in the next batch while this one syncs
                    await trio.to_thread.run_sync(self._write_durably, batch, first_us)
            except OSError as e:
                self.failed = e
                log.error("journal %s: %s: answering errors from now on", self.directory, e)
                # what was taken in meanwhile is answered with the error too
                waiters += self.waiters
                self.pending, self.waiters = [], []
            for w in waiters:
                w.set()
            if self.failed:
                return

    def _write_durably(self, batch: list, first_us: int) -> None:
        """batch: headers and data buffers, written as one run, then fdatasync."""
        self.commit_since = time.monotonic()  # the stall watchdog's clock
        try:
            if self.fd < 0 or self.size >= SEGMENT_BYTES:
                self._new_segment(first_us)
            data = b"".join(batch)
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fdatasync(self.fd)
            self.size += len(data)
        finally:
            self.commit_since = 0.0

    def _new_segment(self, first_us: int) -> None:
        """Named by its first record's time: every earlier segment's records are older."""
        if self.fd >= 0:
            os.close(self.fd)
        path = os.path.join(self.directory, segment_name(first_us))
        if os.path.exists(path):  # a server started again within the same microsecond
            raise OSError(errno.EEXIST, "journal segment exists", path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = 0
        sync_dir(self.directory)


class Watchdog:
    """A commit that does not return (a disk that hangs an fdatasync) would
    hold the guest's writes for as long: after STALL_S this thread, which
    needs neither the event loop nor the stuck one, shuts every connection
    down, so QEMU fails the mirror job and the guest runs on (the daemon's
    backup then takes what the journal missed), and ends the process."""

    def __init__(self, journal: JournalWriter, stall_s: float, on_stall=None):
        self.journal = journal
        self.stall_s = stall_s
        self.fds: set[int] = set()
        self.lock = threading.Lock()
        self.on_stall = on_stall or (lambda: os._exit(3))
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="rpofs-journal-watchdog", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(min(1.0, self.stall_s / 4)):
            since = self.journal.commit_since
            if since and time.monotonic() - since > self.stall_s:
                log.error("journal %s: a commit has not returned for %.0f s: closing the mirror's "
                          "connections (the guest's writes go on without the journal)",
                          self.journal.directory, time.monotonic() - since)
                with self.lock:
                    fds = list(self.fds)
                for fd in fds:
                    with contextlib.suppress(OSError):
                        dup = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
                        dup.shutdown(socket.SHUT_RDWR)
                        dup.close()
                self.on_stall()
                return


class Connection:
    def __init__(self, stream: trio.SocketStream, journal: JournalWriter, exports: dict[str, Export],
                 on_attach=None):
        self.stream = stream
        self.on_attach = on_attach  # called once the client chose an export (a mirror, not a probe)
        self.attached = False
        self.journal = journal
        self.exports = exports  # by name ("vda")
        self.buffer = bytearray()
        self.send_lock = trio.Lock()

    async def recv_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def recv_payload(self, n: int) -> bytearray:
        """A write's data, received into its own buffer (no copy after the kernel's)."""
        out = bytearray(n)
        got = min(n, len(self.buffer))
        out[:got] = self.buffer[:got]
        del self.buffer[:got]
        view = memoryview(out)
        while got < n:
            k = await self.stream.socket.recv_into(view[got:], n - got)
            if not k:
                raise EOFError
            got += k
        return out

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.send(_OPTION.pack(REPLY_MAGIC, option, reply) + struct.pack(">I", len(data)) + data)

    async def handshake(self) -> Export | None:
        """Negotiate; the chosen export, or None when the client left."""
        await self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        client_flags = struct.unpack(">I", await self.recv_exactly(4))[0]
        while True:
            magic, option, length = struct.unpack(">QII", await self.recv_exactly(16))
            if magic != IHAVEOPT or length > 65536:
                return None
            data = await self.recv_exactly(length)
            if option == OPT_EXPORT_NAME:
                export = self.exports.get(data.decode(errors="replace"))
                if export is None:
                    return None  # the protocol's only answer: close
                tail = b"" if client_flags & FLAG_NO_ZEROES else bytes(124)
                await self.send(struct.pack(">QH", export.size, TRANSMISSION_FLAGS) + tail)
                return export
            if option in (OPT_INFO, OPT_GO):
                (name_len,) = struct.unpack(">I", data[:4])
                name = data[4:4 + name_len].decode(errors="replace")
                export = self.exports.get(name)
                if export is None:
                    await self.option_reply(option, REP_ERR_UNKNOWN, f"no export {name!r}".encode())
                    continue
                await self.option_reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size,
                                                                      TRANSMISSION_FLAGS))
                await self.option_reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                                      MAX_PAYLOAD))
                await self.option_reply(option, REP_ACK)
                if option == OPT_GO:
                    return export
            elif option == OPT_LIST:
                for name in self.exports:
                    await self.option_reply(option, REP_SERVER, struct.pack(">I", len(name)) + name.encode())
                await self.option_reply(option, REP_ACK)
            elif option == OPT_ABORT:
                await self.option_reply(option, REP_ACK)
                return None
            else:
                await self.option_reply(option, REP_ERR_UNSUP)

    async def serve(self) -> None:
        try:
            export = await self.handshake()
            if export is None:
                return
            self.attached = True
            if self.on_attach is not None:
                self.on_attach()
            async with trio.open_nursery() as nursery:
                while True:
                    magic, flags, command, handle, offset, length = _REQUEST.unpack(
                        await self.recv_exactly(_REQUEST.size))
                    if magic != REQUEST_MAGIC:
                        return
                    if command == CMD_DISC:
                        return
                    if command == CMD_WRITE:
                        if length > MAX_PAYLOAD:
                            return  # the client broke the protocol: its data cannot be skipped safely
                        data = await self.recv_payload(length)
                    if command in (CMD_WRITE, CMD_WRITE_ZEROES):
                        if offset + length > export.size:
                            await self.reply(handle, errno.ENOSPC)  # the NBD spec's answer past the end
                            continue
                        if self.journal.failed:
                            await self.reply(handle, errno.ENOSPC if self._full() else errno.EIO)
                            continue
                        if length == 0:
                            await self.reply(handle, 0)
                            continue
                        kind = KIND_WRITE if command == CMD_WRITE else KIND_ZERO
                        done = self.journal.take(kind, export.disk, offset,
                                                 data if command == CMD_WRITE else b"", length)
                        nursery.start_soon(self.answer_when_durable, handle, done)
                    elif command == CMD_FLUSH:
                        # Every write answered is durable already; one not answered yet is
                        # not the client's to count on.
                        await self.reply(handle, errno.EIO if self.journal.failed else 0)
                    else:  # READ, TRIM (not advertised), CACHE, BLOCK_STATUS
                        await self.reply(handle, errno.EIO if command == CMD_READ else errno.EINVAL)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _full(self) -> bool:
        return isinstance(self.journal.failed, OSError) and self.journal.failed.errno == errno.ENOSPC

    async def answer_when_durable(self, handle: int, done: trio.Event) -> None:
        await done.wait()
        await self.reply(handle, (errno.ENOSPC if self._full() else errno.EIO) if self.journal.failed else 0)

    async def reply(self, handle: int, error: int) -> None:
        await self.send(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))


async def serve(directory: str, path: str, exports: dict[str, Export],
                task_status=trio.TASK_STATUS_IGNORED, stall_s: float = STALL_S, on_stall=None,
                sealer=None) -> None:
    """Serve until the journal fails (then exit: the mirror fails over), a
    commit stalls (Watchdog), or the process is told to stop. sealer: an
    encrypted repository's keys.journal (the records' data sealed)."""
    journal = JournalWriter(directory, sealer)
    watchdog = Watchdog(journal, stall_s, on_stall)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        async def watch_failure():
            await journal.run_commits()
            await trio.sleep(0.5)   # let the error replies go out
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_failure)

        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("journal %s: stopping", directory)
                    nursery.cancel_scope.cancel()
                    return

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            nursery.start_soon(stop_on_signal)

        clients = _Clients(nursery.cancel_scope, directory)

        async def handle(stream):
            fd = stream.socket.fileno()
            with watchdog.lock:
                watchdog.fds.add(fd)
            connection = Connection(stream, journal, exports, clients.attached)
            try:
                await connection.serve()
            finally:
                with watchdog.lock:
                    watchdog.fds.discard(fd)
                if connection.attached:
                    clients.left(nursery)

        nursery.start_soon(trio.serve_listeners, handle, [listener])
        task_status.started()
    watchdog.stop.set()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # nothing answers there any more
    if journal.failed:
        raise SystemExit(f"journal {directory}: {journal.failed}")


class _Clients:
    """The mirrors attached. QEMU's mirror connects once per disk and stays
    until the job ends: when the last one leaves and none comes back within
    MIRROR_GONE_S, the VM stopped (or its mirrors failed) and the server
    ends, so that nothing goes on claiming protection for a VM that is gone
    (the session is ended, and its journal folded, by the next `rpofs
    protect` or the ingester, as for any server that stopped)."""

    def __init__(self, scope: trio.CancelScope, directory: str):
        self.scope, self.directory = scope, directory
        self.count = 0
        self.generation = 0

    def attached(self) -> None:
        self.count += 1
        self.generation += 1

    def left(self, nursery) -> None:
        self.count -= 1
        if self.count == 0:
            nursery.start_soon(self._end_unless_back, self.generation)

    async def _end_unless_back(self, generation: int) -> None:
        await trio.sleep(MIRROR_GONE_S)
        if self.count == 0 and self.generation == generation:
            log.info("journal %s: every mirror left %gs ago (the VM stopped?): stopping", self.directory,
                     MIRROR_GONE_S)
            self.scope.cancel()


def parse_exports(args: list[str]) -> dict[str, Export]:
    """["vda=SIZE", ...] -> {"vda": Export(0, SIZE), ...}: disk numbers by position."""
    out = {}
    for i, arg in enumerate(args):
        name, _, size = arg.partition("=")
        out[name] = Export(i, int(size))
    return out


def main(argv: list[str]) -> None:
    """argv: DIR SOCKET [--key-fd=FD] vda=SIZE ...; the key of an encrypted
    repository comes as the master key through a pipe (never argv or the
    environment), as the mount's does."""
    directory, path, *disks = argv
    sealer = None
    if disks and disks[0].startswith("--key-fd="):
        from ..store.crypto import Keys
        with os.fdopen(int(disks.pop(0).split("=", 1)[1]), "rb") as f:
            sealer = Keys(f.read(), directory).journal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trio.run(functools.partial(serve, directory, path, parse_exports(disks), sealer=sealer))


if __name__ == "__main__":
    main(sys.argv[1:])
