"""One backup of one VM: a full or a log point, from a libvirt pull job.

The rule (DESIGN §2): a log backup is recorded only onto a compatible full —
same VM, same disks and sizes, its chain's newest checkpoint still in libvirt
with a usable bitmap. Otherwise a full is taken and the reason recorded.
Every path ends the libvirt job; a failed backup leaves no point and deletes
the checkpoint it created (libvirt folds that checkpoint's bitmap into its
parent, so the next log still sees every change).
"""

import collections
import contextlib
import concurrent.futures
import logging
import os
from dataclasses import dataclass

from ..errors import RpofsError, VirtError
from ..store.repo import BackupWriter, Repository, any_nonzero
from ..store.schema import BLOCK_SIZE, CHUNK_SIZE, DiskRecord, PointRecord
from ..store.vmlock import vm_lock
from ..timefmt import now_us
from ..virt.client import (CHECKPOINT_PREFIX, AgentUnavailable, CheckpointUnusable, Connection, Domain,
                           DomainInfo)
from ..virt.disks import DiskChoice, chosen_disks
from ..virt.marker import run_vm_refused, runs_on_a_point
from ..virt.nbdexport import Export
from .config import Quiesce

log = logging.getLogger(__name__)

SOCKET_DIR = "/run/rpofs"       # unix socket paths must stay short (108 bytes)
# QEMU writes its copy-before-write scratch images here. Not in the repository:
# QEMU runs in its own mount namespace and may not see a filesystem mounted
# after the VM started.
SCRATCH_DIR = "/var/tmp/rpofs"
READ_SPAN = 4 << 20             # largest single NBD read for dirty runs
HASH_THREADS = 2                # hashing + compression; NBD reads stay on the caller's thread
IN_FLIGHT = 8                   # chunks read ahead of the hashing threads


class VmNotRunning(RpofsError):
    pass


@dataclass(frozen=True)
class BackupRequest:
    vm: str                              # name or UUID
    full_reason: str = ""                # non-empty: take a full, for this reason
    disks: DiskChoice = DiskChoice()     # which disks the VM's chains cover
    quiesce: Quiesce = Quiesce()
    lock_wait_s: float = 30.0            # how long to wait for another job on the VM


def back_up(repo: Repository, conn: Connection, req: BackupRequest, progress=None) -> PointRecord:
    """One point of the VM, under its lock (rpofs.store.vmlock): a log when
    a compatible full exists, else a full and why. progress: an object with
    set(done, total) and add(n), told the bytes read (rpofs.progress)."""
    dom = conn.domain(req.vm)
    with vm_lock(repo.path, dom.uuid, dom.name, "backup", req.lock_wait_s):
        info = dom.info()
        if not info.running:
            raise VmNotRunning(f"VM {info.name} is not running: rpofs backs up running VMs through libvirt's "
                               f"backup API")
        if runs_on_a_point(dom.xml()):
            raise RpofsError(run_vm_refused(info.name, "back up"))
        from ..store import protection
        if protection.current(repo, info.uuid) is not None:  # libvirt refuses a backup of a mirrored disk
            raise RpofsError(f"VM {info.name} is protected continuously: its points come from the journal "
                             f"(rpofs protect {info.name} folds it now; rpofs unprotect {info.name} ends it)")
        disks = chosen_disks(dom, info, req.disks, "back up")
        last = next(repo.newest_points(info.uuid), None)
        reason = req.full_reason or _why_not_log(repo, dom, disks, last)
        if not reason:
            try:
                return _run(repo, dom, info, disks, last, "", req.quiesce, progress)
            except CheckpointUnusable as e:
                reason = f"the chain's checkpoint cannot be used ({e})"
        log.info("%s: full backup: %s", info.name, reason)
        return _run(repo, dom, info, disks, None, reason, req.quiesce, progress)


def _why_not_log(repo: Repository, dom: Domain, disks: list[DiskRecord], last: PointRecord | None) -> str:
    """"" when a log backup may extend the VM's newest point; else why not."""
    if last is None:
        return "first backup of this VM"
    had = [(d.target, d.size) for d in last.disks]
    now = [(d.target, d.size) for d in disks]
    if had != now:
        return f"disks changed since the last point: {_describe(last.disks)} -> {_describe(disks)}"
    if last.checkpoint in dom.checkpoints():
        return ""
    # Lost metadata (VM redefined, moved, transient) with the bitmaps maybe
    # still in the images: give libvirt the checkpoint back, validated.
    if not last.checkpoint_xml:
        return f"checkpoint {last.checkpoint} of the last point is gone from libvirt"
    try:
        dom.redefine_checkpoint(repo.read_chunk(bytes.fromhex(last.checkpoint_xml)).decode())
    except VirtError as e:
        return f"checkpoint {last.checkpoint} is gone from libvirt and cannot be redefined ({e})"
    log.info("%s: redefined checkpoint %s from the catalog", dom.name, last.checkpoint)
    return ""


def _describe(disks) -> str:
    """"vda 32 MiB, vdb 1 GiB": disks as a person reads them."""
    return ", ".join(f"{d.target} {_size(d.size)}" for d in disks) or "none"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB" or n % 1024:
            return f"{n} {unit}"
        n //= 1024
    return ""


def end_leftovers(repo: Repository, dom: Domain, lock_wait_s: float = 60.0) -> list[str]:
    """After a crash of the process that backed this VM up: end its backup job
    and delete checkpoints that no committed point owns (their bitmaps fold
    into their parents'). Under the VM's lock: a backup running meanwhile
    (`rpofs backup` by hand) owns its new checkpoint, not a leftover."""
    with vm_lock(repo.path, dom.uuid, dom.name, "leftover check", lock_wait_s):
        return _end_leftovers(repo, dom)


def _end_leftovers(repo: Repository, dom: Domain) -> list[str]:
    done = []
    try:
        if dom.thaw():  # frozen by a predecessor killed between freeze and thaw
            done.append("thawed the guest's filesystems")
    except VirtError:
        pass  # no agent, or nothing to thaw
    socket = dom.backup_job_socket()
    if socket and socket.startswith(SOCKET_DIR + "/"):
        dom.end_job()
        done.append("ended a backup job")
    with contextlib.suppress(FileNotFoundError):  # QEMU's socket of a job that ended uncleanly
        os.unlink(os.path.join(SOCKET_DIR, f"{dom.uuid}.sock"))
    points = repo.points(dom.uuid)
    keep = {points[-1].checkpoint} if points else set()
    from ..store import protection  # a live protection session's checkpoints are its, not leftovers
    live = protection.current(repo, dom.uuid)
    if live is not None:
        keep |= {live.checkpoint} | {name for name, _ in live.pending}
    for name in reversed(dom.checkpoints()):  # newest first: leaves before parents
        if name not in keep:
            dom.delete_checkpoint(name)
            done.append(f"deleted checkpoint {name}")
    return done


def _run(repo: Repository, dom: Domain, info: DomainInfo, disks: list[DiskRecord],
         parent: PointRecord | None, reason: str, quiesce: Quiesce, progress) -> PointRecord:
    """Snapshot (frozen if asked), copy, commit; the job ended and a failed
    point's checkpoint deleted on every path."""
    for d in (SOCKET_DIR, SCRATCH_DIR):
        os.makedirs(d, mode=0o700, exist_ok=True)
    socket = os.path.join(SOCKET_DIR, f"{info.uuid}.sock")
    checkpoint = f"{CHECKPOINT_PREFIX}{now_us()}"
    warnings = []
    exports, frozen_at = _snapshot(dom, info, disks, parent, quiesce, socket, checkpoint, warnings)
    try:
        # The point's instant: when the freeze began, or else when the disks
        # were captured (backupBegin returned).
        time_us = frozen_at or now_us()
        boot_state = _read_boot_state(info, warnings)  # with the disks' instant, before the copy
        with repo.begin_writer() as writer:
            _copy_disks(writer, socket, exports, disks, parent, progress)
            xml_key, _ = writer.put_chunk(info.xml.encode())
            checkpoint_key, _ = writer.put_chunk(dom.checkpoint_xml(checkpoint).encode())
            firmware = {kind: writer.put_chunk(data)[0].hex() for kind, data in boot_state.items()}
            record = writer.commit(
                vm=info.uuid, vm_name=info.name, time_us=time_us, parent=parent,
                consistency="filesystems-frozen" if frozen_at else "crash-consistent", disks=disks,
                checkpoint=checkpoint, domain_xml=xml_key.hex(), reason=reason,
                checkpoint_xml=checkpoint_key.hex(), warnings=tuple(warnings), firmware=firmware)
    except BaseException:
        try:
            dom.end_job()
        finally:
            dom.delete_checkpoint(checkpoint)
        raise
    dom.end_job()
    # Only the newest checkpoint is needed: older bitmaps would slow the guest's writes.
    for old in dom.checkpoints():
        if old != checkpoint:
            dom.delete_checkpoint(old)
    return record


def _snapshot(dom: Domain, info: DomainInfo, disks: list[DiskRecord], parent: PointRecord | None,
              quiesce: Quiesce, socket: str, checkpoint: str, warnings: list[str]):
    """Start the pull backup job (the disks are captured when it starts),
    with the guest's filesystems frozen around it when asked. (exports,
    the instant the freeze began or None when the point is not
    filesystems-frozen)."""
    frozen_at, froze_some = _freeze(dom, info, quiesce, warnings) if quiesce.enabled else (None, False)
    try:
        # If this fails, libvirt started nothing (and a job it refused may be
        # another process's: never end that one).
        exports = dom.begin_pull_backup(
            [d.target for d in disks], [d.target for d in info.disks], socket, SCRATCH_DIR,
            checkpoint, parent.checkpoint if parent else None)
    finally:
        if froze_some:  # the snapshot is taken: the guest need not wait for the copy
            dom.thaw()
    return exports, frozen_at


def _freeze(dom: Domain, info: DomainInfo, quiesce: Quiesce, warnings: list[str]) -> tuple[int | None, bool]:
    """Freeze what was asked: (the instant the freeze began if every
    requested filesystem froze, else None with a warning naming what did
    not — the point is then crash-consistent; whether anything may be
    frozen, to thaw). A mountpoint the guest does not have is refused when
    asked on the command line (quiesce.strict): nothing is backed up."""
    wanted = quiesce.mountpoints
    try:
        if wanted:
            present = set(dom.guest_mountpoints())
            missing = [m for m in wanted if m not in present]
            if missing and quiesce.strict:
                raise RpofsError(f"{info.name} has no filesystem mounted at {', '.join(missing)} "
                                 f"(it has {', '.join(sorted(present)) or 'none'}): nothing was backed up")
            wanted = tuple(m for m in wanted if m in present)
            if missing:
                warnings.append(f"not frozen: {', '.join(missing)} (no such mountpoint in the guest): "
                                f"the point is crash-consistent")
            if not wanted:
                return None, False
        asked = now_us()  # writers that start after this wait for the thaw
        froze = dom.freeze(wanted, quiesce.timeout_s)
    except AgentUnavailable as e:
        warnings.append(f"{e}: the point is crash-consistent")
        return None, False
    if froze < max(len(wanted), 1):
        warnings.append(f"the guest agent froze {froze} of {len(wanted) or 'its'} filesystems"
                        f"{' (' + ', '.join(wanted) + ')' if wanted else ''}: the point is crash-consistent")
        return None, True
    complete = len(wanted) == len(quiesce.mountpoints)
    return (asked if complete else None), True


def _copy_disks(writer: BackupWriter, socket: str, exports: dict, disks: list[DiskRecord],
                parent: PointRecord | None, progress) -> None:
    """Every chosen disk through its NBD export: a log copies the blocks
    the checkpoint's bitmap marks, a full every chunk that holds data."""
    opened = []
    try:
        for disk in disks:
            name, bitmap = exports[disk.target]
            opened.append(Export(socket, name, bitmap if parent else None))
            if opened[-1].size != disk.size:
                raise RpofsError(f"disk {disk.target} changed size during the backup")
        plans = [_dirty_runs(e) if parent else _allocated_chunks(e) for e in opened]
        if progress is not None:
            progress.set(0, sum(length for plan in plans for _, length in plan))
        for index, (export, plan) in enumerate(zip(opened, plans)):
            _pipeline(export, plan, _log_store(writer, index) if parent else _full_store(writer, index), progress)
    finally:
        for export in opened:
            export.close()


def _read_boot_state(info: DomainInfo, warnings: list[str]) -> dict[str, bytes]:
    """The UEFI variable store and the TPM state, read as the disks were
    captured (small files: a 528 KiB OVMF store, a few KiB of swtpm state).
    One that cannot be read leaves a warning: the point still holds the
    disks, and a recovery from it starts with a fresh one."""
    state = {}
    for kind, path in sorted((info.firmware or {}).items()):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            warnings.append(f"the {kind} file {path} cannot be read ({e.strerror}): not captured")
            continue
        if any_nonzero(data):
            state[kind] = data
        else:
            warnings.append(f"the {kind} file {path} is empty or all zeros: not captured")
    return state


def _pipeline(export: Export, ranges: list[tuple[int, int]], store, progress) -> None:
    """Read each (offset, length) on this thread; store(offset, data) —
    hashing, compressing, writing — on HASH_THREADS, IN_FLIGHT reads ahead."""
    def stored(offset, data):
        store(offset, data)
        if progress is not None:
            progress.add(len(data))

    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="rpofs-hash") as pool:
        pending = collections.deque()
        for offset, length in ranges:
            pending.append(pool.submit(stored, offset, export.pread(length, offset)))
            while len(pending) >= IN_FLIGHT:
                pending.popleft().result()
        while pending:
            pending.popleft().result()


def _allocated_chunks(export: Export) -> list[tuple[int, int]]:
    """(offset, length) of every chunk that holds allocated data; the rest
    stays absent from the full (zeros)."""
    wanted = sorted({c for off, n in export.data_ranges()
                     for c in range(off // CHUNK_SIZE, (off + n - 1) // CHUNK_SIZE + 1)})
    return [(c * CHUNK_SIZE, min(CHUNK_SIZE, export.size - c * CHUNK_SIZE)) for c in wanted]


def _dirty_runs(export: Export) -> list[tuple[int, int]]:
    """(offset, length) of the runs of changed blocks, up to READ_SPAN each."""
    blocks = sorted({b for off, n in export.dirty_ranges()
                     for b in range(off // BLOCK_SIZE, (off + n - 1) // BLOCK_SIZE + 1)})
    runs = []  # consecutive blocks read in one request
    for b in blocks:
        if runs and runs[-1][1] == b and (b - runs[-1][0]) * BLOCK_SIZE < READ_SPAN:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return [(first * BLOCK_SIZE, min(stop * BLOCK_SIZE, export.size) - first * BLOCK_SIZE) for first, stop in runs]


def _full_store(writer: BackupWriter, disk: int):
    """A full: each chunk read is stored under its number."""
    return lambda offset, data: writer.put_full_chunk(disk, offset // CHUNK_SIZE, data)


def _log_store(writer: BackupWriter, disk: int):
    """A log: each run of changed blocks read is stored block by block."""
    def store(offset, data):
        first = offset // BLOCK_SIZE
        for i in range(0, len(data), BLOCK_SIZE):
            writer.put_log_block(disk, first + i // BLOCK_SIZE, bytes(data[i:i + BLOCK_SIZE]))
    return store
