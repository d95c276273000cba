"""rpofs ingest: the daemon that holds each VM's RPO.

One trio task per VM decides when its next point is due (a log every
log_interval, a full when full_interval has passed since the chain's full)
and runs the blocking backup on a worker thread. A CapacityLimiter bounds the
jobs running at once; a VM waits only for a free job slot, never for another
VM's job. Failures back off per VM. A discovery loop starts tasks for wanted
VMs that run, and a task ends when its VM stops or vanishes (its points stay).
The libvirt connection is re-made with backoff when libvirtd restarts.
A VM with a retention policy is pruned every prune_interval, after a backup,
and its scattered log blocks are defragmented every defrag_interval.
Each application configured for a VM ([vm.NAME.apps.APP]) has a task of its
own that ships its log every `interval` through the guest agent (rpofs.apps),
independent of the block backups; a limiter bounds the agent calls in flight
(max_agent_calls). An agent that does not answer backs the app off (up to a
minute), said once. A shipment that waits for a block point (its stream
started after the newest one) wakes the VM's backup task to take one now.
A VM with `continuous = true` is protected (rpofs.protect, docs/PROTECT.md):
its disks mirrored into the journal, checked every WATCH_S, the journal
folded into a log point every journal_fold and its microsecond instants
dropped after keep_journal_within. While protected it takes no backups
(libvirt refuses a backup of a mirrored disk); when protection ends (the
mirror or the server failed) a log backup runs at once, which takes every
write the journal missed, and protection is tried again after a backoff.
On start, each VM's leftovers from a killed predecessor are ended first
(a live protection session is kept: its server outlives the daemon).
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import trio

from ..errors import RpofsError, TakenOver, UnknownVM
from ..store.defrag import defrag
from ..store import journal, shipments, verify
from ..store.prune import prune
from ..store.repo import Repository
from ..store.schema import PointRecord
from ..timefmt import US
from ..virt.client import Connection
from ..virt.marker import runs_on_a_point
from .. import durable, sdnotify
from . import metrics
from ..store.vmlock import VmBusy
from .backup import BackupRequest, VmNotRunning, back_up, end_leftovers
from .config import IngestConfig

log = logging.getLogger("rpofs.ingest")

DISCOVER_S = 2.0
LOCK_WAIT_S = 2.0   # a VM's backup by hand is waited for this long, then this round is skipped
STATUS_FILE = "ingest-status.json"
PUBLISH_S = 1.0           # a repository in an object store publishes its commits this often
MAX_BACKOFF_S = 60.0
WATCH_S = 1.0             # how often a protected VM's mirror and server are checked
PROTECT_RETRY_S = (10.0, 600.0)  # protection tried again after this, doubling to the most


@dataclass
class AppStatus:
    """One application's shipping, as `rpofs status` shows it."""
    name: str
    kind: str
    state: str = "starting"      # shipping | no agent | waiting for a block point | failing
    ships: int = 0
    bytes_shipped: int = 0
    interval_s: float = 0.0
    last_ship_us: int = 0        # time of its newest app point
    readable_us: int = 0         # time of its newest app point with a base (what at/ reads)
    last_round_us: int = 0       # when it last read the guest (with or without anything new)
    last_round_s: float = 0.0
    waiting: str = ""            # why its newest app point has no base
    last_error: str = ""
    last_error_us: int = 0
    failures: int = 0


@dataclass
class VmStatus:
    """What `rpofs status` shows of the daemon's view of one VM."""
    uuid: str
    name: str
    state: str = "starting"      # waiting | backing up | not running | gone | failing
    next_run_us: int = 0
    last_error: str = ""
    last_error_us: int = 0
    last_job_s: float = 0.0
    points: int = 0
    failures: int = 0
    bytes_ingested: int = 0
    newest_point_us: int = 0
    last_success_us: int = 0     # when its last backup committed (wall clock)
    job_bytes_done: int = 0      # the running backup's progress (bytes read of those it will read)
    job_bytes_total: int = 0
    apps: dict = field(default_factory=dict)   # name -> AppStatus
    # continuous protection ("" : not asked): starting | protected | unprotected (reason says why)
    protection: str = ""
    protection_reason: str = ""
    protected_since_us: int = 0
    journal_newest_us: int = 0   # the newest record journaled
    journal_folded_us: int = 0   # the newest fold: what is older is in ordinary points
    journal_bytes: int = 0       # journal bytes of the current session
    journal_bytes_per_s: float = 0.0


@dataclass
class _Schedule:
    """Where one VM's backups stand, between rounds of its task."""
    last: PointRecord | None
    last_full: PointRecord | None
    backoff: float = 0.0
    failed_at: float = 0.0
    warned: bool = False
    now: bool = False            # the next backup is due at once (protection just ended)
    protect_at: float = 0.0      # continuous VMs: when protection is tried next
    protect_failures: int = 0
    upkeep: dict = field(default_factory=lambda: {"prune": float("-inf"), "defrag": float("-inf")})


class _JobProgress:
    """What back_up reports of a running job, kept in the VM's status
    (status --json, metrics)."""

    def __init__(self, st: VmStatus):
        self._st = st

    def set(self, done: int, total: int | None = None) -> None:
        self._st.job_bytes_done = done
        if total is not None:
            self._st.job_bytes_total = total

    def add(self, n: int) -> None:
        self._st.job_bytes_done += n  # one writer at a time per VM; a torn read only shows a stale figure


def _runs_on_a_point(dom) -> bool:
    """rpofs.virt.marker's rule: left alone until moved (then its first point is a full)."""
    return runs_on_a_point(dom.xml())


class Ingester:
    def __init__(self, cfg: IngestConfig, repo: Repository):
        self.cfg = cfg
        self.repo = repo
        self.jobs = trio.CapacityLimiter(cfg.max_jobs)
        self.libvirt_calls = trio.CapacityLimiter(4)
        self.agent_calls = trio.CapacityLimiter(cfg.max_agent_calls)
        self._wake: dict[str, trio.Event] = {}   # a VM's backup task, woken for a point now
        self.status: dict[str, VmStatus] = {}
        self._tasks: set[str] = set()
        self._conn: Connection | None = None
        self._conn_lock = trio.Lock()
        self._started_us = int(time.time() * US)
        self.publication = {"host": repo.host, "pending": 0, "oldest_pending_us": None, "error": ""}

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await self._connection()
            nursery.start_soon(self._discover, nursery)
            nursery.start_soon(self._write_status)
            nursery.start_soon(self._verify_loop)
            if self.repo.publishes:
                nursery.start_soon(self._publish_loop)
            if self.cfg.metrics:
                await nursery.start(metrics.serve, self.cfg.metrics, self._metrics_text)
            log.info("event=started vms=%s max_jobs=%d", ",".join(self.cfg.vms) or "running", self.cfg.max_jobs)
            sdnotify.ready()
            task_status.started()

    # -- libvirt ---------------------------------------------------------------

    async def _connection(self) -> Connection:
        """The shared connection, re-made (with backoff) when libvirtd went away."""
        async with self._conn_lock:
            delay = 1.0
            while self._conn is None or not await self._call(self._conn.alive):
                try:
                    self._conn = await self._call(Connection, self.cfg.uri)
                    log.info("event=connected uri=%s", self.cfg.uri)
                except RpofsError as e:
                    log.warning("event=connect-failed uri=%s retry_s=%g error=%r", self.cfg.uri, delay, str(e))
                    await trio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            return self._conn

    async def _call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.libvirt_calls)

    # -- which VMs -------------------------------------------------------------

    async def _discover(self, nursery) -> None:
        while True:
            try:
                conn = await self._connection()
                if self.cfg.vms:
                    doms = []
                    for ref in self.cfg.vms:
                        try:
                            dom = await self._call(conn.domain, ref)
                        except UnknownVM:
                            continue
                        if await self._call(dom.is_running):
                            doms.append(dom)
                        else:
                            self._vm_status(dom.uuid, dom.name).state = "not running"
                else:
                    doms = await self._call(conn.running_domains)
                for dom in doms:
                    if dom.uuid not in self._tasks and self.cfg.wants(dom.name, dom.uuid):
                        if await self._call(_runs_on_a_point, dom):
                            self._vm_status(dom.uuid, dom.name).state = "runs on a recovery point"
                            continue
                        self._tasks.add(dom.uuid)
                        nursery.start_soon(self._vm_task, dom.uuid, dom.name)
            except RpofsError as e:
                log.warning("event=discover-failed error=%r", str(e))
            await trio.sleep(DISCOVER_S)

    def _vm_status(self, uuid: str, name: str) -> VmStatus:
        st = self.status.get(uuid)
        if st is None:
            st = self.status[uuid] = VmStatus(uuid, name)
        st.name = name
        return st

    # -- one VM ------------------------------------------------------------------

    async def _vm_task(self, uuid: str, name: str) -> None:
        st = self._vm_status(uuid, name)
        policy = self.cfg.policy(name, uuid)
        try:
            async with trio.open_nursery() as nursery:
                for app in policy.apps:
                    nursery.start_soon(self._ship_loop, uuid, st, app)
                await self._vm_loop(uuid, name, st, policy)
                nursery.cancel_scope.cancel()  # the VM stopped: so do its apps
        finally:
            self._tasks.discard(uuid)

    async def _vm_loop(self, uuid, name, st: VmStatus, policy) -> None:
        """Back the VM up on schedule until it stops; after each point, the
        upkeep that is due (prune, defrag). A continuous VM is protected
        instead whenever it can be."""
        await self._end_leftovers(uuid, name)
        sched = _Schedule(*await trio.to_thread.run_sync(newest_and_full, self.repo, uuid))
        st.newest_point_us = sched.last.time_us if sched.last else 0
        while True:
            if policy.continuous and time.time() >= sched.protect_at:
                if not await self._protected(uuid, st, policy, sched):
                    return
            if not await self._backup_round(uuid, name, st, policy, sched):
                return

    async def _backup_round(self, uuid, name, st: VmStatus, policy, sched: _Schedule) -> bool:
        """Wait for the next backup and take it; False once the VM stopped.
        A continuous VM waits at most until protection is tried again."""
        now = time.time()
        due, full_reason = (now, "") if sched.now else _next_due(now, sched.last, sched.last_full, policy)
        if sched.backoff:
            due = max(due, sched.failed_at + sched.backoff)
        st.next_run_us, st.state = int(due * US), "waiting" if not sched.backoff else "failing"
        wake = self._wake[uuid] = trio.Event()
        wait = due - now
        if policy.continuous and sched.protect_at < due:
            wait = sched.protect_at - now
        with trio.move_on_after(max(0.0, wait)):
            await wake.wait()  # an app's shipment waits for a block point: take one now
        if policy.continuous and time.time() >= sched.protect_at and not wake.is_set() and not sched.now:
            return True        # protection's turn; the backup was not due yet
        if wake.is_set() and time.time() < due:
            full_reason = ""  # early: a log (a full that is due waits for its time)
        sched.now = False
        try:
            point = await self._job(uuid, st, policy, full_reason)
        except VmBusy as e:  # a backup by hand: it made the point this one was for
            log.info("event=backup-skipped vm=%s why=%r", name, str(e))
            sched.last, sched.last_full = await trio.to_thread.run_sync(newest_and_full, self.repo, uuid)
            return True
        except (VmNotRunning, UnknownVM) as e:
            st.state = "gone" if isinstance(e, UnknownVM) else "not running"
            log.info("event=stop-scheduling vm=%s why=%r", name, str(e))
            return False
        except Exception as e:  # noqa: BLE001 — one VM's failure must not end the daemon
            sched.backoff, sched.failed_at = self._failed(st, policy, e), time.time()
            return True
        sched.backoff = 0.0
        sched.last = point
        if point.kind == "full":
            sched.last_full = point
        for w in point.warnings:
            if not sched.warned:  # a missing agent is said once, not every few seconds
                log.warning("event=crash-consistent vm=%s why=%r", name, w)
                sched.warned = True
        await self._upkeep(st, policy, sched.upkeep)
        return True

    # -- continuous protection -----------------------------------------------------

    async def _protected(self, uuid: str, st: VmStatus, policy, sched: _Schedule) -> bool:
        """Protect the VM (or take over its running session) and keep it
        protected until the session ends; False once the VM stopped. After
        an end, or a start that failed, the next backup is due at once (it
        takes what the journal missed) and protection waits a backoff."""
        from ..protect import protector
        try:
            dom = await self._call((await self._connection()).domain, uuid)
        except UnknownVM:
            st.state = "gone"
            return False
        try:
            async with self.jobs:
                st.state, st.protection = "protecting", "starting"
                session = await trio.to_thread.run_sync(
                    lambda: protector.protect(self.repo, dom, policy.disks, _JobProgress(st),
                                              lock_wait_s=LOCK_WAIT_S))
        except (RpofsError, OSError) as e:
            self._protection_off(st, sched, f"protection could not start: {e}")
            return await self._still_running(dom)
        st.protection, st.protection_reason, st.protected_since_us = "protected", "", session.ready_us
        st.state = "protected"
        sched.protect_failures = 0
        log.info("event=protected vm=%s since_us=%d disks=%s", st.name, session.ready_us,
                 ",".join(d.target for d in session.disks))
        sched.last, sched.last_full = await trio.to_thread.run_sync(newest_and_full, self.repo, uuid)
        st.newest_point_us = sched.last.time_us
        reason = await self._watch(uuid, dom, st, policy, sched, session)
        self._protection_off(st, sched, reason)
        return await self._still_running(dom)

    async def _still_running(self, dom) -> bool:
        try:
            return await self._call(dom.is_running)
        except RpofsError:
            return True  # libvirtd away: the next round finds out

    async def _watch(self, uuid: str, dom, st: VmStatus, policy, sched: _Schedule, session) -> str:
        """Every WATCH_S: the mirror and the server checked, the journal
        folded when journal_fold is due; why the session ended."""
        reader = journal.reader(self.repo.path, session)
        next_fold = time.monotonic() + policy.journal_fold_s
        seen = (time.monotonic(), 0)
        while True:
            await trio.sleep(WATCH_S)
            due = time.monotonic() >= next_fold
            try:
                outcome = await trio.to_thread.run_sync(self._tick, dom, session, reader, due)
            except VmBusy:
                continue  # `rpofs protect` or `unprotect` by hand holds the VM: look again next time
            except RpofsError as e:  # libvirtd restarting, say: the domain is looked up anew
                st.last_error, st.last_error_us = str(e), int(time.time() * US)
                log.warning("event=protection-check-failed vm=%s error=%r", st.name, str(e))
                try:
                    dom = await self._call((await self._connection()).domain, uuid)
                except RpofsError:
                    pass
                continue
            session, point = outcome.session, outcome.point
            if point is not None:
                st.last_job_s = 0.0
                self._record(st, point)
                sched.last = point
                if point.kind == "full":
                    sched.last_full = point
            newest = reader.newest()
            st.journal_newest_us, st.journal_folded_us = newest, session.folded_us
            size = reader.size()
            st.journal_bytes_per_s = (size - seen[1]) / max(time.monotonic() - seen[0], 1e-3)
            st.journal_bytes, seen = size, (time.monotonic(), size)
            if outcome.ended:
                return outcome.ended
            if due:
                next_fold = time.monotonic() + policy.journal_fold_s
                await self._drop_journal(st, policy)
                await self._upkeep(st, policy, sched.upkeep)

    def _tick(self, dom, session, journal, fold_due: bool):
        """One check (and fold when due) under the VM's lock: never at the
        same time as a protect or unprotect by hand."""
        from ..protect import protector
        from ..store.vmlock import vm_lock
        with vm_lock(self.repo.path, dom.uuid, dom.name, "protection", LOCK_WAIT_S):
            from ..store import protection
            live = protection.current(self.repo, dom.uuid)
            if live is None or live.started_us != session.started_us:
                return protector.Outcome(session, None, "the session was ended by hand")
            return protector.tick(self.repo, dom, live, journal, fold_due)

    def _protection_off(self, st: VmStatus, sched: _Schedule, reason: str) -> None:
        """Protection ended or did not start: back up at once, retry later."""
        delay = min(PROTECT_RETRY_S[0] * 2 ** min(sched.protect_failures, 8), PROTECT_RETRY_S[1])
        sched.protect_failures += 1
        sched.protect_at, sched.now = time.time() + delay, True
        st.protection, st.protection_reason = "unprotected", reason
        st.protected_since_us = 0
        log.warning("event=unprotected vm=%s retry_s=%g why=%r", st.name, delay, reason)

    async def _drop_journal(self, st: VmStatus, policy) -> None:
        """The journal's instants older than keep_journal_within go (every session of the VM)."""
        from ..protect import protector
        from ..store import protection
        try:
            for session in await trio.to_thread.run_sync(protection.of_vm, self.repo, st.uuid):
                await trio.to_thread.run_sync(protector.drop_journal, self.repo, session,
                                              int(policy.keep_journal_within_s * US))
        except (RpofsError, OSError) as e:
            log.warning("event=journal-retention-failed vm=%s error=%r", st.name, str(e))

    def _readable_us(self, vm: str, app: str) -> int:
        found = next((s for s in shipments.ships(self.repo, vm, app=app, newest_first=True) if s.base is not None), None)
        return found.time_us if found else 0

    async def _ship_loop(self, uuid: str, st: VmStatus, app) -> None:
        """Ship one app every interval until the VM's task ends. The app has
        a libvirt connection of its own: libvirtd serves at most
        max_client_requests (5) calls of one connection at once, and with
        every agent call on the shared one that, not CPU, bounded the VMs a
        host keeps at 1 s (tools/bench-apps: 34 at ~25 ms an agent call)."""
        from ..apps.shipper import Shipper
        from ..virt.client import AgentUnavailable
        ast = st.apps[app.name] = AppStatus(app.name, app.kind, interval_s=app.interval_s,
                                            readable_us=await trio.to_thread.run_sync(self._readable_us, uuid, app.name))
        shipper, backoff, conn = None, 0.0, None
        try:
            while True:
                started = time.monotonic()
                try:
                    if shipper is None:
                        if conn is not None:
                            old, conn = conn, None
                            await trio.to_thread.run_sync(old.close)
                        conn = await trio.to_thread.run_sync(Connection, self.cfg.uri)
                        dom = await trio.to_thread.run_sync(conn.domain, uuid)
                        shipper = Shipper(self.repo, dom, uuid, st.name)
                    async with self.agent_calls:
                        result = await trio.to_thread.run_sync(shipper.ship, app)
                except AgentUnavailable as e:
                    if ast.state != "no agent":
                        log.warning("event=app-no-agent vm=%s app=%s error=%r", st.name, app.name, str(e))
                    ast.state, ast.last_error, ast.last_error_us = "no agent", str(e), int(time.time() * US)
                    backoff = min(max(backoff * 2, app.interval_s, 1.0), MAX_BACKOFF_S)
                    await trio.sleep(backoff)
                    continue
                except Exception as e:  # noqa: BLE001 — one app's failure must not end the VM's task
                    shipper = None  # the domain may be gone or libvirt restarted: made anew
                    ast.failures += 1
                    ast.state, ast.last_error, ast.last_error_us = "failing", str(e), int(time.time() * US)
                    backoff = min(max(backoff * 2, app.interval_s, 1.0), MAX_BACKOFF_S)
                    log.warning("event=ship-failed vm=%s app=%s retry_s=%g error=%r", st.name, app.name, backoff, str(e))
                    await trio.sleep(backoff)
                    continue
                backoff = 0.0
                ast.last_round_us, ast.last_round_s = int(time.time() * US), time.monotonic() - started
                ast.state = "shipping"
                for why in result.restarts:
                    log.info("event=app-stream-restart vm=%s app=%s why=%r", st.name, app.name, why)
                if result.record is not None:
                    ast.ships += 1
                    ast.bytes_shipped += result.bytes
                    ast.last_ship_us = result.record.time_us
                    ast.waiting = result.record.waiting
                    if result.record.base is not None:
                        ast.readable_us = result.record.time_us
                    else:
                        ast.state = "waiting for a block point"
                        wake = self._wake.get(uuid)
                        if wake is not None:
                            wake.set()
                await trio.sleep(max(0.0, app.interval_s - (time.monotonic() - started)))
        finally:
            if conn is not None:
                conn.close()

    async def _end_leftovers(self, uuid: str, name: str) -> None:
        """What a killed predecessor left of this VM's backups (its job, its
        checkpoint), ended before the first backup."""
        conn = await self._connection()
        try:
            dom = await self._call(conn.domain, uuid)
            for what in await trio.to_thread.run_sync(end_leftovers, self.repo, dom):
                log.warning("event=leftover vm=%s action=%r", name, what)
        except RpofsError as e:
            log.warning("event=leftover-check-failed vm=%s error=%r", name, str(e))

    async def _job(self, uuid: str, st: VmStatus, policy, full_reason: str) -> PointRecord:
        """One backup in a job slot, its progress kept in st."""
        async with self.jobs:
            st.state = "backing up"
            started = time.monotonic()
            conn = await self._connection()
            request = BackupRequest(uuid, full_reason, policy.disks, policy.quiesce, lock_wait_s=LOCK_WAIT_S)
            st.job_bytes_done = st.job_bytes_total = 0
            point = await trio.to_thread.run_sync(back_up, self.repo, conn, request, _JobProgress(st))
        st.last_job_s = time.monotonic() - started
        self._record(st, point)
        return point

    def _failed(self, st: VmStatus, policy, e: Exception) -> float:
        """Count and log a failed backup; the backoff before the next try."""
        backoff = min(max(policy.log_interval_s, 1.0) * 2 ** min(st.failures, 6), MAX_BACKOFF_S)
        st.failures += 1
        st.last_error, st.last_error_us = str(e), int(time.time() * US)
        if isinstance(e, RpofsError):
            log.warning("event=backup-failed vm=%s retry_s=%g error=%r", st.name, backoff, str(e))
        else:
            log.exception("event=backup-failed vm=%s retry_s=%g", st.name, backoff)
        return backoff

    async def _upkeep(self, st: VmStatus, policy, ran: dict) -> None:
        """Prune every prune_interval (with a retention policy), defrag every
        defrag_interval (unless 0), between this VM's own backups."""
        if not policy.retention.keeps_everything() and time.monotonic() - ran["prune"] >= policy.prune_interval_s:
            ran["prune"] = time.monotonic()
            await self._prune(st, policy)
        if policy.defrag_interval_s and time.monotonic() - ran["defrag"] >= policy.defrag_interval_s:
            ran["defrag"] = time.monotonic()
            await self._defrag(st)

    async def _prune(self, st: VmStatus, policy) -> None:
        """Between this VM's own backups; other VMs' backups wait for the
        repository lock while it runs."""
        async with self.jobs:
            try:
                report = await trio.to_thread.run_sync(prune, self.repo, st.uuid, policy.retention)
            except RpofsError as e:
                log.warning("event=prune-failed vm=%s error=%r", st.name, str(e))
                return
        if report.points_removed:
            log.info("event=pruned vm=%s %s", st.name, report.summary().replace("; ", ", "))

    async def _defrag(self, st: VmStatus) -> None:
        """Like _prune: between this VM's backups, others wait for the lock."""
        async with self.jobs:
            try:
                report = await trio.to_thread.run_sync(defrag, self.repo, st.uuid)
            except RpofsError as e:
                log.warning("event=defrag-failed vm=%s error=%r", st.name, str(e))
                return
        if report.blocks_moved or report.blocks_filled:
            log.info("event=defragged vm=%s %s", st.name, report.summary().replace("; ", ", "))

    def _record(self, st: VmStatus, point: PointRecord) -> None:
        st.points += 1
        st.bytes_ingested += point.stats.get("stored_bytes", 0)
        st.newest_point_us = point.time_us
        st.last_success_us = int(time.time() * US)
        log.info("event=point vm=%s kind=%s point=%d job_s=%.3f read=%d stored=%d consistency=%s%s",
                 st.name, point.kind, point.point, st.last_job_s, point.stats.get("logical_bytes", 0),
                 point.stats.get("stored_bytes", 0), point.consistency,
                 f" reason={point.reason!r}" if point.reason else "")

    # -- verify on schedule ------------------------------------------------------------

    async def _verify_loop(self) -> None:
        """rpofs verify every verify_interval, on a worker thread, alongside
        the backups (it takes no lock). While a read-data pass is under way,
        each run also reads the next verify_read_mib MiB of packs, so a run's
        I/O is bounded and the backups keep their RPO; a pass starts every
        verify_read_data_interval. The schedule survives restarts: it is
        kept with the results (REPO/verify.json)."""
        cfg = self.cfg
        if not cfg.verify_interval_s:
            return
        while True:
            results = await trio.to_thread.run_sync(verify.load, self.repo.path)
            last = results.get("repository", {}).get("time_us", 0) / US
            wait = last + cfg.verify_interval_s - time.time()
            if wait > 0:
                await trio.sleep(wait)
                continue
            read_pass = dict(results.get("read_pass") or {"cursor": 0, "started_us": 0})
            due = cfg.verify_read_data_interval_s and (
                read_pass["cursor"] or time.time() - read_pass["started_us"] / US >= cfg.verify_read_data_interval_s)
            try:
                if due:
                    if not read_pass["cursor"]:
                        read_pass = {"cursor": 1, "started_us": int(time.time() * US)}
                    report, read_pass["cursor"] = await trio.to_thread.run_sync(
                        verify.verify_slice, self.repo, read_pass["cursor"], cfg.verify_read_mib << 20)
                    if not read_pass["cursor"]:
                        read_pass["completed_us"] = int(time.time() * US)
                else:
                    report = await trio.to_thread.run_sync(verify.verify, self.repo)
                await trio.to_thread.run_sync(verify.save, self.repo.path, report, read_pass)
            except (RpofsError, OSError) as e:
                log.warning("event=verify-failed error=%r", str(e))
                await trio.sleep(min(cfg.verify_interval_s, 60.0))
                continue
            event = "verified" if report.ok else "verify-found-damage"
            (log.info if report.ok else log.error)(
                "event=%s problems=%d points=%d read_bytes=%d garbage_bytes=%d seconds=%.3f%s", event,
                len(report.problems), report.points, report.bytes_read, report.garbage.bytes, report.seconds,
                f" read_pass_cursor={read_pass['cursor']}" if due else "")
            for line in verify.describe(report)[:-1] if not report.ok else ():
                log.error("event=damage %s", line.strip())

    async def _publish_loop(self) -> None:
        """A repository in an object store: every PUBLISH_S, what was
        committed is put in the store (rpofs.store.publish), so the store
        alone holds every point within about that much. A store that
        cannot be reached is tried again; another machine that took this
        host over ends the daemon (it must write no more)."""
        from ..store import publish
        while True:
            try:
                done = await trio.to_thread.run_sync(publish.publish, self.repo)
                if done.batches:
                    log.info("event=published batches=%d objects=%d bytes=%d snapshot=%s", done.batches,
                             done.objects, done.bytes, done.snapshot)
                self.publication["error"] = ""
            except TakenOver as e:
                log.error("event=taken-over error=%r", str(e))
                raise
            except RpofsError as e:
                log.warning("event=publish-failed error=%r", str(e))
                self.publication["error"] = str(e)
            backlog = await trio.to_thread.run_sync(publish.backlog, self.repo)
            self.publication.update(pending=backlog.batches, oldest_pending_us=backlog.oldest_us)
            await trio.sleep(PUBLISH_S)

    # -- what others see -----------------------------------------------------------

    async def _write_status(self) -> None:
        path = os.path.join(self.repo.path, STATUS_FILE)
        while True:
            body = json.dumps({"pid": os.getpid(), "started_us": self._started_us,
                               "written_us": int(time.time() * US),
                               "vms": [asdict(s) for s in self.status.values()],
                               **({"publication": self.publication} if self.repo.publishes else {})}, indent=1)
            # mode as open() makes it (the umask decides): rpofs status and monitoring read it
            await trio.to_thread.run_sync(durable.write_file, path, body.encode(), 0o666)
            await trio.sleep(1.0)

    def _metrics_text(self) -> str:
        """On a worker thread (the repository's size is a directory scan)."""
        try:
            size = self.repo.stored_bytes()
        except OSError:  # a pack deleted while it was counted (prune): left out of this scrape
            size = None
        return metrics.render(list(self.status.values()), size, time.time() * US, verify.load(self.repo.path),
                              self.publication if self.repo.publishes else None)


def newest_and_full(repo: Repository, uuid: str) -> tuple[PointRecord | None, PointRecord | None]:
    """The VM's newest point and the full of its chain (reading back to it only)."""
    newest = None
    for p in repo.newest_points(uuid):
        newest = newest or p
        if p.kind == "full":
            return newest, p
    return newest, None


def _next_due(now: float, last: PointRecord | None, last_full: PointRecord | None, policy) -> tuple[float, str]:
    """When the VM's next point is due, and the reason if it must be a full."""
    if last is None or last_full is None:
        return now, ""  # back_up takes a full: nothing to extend
    full_due = last_full.time_us / US + policy.full_interval_s
    log_due = last.time_us / US + policy.log_interval_s
    if full_due <= log_due:
        return full_due, "full interval elapsed: a new chain starts"
    return log_due, ""


async def run(cfg: IngestConfig, keys=None) -> None:
    """keys: an encrypted repository's, as Repository.open takes them."""
    repo = Repository.open(cfg.repository, keys=keys)
    try:
        await Ingester(cfg, repo).run()
    finally:
        repo.close()
