"""From a materialized disk to its filesystems: the disk as a file-like
stream and its volumes, each named as it shows under files/<disk>/:

    "1", "2", ...   a partition (MBR, GPT), by number
    "0"             the whole disk, when a filesystem starts at its first byte
    "<vg>-<lv>"     an LVM2 logical volume, named as in /dev/mapper (a hyphen
                    inside a VG or LV name is doubled: VG "my-vg", LV "root"
                    is "my--vg-root"); the partition or disk that is its
                    physical volume is not shown itself (lvm.py)

A volume whose filesystem cannot be opened (none there, like swap or a BIOS
boot partition; damaged; an LV whose layout is not read, or whose extents are
on a PV this disk does not hold) is left out, its reason logged once and kept
in DiskFiles.skipped."""

import logging
import threading
from dataclasses import dataclass, field

from dissect.util.stream import AlignedStream
from dissect.volume.disk import Disk
from dissect.volume.exceptions import DiskError

from .filesystems import Filesystem, FsError, XfsFilesystem, open_filesystem
from .journal import JournalError, ReplayedDevice
from .lvm import LvmError, logical_volumes, probe

log = logging.getLogger(__name__)

WHOLE_DISK = "0"


def one_line(text: str) -> str:
    """A note as one line: dissect's multi-line messages ("...scheme:\n- a\n- a\n- b")
    joined, each line once ("...scheme: a; b")."""
    parts = []
    for line in str(text).splitlines():
        line = line.strip().lstrip("-* ").strip().rstrip(".")
        if line and line not in parts:
            parts.append(line)
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


class ReadStream(AlignedStream):
    """Anything with read(offset, length) and a size, as the stream dissect reads."""

    def __init__(self, read, size: int):
        self._read_at = read
        super().__init__(size, align=64 << 10)

    def _read(self, offset: int, length: int) -> bytes:
        return bytes(self._read_at(offset, length))


@dataclass
class Volume:
    name: str             # "1", "2", ..., "0" for the whole disk, or "<vg>-<lv>"
    offset: int           # on the disk (an LV: where its first byte is; `read` maps the rest)
    size: int
    note: str = ""        # why its files cannot be shown, or what was done to show them
    read: object = field(default=None, repr=False)  # read(offset, length) of an LV; None: the disk at offset
    _fs: Filesystem | None = field(default=None, repr=False)
    _logged: bool = field(default=False, repr=False)


class DiskFiles:
    """The volumes of one disk at one point, and their filesystems, opened on
    first use. Thread-safe."""

    def __init__(self, read, size: int, where: str, crash_consistent: bool = False):
        self._disk = ReadStream(read, size)
        self._read = read
        self.where = where
        self.crash_consistent = crash_consistent  # taken without freezing: journals may hold the newest changes
        self.notes: list[str] = []  # what could not be read of the disk's layout (volumes have their own)
        self._lock = threading.Lock()
        self._volumes: list[Volume] | None = None
        self.skipped: list[Volume] = []  # found but left out: each note says why

    def volumes(self) -> list[Volume]:
        """The volumes whose filesystems open, in order: partitions, then LVs."""
        with self._lock:
            if self._volumes is None:
                found = self._find_volumes()
                # opened now (a listing of files/<disk>/ opens them all anyway), so that
                # one that cannot be shown is left out rather than failing the listing
                self._volumes = [v for v in found if self._open(v) is not None]
                self.skipped = [v for v in found if v._fs is None]
            return self._volumes

    def _find_volumes(self) -> list[Volume]:
        size = self._disk.size
        try:
            if open_filesystem(self._disk) is not None:
                return [Volume(WHOLE_DISK, 0, size)]
            pv = probe(self._read, 0, size, "the whole disk")
            if pv is not None:
                return self._logical(self._lvm([pv]))
            self._disk.seek(0)  # dissect reads the table from where the stream stands
            disk = Disk(self._disk)
        except LvmError as e:
            return self._problem(f"the whole disk: LVM physical volume cannot be read: {e}")
        except (DiskError, FsError) as e:
            return self._problem(f"no partition table or filesystem found: {e}")
        except Exception as e:  # a damaged table: the disk itself stays readable
            return self._problem(f"partition table cannot be read: {e}")
        volumes, pvs = [], []
        for p in disk.partitions:
            if p.size <= 0 or _is_container(p):
                continue
            length = _length(p, size)
            try:
                pv = probe(self._read, p.offset, length, f"partition {p.number}")
            except LvmError as e:  # a damaged label: no files there, nor a filesystem to show
                self._problem(f"partition {p.number}: LVM physical volume cannot be read: {e}")
                continue
            except Exception as e:
                self._problem(f"partition {p.number} cannot be read: {e}")
                continue
            if pv is not None:
                pvs.append(pv)
            else:
                volumes.append(Volume(str(p.number), p.offset, length))
        return volumes + self._logical(self._lvm(pvs)) if pvs else volumes

    def _problem(self, note: str) -> list:
        """Kept for point.json and the error a command gives (logged at info:
        `rpofs cp` says it in its one line, the mount's log has it)."""
        note = one_line(note)
        log.info("%s: %s", self.where, note)
        self.notes.append(note)
        return []

    def _lvm(self, pvs):
        try:
            return logical_volumes(pvs, self._read, self.where)
        except Exception as e:  # whatever damaged metadata does: the partitions still show
            return self._problem(f"LVM metadata cannot be read: {e}")

    @staticmethod
    def _logical(lvs) -> list[Volume]:
        return [Volume(lv.name, lv.offset, lv.size, one_line(lv.note), lv.read) for lv in lvs]

    def filesystem(self, volume: Volume) -> Filesystem | None:
        """The volume's filesystem, with an ext journal replayed in memory;
        None (and volume.note says why) when it cannot be shown."""
        with self._lock:
            return self._open(volume)

    def _open(self, volume: Volume) -> Filesystem | None:
        if volume._fs is not None or volume.note.startswith("cannot"):
            if volume.note.startswith("cannot") and not volume._logged:
                volume._logged = True
                log.info("%s volume %s: %s", self.where, volume.name, volume.note)
            return volume._fs
        read = volume.read
        if read is None:
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
            elif isinstance(volume._fs, XfsFilesystem) and self.crash_consistent:
                volume.note = ("XFS log not replayed: files shown as the disk holds them, without "
                               "changes the log alone may hold at this crash-consistent point")
                log.info("%s volume %s: %s", self.where, volume.name, volume.note)
        except (FsError, JournalError) as e:
            volume.note = one_line(f"cannot show files: {e}")
        except Exception as e:  # a read of the volume failed (a damaged chunk, an LV read)
            volume.note = one_line(f"cannot show files: {type(e).__name__}: {e}")
        if volume.note.startswith("cannot"):
            volume._logged = True
            log.info("%s volume %s: %s", self.where, volume.name, volume.note)
        return volume._fs


def _is_container(partition) -> bool:
    """MBR extended partitions hold the logical ones, which are listed too."""
    return isinstance(partition.type, int) and partition.type in (0x05, 0x0F, 0x85)


def _length(partition, disk_size: int) -> int:
    """A partition's size. dissect gives a GPT partition's as (last LBA - first
    LBA) sectors, one short: the last LBA is the partition's own."""
    raw = partition.raw
    if hasattr(raw, "last_lba") and hasattr(raw, "first_lba"):
        sector = getattr(partition.disk, "sector_size", 512)
        return min((raw.last_lba - raw.first_lba + 1) * sector, disk_size - partition.offset)
    return partition.size
