"""Continuous protection of one VM: start it, keep it, fold its journal,
end it. Synchronous: `rpofs protect` calls it directly, the ingester on a
worker thread. The design and the measurements behind it: docs/PROTECT.md.

A session:
1. a checkpoint is made (C0), the journal server started, and every
   chosen disk mirrored into it (libvirt block copy, write-blocking);
2. when every mirror is ready, the journal up to that instant is folded
   into a full (the mirror's first pass wrote every byte), recorded with
   C0 as its checkpoint, and the session is `protected`;
3. every journal_fold the records since are folded into a log point. Each
   fold records the newest checkpoint that is *confirmed*: made while the
   mirror ran, with a durable record taken in CONFIRM_S after it. Every
   write before such a checkpoint was journaled, so a log backup from it on
   top of the fold misses nothing. A new checkpoint is made after each fold;
4. the session ends when asked (unprotect), when the VM stops, or when the
   mirror or the server fails. QEMU answers the guest's write even when the
   target failed it (measured: docs/PROTECT.md), so a write after the
   failure is in the VM's disk only: the ingester then takes a log backup at
   once (the "repair"), which extends the last fold from its confirmed
   checkpoint and so takes every block written since.

A guard process (rpofs.protect.guard) started with the mirrors lets them go
when the server stops answering, so the guest never waits on rpofs for
more than its bound (~5 s measured, 10 s documented), with no daemon.

libvirt refuses a backup job on a disk that is being mirrored; checkpoints
can be made meanwhile. So while a VM is protected its points come from the
journal only.
"""

import contextlib
import logging
import os
import signal
import socket as socketlib
import subprocess
import sys
import time
from dataclasses import replace
from typing import NamedTuple

from ..children import child_env
from ..errors import RpofsError
from ..store.repo import Repository
from ..store.schema import DiskRecord, PointRecord, ProtectionSession
from ..store.vmlock import vm_lock
from ..timefmt import now_us
from ..virt.client import CHECKPOINT_PREFIX, Domain, DomainInfo
from ..virt.disks import DiskChoice, chosen_disks
from ..virt.marker import run_vm_refused, runs_on_a_point
from ..store import holds, protection
from ..store.journal import JournalReader, journal_dir, reader as journal_reader, scan, segment_start, segments
from .fold import FoldInput, fold
from .guard import note as guard_note

log = logging.getLogger(__name__)

SOCKET_DIR = "/run/rpofs"
CONFIRM_S = 2.0          # a checkpoint is confirmed once the mirror ran this long after it
READY_TIMEOUT_S = 600.0  # the mirrors' first pass, at least
SERVER_START_S = 10.0
LOCK_WAIT_S = 30.0       # how long protect and unprotect (by hand) wait for another job on the VM


class NotProtectable(RpofsError):
    pass


class Outcome(NamedTuple):
    """What a look at a session (tick, fold_now) or its end came to."""
    session: ProtectionSession       # as recorded after it
    point: PointRecord | None        # the fold it made, if any
    ended: str = ""                  # why the session ended; "" while it goes on


def socket_path(vm: str) -> str:
    return os.path.join(SOCKET_DIR, f"{vm}.journal")


# -- the journal server process ------------------------------------------------

def start_server(directory: str, socket: str, disks: tuple[DiskRecord, ...], master: bytes | None = None) -> int:
    """The server, detached: its own session, so it outlives the process
    that started it (a daemon killed with -9 leaves the mirror working).
    master: an encrypted repository's master key, handed over through a
    pipe (never argv or the environment): the server seals every record."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(socket), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    key_args, pass_fds = [], ()
    if master is not None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, master)   # 32 bytes: within any pipe's buffer
        os.close(write_fd)
        key_args, pass_fds = [f"--key-fd={read_fd}"], (read_fd,)
    try:
        with open(os.path.join(directory, "server.log"), "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rpofs.protect.server", directory, socket] + key_args
                + [f"{d.target}={d.size}" for d in disks], pass_fds=pass_fds,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
                env=child_env())
    finally:
        for fd in pass_fds:
            os.close(fd)
    deadline = time.monotonic() + SERVER_START_S
    while not _listening(socket):  # the file exists from bind(), connections work from listen()
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc.pid)
            raise RpofsError(f"the journal server did not start (see {directory}/server.log)")
        time.sleep(0.02)
    return proc.pid


def start_guard(dom: Domain, socket: str, directory: str, server_pid: int, disks) -> int:
    """The guard of the mirrors into `socket` (rpofs.protect.guard), detached
    like the server: it lets them go when the server stops answering, so
    the guest never waits on rpofs longer than its bound, with no daemon."""
    with open(os.path.join(directory, "guard.log"), "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpofs.protect.guard", dom.uri(), dom.uuid, socket, directory, str(server_pid)]
            + [d.target for d in disks],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True, env=child_env())
    return proc.pid


def _listening(path: str) -> bool:
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def server_alive(pid: int, directory: str) -> bool:
    """Whether pid is this journal's server, running (a zombie is not)."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it was our child and died
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"rpofs.protect.server" in cmdline and directory.encode() in cmdline and state != "Z"


def stop_server(pid: int, wait_s: float = 5.0) -> None:
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# -- a session's life ----------------------------------------------------------------

def protect(repo: Repository, dom: Domain, choice: DiskChoice = DiskChoice(), progress=None,
            lock_wait_s: float = LOCK_WAIT_S) -> ProtectionSession:
    """Start protecting the VM (or find its session still running); the
    session once protected. progress: set(done, total) with the mirrors'
    first pass in bytes."""
    with vm_lock(repo.path, dom.uuid, dom.name, "protect", lock_wait_s):
        info = dom.info()
        if not info.running:
            live = protection.current(repo, dom.uuid)
            if live is not None:  # QEMU stopped while no one watched: its journal is folded now
                end(repo, dom, live, "the VM stopped")
            raise NotProtectable(f"VM {info.name} is not running")
        if runs_on_a_point(dom.xml()):
            raise NotProtectable(run_vm_refused(info.name, "protect"))
        disks = tuple(chosen_disks(dom, info, choice, "protect"))
        live = protection.current(repo, dom.uuid)
        if live is not None:
            broken = health(repo, dom, live)
            if not broken and live.state == "protected":
                if [d.target for d in live.disks] != [d.target for d in disks]:
                    raise NotProtectable(f"VM {info.name} is protected already, its disks "
                                         f"{', '.join(d.target for d in live.disks)}: rpofs unprotect "
                                         f"{info.name} first to protect others")
                return live
            end(repo, dom, live, broken or "a session that had not finished starting was found")
        return _start(repo, dom, info, disks, progress)


def _start(repo: Repository, dom: Domain, info: DomainInfo, disks, progress) -> ProtectionSession:
    session = protection.save(repo, ProtectionSession(dom.uuid, now_us(), disks))
    directory = journal_dir(repo.path, session)
    socket = socket_path(dom.uuid)
    try:
        pid = start_server(directory, socket, disks, repo.master_key())
        session = protection.save(repo, replace(session, server_pid=pid))
        checkpoint = f"{CHECKPOINT_PREFIX}{now_us()}"
        dom.create_checkpoint(checkpoint, [d.target for d in disks], [d.target for d in info.disks])
        for d in disks:
            dom.start_mirror(d.target, socket)
        start_guard(dom, socket, directory, pid, disks)
        ready_us = _wait_ready(dom, disks, progress)
        journal = journal_reader(repo.path, session)
        session = replace(session, state="protected", ready_us=ready_us, folded_us=ready_us,
                          checkpoint=checkpoint)
        _fold(repo, dom, info, session, journal.records(), ready_us, None, checkpoint)
    except BaseException as e:
        end(repo, dom, session, f"starting failed: {e}", fold_journal=False)
        raise
    log.info("%s: protected from %d (checkpoint %s)", info.name, ready_us, checkpoint)
    return session


def _wait_ready(dom: Domain, disks, progress) -> int:
    """Until every mirror's first pass is done: the instant after which
    every write is mirrored synchronously, so the journal is complete."""
    total = sum(d.size for d in disks)
    deadline = time.monotonic() + max(READY_TIMEOUT_S, total / (20 << 20))
    while True:
        done = 0
        ready = True
        for d in disks:
            job = dom.block_job(d.target)
            if job is None:
                raise RpofsError(f"the mirror of disk {d.target} ended during its first pass "
                                 f"(the journal server failed?)")
            done += job.done * d.size // job.total if job.total else 0
            ready = ready and dom.block_job_ready(d.target)
        if progress is not None:
            progress.set(done, total)
        if ready:
            return now_us()
        if time.monotonic() > deadline:
            raise RpofsError("the mirrors' first pass did not finish in time")
        time.sleep(0.05)


def health(repo: Repository, dom: Domain, session: ProtectionSession, journal: "JournalReader | None" = None) -> str:
    """"" while the session's server runs and every disk is mirrored into
    it; else what is wrong."""
    directory = journal_dir(repo.path, session)
    let_go = guard_note(directory)
    if let_go:
        return let_go
    if not dom.is_running():
        return "the VM stopped"
    if journal is not None and journal.damage:
        return journal.damage
    if not server_alive(session.server_pid, directory):
        return "the journal server is not running"
    if journal is not None and journal.torn_tail():
        return journal.torn_tail() + " while its server runs: damaged"
    socket = socket_path(dom.uuid)
    for d in session.disks:
        if dom.mirror_socket(d.target) != socket or dom.block_job(d.target) is None:
            return f"disk {d.target} is not mirrored into the journal any more (its mirror job failed or ended)"
    return ""


def tick(repo: Repository, dom: Domain, session: ProtectionSession, journal: JournalReader,
         fold_due: bool) -> Outcome:
    """One look at a protected session, folding when fold_due. A broken
    session is ended (its journal folded)."""
    broken = health(repo, dom, session, journal)
    if broken:
        return end(repo, dom, session, broken, journal=journal)
    if not fold_due:
        return Outcome(session, None)
    return fold_now(repo, dom, session, journal)


def fold_now(repo: Repository, dom: Domain, session: ProtectionSession,
             journal: JournalReader) -> Outcome:
    """Fold what the journal holds since the last fold (called while the
    mirror is seen running: pending checkpoints old enough are confirmed),
    then make the next checkpoint."""
    now = now_us()
    journal.records()
    newest = journal.newest()
    confirmed = session.checkpoint
    pending = []
    existing = set(dom.checkpoints())
    margin = int(CONFIRM_S * 1e6)
    for name, made in session.pending:
        if name not in existing:
            continue  # deleted meanwhile (a restarted daemon's leftover check)
        # Journaled in batches, in order: a durable record taken in `margin`
        # after the checkpoint means every write taken in before that is
        # durable too, and so every write the checkpoint's bitmap leaves out
        # (unless one took longer than `margin` from QEMU's source write to
        # the server, docs/PROTECT.md).
        if made + margin <= min(now, newest):
            confirmed = name
        else:
            pending.append((name, made))
    session = replace(session, checkpoint=confirmed, pending=tuple(pending))
    point = _fold_records(repo, dom, session, journal)
    if point is not None:
        session = protection.current(repo, dom.uuid) or session
        name = f"{CHECKPOINT_PREFIX}{now_us()}"
        info = dom.info()
        dom.create_checkpoint(name, [d.target for d in session.disks], [d.target for d in info.disks])
        session = protection.save(repo, replace(session, pending=session.pending + ((name, now_us()),)))
        _drop_old_checkpoints(dom, session)
    else:
        session = protection.save(repo, session)
    return Outcome(session, point)


def _fold_records(repo: Repository, dom: Domain, session: ProtectionSession, journal: JournalReader,
                  ended: ProtectionSession | None = None) -> PointRecord | None:
    """The records since the newest point, folded into a log (None when
    there are none)."""
    found = journal.records()
    parent = next(repo.newest_points(session.vm), None)
    if parent is None or parent.stats.get("journal", {}).get("session") != session.started_us:
        raise RpofsError("the VM's newest point is not this session's: its journal cannot be folded onto it")
    newer = [r for r in found if r.time_us > parent.time_us]
    if not newer:
        if ended is not None:
            protection.save(repo, ended)
        return None
    until = newer[-1].time_us
    info = dom.info() if dom.is_running() else None
    return _fold(repo, dom, info, ended or replace(session, folded_us=until), found, until, parent,
                 session.checkpoint)


def _fold(repo: Repository, dom: Domain, info: DomainInfo | None, session: ProtectionSession,
          found: list, until: int, parent: PointRecord | None, checkpoint: str) -> PointRecord:
    if info is not None:
        xml, name = info.xml, info.name
    else:  # the VM stopped: the definition the last point captured
        xml, name = repo.read_chunk(bytes.fromhex(parent.domain_xml)).decode(), parent.vm_name
    try:
        checkpoint_xml = dom.checkpoint_xml(checkpoint) if checkpoint else ""
    except RpofsError:
        checkpoint_xml = ""
    what = FoldInput(session.vm, name, xml, checkpoint, checkpoint_xml)
    return fold(repo, session, found, until, parent, what,
                also=lambda txn, record: protection.put(repo, txn, session))


def _drop_old_checkpoints(dom: Domain, session: ProtectionSession) -> None:
    """Checkpoints older than the confirmed one are not needed: a bitmap
    each write must update."""
    keep = {session.checkpoint} | {name for name, _ in session.pending}
    names = dom.checkpoints()
    if session.checkpoint not in names:
        return
    for old in names[:names.index(session.checkpoint)]:
        if old not in keep:
            with contextlib.suppress(RpofsError):
                dom.delete_checkpoint(old)


def end(repo: Repository, dom: Domain, session: ProtectionSession, reason: str,
        journal: JournalReader | None = None, fold_journal: bool = True) -> Outcome:
    """Stop the mirrors and the server, fold what the journal holds, and
    record the session as ended (why, and up to when its journal reads)."""
    for d in session.disks:
        with contextlib.suppress(RpofsError):
            if dom.mirror_socket(d.target) == socket_path(dom.uuid):
                dom.cancel_block_job(d.target)
    stop_server(session.server_pid)
    journal = journal or journal_reader(repo.path, session)
    found = journal.records() if session.state == "protected" else []
    ended = replace(session, state="ended", ended_us=now_us(), reason=reason,
                    last_us=found[-1].time_us if found else session.ready_us)
    point = None
    if fold_journal and session.state == "protected":
        try:
            point = _fold_records(repo, dom, session, journal, ended=ended)
        except (RpofsError, OSError) as e:  # a full disk, say: the next backup takes these writes
            log.error("%s: the journal's last records could not be folded: %s", dom.name, e)
            ended = replace(ended, last_us=session.folded_us)
    protection.save(repo, ended)
    log.info("%s: protection ended: %s", dom.name, reason)
    return Outcome(ended, point, reason)


def unprotect(repo: Repository, dom: Domain, lock_wait_s: float = LOCK_WAIT_S) -> ProtectionSession | None:
    """End the VM's session (its journal folded); None if it had none."""
    with vm_lock(repo.path, dom.uuid, dom.name, "unprotect", lock_wait_s):
        live = protection.current(repo, dom.uuid)
        if live is None:
            return None
        # a session already broken (its guard let the mirror go, its server died) ends for that reason
        broken = health(repo, dom, live) if dom.is_running() else ""
        return end(repo, dom, live, broken or "stopped by rpofs unprotect").session


def protect_by_hand(repo: Repository, dom: Domain, choice: DiskChoice = DiskChoice(),
                    progress=None) -> Outcome:
    """`rpofs protect`: start protecting the VM (protect; its first fold is
    the outcome's point); of one protected already, fold what its journal
    holds now, under the VM's lock (never beside the ingester's fold): the
    new point, or None when nothing was written since. progress(name): a
    Progress for the mirrors' first pass, or None. A session the fold finds
    broken is ended (its journal folded) and an RpofsError says what to do."""
    live = protection.current(repo, dom.uuid)
    with progress(dom.name) if progress is not None else contextlib.nullcontext() as shown:
        session = protect(repo, dom, choice, shown)
    if live is None or live.started_us != session.started_us:
        first = next((p for p in repo.newest_points(dom.uuid)), None)
        return Outcome(session, first if first is not None and first.origin == "journal" else None)
    with vm_lock(repo.path, dom.uuid, dom.name, "protect", LOCK_WAIT_S):
        outcome = tick(repo, dom, protection.current(repo, dom.uuid) or session,
                       journal_reader(repo.path, session), True)
    if outcome.ended:
        raise RpofsError(f"{dom.name}: protection ended: {outcome.ended}; back it up now with: "
                         f"rpofs backup {dom.name}")
    return outcome


def readable_span(session: ProtectionSession) -> tuple[int, int] | None:
    """(from, to) µs: the instants a session's journal can be read at,
    beyond its points; None when it holds no write after protection began
    (or retention dropped them all)."""
    start = max(session.ready_us, session.journal_from_us)
    return (start, session.last_us) if session.last_us > start else None


def _held_from(repo: Repository, vm: str) -> int:
    """The oldest fold a VM run at a journal instant reads on (holds'
    instant_us): the journal's records after it must stay. Far future: none."""
    keep = 1 << 62
    with repo.env.begin() as txn:
        for hold in holds.every(repo.path):
            if hold.vm == vm and hold.instant_us:
                fold = repo.get_point(txn, hold.point)
                if fold is not None:
                    keep = min(keep, fold.time_us)
    return keep


def drop_journal(repo: Repository, session: ProtectionSession, keep_within_us: int, now: int | None = None) -> int:
    """Retention of the journal's microsecond precision: delete the
    segments whose every record is folded and older than keep_within_us
    (oldest first: the journal stays a suffix; never past the fold a VM run
    at an instant reads on), recording up to when records may be gone. An instant whose base fold is older then reads
    from its fold only (at/ falls back to the points). Bytes freed."""
    now = now_us() if now is None else now
    horizon = min(session.folded_us if session.state != "ended" else session.last_us, now - keep_within_us,
                  _held_from(repo, session.vm))
    directory = journal_dir(repo.path, session)
    paths = segments(directory)
    freed, dropped_to = 0, session.journal_from_us
    for i, path in enumerate(paths):
        # a segment's records are all older than the next segment's start
        if i + 1 == len(paths):
            if session.state != "ended":
                break
            last = scan(path).records
            newest = last[-1].time_us if last else 0
        else:
            newest = segment_start(os.path.basename(paths[i + 1])) - 1
        if newest > horizon:
            break
        freed += os.path.getsize(path)
        dropped_to = max(dropped_to, newest)
        # recorded before the file goes: a reader never trusts a journal that lost records
        session = protection.raise_journal_from(repo, session, dropped_to)
        os.unlink(path)
    if session.state == "ended" and not segments(directory):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)
    return freed
