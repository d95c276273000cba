"""An optional Prometheus endpoint: GET anything, get the text exposition
(every metric with # HELP and # TYPE; `render` is pure).

A running job's progress (bytes read of those it will read) is shown while
it runs, as far as the backup reports it to the daemon."""

import functools
import importlib.metadata
import logging

import trio

from ..errors import RpofsError
from .config import app_stale, check_metrics_address

log = logging.getLogger(__name__)


async def serve(address: str, render, task_status=trio.TASK_STATUS_IGNORED) -> None:
    host, port = check_metrics_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as e:
        raise RpofsError(f"metrics: cannot listen on {address}: {e.strerror or e}") from None
    task_status.started()
    log.info("event=metrics-listening address=%s", address)

    async def answer(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                body = (await trio.to_thread.run_sync(render)).encode()  # it stats the repository
                await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except trio.BrokenResourceError:
            pass  # the scraper went away
        except Exception:  # noqa: BLE001 — a failed scrape must not end the daemon
            log.exception("event=metrics-failed")
        finally:
            await stream.aclose()

    await trio.serve_listeners(answer, listeners)


# name -> (type, help); the order they are shown in
METRICS = {
    "rpofs_build_info": ("gauge", "rpofs's version, as a label; always 1"),
    "rpofs_repository_bytes": ("gauge", "bytes the repository takes on disk (catalog and pack files, allocated)"),
    "rpofs_rpo_age_seconds": ("gauge", "age of the VM's newest point: the recovery point objective achieved now"),
    "rpofs_last_success_timestamp_seconds": ("gauge", "when the VM's last backup by this daemon committed (Unix time)"),
    "rpofs_last_job_duration_seconds": ("gauge", "how long the VM's last successful backup job took"),
    "rpofs_points_total": ("counter", "points this daemon took of the VM"),
    "rpofs_ingested_bytes_total": ("counter", "bytes this daemon stored for the VM (after dedup and compression)"),
    "rpofs_failures_total": ("counter", "failed backups of the VM"),
    "rpofs_job_bytes_done": ("gauge", "the running backup job's bytes read so far (only while one runs)"),
    "rpofs_job_bytes_total": ("gauge", "the bytes the running backup job will read (only while one runs)"),
    "rpofs_verify_timestamp_seconds": ("gauge", "when rpofs verify last checked the VM's points (Unix time)"),
    "rpofs_verify_damaged_points": ("gauge", "the VM's points that read EIO somewhere, as the last verify found"),
    "rpofs_verify_garbage_bytes": ("gauge", "pack bytes nothing refers to, as the last repository-wide verify found"),
    "rpofs_publication_lag_seconds": ("gauge", "in an object store: how long the oldest commit not yet published "
                                      "to the store has waited (0: everything is published)"),
    "rpofs_publication_pending": ("gauge", "in an object store: catalog batches not yet published"),
    "rpofs_publication_failing": ("gauge", "in an object store: 1 while the last publication failed"),
    "rpofs_app_point_age_seconds": ("gauge", "age of the app's newest app point (its log shipped from the guest)"),
    "rpofs_app_ships_total": ("counter", "app points this daemon recorded for the app"),
    "rpofs_app_shipped_bytes_total": ("counter", "log bytes this daemon shipped for the app"),
    "rpofs_app_agent_up": ("gauge", "1 while the app's last round reached the guest agent, else 0"),
    "rpofs_app_waiting": ("gauge", "1 while the app's newest app point waits for a block point to extend"),
    "rpofs_app_readable_age_seconds": ("gauge", "age of the app's newest readable app point (one with a base)"),
    "rpofs_app_stale": ("gauge", "1 while the app's newest readable app point is older than its interval allows"),
    "rpofs_protected": ("gauge", "continuous VMs: 1 while every write is journaled before it completes, "
                        "0 while protection is down (backups run instead)"),
    "rpofs_journal_unfolded_seconds": ("gauge", "age of the newest fold of the journal into a point"),
    "rpofs_journal_bytes": ("gauge", "bytes of the current protection session's journal on disk"),
    "rpofs_journal_bytes_per_second": ("gauge", "how fast the journal grew over the last check"),
}


@functools.lru_cache(maxsize=1)
def version() -> str:
    try:
        return importlib.metadata.version("rpofs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _label(value: str) -> str:
    """A label value as the text format escapes it."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render(vms, repository_bytes: int | None, now_us: float, verified: dict | None = None,
           publication: dict | None = None) -> str:
    """The exposition. vms: the daemon's per-VM status (rpofs.ingest.daemon.VmStatus);
    verified: the kept verify results (rpofs.store.verify.load); publication:
    a repository in an object store's (the daemon's `publication`)."""
    verified = verified or {"vms": {}}
    samples: dict[str, list[str]] = {name: [] for name in METRICS}
    samples["rpofs_build_info"].append(f'rpofs_build_info{{version="{_label(version())}"}} 1')
    if repository_bytes is not None:
        samples["rpofs_repository_bytes"].append(f"rpofs_repository_bytes {repository_bytes}")
    for s in vms:
        label = f'{{vm="{_label(s.name)}",uuid="{_label(s.uuid)}"}}'
        protected = getattr(s, "protection", "") == "protected"
        if s.newest_point_us:
            age = 0.0 if protected else (now_us - s.newest_point_us) / 1e6  # protected: nothing at risk
            samples["rpofs_rpo_age_seconds"].append(f"rpofs_rpo_age_seconds{label} {age:.3f}")
        if getattr(s, "protection", ""):
            samples["rpofs_protected"].append(f"rpofs_protected{label} {int(protected)}")
            if protected and s.journal_folded_us:
                samples["rpofs_journal_unfolded_seconds"].append(
                    f"rpofs_journal_unfolded_seconds{label} {(now_us - s.journal_folded_us) / 1e6:.3f}")
            samples["rpofs_journal_bytes"].append(f"rpofs_journal_bytes{label} {s.journal_bytes}")
            samples["rpofs_journal_bytes_per_second"].append(
                f"rpofs_journal_bytes_per_second{label} {s.journal_bytes_per_s:.1f}")
        if s.last_success_us:
            samples["rpofs_last_success_timestamp_seconds"].append(
                f"rpofs_last_success_timestamp_seconds{label} {s.last_success_us / 1e6:.3f}")
            samples["rpofs_last_job_duration_seconds"].append(
                f"rpofs_last_job_duration_seconds{label} {s.last_job_s:.3f}")
        samples["rpofs_points_total"].append(f"rpofs_points_total{label} {s.points}")
        samples["rpofs_ingested_bytes_total"].append(f"rpofs_ingested_bytes_total{label} {s.bytes_ingested}")
        samples["rpofs_failures_total"].append(f"rpofs_failures_total{label} {s.failures}")
        if s.state == "backing up" and getattr(s, "job_bytes_total", 0):
            samples["rpofs_job_bytes_done"].append(f"rpofs_job_bytes_done{label} {s.job_bytes_done}")
            samples["rpofs_job_bytes_total"].append(f"rpofs_job_bytes_total{label} {s.job_bytes_total}")
        for a in getattr(s, "apps", {}).values():
            app = f'{{vm="{_label(s.name)}",uuid="{_label(s.uuid)}",app="{_label(a.name)}"}}'
            if a.last_ship_us:
                samples["rpofs_app_point_age_seconds"].append(
                    f"rpofs_app_point_age_seconds{app} {(now_us - a.last_ship_us) / 1e6:.3f}")
            samples["rpofs_app_ships_total"].append(f"rpofs_app_ships_total{app} {a.ships}")
            samples["rpofs_app_shipped_bytes_total"].append(f"rpofs_app_shipped_bytes_total{app} {a.bytes_shipped}")
            samples["rpofs_app_agent_up"].append(f"rpofs_app_agent_up{app} {int(a.state != 'no agent')}")
            samples["rpofs_app_waiting"].append(f"rpofs_app_waiting{app} {int(a.state == 'waiting for a block point')}")
            readable_age = (now_us - a.readable_us) / 1e6 if a.readable_us else None
            if readable_age is not None:
                samples["rpofs_app_readable_age_seconds"].append(
                    f"rpofs_app_readable_age_seconds{app} {readable_age:.3f}")
            samples["rpofs_app_stale"].append(f"rpofs_app_stale{app} {int(app_stale(readable_age, a.interval_s))}")
        checked = verified["vms"].get(s.uuid)
        if checked:
            samples["rpofs_verify_timestamp_seconds"].append(
                f"rpofs_verify_timestamp_seconds{label} {checked['time_us'] / 1e6:.3f}")
            samples["rpofs_verify_damaged_points"].append(
                f"rpofs_verify_damaged_points{label} {checked['points_damaged']}")
    if "repository" in verified:
        samples["rpofs_verify_garbage_bytes"].append(
            f"rpofs_verify_garbage_bytes {verified['repository'].get('garbage_bytes', 0)}")
    if publication is not None:
        oldest = publication.get("oldest_pending_us")
        samples["rpofs_publication_lag_seconds"].append(
            f"rpofs_publication_lag_seconds {max(0.0, (now_us - oldest) / 1e6) if oldest else 0.0:.3f}")
        samples["rpofs_publication_pending"].append(f"rpofs_publication_pending {publication.get('pending', 0)}")
        samples["rpofs_publication_failing"].append(f"rpofs_publication_failing {int(bool(publication.get('error')))}")
    lines = []
    for name, (kind, text) in METRICS.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"
