"""`rpofs status`: the catalog's facts (last full, last log, achieved RPO)
joined with what the running ingester reports (state, next run, last error)."""

import json
import os
import time
from typing import NamedTuple

from ..store import verify
from ..store.repo import Repository
from ..timefmt import US, format_time
from .config import app_stale
from .daemon import STATUS_FILE

STALE_S = 10.0  # the ingester rewrites its status every second
OVERDUE_S = 5.0  # a next run this far past its time (and not running) is overdue


def _ingester(repo: Repository) -> dict:
    try:
        with open(os.path.join(repo.path, STATUS_FILE)) as f:
            body = json.load(f)
    except (OSError, ValueError):
        return {"running": False, "vms": {}}
    alive = True
    try:
        os.kill(body["pid"], 0)
    except OSError:
        alive = False
    fresh = time.time() - body["written_us"] / US < STALE_S
    return {"running": alive and fresh, "pid": body["pid"], "vms": {v["uuid"]: v for v in body["vms"]},
            "publication": body.get("publication") or {}}


def _time(us: int | None) -> str | None:
    return format_time(us, 3) if us else None


def next_run_state(next_run_us: int | None, state: str, now_us: float) -> str | None:
    """"scheduled" (its time is to come), "due" (now, or its job runs),
    "overdue" (past its time by more than OVERDUE_S and not running: waiting
    for a job slot, a busy repository, a stuck daemon); None unscheduled."""
    if not next_run_us:
        return None
    if next_run_us > now_us:
        return "scheduled"
    if state == "backing up" or now_us - next_run_us <= OVERDUE_S * US:
        return "due"
    return "overdue"


def _verified(results: dict, uuid: str) -> dict | None:
    checked = results["vms"].get(uuid)
    if not checked:
        return None
    return {"at": _time(checked["time_us"]), "read_data": checked["read_data"], "ok": checked["ok"],
            "points_damaged": checked["points_damaged"]}


def gather(repo: Repository) -> dict:
    now_us = time.time() * US
    ingester = _ingester(repo)
    verified = verify.load(repo.path)
    live = ingester["vms"] if ingester["running"] else {}
    vms = []
    for uuid, name in sorted(repo.vms(), key=lambda v: v[1]):
        newest = last_full = last_log = None
        for p in repo.newest_points(uuid):  # back only as far as the newest full and log
            newest = newest or p
            if p.kind == "full":
                last_full = last_full or p
            else:
                last_log = last_log or p
            if last_full and last_log:
                break
        d = live.get(uuid, {})
        protection = _protection(repo, uuid, name, d, now_us)
        rpo = round((now_us - newest.time_us) / US, 3) if newest else None
        vms.append({
            "name": name, "uuid": uuid, "points": repo.point_count(uuid),
            "last_full": _time(last_full and last_full.time_us),
            "last_log": _time(last_log and last_log.time_us),
            # protected: every write acknowledged is journaled, so nothing is at risk
            "rpo_seconds": 0.0 if protection and protection["state"] == "protected" else rpo,
            "consistency": newest.consistency if newest else None,
            "state": d.get("state", "not scheduled"),
            "next_run": _time(d.get("next_run_us")),
            "next_run_state": next_run_state(d.get("next_run_us"), d.get("state", ""), now_us),
            "last_job_seconds": d.get("last_job_s"),
            "job": ({"bytes_done": d.get("job_bytes_done", 0), "bytes_total": d.get("job_bytes_total", 0)}
                    if d.get("state") == "backing up" else None),
            "last_error": d.get("last_error") or None,
            "last_error_at": _time(d.get("last_error_us")),
            "verify": _verified(verified, uuid),
            "apps": _apps(repo, uuid, d.get("apps", {}), now_us),
            "protection": protection,
        })
    report = {"ingester": {"running": ingester["running"], "pid": ingester.get("pid")}, "vms": vms}
    if repo.publishes:
        report["publication"] = _publication(repo, ingester, now_us)
    return report


def _publication(repo: Repository, ingester: dict, now_us: float) -> dict:
    """A repository in an object store: what of its catalog the store does not hold yet."""
    from ..store import publish
    backlog = publish.backlog(repo)
    error = ingester.get("publication", {}).get("error") if ingester["running"] else ""
    return {"store": repo.store_conf.store, "host": repo.host, "pending": backlog.batches,
            "lag_seconds": round(max(0.0, (now_us - backlog.oldest_us) / US), 3) if backlog.oldest_us else 0.0,
            "last_error": error or None}


def _protection(repo: Repository, uuid: str, name: str, live: dict, now_us: float) -> dict | None:
    """Continuous protection: the ingester's view (state, journal lag,
    bytes/s) when it protects the VM, else the catalog's (a session started
    by hand); None for a VM never protected."""
    from ..protect.protector import server_alive
    from ..store import journal, protection
    found = protection.of_vm(repo, uuid)
    current = next((s for s in reversed(found) if s.state != "ended"), None)
    last = found[-1] if found else None
    if not live.get("protection") and last is None:
        return None
    state = live.get("protection") or ("protected" if current and current.state == "protected" else
                                       "starting" if current else "unprotected")
    lost = ""
    if not live.get("protection") and current is not None and not server_alive(
            current.server_pid, journal.journal_dir(repo.path, current)):
        # by hand, nothing watches: a server that ended (the VM stopped, its mirror failed) ends the claim
        state, lost = "lost", (f"the journal server is not running (the VM stopped or its mirror failed): "
                               f"rpofs protect {name} ends the session and folds its journal")
    folded = live.get("journal_folded_us") or (current.folded_us if current else 0)
    return {
        "state": state,
        "by": "ingester" if live.get("protection") else "hand" if current else None,
        "reason": lost or live.get("protection_reason") or (last.reason if last and last.state == "ended" else "")
                  or None,
        "since": _time(live.get("protected_since_us") or (current.ready_us if current else 0)),
        "journal_newest": _time(live.get("journal_newest_us")),
        "journal_folded": _time(folded),
        "journal_lag_seconds": round((now_us - folded) / US, 3) if state == "protected" and folded else None,
        "journal_bytes": live.get("journal_bytes"),
        "journal_bytes_per_second": round(live["journal_bytes_per_s"], 1) if "journal_bytes_per_s" in live else None,
        "sessions": len(found),
    }


class _Unrecorded(NamedTuple):
    """An app the ingester runs that has no record yet (never reached its guest)."""
    name: str
    kind: str
    path: str


def _apps(repo: Repository, uuid: str, live: dict, now_us: float) -> list[dict]:
    """Per app: the catalog's newest app point (and whether it has a base),
    joined with the ingester's view (state, rounds, errors)."""
    from ..store import shipments
    out = []
    known = {a.name: a for a in shipments.apps(repo, uuid)}
    for name in sorted(set(known) | set(live)):
        app = known.get(name) or _Unrecorded(name, live[name].get("kind", ""), "")
        newest = next(shipments.ships(repo, uuid, app=app.name, newest_first=True), None)
        readable = next((s for s in shipments.ships(repo, uuid, app=app.name, newest_first=True)
                         if s.base is not None), None)
        d = live.get(app.name, {})
        age = round((now_us - readable.time_us) / US, 3) if readable else None
        interval = d.get("interval_s")  # only the ingester promises an interval
        out.append({
            "name": app.name, "kind": app.kind, "path": app.path,
            "state": d.get("state", "not scheduled"),
            "newest_app_point": _time(newest and newest.time_us),
            "newest_readable": _time(readable and readable.time_us),
            "age_seconds": age,
            "interval_seconds": interval,
            "stale": app_stale(age, interval) if interval else None,
            "waiting": (newest.waiting or None) if newest and newest.base is None else None,
            "ships": d.get("ships"), "bytes_shipped": d.get("bytes_shipped"),
            "last_error": d.get("last_error") or None, "last_error_at": _time(d.get("last_error_us")),
        })
    return out


def _next_text(v: dict) -> str:
    """Never a next run in the past: due, or overdue since its time."""
    state = v.get("next_run_state")
    if state == "scheduled":
        return f", next {v['next_run']}"
    if state == "due":
        return "" if v["state"] == "backing up" else ", due now"
    if state == "overdue":
        return f", overdue since {v['next_run']}"
    return ""


def _verify_text(checked: dict | None) -> str:
    if not checked:
        return ", never verified"
    what = "data read" if checked["read_data"] else "catalog"
    if checked["ok"]:
        return f", verified {checked['at']} ({what}): ok"
    return f", verified {checked['at']} ({what}): DAMAGED, {checked['points_damaged']} points read EIO"


def render(report: dict) -> str:
    ing = report["ingester"]
    lines = [f"ingester: {'running, pid ' + str(ing['pid']) if ing['running'] else 'not running'}"]
    pub = report.get("publication")
    if pub:
        lines.append(f"store: {pub['store']} as host {pub['host']}, "
                     + (f"{pub['pending']} catalog changes not published yet, the oldest {pub['lag_seconds']:.1f}s ago"
                        if pub["pending"] else "everything published")
                     + (f", last error: {pub['last_error']}" if pub["last_error"] else ""))
    for v in report["vms"]:
        rpo = f"{v['rpo_seconds']:.1f}s" if v["rpo_seconds"] is not None else "-"
        lines.append(f"{v['name']}: rpo {rpo}, {v['points']} points, last full {v['last_full'] or '-'}, "
                     f"last log {v['last_log'] or '-'}, {v['state']}"
                     + _next_text(v)
                     + (f", last error at {v['last_error_at']}: {v['last_error']}" if v["last_error"] else "")
                     + (_verify_text(v["verify"]) if "verify" in v else ""))
        p = v.get("protection")
        if p:
            lag = f", journal folded {p['journal_lag_seconds']:.1f}s ago" if p["journal_lag_seconds"] is not None else ""
            rate = f", {p['journal_bytes_per_second']:.0f} B/s journaled" if p["journal_bytes_per_second"] is not None else ""
            lines.append(f"  protection: {p['state']}" + (f" since {p['since']}" if p["state"] == "protected" else "")
                         + (f" (by {p['by']})" if p["by"] else "") + lag + rate
                         + (f", {p['reason']}" if p["reason"] and p["state"] != "protected" else ""))
        for a in v.get("apps", []):
            age = f" ({a['age_seconds']:.1f}s ago)" if a["age_seconds"] is not None else ""
            lines.append(f"  app {a['name']} ({' '.join(filter(None, (a['kind'], a['path'])))}): newest readable app point "
                         f"{a['newest_readable'] or '-'}{age}, {a['state']}"
                         + (f", STALE: older than its {a['interval_seconds']:g}s interval allows" if a["stale"] else "")
                         + (f", waiting for a block point: {a['waiting']}" if a["waiting"] else "")
                         + (f", last error at {a['last_error_at']}: {a['last_error']}" if a["last_error"] else ""))
    return "\n".join(lines)
