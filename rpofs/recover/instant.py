"""`rpofs run`: a VM booted from a recovery point in seconds, then moved to
local storage while it runs, or stopped and removed.

A point's disks already are files in the mount, materialized read by read.
`run` makes each disk a qcow2 overlay whose backing file is the point's
`<disk>.raw`, defines a new domain from the point's captured XML (new name,
UUID and MACs; domainxml.py) and starts it: the guest boots at once, reads
what it touches from the repository and writes only to its overlays; the
point itself is never written.

The backing path is `<mount>/.by-uuid/<vm uuid>/at/<point time to the µs>/
<disk>.raw`: it names the same point for as long as the point exists, even
when a neighbour in the same second changes the point's directory name or
another VM takes the same name. The point is held (rpofs.store.holds) so
prune keeps it while the VM depends on it.

The mount must exist before QEMU starts: libvirt gives each QEMU a mount
namespace of its own, copied from the host's when the VM starts, and on a
host whose `/` is not a shared mount (containers) a FUSE mount made later
never reaches it. `run` uses a mount of the repository that exists, or
starts one at REPO/run/mnt. Unmounting it on the host afterwards does not
hurt a running VM: its namespace keeps its own reference, and the mount
daemon serves until the last such VM is gone.

`run --move` copies every disk with its whole backing chain into a
standalone qcow2 image while the guest runs (libvirt block copy; guest
writes go to both sides meanwhile) and pivots the VM onto it, disk by disk.
An interrupted move leaves the VM on its overlays (or some disks already
moved): run it again and it carries on with the disks not yet moved. A
moved VM is an ordinary VM: its run record, hold and overlays go.

Everything `run` makes is listed in REPO/run/<uuid>/run.json, written
before it is made, so `run --stop` (or a failed `run`) removes exactly that
and nothing else.

After a reboot (or a mount daemon that died) a run VM's overlays name
backing files in a mount that is not there: QEMU cannot open them, and the
VM cannot start. `run --list` says so in one line, `run --resume` mounts
again what the records name and starts the VMs, and the systemd unit
rpofs-run-mount.service serves REPO/run/mnt before libvirt starts at boot
(`run --serve-mount`), so VMs libvirt brings back itself find it.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from .. import durable
from ..errors import RpofsError, UnknownVM, VirtError
from ..mount.tree import Tree, resolve
from ..progress import Progress
from ..store import holds
from ..store.materialize import DiskReader
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..timefmt import format_time, now_us
from ..virt.client import Connection, Domain
from . import domainxml
from . import images
from .boot import check_dir, check_name, default_name, place_boot_state

log = logging.getLogger(__name__)

RUN_DIR = "run"
MOUNT_DIR = "mnt"
POLL_S = 0.2


@dataclass(frozen=True)
class RunOptions:
    name: str | None = None     # None: the VM's name and the point's time, made unique
    dir: str = ""               # where the overlays go; "": REPO/run/<uuid>/
    start: bool = True
    network: bool = True


@dataclass
class RunRecord:
    """What one `rpofs run` made, in REPO/run/<uuid>/run.json."""
    name: str
    uuid: str                   # the new domain's
    vm: str                     # the point's VM (uuid) and name
    vm_name: str
    point: int
    time_us: int
    workdir: str
    mountpoint: str
    mount_started: bool         # run started that mount (REPO/run/mnt)
    created_us: int
    made: list[str] = field(default_factory=list)     # files run created: overlays, nvram, TPM state
    moving: list[str] = field(default_factory=list)   # images a --move writes (a re-run or --stop finds them)
    defined: bool = False

    def save(self) -> None:
        durable.write_file(os.path.join(self.workdir, "run.json"),
                           json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def load(cls, path: str) -> "RunRecord":
        with open(path) as f:
            return cls(**json.load(f))

    @property
    def holder(self) -> str:
        return f"run-{self.uuid}"


@contextlib.contextmanager
def _run_lock(repo: Repository):
    """One run/move/stop at a time per repository: they share the mount and
    pick names that must stay unique."""
    folder = os.path.join(repo.path, RUN_DIR)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def records(repo: Repository | str) -> list[RunRecord]:
    """The run records of the repository (a Repository or its path: the
    systemd unit reads them before the repository is opened)."""
    folder = os.path.join(repo if isinstance(repo, str) else repo.path, RUN_DIR)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = os.path.join(entry.path, "run.json")
            if entry.is_dir() and os.path.exists(path):
                try:
                    out.append(RunRecord.load(path))
                except (OSError, ValueError, TypeError) as e:
                    log.warning("cannot read %s: %s", path, e)
    return out


def find(repo: Repository, name: str) -> RunRecord:
    for rec in records(repo):
        if name in (rec.name, rec.uuid):
            return rec
    raise UnknownVM(f"no VM named {name!r} was started by rpofs run from {repo.path} "
                    f"(rpofs run --list shows them)")


# -- run ----------------------------------------------------------------------

def run(repo: Repository, conn: Connection, vm: str, when: str, opts: RunOptions) -> tuple[RunRecord, list[str]]:
    """Boot a new VM from the point; its record and notes for the user
    (disks left out, a fresh variable store)."""
    # names and directories are checked before anything is made
    if opts.name is not None:
        check_name(opts.name)
    disk_dir = check_dir(opts.dir) if opts.dir else ""
    moment = resolve(repo, vm, when)  # as at/ does
    point = moment.point
    # a journal instant: its disks are read through the mount's at/<instant> (the fold it extends
    # with the journal's records up to it); the fold is what the hold keeps, with the journal after it
    held = moment.tree.journal_base(point.vm, point.time_us)[1] if moment.kind == "journal" else point
    captured = repo.read_chunk(bytes.fromhex(point.domain_xml)).decode()
    with _run_lock(repo):
        taken = {r.name for r in records(repo)}
        if opts.name is not None:
            if opts.name in taken or conn.has_domain(opts.name):
                raise RpofsError(f"a VM named {opts.name!r} exists already: choose another --name")
            name = opts.name
        else:
            name = default_name(point, lambda n: n in taken or conn.has_domain(n))
        new_uuid = str(uuidlib.uuid4())
        workdir = os.path.join(repo.path, RUN_DIR, new_uuid)
        disk_dir = disk_dir or workdir
        overlays = {d.target: os.path.join(disk_dir, f"{name}-{d.target}.qcow2") for d in point.disks}
        for path in overlays.values():
            if os.path.lexists(path):
                raise RpofsError(f"{path} exists already: remove it or choose another --name or --dir")
        mountpoint, starting = _ensure_mount(repo)
        try:
            os.makedirs(workdir, mode=0o700)
            rec = RunRecord(name=name, uuid=new_uuid, vm=point.vm, vm_name=point.vm_name, point=held.point,
                            time_us=point.time_us, workdir=workdir, mountpoint=mountpoint,
                            mount_started=starting is not None, created_us=now_us())
            rec.save()
        except BaseException:
            _abandon_mount(mountpoint, starting)
            raise
        try:
            notes = ([moment.note()] if moment.note() else []) + _make(repo, conn, rec, point, held, captured,
                                                                       overlays, opts, starting)
        except BaseException:
            if starting is not None:
                with contextlib.suppress(RpofsError):
                    starting.wait()  # so that it can be unmounted
            _remove(repo, conn, rec)
            raise
        return rec, notes


def backing_path(mountpoint: str, point: PointRecord, target: str) -> str:
    """The point's disk (or a journal instant's) through the mount, by a
    path that keeps naming it."""
    return os.path.join(point_dir(mountpoint, point.vm, point.time_us), f"{target}.raw")


def point_dir(mountpoint: str, vm: str, time_us: int) -> str:
    """The point's directory through the mount: .by-uuid/ and a microsecond
    at/ time keep naming it whatever names come and go around it."""
    return os.path.join(mountpoint, ".by-uuid", vm, "at", format_time(time_us, 6))


def _make(repo: Repository, conn: Connection, rec: RunRecord, point: PointRecord, held: PointRecord,
          captured: str, overlays: dict[str, str], opts: RunOptions, starting) -> list[str]:
    """Everything but the mount is made while the mount starts (its daemon
    takes 0.6-0.8 s to serve, a third of `run`); the VM starts once it does.
    point: what it boots (a point, or a journal instant's stand-in); held:
    the stored point prune must keep (the instant's fold)."""
    instant_us = point.time_us if held is not point else 0
    holds.put(repo, holds.Hold(rec.holder, held.vm, held.point, f"VM {rec.name} runs on it", rec.name,
                               instant_us))
    if repo.replica:   # another host's point: what that host published since, read (holds.py)
        repo.follow()
    if not repo.has_point(held.point):  # pruned between finding it and holding it
        raise RpofsError(f"the point {held.name or held.point} of {held.vm_name} was just pruned")
    for d in point.disks:
        rec.made.append(overlays[d.target])
        rec.save()
        # the backing file is not opened (it may not be mounted yet): its size is the disk's
        images.create(overlays[d.target], "qcow2", d.size, backing=backing_path(rec.mountpoint, point, d.target),
                      check_backing=False)
    boot = place_boot_state(repo, point, captured, rec.workdir, rec.name)
    rec.made += boot.files
    rec.save()
    prepared = domainxml.prepare(captured, domainxml.Recovery(
        name=rec.name, uuid=rec.uuid,
        disks=tuple(domainxml.NewDisk(t, p, "qcow2") for t, p in overlays.items()),
        workdir=rec.workdir, network=opts.network, nvram=boot.nvram,
        marker={"kind": "run", "vm": point.vm, "point": held.point,
                "time": format_time(point.time_us, 6), "repository": repo.path}))
    dom = conn.define(prepared.xml)
    rec.defined = True
    rec.save()
    tpm = boot.place_tpm(dom.uuid)
    if tpm:
        rec.made.append(tpm)
        rec.save()
    if starting is not None:
        starting.wait()
    for d in point.disks:
        backing = backing_path(rec.mountpoint, point, d.target)
        if not os.path.exists(backing):
            raise RpofsError(f"the mount at {rec.mountpoint} does not show {backing}")
    if opts.start:
        dom.start()
    return list(prepared.notes) + boot.notes


def _ensure_mount(repo: Repository):
    """A mount of the repository that QEMU will see: one that exists and
    answers, or a new one at REPO/run/mnt, started and not waited for.
    (mountpoint, the StartingMount to wait for, or None when it was mounted
    already)."""
    from ..mount.daemon import mounts_of
    found = [m for m in mounts_of(repo.path) if mount_serves(repo.path, m)]
    if found:
        return found[0], None
    mountpoint = run_mountpoint(repo.path)
    return mountpoint, _mount_again(repo.path, mountpoint, repo.master_key())


def run_mountpoint(repo_path: str) -> str:
    """REPO/run/mnt: the mount run starts when the repository is not mounted."""
    return os.path.join(repo_path, RUN_DIR, MOUNT_DIR)


def mount_serves(repo_path: str, mountpoint: str) -> bool:
    """Whether the repository is mounted at `mountpoint` and the mount
    answers. A mount whose daemon died (killed, crashed) stays in the mount
    table and fails every call with ENOTCONN; after a reboot it is simply
    not there."""
    from ..mount.daemon import mounts_of
    if mountpoint not in mounts_of(repo_path):
        return False
    try:
        os.stat(os.path.join(mountpoint, ".by-uuid"))
    except OSError:
        return False
    return True


def run_mount_options(repo_path: str):
    """How run's own mount is made (MountOptions): QEMU must be able to read
    it."""
    from ..mount.daemon import MountOptions
    return MountOptions(repo=repo_path, mountpoint=run_mountpoint(repo_path), allow_other=not _qemu_is_root())


def clear_dead_mount(repo_path: str, mountpoint: str) -> None:
    """Take away the repository's mount at `mountpoint` when its daemon is
    gone (it would make the mountpoint 'busy' for a new one)."""
    from ..mount.daemon import mounts_of, unmount
    if mountpoint in mounts_of(repo_path) and not mount_serves(repo_path, mountpoint):
        log.info("unmounting %s: its mount daemon is gone", mountpoint)
        unmount(mountpoint)


def _mount_again(repo_path: str, mountpoint: str, master_key: bytes | None):
    """Start a mount of the repository at `mountpoint` (REPO/run/mnt, or the
    mount a run record names) unless one answers there: the StartingMount,
    or None. A dead one is unmounted first; run's own directory is made."""
    from ..mount.daemon import MountOptions, check_mountpoint, start_mount
    if mount_serves(repo_path, mountpoint):
        return None
    clear_dead_mount(repo_path, mountpoint)
    if mountpoint == run_mountpoint(repo_path):
        os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    check_mountpoint(mountpoint)
    return start_mount(MountOptions(repo=repo_path, mountpoint=mountpoint, allow_other=not _qemu_is_root()),
                       master_key)


def _abandon_mount(mountpoint: str, starting) -> None:
    """Undo a mount _ensure_mount started, when nothing came of it."""
    if starting is None:
        return
    from ..mount.daemon import unmount
    with contextlib.suppress(RpofsError):
        starting.wait()
        unmount(mountpoint)


def _qemu_is_root() -> bool:
    """Whether libvirt runs QEMU as root (qemu.conf's user); a mount without
    allow_other is readable by its owner only, root included."""
    try:
        with open("/etc/libvirt/qemu.conf") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "user":
                    return value.strip().strip('"') in ("root", "+0")
    except OSError:
        pass
    return False


# -- stop -----------------------------------------------------------------------

def stop(repo: Repository, conn: Connection, name: str) -> RunRecord:
    with _run_lock(repo):
        rec = find(repo, name)
        _remove(repo, conn, rec)
        return rec


def _remove(repo: Repository, conn: Connection, rec: RunRecord) -> None:
    """Undo what the record lists: the domain (only if it is the one run
    made: same UUID), the files run created, the hold, the record, and the
    mount run started once no other run VM needs it."""
    if rec.defined:
        dom = _domain(conn, rec)
        if dom is not None:
            dom.destroy()
            dom.undefine()
    for path in reversed(rec.made + rec.moving):
        _unlink(path)  # what cannot be removed is said, and the rest undone all the same
    holds.drop(repo.path, rec.holder)
    shutil.rmtree(rec.workdir, ignore_errors=True)
    _release_mount(repo, rec)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # never made (a name too long, a read-only directory), or not ours to remove
        log.warning("cannot remove %s: %s", path, e.strerror)


def _release_mount(repo: Repository, rec: RunRecord) -> None:
    """Unmount run's own mount (REPO/run/mnt) once no run VM uses it, which
    ever run started it (a VM started later found it mounted and used it)."""
    if rec.mountpoint != os.path.join(repo.path, RUN_DIR, MOUNT_DIR):
        return  # a mount the user made: theirs to unmount
    if any(r.mountpoint == rec.mountpoint for r in records(repo) if r.uuid != rec.uuid):
        return
    from ..mount.daemon import mounts_of, unmount
    if rec.mountpoint in mounts_of(repo.path):
        try:
            unmount(rec.mountpoint)
        except RpofsError as e:
            log.warning("leaving %s mounted: %s", rec.mountpoint, e)


def _domain(conn: Connection, rec: RunRecord) -> Domain | None:
    try:
        return conn.domain(rec.uuid)
    except UnknownVM:
        return None


# -- move ----------------------------------------------------------------------

@dataclass(frozen=True)
class _DiskMove:
    target: str
    final: str      # DIR/<name>-<disk>.qcow2: the point's data, then the guest's merged in
    top: str        # DIR/<name>-<disk>.top.qcow2: over final, the mirror of the overlay
    step: str       # "write" (still on its overlay), "merge" (on top), "done" (on final)


def move(repo: Repository, conn: Connection, name: str, dest_dir: str) -> RunRecord:
    """Make each disk a standalone qcow2 image in DIR while the VM runs:

    1. the point's disk written into DIR/<name>-<disk>.qcow2 straight from
       the repository (only its data: zeros stay unallocated; the point is
       immutable, so the guest need not wait);
    2. a block copy of the overlay alone onto a new image over it (shallow:
       the guest's writes since `run`, and those made meanwhile), then a
       pivot onto it;
    3. an active commit of that image into the first, then a pivot: the VM
       runs on DIR/<name>-<disk>.qcow2 alone.

    Why not a full block copy of the chain: the mount's raw files cannot
    report holes (FUSE lseek is not in pyfuse3), so QEMU would read every
    byte of the disk through the mount and write it all, zeros included — a
    1 TiB disk with 10 GiB of data would take 1 TiB in DIR.

    Each step leaves the VM on a complete chain; an interrupted move is run
    again and carries on from the step each disk is at."""
    dest_dir = os.path.abspath(dest_dir)
    if not os.path.isdir(dest_dir):
        raise RpofsError(f"--dir {dest_dir}: no such directory")
    with _run_lock(repo):
        rec = find(repo, name)
        dom = _domain(conn, rec)
        if dom is None:
            raise RpofsError(f"{rec.name} is gone from libvirt: rpofs run --stop {rec.name} cleans up after it")
        if not dom.is_running():
            raise RpofsError(f"{rec.name} is not running: a move copies a running VM's disks "
                             f"(virsh start {rec.name} first)")
        with repo.env.begin() as txn:
            point = repo.get_point(txn, rec.point)
        if point is None:
            raise RpofsError(f"the point {rec.name} runs on is gone from the repository")
        plan = _plan_move(dom, rec, dest_dir)
        rec.moving = sorted(set(rec.moving) | {p for d in plan for p in (d.final, d.top)})
        rec.save()
        _write_bases(repo, point, dom, rec, [d for d in plan if d.step == "write"])
        for d in plan:
            if d.step == "write":
                _block_job(dom, rec, d.target, lambda: dom.block_copy(d.target, d.top, shallow=True), "copy")
            if d.step in ("write", "merge"):
                _block_job(dom, rec, d.target, lambda: dom.block_commit_active(d.target), "merge")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d.top)
            log.info("%s: disk %s now on %s", rec.name, d.target, d.final)
        _finish_move(repo, conn, dom, rec, dest_dir)
        return rec


def _plan_move(dom: Domain, rec: RunRecord, dest_dir: str) -> list[_DiskMove]:
    overlays = {p for p in rec.made if p.endswith(".qcow2")}
    plan = []
    for target, source in sorted(dom.disk_sources().items()):
        final = os.path.join(dest_dir, f"{rec.name}-{target}.qcow2")
        top = os.path.join(dest_dir, f"{rec.name}-{target}.top.qcow2")
        if source == final:
            step = "done"
        elif source == top:
            step = "merge"
        elif source in overlays:
            step = "write"
            for path in (final, top):
                if os.path.lexists(path) and path not in rec.moving:
                    raise RpofsError(f"{path} exists already: remove it or choose another --dir")
        else:
            raise RpofsError(f"disk {target} of {rec.name} is on {source}, which is neither its overlay nor "
                             f"in {dest_dir}: was it moved elsewhere? (rpofs run --move NAME --dir DIR)")
        plan.append(_DiskMove(target, final, top, step))
    return plan


def _write_bases(repo: Repository, point: PointRecord, dom: Domain, rec: RunRecord,
                 todo: list[_DiskMove]) -> None:
    for d in todo:  # an earlier, interrupted move's job and images
        dom.cancel_block_job(d.target)
        for path in (d.final, d.top):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    readers = _readers(repo, point, rec, [d.target for d in todo])
    with Progress(f"moving {rec.name}: writing the point's disks", sum(r.size for r in readers)) as progress:
        for d, reader in zip(todo, readers):
            images.write_disk(reader, d.final, "qcow2", progress.add)
            images.create(d.top, "qcow2", backing=d.final, backing_fmt="qcow2")


def _readers(repo: Repository, point: PointRecord, rec: RunRecord, targets: list[str]) -> list:
    """The disks the VM runs on, as readers: the point's, or for a VM run at
    a journal instant that instant's (its fold with the records up to it,
    read as the mount reads it)."""
    if rec.time_us == point.time_us:
        return [DiskReader(repo, point, t) for t in targets]
    tree = Tree(repo)
    stand_in = tree.instant_point(rec.vm, rec.time_us)
    return [tree.disk_reader(stand_in, t) for t in targets]


def _block_job(dom: Domain, rec: RunRecord, target: str, begin, what: str) -> None:
    """Run one block job (a copy or a merge) to readiness and pivot; the
    job is ended without switching if anything fails. A job an interrupted
    move left running is ended first."""
    dom.cancel_block_job(target)
    begin()
    try:
        with Progress(f"moving {rec.name}: {what} of {target}", 0) as progress:
            while not dom.block_job_ready(target):
                job = dom.block_job(target)
                if job is None:
                    raise VirtError(f"the {what} of {rec.name} disk {target} ended before it was "
                                    f"complete (see libvirtd's log); run the move again")
                progress.set(*job)
                time.sleep(POLL_S)
        dom.pivot(target)
    except BaseException:
        with contextlib.suppress(RpofsError):
            dom.cancel_block_job(target)
        raise


def _finish_move(repo: Repository, conn: Connection, dom: Domain, rec: RunRecord, dest_dir: str) -> None:
    """The VM no longer reads its overlays: redefine it for its next boot
    without rpofs's marker and with its console files and variable store
    beside its disks, then remove the overlays, what a move interrupted
    after its pivot left (a merged top image), the hold and the record."""
    xml, moved = domainxml.relocate(dom.xml(inactive=True), rec.workdir, dest_dir)
    for old, new in moved:
        if os.path.exists(old) and old.endswith("_VARS.fd"):  # the variable store carries over
            shutil.copy2(old, new)
    conn.define(xml)
    still = set(dom.disk_sources().values())
    for path in [p for p in rec.made if p.endswith(".qcow2")] + rec.moving:
        if path not in still:
            _unlink(path)
    holds.drop(repo.path, rec.holder)
    _release_mount(repo, rec)   # before the record goes: a move killed in between is run again and ends it
    shutil.rmtree(rec.workdir, ignore_errors=True)


# -- list ------------------------------------------------------------------------

@dataclass(frozen=True)
class RunState:
    record: RunRecord
    state: str          # "running", "shut off", "gone"
    on_overlays: bool
    mounted: bool = True    # the mount its overlays read through is there and answers

    @property
    def todo(self) -> str:
        """What to do, in one line, when the VM cannot run as it is ("": nothing)."""
        if self.state == "gone":
            return f"gone from libvirt: rpofs run --stop {self.record.name} removes what is left"
        if not self.mounted:
            return f"mount missing ({self.record.mountpoint}): rpofs run --resume {self.record.name}"
        return ""


def listing(repo: Repository, conn: Connection) -> list[RunState]:
    out = []
    serving: dict[str, bool] = {}
    for rec in records(repo):
        if rec.mountpoint not in serving:
            serving[rec.mountpoint] = mount_serves(repo.path, rec.mountpoint)
        dom = _domain(conn, rec)
        if dom is None:
            out.append(RunState(rec, "gone", False, serving[rec.mountpoint]))
            continue
        state = "running" if dom.is_running() else "shut off"
        overlays = {p for p in rec.made if p.endswith(".qcow2")}
        out.append(RunState(rec, state, bool(overlays & set(dom.disk_sources().values())), serving[rec.mountpoint]))
    return out


# -- after a reboot ----------------------------------------------------------------

@dataclass(frozen=True)
class Resumed:
    record: RunRecord
    mounted: bool       # its mount was made again
    state: str          # "started", "running", "shut off" (not asked to start), "gone", "failed"
    error: str = ""


def resume(repo: Repository, conn: Connection, name: str | None = None, start: bool = True) -> list[Resumed]:
    """Bring run VMs back after a reboot (or a mount daemon that died): every
    mount their records name that is not there and answering is made again
    (REPO/run/mnt, or a mount of the user's at its recorded place: the
    overlays name their backing files by that path), waited for, each
    point checked to be in it; then each VM that is defined and shut off is
    started (not with start=False). name: that VM only, else every run VM.
    One VM's failure to start is its own result, not the others'."""
    with _run_lock(repo):
        recs = [find(repo, name)] if name else records(repo)
        if not recs:
            raise RpofsError(f"no VM was started by rpofs run from {repo.path}: nothing to resume")
        starting = {}
        for mountpoint in dict.fromkeys(r.mountpoint for r in recs):
            pending = _mount_again(repo.path, mountpoint, repo.master_key())
            if pending is not None:
                starting[mountpoint] = pending
        for pending in starting.values():
            pending.wait()
        out = []
        for rec in recs:
            remounted = rec.mountpoint in starting
            dom = _domain(conn, rec) if rec.defined else None
            if dom is None:
                out.append(Resumed(rec, remounted, "gone"))
                continue
            where = point_dir(rec.mountpoint, rec.vm, rec.time_us)
            if not os.path.isdir(where):
                out.append(Resumed(rec, remounted, "failed", f"the mount at {rec.mountpoint} does not show its "
                                   f"point {where} (gone from the repository?)"))
                continue
            if dom.is_running():
                out.append(Resumed(rec, remounted, "running"))
            elif not start:
                out.append(Resumed(rec, remounted, "shut off"))
            else:
                try:
                    dom.start()
                except RpofsError as e:
                    out.append(Resumed(rec, remounted, "failed", str(e)))
                    continue
                out.append(Resumed(rec, remounted, "started"))
        return out


def needs_run_mount(repo_path: str) -> bool:
    """Whether a run VM reads through REPO/run/mnt (the systemd unit serves it then)."""
    return any(r.mountpoint == run_mountpoint(repo_path) for r in records(repo_path))
