"""Real level, a real guest: the ingester takes quiesced log backups every
few seconds while the guest's workload appends to a log file on one disk and
inserts into SQLite on the other. At each point read back through the mount,
the guest's files hold exactly a prefix of the sequence, the same on both
disks, and the point's time falls where that prefix says it should."""

import datetime
import json
import shutil
import signal
import subprocess
import uuid

import pytest

from guestlab import Guest, build_guest, read_db, read_log
from vmlab import RPOFS, mounted, point_count, points_json, run_rpofs, wait_for

pytestmark = pytest.mark.libvirt

CLOCK_SLACK_S = 1.0  # guest clock (set from the host at boot) against the host's


def seconds(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def ingest_until(repo, vm: str, defaults: str, points: int, timeout: float) -> None:
    """A new repository, and the ingester on `vm` with these [defaults] until
    the VM has `points` points; it must stop cleanly and log no failure."""
    run_rpofs("init", repo=repo)
    config = repo.parent / f"{repo.name}.toml"
    config.write_text(f'[ingest]\nvms = ["{vm}"]\n[defaults]\nlog_interval = "2s"\n{defaults}\n')
    log_path = repo.parent / f"{repo.name}-ingest.log"
    with open(log_path, "ab") as out:
        daemon = subprocess.Popen(RPOFS + ["--repo", str(repo), "ingest", "--config", str(config)],
                                  stdout=out, stderr=out)
    try:
        wait_for(lambda: point_count(repo, vm) >= points, timeout=timeout, what=f"{points} points")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log_path.read_text()
    text = log_path.read_text()
    assert "Traceback" not in text and "event=backup-failed" not in text, text


def test_quiesced_points_of_a_real_guest(tmp_path):
    build_guest()
    repo, repo_db = tmp_path / "repo", tmp_path / "repo-db"
    with Guest(f"rpofs-gi-{uuid.uuid4().hex[:8]}", tmp_path / "guest") as g:
        ingest_until(repo, g.name, 'quiesce = "all"\nquiesce_timeout = "5s"', points=6, timeout=90)
        # the disk holding a guest mountpoint, that filesystem alone frozen
        ingest_until(repo_db, g.name, 'disks = { mountpoint = "/data/db" }\nquiesce = ["/data/db"]',
                     points=2, timeout=60)
        name = g.name

    points = points_json(repo, name)
    assert all(p["consistency"] == "filesystems-frozen" and not p["warnings"] for p in points)
    assert [p["kind"] for p in points[:2]] == ["full", "log"]
    previous, held = 0, []
    with mounted(repo, tmp_path / "mnt") as mnt:
        for p in points:
            copies = {}
            for target in ("vda", "vdb"):
                copies[target] = str(tmp_path / f"{p['point']}-{target}.raw")
                shutil.copyfile(mnt / name / p["name"] / f"{target}.raw", copies[target])
            log, db = read_log(copies["vda"]), read_db(copies["vdb"])
            L, M = len(log), len(db)
            assert [n for n, _ in log] == list(range(1, L + 1)), p["name"]
            assert [n for n, _ in db] == list(range(1, M + 1)), p["name"]
            # frozen together: the log line of the row in flight at most one ahead
            assert L - M in (0, 1) and log[:M] == db, (p["name"], L, M)
            assert L >= previous  # later points hold more, never less
            previous = L
            held.append((seconds(p["time"]), L))
            final = log
    # Each point's time lies after its newest row's time (taken before that
    # row was written) and before the time of the row after the next: row
    # L+1 is not in the point, so its write and sync ended after the freeze
    # began, and row L+2's time is taken after that. (Row L+1's own time is
    # taken before its write, which a busy machine can delay past the
    # freeze: it may lie before the point.) Only the clocks' offset is slack.
    for t, L in held:
        if L:
            assert final[L - 1][1] <= t + CLOCK_SLACK_S, (t, final[L - 1])
        if L + 1 < len(final):
            assert final[L + 1][1] >= t - CLOCK_SLACK_S, (t, final[L + 1])
    db_points = points_json(repo_db, name)
    assert all([d["target"] for d in p["disks"]] == ["vdb"] for p in db_points)
    assert all(p["consistency"] == "filesystems-frozen" for p in db_points)


def test_crash_consistent_points_show_the_journal(tmp_path):
    """Points taken without freezing a busy guest: files/ shows each disk as a
    mount would, its ext journal replayed — the same as e2fsck's replay of a
    copy — and for some points that differs from the filesystem as it lies."""
    from dissect.extfs import ExtFS

    build_guest()
    repo = tmp_path / "repo"
    with Guest(f"rpofs-gc-{uuid.uuid4().hex[:8]}", tmp_path / "guest") as g:
        ingest_until(repo, g.name, 'quiesce = "none"', points=5, timeout=90)
        name = g.name
    points = points_json(repo, name)
    assert all(p["consistency"] == "crash-consistent" for p in points)
    behind = 0
    with mounted(repo, tmp_path / "mnt") as mnt:
        for p in points:
            raw = tmp_path / f"{p['point']}.raw"
            shutil.copyfile(mnt / name / p["name"] / "vda.raw", raw)
            shown = (mnt / name / p["name"] / "files/vda/0/seq.log").read_text()
            replayed = read_log(str(raw))  # e2fsck's journal replay on a copy
            assert [tuple(map(float, line.split())) for line in shown.splitlines()] == \
                [(float(n), t) for n, t in replayed], p["name"]
            with open(raw, "rb") as f:  # the same filesystem read without replay
                as_it_lies = ExtFS(f).get("/seq.log").open().read().decode()
            behind += as_it_lies != shown
            if as_it_lies != shown:  # point.json says the journal was replayed
                files = json.loads((mnt / name / p["name"] / "point.json").read_text())["files"]
                assert files["vda"]["volumes"][0]["note"].startswith("ext journal replayed"), files
    assert behind >= 1, "no point needed its journal replayed: the test proved nothing"
