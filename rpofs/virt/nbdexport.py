"""libnbd, and only here: reading one disk of a running backup job, and
writing a restored disk into a qcow2 image."""

import errno
import os
import shutil
import subprocess
import queue
import tempfile
import time

import nbd

from ..children import child_env
from ..errors import VirtError

ALLOCATION = "base:allocation"
_STATE_ZERO = 2          # base:allocation: the range reads as zeros
_DIRTY = 1               # qemu:dirty-bitmap:*: the range changed since the checkpoint
_STATUS_STEP = 1 << 30   # block status request size; servers may answer less


class Export:
    def __init__(self, socket: str, name: str, bitmap: str | None = None):
        self.name = name
        self._bitmap = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        try:
            self._h = nbd.NBD()
            self._h.add_meta_context(ALLOCATION)
            if self._bitmap:
                self._h.add_meta_context(self._bitmap)
            self._h.set_export_name(name)
            self._h.connect_unix(socket)
            self.size = self._h.get_size()
            if self._bitmap and not self._h.can_meta_context(self._bitmap):
                raise VirtError(f"NBD export {name} does not offer {self._bitmap}")
        except nbd.Error as e:
            raise VirtError(f"NBD export {name} at {socket}: {e}") from e

    def _extents(self, context: str):
        """(offset, length, flags) covering the whole disk, in order."""
        offset = 0
        while offset < self.size:
            found = []

            def collect(ctx, start, entries, err):
                if ctx == context:
                    pos = start
                    for i in range(0, len(entries), 2):
                        found.append((pos, entries[i], entries[i + 1]))
                        pos += entries[i]
                return 0

            try:
                self._h.block_status(min(_STATUS_STEP, self.size - offset), offset, collect)
            except nbd.Error as e:
                raise VirtError(f"NBD block status of {self.name} at {offset}: {e}") from e
            if not found:
                raise VirtError(f"NBD export {self.name} gave no {context} status at {offset}")
            for start, length, flags in found:
                length = min(length, self.size - start)
                if length > 0:
                    yield start, length, flags
                offset = start + length

    def data_ranges(self):
        """Ranges that may hold non-zero data (everything not known to read as zeros)."""
        return [(o, n) for o, n, f in self._extents(ALLOCATION) if not f & _STATE_ZERO]

    def dirty_ranges(self):
        """Ranges changed since the incremental's checkpoint."""
        return [(o, n) for o, n, f in self._extents(self._bitmap) if f & _DIRTY]

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return self._h.pread(length, offset)
        except nbd.Error as e:
            raise VirtError(f"NBD read of {self.name} at {offset}+{length}: {e}") from e

    def close(self) -> None:
        try:
            self._h.shutdown()
        except nbd.Error:
            pass  # the job is being ended anyway


class ImageWriter:
    """Writes into a disk image of any format QEMU knows (qcow2 above all)
    through one qemu-nbd on a private unix socket, with one NBD connection
    per writing thread: pwrite from up to `connections` threads at once.

    Measured here writing 1 GiB of 1 MiB pieces into a new qcow2: one
    connection (libnbd serializes a handle's requests) 390-475 MB/s with
    the host page cache, 4 connections with cache=none (O_DIRECT) 760-790,
    8 about 870; a raw file written directly 670-1,020. A filesystem that
    refuses O_DIRECT (tmpfs) gets the page cache. close() flushes every
    connection (QEMU writes its metadata and syncs) before the image
    counts as written."""

    def __init__(self, path: str, fmt: str, connections: int = 4):
        self.path = path
        self._dir = tempfile.mkdtemp(prefix="rpofs-nbd-")
        self._socket = os.path.join(self._dir, "sock")
        self._server = None
        self._handles: list = []
        self._idle: queue.Queue = queue.Queue()   # connections not writing now
        try:
            for cache in ("none", "writeback"):
                if self._serve(fmt, cache, connections):
                    break
            else:
                raise VirtError(f"cannot open {path} through qemu-nbd: {self._error}")
            for _ in range(connections):
                h = self._connect()
                self._handles.append(h)
                self._idle.put(h)
        except nbd.Error as e:
            self._stop()
            raise VirtError(f"cannot open {path} through qemu-nbd: {e}") from e
        except BaseException:
            self._stop()
            raise

    def _connect(self) -> "nbd.NBD":
        """One connection. qemu-nbd binds its socket before it listens: a
        connect in between is refused (seen under load), so that is retried
        for a while as long as qemu-nbd runs."""
        deadline = time.monotonic() + 10
        while True:
            h = nbd.NBD()
            try:
                h.connect_unix(self._socket)
                return h
            except nbd.Error as e:
                del h
                # libnbd names the errno ("ECONNREFUSED"), it does not number it
                if (getattr(e, "errno", None) not in ("ECONNREFUSED", errno.ECONNREFUSED)
                        or self._server.poll() is not None or time.monotonic() > deadline):
                    raise
            time.sleep(0.01)

    def _serve(self, fmt: str, cache: str, connections: int) -> bool:
        """Start qemu-nbd; False (and self._error) if it exits at once."""
        self._server = subprocess.Popen(
            ["qemu-nbd", "--format", fmt, f"--cache={cache}", "--discard=unmap", "--shared", str(connections),
             "--socket", self._socket, self.path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
        deadline = time.monotonic() + 30
        while not os.path.exists(self._socket):
            if self._server.poll() is not None:
                self._error = self._server.stderr.read().strip()
                self._server = None
                return False
            if time.monotonic() > deadline:
                raise VirtError(f"qemu-nbd did not start serving {self.path} in 30 s")
            time.sleep(0.005)
        return True

    def pwrite(self, data, offset: int) -> None:
        """From any thread; one request per idle connection at a time."""
        h = self._idle.get()
        try:
            h.pwrite(data, offset)
        except nbd.Error as e:
            raise VirtError(f"writing {self.path} at {offset}: {e}") from e
        finally:
            self._idle.put(h)

    def close(self, flush: bool = True) -> None:
        """Flush (qemu-nbd makes the image durable) and disconnect."""
        try:
            if flush:
                for h in self._handles:
                    h.flush()
        except nbd.Error as e:
            raise VirtError(f"finishing {self.path}: {e}") from e
        finally:
            self._stop()

    def _stop(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self._handles = []
        if self._server is not None:
            try:
                self._server.wait(timeout=30)  # it exits once its last client has gone
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server.stderr.close()
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)
