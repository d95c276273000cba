"""Disk images for recovered VMs: empty ones, overlays over a point, and a
point's disk written into an image straight from the repository."""

import contextlib
import os
import subprocess

from ..children import child_env
from ..errors import RpofsError
from ..store.materialize import DiskReader
from ..store.restore import copy_disk, pwrite_all
from ..virt.nbdexport import ImageWriter


def create(path: str, fmt: str, size: int = 0, backing: str = "", backing_fmt: str = "raw",
           check_backing: bool = True) -> None:
    """A new empty image (sparse), or a qcow2 overlay over `backing` (its
    size the backing file's, or `size` without opening it when not
    check_backing)."""
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-F", backing_fmt, "-b", backing]
        cmd += [path] if check_backing else ["-u", path, str(size)]
    else:
        cmd += [path, str(size)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        raise RpofsError(f"cannot create {path}: {result.stderr.strip() or result.returncode}")


def write_disk(reader: DiskReader, path: str, fmt: str, progress=None) -> int:
    """The point's disk into a new image at `path`, durable when this
    returns: only the ranges that hold data are written (zeros stay holes,
    or unallocated qcow2 clusters). qcow2 through qemu-nbd; raw directly.
    The bytes written."""
    create(path, fmt, reader.size)
    if fmt == "raw":
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = copy_disk(reader, lambda data, offset: pwrite_all(fd, data, offset), False, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        return written
    writer = ImageWriter(path, fmt)
    try:
        written = copy_disk(reader, writer.pwrite, False, progress)
    except BaseException:
        with contextlib.suppress(RpofsError):
            writer.close(flush=False)
        raise
    writer.close()
    return written


def data_bytes(reader: DiskReader) -> int:
    """How many bytes of the disk hold data at the point (from the index
    alone: what writing it out costs in room)."""
    return sum(e.stop - e.pos for e in reader.extents(0, reader.size) if e.loc is not None)
