"""Many hosts on one store, against a real Ceph RGW (tools/ceph-rgw): each
host's catalog published, followed by the others, taken over by a new
machine; every point read back byte-exact from another host's directory."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from rpofs.errors import RpofsError
from rpofs.store import hosts, publish
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.s3 import Bucket, StoreUrl
from synth import T0, VM, back_up, write
from rpofs.timefmt import US

pytestmark = pytest.mark.objstore

MiB = 1 << 20


def rpofs(*args, repo, env=None):
    return subprocess.run([sys.executable, "-m", "rpofs.cli", "--repo", str(repo), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def one_line(done, expected: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr


class Host:
    """One host's repository and a disk it backs up, with the bytes of each point."""

    def __init__(self, path, url, name, rnd, mib=4, vm_name="m", vm=VM, **init):
        self.repo = Repository.init(str(path), store=url, host=name, cache_size=64 * MiB, **init)
        self.path, self.rnd, self.vm_name, self.vm = path, rnd, vm_name, vm
        self.disk = bytearray(rnd.randbytes(mib * MiB))
        self.truth: dict[int, bytes] = {}
        self.last = None

    def point(self, time_us: int):
        dirty = set()
        if self.last is not None:
            for _ in range(3):
                write(self.disk, dirty, self.rnd.randrange(len(self.disk) - 5000), self.rnd.randbytes(5000))
        self.last = back_up(self.repo, [self.disk], [dirty], "log" if self.last else "full", self.last, time_us,
                            vm_name=self.vm_name, vm=self.vm)
        self.truth[self.last.point] = bytes(self.disk)
        return self.last


def reads_every_point(repo: Repository, truth: dict[int, bytes]) -> None:
    points = repo.points(VM)
    assert {p.point for p in points} == set(truth)
    for p in points:
        assert bytes(DiskReader(repo, p, "vda").read(0, len(truth[p.point]))) == truth[p.point]


def kvm1_seen_from_a_new_host(tmp_path, store_url) -> str:
    """kvm2, a host made now: the directory of its replica of kvm1."""
    b = Repository.init(str(tmp_path / "b"), store=store_url, host="kvm2")
    try:
        return hosts.ensure_replica(str(tmp_path / "b"), b.store_conf, "kvm1")
    finally:
        b.close()


def test_a_host_reads_every_point_of_another_byte_exact_and_follows_its_new_ones(tmp_path, store_url):
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(1))
    for i in range(3):
        a.point(T0 + i * US)
    a.repo.publish()
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        assert seen.replica and seen.host == "kvm1"
        reads_every_point(seen, a.truth)
        with pytest.raises(RpofsError, match="only kvm1 writes it"):
            back_up(seen, [bytearray(MiB)], [set()], "full", None, T0)
    a.point(T0 + 10 * US)  # published when a closes
    a.repo.close()
    with Repository.open(replica) as seen:
        reads_every_point(seen, a.truth)
    # the CLI finds the VM on the other host by its name
    listed = rpofs("points", "m", "--json", repo=tmp_path / "b")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 4
    shown = rpofs("hosts", "--json", repo=tmp_path / "b")
    assert shown.returncode == 0, shown.stderr
    rows = {r["name"]: r for r in json.loads(shown.stdout)}
    assert rows["kvm1"]["points"] == 4 and rows["kvm1"]["vms"] == 1 and not rows["kvm1"]["this"]
    assert rows["kvm2"]["this"] and rows["kvm2"]["points"] == 0 and rows["kvm2"]["unpublished"] == 0
    restored = tmp_path / "vda.raw"
    done = rpofs("restore", "m@latest:vda", str(restored), repo=tmp_path / "b")
    assert done.returncode == 0, done.stderr
    assert restored.read_bytes() == a.truth[max(a.truth)]


def test_the_host_lost_a_new_machine_takes_it_over_and_carries_on_its_chain(tmp_path, store_url):
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(2))
    for i in range(3):
        a.point(T0 + i * US)
    a.repo.publish()
    # a second machine with the same name is refused; a take-over while the lease is fresh too
    one_line(rpofs("init", "--store", store_url, "--host", "kvm1", repo=tmp_path / "c"), "already has a host kvm1")
    one_line(rpofs("init", "--store", store_url, "--host", "kvm1", "--take-over", repo=tmp_path / "c"),
             "looks alive")
    assert not os.path.exists(tmp_path / "c" / "catalog")
    shutil.rmtree(tmp_path / "a" / "catalog")  # kvm1 burns down (its process still holds the old files)
    done = rpofs("init", "--store", store_url, "--host", "kvm1", "--take-over", "--force", repo=tmp_path / "c")
    assert done.returncode == 0, done.stderr
    assert "taken over with its 1 VMs" in done.stdout
    with Repository.open(str(tmp_path / "c")) as c:
        reads_every_point(c, a.truth)
        # the chain goes on: a log point on top of the last published one, into new packs
        disk = bytearray(a.disk)
        write(disk, dirty := set(), 12345, b"\x07" * 70000)
        log = back_up(c, [disk], [dirty], "log", c.points(VM)[-1], T0 + 20 * US)
        assert log.chain == a.last.chain
        truth = {**a.truth, log.point: bytes(disk)}
        reads_every_point(c, truth)
    # the old machine comes back: it may neither store packs over the new one's nor publish
    with pytest.raises(RpofsError, match="taken over"):
        a.point(T0 + 30 * US)
        a.repo.publish()
    a.repo.close()
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        reads_every_point(seen, truth)


def test_a_new_follower_starts_from_a_snapshot_and_old_logs_go(tmp_path, store_url, monkeypatch):
    monkeypatch.setattr(publish, "SNAPSHOT_MIN", 1)  # a snapshot at every publication once logs outweigh half of it
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(3), mib=2)
    for i in range(12):
        a.point(T0 + i * US)
        a.repo.publish()
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        listing = publish._listing(bucket, "kvm1")
    assert len(listing.snapshots) >= 2
    # nothing older than the previous snapshot is kept
    assert all(last >= listing.snapshots[-2] for _, last in listing.logs)
    assert all(s >= listing.snapshots[-2] for s in listing.snapshots)
    a.repo.close()
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        reads_every_point(seen, a.truth)


def test_a_publication_killed_after_its_put_is_put_again_and_applied_once(tmp_path, store_url, monkeypatch):
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(4), mib=2)
    a.point(T0)
    a.repo.publish()
    a.point(T0 + US)
    real = Repository.write_txn

    def dies_after_the_put(self, publish=True):
        if not publish:
            raise KeyboardInterrupt("killed")
        return real(self, publish)
    monkeypatch.setattr(Repository, "write_txn", dies_after_the_put)
    with pytest.raises(KeyboardInterrupt):
        a.repo.publish()
    monkeypatch.setattr(Repository, "write_txn", real)
    assert publish.backlog(a.repo).batches > 0
    a.point(T0 + 2 * US)   # a batch more: the next log object overlaps the one already put
    a.repo.publish()
    assert publish.backlog(a.repo).batches == 0
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        logs = publish._listing(bucket, "kvm1").logs
    assert any(f1 == f2 and l1 < l2 for f1, l1 in logs for f2, l2 in logs), logs
    a.repo.close()
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        reads_every_point(seen, a.truth)


def test_an_encrypted_host_is_published_sealed_and_read_with_its_passphrase(tmp_path, store_url):
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(5), mib=2, passphrase="pass one")
    a.point(T0)
    a.point(T0 + US)
    a.repo.close()
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        names = bucket.list("hosts/kvm1/")
        for name in names:
            if "/log/" in name or "/snap/" in name:
                assert b"vda" not in bucket.get(name)[0]
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    from rpofs.store import crypto
    with pytest.raises(RpofsError):
        Repository.open(replica, keys=crypto.Passphrase(lambda: "wrong"))
    with Repository.open(replica, keys=crypto.Passphrase(lambda: "pass one")) as seen:
        reads_every_point(seen, a.truth)


def test_one_mount_shows_every_hosts_vms_and_follows_their_new_points(tmp_path, store_url):
    """kvm2's mount holds its own VM m, kvm1's VM of the same name as
    m@kvm1, both by UUID, every point byte-exact; a point kvm1 publishes
    while it is mounted appears, and so do the VMs of a host that joins."""
    from rpofs.timefmt import format_time
    from vmlab import wait_for
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(7), mib=2)
    for i in range(2):
        a.point(T0 + i * US)
    a.repo.publish()
    other = "00000000-0000-0000-0000-0000000000b2"
    b = Host(tmp_path / "b", store_url, "kvm2", random.Random(8), mib=2, vm=other)
    b.point(T0 + 5 * US)
    b.repo.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = rpofs("mount", str(mnt), repo=tmp_path / "b")
    assert done.returncode == 0, done.stderr
    try:
        assert sorted(os.listdir(mnt)) == [".by-uuid", "m", "m@kvm1"]
        assert os.readlink(mnt / ".by-uuid" / VM) == "../m@kvm1" and os.readlink(mnt / ".by-uuid" / other) == "../m"
        for point in a.repo.points(VM):
            with open(mnt / "m@kvm1" / "at" / format_time(point.time_us, 6) / "vda.raw", "rb") as f:
                assert f.read() == a.truth[point.point]
        with open(mnt / "m" / "latest" / "vda.raw", "rb") as f:
            assert f.read() == b.truth[b.last.point]
        newest = a.point(T0 + 30 * US)
        a.repo.publish()
        wait_for(lambda: os.readlink(mnt / "m@kvm1" / "latest") == newest.name, timeout=30,
                 what="kvm1's new point in kvm2's mount")
        with open(mnt / "m@kvm1" / newest.name / "vda.raw", "rb") as f:
            assert f.read() == a.truth[newest.point]
        # a host that joins the store while it is mounted: its VMs appear
        c = Host(tmp_path / "c", store_url, "kvm3", random.Random(9), mib=1, vm_name="w",
                 vm="00000000-0000-0000-0000-0000000000c3")
        c.point(T0 + 40 * US)
        c.repo.close()
        wait_for(lambda: "w" in os.listdir(mnt), timeout=30, what="the new host kvm3's VM in kvm2's mount")
        with open(mnt / "w" / "latest" / "vda.raw", "rb") as f:
            assert f.read() == c.truth[c.last.point]
    finally:
        rpofs("umount", str(mnt), repo=tmp_path / "b")
        a.repo.close()


def test_a_new_follower_reads_the_snapshot_rather_than_every_log_since_the_first(tmp_path, store_url):
    """30 log objects, then a snapshot while the logs still reach back to
    batch 1: a new follower starts from the snapshot (one GET, not 30) and
    applies only what came after it; every point reads byte-exact."""
    import lmdb
    from rpofs.store import schema
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(9), mib=1)
    for i in range(30):
        a.point(T0 + i * US)
        a.repo.publish()
    publish.snapshot(a.repo)
    for i in range(30, 33):
        a.point(T0 + i * US)
    a.repo.publish()
    a.repo.close()
    catalog = tmp_path / "follower"
    catalog.mkdir()
    env = lmdb.open(str(catalog), max_dbs=len(schema.DATABASES))
    db = {name: env.open_db(name.encode()) for name in schema.DATABASES}
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        done = publish.follow(env, db, bucket, "kvm1", None)
        assert done.from_snapshot and done.applied < 10, done
        again = publish.follow(env, db, bucket, "kvm1", None)
        assert again.applied == 0 and again.through == done.through
    env.close()
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        reads_every_point(seen, a.truth)


def test_a_hold_taken_on_another_hosts_point_is_kept_by_that_hosts_prune_and_forget(tmp_path, store_url):
    """kvm2 runs a VM on kvm1's second point (a hold through its replica,
    as `rpofs run` takes it): kvm1's prune keeps that point and its forget
    is refused, until kvm2 drops the hold."""
    from rpofs.store import forget, holds
    from rpofs.store.prune import Retention, prune
    a = Host(tmp_path / "a", store_url, "kvm1", random.Random(10), mib=1)
    for i in range(3):
        a.point(T0 + i * US)
    a.repo.publish()
    full, held = a.repo.points(VM)[:2]
    replica = kvm1_seen_from_a_new_host(tmp_path, store_url)
    with Repository.open(replica) as seen:
        holds.put(seen, holds.Hold("web-run", VM, held.point, "VM web-run runs on it", "web-run"))
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        assert list(bucket.list("hosts/kvm2/holds/kvm1/")) == ["hosts/kvm2/holds/kvm1/web-run.json"]
    report = prune(a.repo, VM, Retention(last=1))
    assert [p.point for p in a.repo.points(VM)] == [full.point, held.point, a.last.point], report
    with pytest.raises(RpofsError, match="VM web-run@kvm2 runs on one of its points .on host kvm2: rpofs run"):
        forget.forget(a.repo, VM)
    assert bytes(DiskReader(a.repo, held, "vda").read(0, MiB)) == a.truth[held.point]
    holds.drop(replica, "web-run")
    prune(a.repo, VM, Retention(last=1))
    assert [p.point for p in a.repo.points(VM)] == [full.point, a.last.point]   # the full: the last's chain
    a.repo.close()
