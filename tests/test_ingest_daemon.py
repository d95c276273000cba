"""Real level: the ingester daemon on no-OS VMs while guest writes run, its
points read through a real mount; kill -9 of the daemon at random moments."""

import datetime
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid

import libvirt
import pytest

from vmlab import (RPOFS, TestVM, WriteLog, make_qcow2, mounted, point_count, points_json, run_rpofs,
                   seeded_content, wait_for)

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 4 * MiB + 512
LOG_INTERVAL = 2.0
SLACK_S = 2.0   # how long before a point's time a write may end and still be left out


@pytest.fixture
def lab(tmp_path):
    vms, base = [], []
    try:
        for v in range(2):
            disks = [seeded_content(SIZE, 10 * v + d) for d in range(2)]
            paths = []
            for d, content in enumerate(disks):
                paths.append((str(tmp_path / f"vm{v}-{d}.qcow2"), "qcow2"))
                make_qcow2(paths[-1][0], bytes(content))
            vms.append(TestVM(f"rpofs-ing-{uuid.uuid4().hex[:8]}", paths))
            base.append(disks)
        repo = tmp_path / "repo"
        run_rpofs("init", repo=repo)
        config = tmp_path / "rpofs.toml"
        config.write_text(f'[ingest]\nvms = {json.dumps([vm.name for vm in vms])}\nmax_jobs = 2\n'
                          f'[defaults]\nlog_interval = "{LOG_INTERVAL}s"\nfull_interval = "1h"\n'
                          # no agent in these VMs: crash-consistent points, said once
                          'quiesce = "all"\n')
        yield vms, WriteLog(base), repo, config, tmp_path
    finally:
        for vm in vms:
            vm.destroy()


class Writer(threading.Thread):
    """Guest writes on every disk of every VM, a few per second, until stopped."""

    def __init__(self, vms, log: WriteLog, seed: int):
        super().__init__(daemon=True)
        self.vms, self.log, self.rnd = vms, log, random.Random(seed)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                vm, disk = self.rnd.randrange(len(self.vms)), self.rnd.randrange(2)
                length = self.rnd.randrange(1, 256) * 512
                offset = self.rnd.randrange(0, (SIZE - length) // 512) * 512
                self.log.write(self.vms, vm, disk, offset, length, 1 + i % 250)
                i += 1
                time.sleep(self.rnd.uniform(0.02, 0.2))
        except Exception as e:  # reported by the test
            self.error = e


def start_daemon(repo, config, log_path, *extra, env=None):
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(RPOFS + ["--repo", str(repo), "ingest", "--config", str(config), *extra],
                                stdout=out, stderr=out, env=env)


def check_every_point(repo, mnt, vms, log: WriteLog):
    """Each point of each VM holds exactly the first k guest writes, for a k
    its time allows; returns the points per VM."""
    all_points = []
    for v, vm in enumerate(vms):
        points = points_json(repo, vm.name)
        for p in points:
            disks = []
            for d in range(2):
                with open(mnt / vm.name / p["name"] / f"vd{chr(97 + d)}.raw", "rb") as f:
                    disks.append(f.read())
            ks = [k for k in log.candidates(_seconds(p["time"]), SLACK_S) if [bytes(x) for x in log.state(v, k)] == disks]
            assert ks, f"{vm.name} point {p['name']} matches no prefix of the guest writes"
        all_points.append(points)
    return all_points


def test_daemon_holds_the_interval_and_every_point_is_exact(lab):
    vms, log, repo, config, tmp = lab
    writer = Writer(vms, log, seed=5)
    writer.start()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd listens for Type=notify
    notify.bind(str(tmp / "notify"))
    notify.settimeout(30)
    port = _free_port()
    daemon = start_daemon(repo, config, tmp / "ingest.log", "--metrics", f"127.0.0.1:{port}",
                          env=dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify")))
    try:
        assert notify.recv(4096).startswith(b"READY=1")
        notify.close()
        time.sleep(30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        status = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
        assert status["ingester"]["running"]
        assert {v["name"]: v["state"] for v in status["vms"]}.keys() == {vm.name for vm in vms}
    finally:
        writer.stop.set()
        writer.join()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, (tmp / "ingest.log").read_text()
    check_metrics(metrics, vms)
    assert writer.error is None, writer.error
    text = (tmp / "ingest.log").read_text()
    assert "Traceback" not in text and "event=backup-failed" not in text
    jobs = job_windows(text)
    longest = max(end - start for start, end in jobs.values())
    # the RPO achieved when status asked: within an interval, two jobs and a late wake-up of the newest point
    assert all(v["rpo_seconds"] is not None and v["rpo_seconds"] <= 2 * LOG_INTERVAL + 2 * longest
               for v in status["vms"]), (status, longest)
    with mounted(repo, tmp / "mnt") as mnt:
        per_vm = check_every_point(repo, mnt, vms, log)
    for points in per_vm:
        assert points[0]["kind"] == "full" and all(p["kind"] == "log" for p in points[1:])
        check_schedule(points, jobs)
    for vm, points in zip(vms, per_vm):
        assert all(p["consistency"] == "crash-consistent" and p["warnings"] for p in points)
        assert text.count(f"event=crash-consistent vm={vm.name} ") == 1


def check_metrics(text: str, vms) -> None:
    """Every metric has # HELP and # TYPE before its samples; each VM's are there."""
    described = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            described[name] = kind
        elif line.startswith("# HELP "):
            assert line.split(" ", 3)[3], line
        else:
            name = line.split("{")[0].split(" ")[0]
            assert name in described, f"{name} has no # TYPE before it"
    assert text.count("# HELP ") == len(described)
    assert described["rpofs_points_total"] == "counter" and described["rpofs_rpo_age_seconds"] == "gauge"
    assert re.search(r'^rpofs_build_info\{version="[^"]+"\} 1$', text, re.M)
    assert re.search(r"^rpofs_repository_bytes [1-9]\d*$", text, re.M)
    for vm in vms:
        label = f'{{vm="{vm.name}",uuid="{vm.uuid}"}}'
        for name in ("rpofs_points_total", "rpofs_rpo_age_seconds", "rpofs_last_success_timestamp_seconds",
                     "rpofs_last_job_duration_seconds", "rpofs_ingested_bytes_total", "rpofs_failures_total"):
            assert f"{name}{label} " in text, (name, text)


_POINT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO rpofs\.ingest: event=point vm=\S+ "
                         r"kind=\S+ point=(\d+) job_s=([\d.]+)", re.M)
CLOCK_S = 0.05  # the log's millisecond stamps, job_s's three decimals, time.time() against monotonic


def job_windows(log_text: str) -> dict[int, tuple[float, float]]:
    """point number -> (its job's start, its end), wall clock, as the daemon
    logged them: the line is written when the job ended, with its length."""
    out = {}
    for stamp, point, job_s in _POINT_LINE.findall(log_text):
        end = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
        out[int(point)] = (end - float(job_s), end)
    return out


def check_schedule(points, jobs) -> None:
    """The schedule, from what was measured rather than from a margin: each
    point was captured during its own job; each job began no earlier than
    LOG_INTERVAL after the previous point and no later than that (or the end
    of the previous job, if that ran longer) plus a late wake-up, which is
    never a whole interval: no point is skipped. So the gap between two
    points is at most the interval (or the previous job) plus the next job."""
    for p in points:
        start, end = jobs[p["point"]]
        assert start - CLOCK_S <= _seconds(p["time"]) <= end + CLOCK_S, (p["name"], start, end)
    for a, b in zip(points, points[1:]):
        due = _seconds(a["time"]) + LOG_INTERVAL
        start, _ = jobs[b["point"]]
        allowed = max(due, jobs[a["point"]][1])
        assert due - CLOCK_S <= start, f"{b['name']}: its job began {due - start:.3f} s before it was due"
        assert start - allowed < LOG_INTERVAL, f"{b['name']}: its job began {start - allowed:.3f} s late"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_kill_9_at_random_moments_loses_nothing(lab):
    vms, log, repo, config, tmp = lab
    rnd = random.Random(9)
    writer = Writer(vms, log, seed=6)
    writer.start()
    try:
        for _ in range(5):
            daemon = start_daemon(repo, config, tmp / "ingest.log")
            time.sleep(rnd.uniform(0.5, 4.0))
            daemon.kill()
            daemon.wait()
        # the next start ends the leftovers and goes on
        before = {vm.name: point_count(repo, vm.name) for vm in vms}
        daemon = start_daemon(repo, config, tmp / "ingest.log")
        wait_for(lambda: all(point_count(repo, vm.name) >= before[vm.name] + 2 for vm in vms),
                 timeout=30, what="two more points per VM after the restarts")
    finally:
        writer.stop.set()
        writer.join()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    assert writer.error is None, writer.error
    for vm in vms:
        points = points_json(repo, vm.name)
        assert vm.dom.jobInfo()[0] == 0, "a backup job was left running"
        assert vm.checkpoints() == [points[-1]["checkpoint"]], "a stray checkpoint was left"
    with mounted(repo, tmp / "mnt") as mnt:
        check_every_point(repo, mnt, vms, log)
    assert os.path.exists(repo / "ingest-status.json")



def test_libvirtd_restart_and_vms_that_go_away(lab):
    """libvirtd restarted under the daemon: it reconnects and goes on. A VM
    destroyed: its task ends, its points stay, the other VM goes on."""
    vms, log, repo, config, tmp = lab
    daemon = start_daemon(repo, config, tmp / "ingest.log")
    try:
        wait_for(lambda: all(point_count(repo, vm.name) >= 2 for vm in vms), timeout=30,
                 what="points of both VMs")
        with open("/var/run/libvirtd.pid") as f:
            libvirtd = int(f.read())
        os.kill(libvirtd, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{libvirtd}"), timeout=30, what="libvirtd to stop")
        time.sleep(2)
        with open("/var/log/libvirt/libvirtd.log", "ab") as out:  # never a pipe: SIGPIPE would kill it
            subprocess.run(["libvirtd", "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
        wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                        capture_output=True).returncode == 0, timeout=30, what="libvirtd")
        counts = {vm.name: point_count(repo, vm.name) for vm in vms}
        wait_for(lambda: all(point_count(repo, vm.name) >= counts[vm.name] + 2 for vm in vms),
                 timeout=60, what="points after libvirtd came back")

        gone, alive = vms
        gone.conn.close()
        gone.conn = libvirt.open("qemu:///system")  # the old connection died with libvirtd
        gone.dom = gone.conn.lookupByUUIDString(gone.uuid)
        alive.conn.close()
        alive.conn = libvirt.open("qemu:///system")
        alive.dom = alive.conn.lookupByUUIDString(alive.uuid)
        gone.dom.destroy()
        wait_for(lambda: _state(repo, gone.name) in ("not running", "gone"), timeout=30,
                 what="the daemon to see the destroyed VM stopped")  # from then on it takes no point of it
        kept = point_count(repo, gone.name)
        counts = point_count(repo, alive.name)
        wait_for(lambda: point_count(repo, alive.name) >= counts + 2, timeout=30,
                 what="points of the VM still running")
        assert point_count(repo, gone.name) == kept  # no more, and none lost
        status = {v["name"]: v for v in json.loads(run_rpofs("status", "--json", repo=repo).stdout)["vms"]}
        assert status[gone.name]["state"] in ("not running", "gone") and status[alive.name]["rpo_seconds"] < 10
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    text = (tmp / "ingest.log").read_text()
    assert "event=connected" in text and "Traceback" not in text


def test_retention_and_defrag_run_as_it_goes_and_survive_kill_9(lab):
    vms, log, repo, config, tmp = lab
    config.write_text(config.read_text().replace("[ingest]\n", '[ingest]\nverify_interval = "2s"\n'
                                                 'verify_read_data_interval = "4s"\nverify_read_mib = 1\n')
                      + 'keep_within = "5s"\nprune_interval = "1s"\ndefrag_interval = "1s"\n')
    writer = Writer(vms, log, seed=7)
    writer.start()
    try:
        daemon = start_daemon(repo, config, tmp / "ingest.log")
        time.sleep(9)
        daemon.kill()  # perhaps in the middle of a prune or a defrag
        daemon.wait()
        daemon = start_daemon(repo, config, tmp / "ingest.log")
        time.sleep(9)
    finally:
        writer.stop.set()
        writer.join()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    assert writer.error is None, writer.error
    text = (tmp / "ingest.log").read_text()
    assert "event=pruned" in text and "event=prune-failed" not in text and "Traceback" not in text
    assert "event=defragged" in text and "event=defrag-failed" not in text
    # verify ran on schedule alongside, in slices of at most a pack past 1 MiB, and found nothing
    # (prune, defrag and kill -9 meanwhile are not damage)
    assert "event=verified" in text and "read_pass_cursor=" in text
    assert "event=verify-found-damage" not in text and "event=verify-failed" not in text
    status = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
    assert all(v["verify"] and v["verify"]["ok"] for v in status["vms"]), status
    for vm in vms:
        points = points_json(repo, vm.name)
        times = [_seconds(p["time"]) for p in points]
        # the chain's full, then only points within 5 s (+ one prune interval) of the newest
        assert points[0]["kind"] == "full" and times[-1] - times[1] <= 5 + 1 + LOG_INTERVAL, times
    with mounted(repo, tmp / "mnt") as mnt:
        check_every_point(repo, mnt, vms, log)
    from test_prune import check_repository
    from rpofs.store.repo import Repository
    r = Repository.open(str(repo))
    try:
        check_repository(r)
    finally:
        r.close()


def _state(repo, name: str) -> str:
    """The daemon's state of a VM, as `rpofs status` shows it."""
    shown = json.loads(run_rpofs("status", "--json", repo=repo).stdout)["vms"]
    return next((v["state"] for v in shown if v["name"] == name), "")
