"""libnbd, and only here: reading one disk of a running backup job, and
writing a restored disk into a qcow2 image."""

import nbd

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
    through qemu-nbd, which libnbd starts with systemd socket activation for
    this connection alone: no socket path to pick, and the server ends with
    the handle. pwrite is safe from several threads (libnbd serializes)."""

    def __init__(self, path: str, fmt: str):
        self.path = path
        try:
            self._h = nbd.NBD()
            self._h.connect_systemd_socket_activation(
                ["qemu-nbd", "--format", fmt, "--cache=writeback", "--discard=unmap", path])
        except nbd.Error as e:
            raise VirtError(f"cannot open {path} through qemu-nbd: {e}") from e

    def pwrite(self, data, offset: int) -> None:
        try:
            self._h.pwrite(data, offset)
        except nbd.Error as e:
            raise VirtError(f"writing {self.path} at {offset}: {e}") from e

    def close(self, flush: bool = True) -> None:
        """Flush (qemu-nbd makes the image durable) and disconnect."""
        try:
            if flush:
                self._h.flush()
            self._h.shutdown()
        except nbd.Error as e:
            raise VirtError(f"finishing {self.path}: {e}") from e
