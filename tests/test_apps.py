"""Application logs shipped from a real guest (rpofs.apps, docs/APPS.md).

The guest (tools/mkguest) commits one SQLite row per transaction (WAL mode,
synchronous=FULL) and appends a line per row to a log file; it prints
"seq n" once row n is committed. rpofs ships the WAL and the log through the
guest agent between block points, across a WAL restart, a truncated log, a
guest reboot and an agent killed in the middle of a read. Every point, block
and app, is then read back through a real FUSE mount and opened with sqlite3:
rows 1..k without a gap, integrity_check ok, k never going back, k at an app
point at least its base's and at least what the guest had acknowledged when
the shipment began, and each log a prefix of the log to come."""

import contextlib
import json
import os
import sqlite3
import subprocess
import time
import uuid

import pytest

from guestlab import Guest, build_guest, guest_run
from rpofs.store import shipments
from rpofs.apps.shipper import Shipper
from rpofs.store.crypto import Passphrase
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.verify import verify
from rpofs.virt.client import AgentUnavailable, Connection
from rpofs.vmconfig import AppConfig
from vmlab import RPOFS, TestVM, mounted, run_rpofs, wait_for

pytestmark = pytest.mark.libvirt

ORDERS = AppConfig("orders", "sqlite", "/data/db/seq.db")
JOURNAL = AppConfig("journal", "files", "/data/log/*.log")


def rows_of(path: str) -> list[int]:
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        return [r[0] for r in db.execute("SELECT n FROM seq ORDER BY n")]
    finally:
        db.close()


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class Run:
    """One guest, one repository, and what the guest had acknowledged when
    each shipment began (the floor of what it must hold)."""

    def __init__(self, tmp_path, guest: Guest, encrypted: bool = False):
        self.guest, self.repo_path = guest, tmp_path / "repo"
        run_rpofs("init", *(["--encrypt"] if encrypted else []), repo=self.repo_path)
        self.repo = Repository.open(str(self.repo_path), keys=Passphrase(lambda: os.environ.get("RPOFS_PASSPHRASE")))
        self.conn = Connection("qemu:///system")
        self.dom = self.conn.domain(guest.name)
        self.uuid = self.dom.info().uuid
        self.shipper = Shipper(self.repo, self.dom, self.uuid, guest.name)
        self.floor: dict[int, int] = {}   # ship no -> rows acknowledged before its read began

    def ship(self, app=ORDERS):
        acknowledged = self.guest.progress()
        result = self.shipper.ship(app)
        if result.record is not None:
            self.floor[result.record.ship] = acknowledged
        return result

    def ship_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.ship(ORDERS)
            self.ship(JOURNAL)
            time.sleep(0.5)

    def backup(self, *args) -> None:
        run_rpofs("backup", self.guest.name, *args, repo=self.repo_path)

    def close(self):
        self.repo.close()
        self.conn.close()


@pytest.fixture(params=[False], ids=["plain"])
def shipping(tmp_path, request, monkeypatch):
    """A guest and a repository: encrypted when the test asks (indirect params)."""
    build_guest()
    if request.param:
        monkeypatch.setenv("RPOFS_PASSPHRASE", "app logs sealed")
    with Guest(f"rpofs-app-{uuid.uuid4().hex[:8]}", tmp_path / "guest", interval=0.05) as g:
        run = Run(tmp_path, g, encrypted=request.param)
        try:
            yield run
        finally:
            run.close()


def check_every_point(run: Run, mnt) -> dict[str, int]:
    """Read every point through the mount; the invariants of the module
    docstring. Returns k by point name."""
    vmdir = os.path.join(mnt, run.guest.name)
    listing = [read_json(os.path.join(vmdir, name, "point.json"))
               for name in os.listdir(vmdir) if name not in ("at", "latest")]
    listing.sort(key=lambda p: p["time"])
    ks, logs, previous = {}, [], 0
    for p in listing:
        here = os.path.join(vmdir, p["name"])
        k = rows_of(os.path.join(here, "apps", "orders", "seq.db"))
        assert k == list(range(1, len(k) + 1)), f"{p['name']}: rows with a gap"
        ks[p["name"]] = len(k)
        assert len(k) >= previous, f"{p['name']} ({p['kind']}) holds {len(k)} rows, an earlier point {previous}"
        previous = len(k)
        if p["kind"] == "app":
            base = p["extends"]["name"]
            assert len(k) >= ks[base], f"app point {p['name']}: {len(k)} rows, its base {base} {ks[base]}"
            if p["app"] == "orders":
                assert len(k) >= run.floor[p["ship"]], (p["name"], len(k), run.floor[p["ship"]])
            # the disks are the base's
            assert os.stat(os.path.join(here, "vdb.raw")).st_ino == os.stat(os.path.join(vmdir, base, "vdb.raw")).st_ino
        with open(os.path.join(here, "apps", "journal", "seq.log"), "rb") as f:
            logs.append((p["name"], f.read()))
    return ks, logs


def test_a_database_back_at_every_shipped_commit(shipping, tmp_path):
    run = shipping
    wait_for(lambda: run.guest.progress() >= 3, timeout=30, what="the guest's first rows")
    # before any block point: recorded, waiting, never shown
    early = run.ship(ORDERS).record
    assert early is not None and early.base is None and "no block point" in early.waiting
    run.backup("--full")
    run.ship_for(4)
    assert "0|" in run.guest.wal_checkpoint("RESTART")  # the next row restarts the WAL
    run.ship_for(3)
    run.backup()
    run.ship_for(3)
    # a truncated log: the next generation is shipped from its start
    log_before_truncation = run.guest.progress()
    guest_run(run.guest.dom, "/bin/sh", "-c", ": > /data/log/seq.log")
    run.ship_for(3)

    # the agent killed in the middle of a read: nothing recorded, then it goes on
    with run.repo.env.begin() as txn:
        before_app = shipments.get_app(run.repo, txn, run.uuid, "orders")
    shipped_before = len(list(shipments.ships(run.repo, run.uuid, app="orders")))
    calls = {"reads": 0}
    agent = run.dom.agent

    def killing_agent(command, arguments=None, timeout_s=5):
        if command == "guest-file-read":
            calls["reads"] += 1
            if calls["reads"] == 2:  # after the header's read, before the frames'
                guest_run(run.guest.dom, "/bin/busybox", "killall", "-9", "qemu-ga")
        return agent(command, arguments, timeout_s)

    run.dom.agent = killing_agent
    # new frames to ship (the guest commits a row every 0.2 s): the ship reads the header, then frames
    since = run.guest.progress()
    wait_for(lambda: run.guest.progress() >= since + 3, timeout=30, what="new rows in the guest's database")
    with pytest.raises(AgentUnavailable):
        run.shipper.ship(ORDERS)
    run.dom.agent = agent
    assert calls["reads"] >= 2
    with run.repo.env.begin() as txn:
        assert shipments.get_app(run.repo, txn, run.uuid, "orders") == before_app
    assert len(list(shipments.ships(run.repo, run.uuid, app="orders"))) == shipped_before
    wait_for(lambda: _answers(run.dom), timeout=30, what="the guest agent back")
    run.ship_for(2)

    # a guest reboot (power cut): the workload carries on from its disks
    run.guest.reboot()
    run.dom = run.conn.domain(run.guest.name)
    run.shipper = Shipper(run.repo, run.dom, run.uuid, run.guest.name)  # its streams are in the catalog
    wait_for(lambda: run.guest.progress() > 0, timeout=30, what="rows after the reboot")
    run.ship_for(2)
    run.backup()
    run.ship_for(3)

    points = json.loads(run_rpofs("points", run.guest.name, "--json", repo=run.repo_path).stdout)
    apps = [p for p in points if p["kind"] == "app"]
    assert len(apps) >= 20 and sum(p["waiting"] == "" for p in apps) >= 18
    with mounted(run.repo_path, tmp_path / "mnt") as mnt:
        ks, logs = check_every_point(run, mnt)
        # at/ names the newest point of either kind; a time between two app points, the older
        last = apps[-1]
        assert os.readlink(os.path.join(mnt, run.guest.name, "at", last["time"])) == "../" + last["name"]
        assert os.readlink(os.path.join(mnt, run.guest.name, "latest")) == max(points, key=lambda p: p["time"])["name"]
        # rpofs cp reads what the mount shows
        out = tmp_path / "copy.db"
        run_rpofs("cp", f"{run.guest.name}@{last['time']}:apps/orders/seq.db", str(out), repo=run.repo_path)
        with open(out, "rb") as a, open(os.path.join(mnt, run.guest.name, last["name"], "apps", "orders",
                                                     "seq.db"), "rb") as b:
            assert a.read() == b.read()
    # the log at each point is a prefix of the log of the newest point of its generation
    assert log_before_truncation
    cut = next(i for i in range(1, len(logs)) if len(logs[i][1]) < len(logs[i - 1][1]))
    for group in (logs[:cut], logs[cut:]):
        final = group[-1][1]
        for name, data in group:
            assert final.startswith(data), f"{name}: the log is not a prefix of the later one"
    # the guest committed more than the last point shows, but not less
    assert max(ks.values()) <= run.guest.progress() + 1


def _answers(dom) -> bool:
    try:
        dom.agent("guest-ping")
        return True
    except AgentUnavailable:
        return False


@pytest.mark.parametrize("shipping", [False, True], ids=["plain", "encrypted"], indirect=True)
def test_prune_and_verify_with_app_points(shipping, tmp_path):
    run = shipping
    wait_for(lambda: run.guest.progress() >= 3, timeout=30, what="the guest's first rows")
    run.backup("--full")
    run.ship_for(2)
    run.backup()
    run.ship_for(2)
    run.backup()
    run.ship_for(2)
    ships = list(shipments.ships(run.repo, run.uuid))
    bases = sorted({s.base for s in ships})
    assert len(bases) == 3
    report = verify(run.repo, read_data=True)
    assert report.ok, report.problems
    # keep the newest point (and its chain's full): the middle log goes, and the app points on it
    planned = prune(run.repo, run.uuid, Retention(last=1), dry_run=True)
    pruned = prune(run.repo, run.uuid, Retention(last=1))
    assert [p.point for p in pruned.points_removed] == [bases[1]]
    now = list(shipments.ships(run.repo, run.uuid))
    left = [s for s in now if s.base is not None]
    assert {s.base for s in left} == {bases[0], bases[2]}
    # counted as they went: deleted, or kept without a base (later app points read them)
    # (here the middle base's app points stay without it: the later ones read from them; the
    # count said "removed" for them before)
    assert pruned.ships_removed == len(ships) - len(now)
    assert pruned.ships_unbased == sum(1 for s in now if s.base is None and "pruned" in s.waiting)
    assert pruned.ships_removed + pruned.ships_unbased > 0
    assert (planned.ships_removed, planned.ships_unbased) == (pruned.ships_removed, pruned.ships_unbased)
    assert [s.ship for s in planned.app_points_removed] == [s.ship for s in pruned.app_points_removed]
    assert verify(run.repo, read_data=True).ok
    with mounted(run.repo_path, tmp_path / "mnt") as mnt:
        check_every_point(run, mnt)
    # status shows the apps
    status = json.loads(run_rpofs("status", "--json", repo=run.repo_path).stdout)
    vm = next(v for v in status["vms"] if v["name"] == run.guest.name)
    assert {a["name"] for a in vm["apps"]} == {"orders", "journal"}
    assert all(a["newest_readable"] for a in vm["apps"])


@contextlib.contextmanager
def ingesting(tmp_path, config_text: str):
    """A new repository and `rpofs ingest` on it with this config, stopped
    (and its exit checked) on the way out: (repo, config, log path)."""
    repo, config, log_path = tmp_path / "repo", tmp_path / "rpofs.toml", tmp_path / "ingest.log"
    run_rpofs("init", repo=repo)
    config.write_text(config_text)
    with open(log_path, "ab") as out:
        daemon = subprocess.Popen(RPOFS + ["--repo", str(repo), "ingest", "--config", str(config)],
                                  stdout=out, stderr=out)
    try:
        yield repo, config, log_path
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0, log_path.read_text()


def test_the_ingester_ships_every_interval(tmp_path):
    build_guest()
    with Guest(f"rpofs-appd-{uuid.uuid4().hex[:8]}", tmp_path / "guest", interval=0.1) as g:
        with ingesting(tmp_path, f'[ingest]\nvms = ["{g.name}"]\n[vm.{g.name}]\nlog_interval = "1h"\n'
                       f'[vm.{g.name}.apps.orders]\nkind = "sqlite"\npath = "/data/db/seq.db"\ninterval = "1s"\n'
                       ) as (repo, _, log_path):
            def readable():
                r = Repository.open(str(repo))
                try:
                    uuid_ = r.vms()[0][0] if r.vms() else None
                    return uuid_ and sum(s.base is not None for s in shipments.ships(r, uuid_)) >= 8
                finally:
                    r.close()
            wait_for(readable, timeout=90, what="8 readable app points")
            status = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
            app = status["vms"][0]["apps"][0]
            assert app["state"] in ("shipping", "waiting for a block point") and app["age_seconds"] < 10
        text = log_path.read_text()
        assert "Traceback" not in text and "event=ship-failed" not in text, text
        r = Repository.open(str(repo))
        try:
            ships = [s for s in shipments.ships(r, r.vms()[0][0]) if s.base is not None]
            gaps = [(b.time_us - a.time_us) / 1e6 for a, b in zip(ships, ships[1:])]
            assert max(gaps) < 3.0, gaps  # about one a second (a round with no new row records none)
        finally:
            r.close()


def test_a_vm_without_an_agent_is_said_once_and_backed_off(tmp_path):
    """No guest agent (a VM with no OS): the app's status says so, the
    daemon warns once and backs off; the block backups go on."""
    disk = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    vm = TestVM(f"rpofs-noagent-{uuid.uuid4().hex[:8]}", [(str(disk), "qcow2")])
    try:
        with ingesting(tmp_path, f'[ingest]\nvms = ["{vm.name}"]\n[vm.{vm.name}]\nlog_interval = "2s"\n'
                       f'[vm.{vm.name}.apps.orders]\npath = "/data/db.sqlite"\ninterval = "200ms"\n'
                       ) as (repo, config, log_path):
            def no_agent():
                status = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
                vms = [v for v in status["vms"] if v["name"] == vm.name]
                return vms and vms[0]["points"] >= 3
            wait_for(no_agent, timeout=60, what="3 block points")
            status = json.loads(run_rpofs("status", "--json", repo=repo).stdout)
            app = next(v for v in status["vms"] if v["name"] == vm.name)["apps"][0]
            assert app["name"] == "orders" and app["state"] == "no agent" and "agent" in app["last_error"]
            assert "app orders" in run_rpofs("status", repo=repo).stdout
            r = run_rpofs("ship", vm.name, "--config", config, repo=repo, check=False)
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "agent" in r.stderr, r.stderr
        text = log_path.read_text()
        assert text.count("event=app-no-agent") == 1 and "Traceback" not in text, text
        assert "event=ship-failed" not in text, text
    finally:
        vm.destroy()
