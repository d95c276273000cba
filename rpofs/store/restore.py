"""`rpofs restore VM@TIME:DISK DEST`: a whole disk, written to a file or a
block device without a mount (rpofs.recover.disk resolves VM@TIME; this
writes what a reader reads).

The index says where the disk holds data and where it is zeros, so zeros are
neither read nor written: a file stays sparse there (a device gets them
written, it may hold old data). Chunks are read and verified on worker
threads (pread, zstd and blake3 release the GIL) and written in place with
pwrite. The output appears under its name only when complete: a file is
written as DEST.part and renamed, a device is written directly.
"""

import concurrent.futures
import os
import stat

from ..errors import RpofsError
from .materialize import DiskReader, Extent
from .repo import any_nonzero
from .schema import BLOCK_SIZE

WINDOW = 64 << 20      # located together, read in parallel
THREADS = 4
_ZEROS = bytes(1 << 20)


def parse_disk_ref(text: str) -> tuple[str, str, str]:
    """VM@TIME:DISK -> (vm, time, disk); the time has colons of its own."""
    vm, at, rest = text.partition("@")
    when, colon, disk = rest.rpartition(":")
    if not (vm and at and when and colon and disk) or "/" in disk:
        raise RpofsError(f"cannot read {text!r}: expected VM@TIME:DISK, e.g. db1@2026-11-24T10:41:07Z:vdb")
    return vm, when, disk


def check_destination(dest: str, force: bool) -> None:
    """A file to be written at dest (or a block device): its directory must
    exist, and an existing file is replaced only with force. The same rule
    for `rpofs restore` and `rpofs cp`."""
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise RpofsError(f"{parent}: no such directory")
    if os.path.isdir(dest):
        raise RpofsError(f"{dest} is a directory: name the file to write")
    if os.path.lexists(dest) and not force and not (os.path.exists(dest) and stat.S_ISBLK(os.stat(dest).st_mode)):
        raise RpofsError(f"{dest} exists (--force to replace it)")


def write_disk(reader: DiskReader, dest: str, force: bool = False, progress=None) -> tuple[int, int]:
    """Write the disk `reader` reads (a point's DiskReader, or anything with
    its size, extents, extent_bytes and prefetch: a journal instant's);
    (its size, bytes written). progress: a rpofs.progress.Progress (or
    anything with set and add), told the size and each extent done."""
    check_destination(dest, force)
    device = os.path.exists(dest) and stat.S_ISBLK(os.stat(dest).st_mode)
    if device:
        fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
        if os.lseek(fd, 0, os.SEEK_END) < reader.size:
            os.close(fd)
            raise RpofsError(f"{dest} holds fewer than the disk's {reader.size} bytes")
        out = dest
    else:
        out = dest + ".part"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if not device:
            os.ftruncate(fd, reader.size)  # zeros everywhere, allocated nowhere
        if progress is not None:
            progress.set(0, reader.size)
        written = copy_disk(reader, lambda data, offset: pwrite_all(fd, data, offset), zero_fill=device,
                            progress=progress.add if progress is not None else None)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if not device:
            os.unlink(out)
        raise
    os.close(fd)
    if not device:
        os.replace(out, dest)
    return reader.size, written


def copy_disk(reader: DiskReader, pwrite, zero_fill: bool, progress=None) -> int:
    """Write the disk through pwrite(data, offset), called from worker
    threads (a file's pwrite, or an NBD connection's for a qcow2 image);
    zeros only when zero_fill. Without it, zeros are skipped at BLOCK_SIZE
    grain inside stored chunks too (a full keeps a 1 MiB chunk whole when
    any of it is data: a used filesystem's chunks are often part zeros), so
    a sparse output stays as sparse as the disk. progress(bytes) after each
    extent. Returns the bytes written."""
    def copy(extent: Extent) -> int:
        pos, stop = extent.pos, extent.stop
        if extent.loc is None:
            if zero_fill:
                for at in range(pos, stop, len(_ZEROS)):
                    pwrite(memoryview(_ZEROS)[:min(len(_ZEROS), stop - at)], at)
            if progress:
                progress(stop - pos)
            return stop - pos if zero_fill else 0
        data = reader.extent_bytes(extent)
        if zero_fill:
            pwrite(data, pos)
            written = stop - pos
        else:
            written = 0
            for start, end in _data_runs(data, pos):
                pwrite(data[start:end], pos + start)
                written += end - start
        if progress:
            progress(stop - pos)
        return written

    written = 0
    def window(start: int) -> list:
        extents = reader.extents(start, min(start + WINDOW, reader.size))
        reader.prefetch(extents)
        return extents

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        extents = window(0) if reader.size else []
        for start in range(0, reader.size, WINDOW):
            ahead = window(start + WINDOW) if start + WINDOW < reader.size else []   # fetched while this is written
            written += sum(pool.map(copy, extents))
            extents = ahead
    return written


def _data_runs(data: memoryview, pos: int):
    """(start, end) within data of the runs of BLOCK_SIZE-aligned blocks
    (aligned on the disk: data starts at disk offset pos) that are not all
    zeros."""
    run_start = None
    at = 0
    while at < len(data):
        end = min(len(data), at + BLOCK_SIZE - (pos + at) % BLOCK_SIZE)
        if any_nonzero(data[at:end]):
            if run_start is None:
                run_start = at
        elif run_start is not None:
            yield run_start, at
            run_start = None
        at = end
    if run_start is not None:
        yield run_start, len(data)


def pwrite_all(fd: int, data, offset: int) -> None:
    """All of data at offset (pwrite may write less)."""
    data = memoryview(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
