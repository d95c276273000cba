"""From a materialized disk to its filesystems: the disk as a file-like
stream, its partitions (MBR, GPT) named by number, or the whole disk as "0"
when a filesystem starts at its first byte."""

import logging
import threading
from dataclasses import dataclass, field

from dissect.util.stream import AlignedStream
from dissect.volume.disk import Disk
from dissect.volume.exceptions import DiskError

from .filesystems import Filesystem, FsError, open_filesystem
from .journal import JournalError, ReplayedDevice

log = logging.getLogger(__name__)

WHOLE_DISK = "0"


class ReadStream(AlignedStream):
    """Anything with read(offset, length) and a size, as the stream dissect reads."""

    def __init__(self, read, size: int):
        self._read_at = read
        super().__init__(size, align=64 << 10)

    def _read(self, offset: int, length: int) -> bytes:
        return bytes(self._read_at(offset, length))


@dataclass
class Volume:
    name: str             # "1", "2", ... or "0" for the whole disk
    offset: int
    size: int
    note: str = ""        # why its files cannot be shown, or what was done to show them
    _fs: Filesystem | None = field(default=None, repr=False)


class DiskFiles:
    """The volumes of one disk at one point, and their filesystems, opened on
    first use. Thread-safe."""

    def __init__(self, read, size: int, where: str):
        self._disk = ReadStream(read, size)
        self._read = read
        self.where = where
        self._lock = threading.Lock()
        self._volumes: list[Volume] | None = None

    def volumes(self) -> list[Volume]:
        with self._lock:
            if self._volumes is None:
                self._volumes = self._find_volumes()
            return self._volumes

    def _find_volumes(self) -> list[Volume]:
        try:
            if open_filesystem(self._disk) is not None:
                return [Volume(WHOLE_DISK, 0, self._disk.size)]
            self._disk.seek(0)  # dissect reads the table from where the stream stands
            disk = Disk(self._disk)
        except (DiskError, FsError) as e:
            log.warning("%s: no partition table or filesystem found: %s", self.where, e)
            return []
        except Exception as e:  # a damaged table: the disk itself stays readable
            log.warning("%s: partition table cannot be read: %s", self.where, e)
            return []
        return [Volume(str(p.number), p.offset, p.size) for p in disk.partitions
                if p.size > 0 and not _is_container(p)]

    def filesystem(self, volume: Volume) -> Filesystem | None:
        """The volume's filesystem, with an ext journal replayed in memory;
        None (and volume.note says why) when it cannot be shown."""
        with self._lock:
            if volume._fs is not None or volume.note.startswith("cannot"):
                return volume._fs
            base = volume.offset

            def read(offset, length):
                return self._read(base + offset, length)

            try:
                stream = ReadStream(read, volume.size)
                head = stream.read(2048)
                if head[1080:1082] == b"\x53\xef":  # ext: a mount would replay its journal
                    device = ReplayedDevice(read, volume.size)
                    if device.replayed:
                        volume.note = (f"ext journal replayed in memory: {device.transactions} transactions, "
                                       f"{device.blocks} blocks")
                        log.info("%s volume %s: %s", self.where, volume.name, volume.note)
                    stream = ReadStream(device.read, volume.size)
                volume._fs = open_filesystem(stream)
                if volume._fs is None:
                    volume.note = "cannot show files: no filesystem rpofs can read"
            except (FsError, JournalError) as e:
                volume.note = f"cannot show files: {e}"
            if volume.note.startswith("cannot"):
                log.warning("%s volume %s: %s", self.where, volume.name, volume.note)
            return volume._fs


def _is_container(partition) -> bool:
    """MBR extended partitions hold the logical ones, which are listed too."""
    return isinstance(partition.type, int) and partition.type in (0x05, 0x0F, 0x85)

