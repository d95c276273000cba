"""`rpofs store push` against a real Ceph RGW (tools/ceph-rgw): a local
repository moved into a store reads every point byte-exact from it with an
empty cache, and from another host through its published snapshot; backups
go on during the upload and after the push (into the store, published); a
push killed in its upload or after its switch carries on when run again;
refusals in one line, with nothing written. No libvirt: disks are recorded
from memory (tests/synth.py)."""

import dataclasses
import fcntl
import io
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from rpofs.errors import RpofsError
from rpofs.progress import Progress
from rpofs.store import crypto, hosts, publish, push
from rpofs.store.materialize import DiskReader
from rpofs.store.packs import LocalPacks
from rpofs.store.repo import Repository
from rpofs.store.s3 import Bucket, StoreUrl
from rpofs.store.schema import PointRecord
from rpofs.timefmt import US
from synth import T0, VM, back_up, write

pytestmark = pytest.mark.objstore

MiB = 1 << 20
TESTS = os.path.dirname(os.path.abspath(__file__))


def rpofs(*args, repo, env=None):
    return subprocess.run([sys.executable, "-m", "rpofs.cli", "--repo", str(repo), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def fails_in_one_line(done, fragment: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpofs: ") and fragment in lines[0], done.stderr


@dataclasses.dataclass
class Local:
    """A local repository of three points of one disk, and each point's bytes."""
    path: pathlib.Path
    disk: bytearray
    truth: dict[int, bytes]
    last: PointRecord
    passphrase: str | None = None

    def keys(self):
        return crypto.Passphrase(lambda: self.passphrase) if self.passphrase else None


def local_repo(path: pathlib.Path, rnd: random.Random, passphrase: str | None = None) -> Local:
    repo = Repository.init(str(path), passphrase)
    disk, truth, last = bytearray(rnd.randbytes(3 * MiB)), {}, None
    for i in range(3):
        dirty: set[int] = set()
        if last is not None:
            write(disk, dirty, rnd.randrange(len(disk) - 5000), rnd.randbytes(5000))
        last = back_up(repo, [disk], [dirty], "log" if last else "full", last, T0 + i * US)
        truth[last.point] = bytes(disk)
    repo.close()
    return Local(path, disk, truth, last, passphrase)


def local_packs(path) -> dict[int, int]:
    """{pack: size} of REPO/chunks."""
    return {int(e.name[5:]): e.stat().st_size for e in os.scandir(path / "chunks") if e.name.startswith("pack-")}


def store_packs(url: str, host: str) -> dict[int, int]:
    with Bucket(StoreUrl.parse(url)) as bucket:
        return push._stored(bucket, host)


def reads_every_point(repo: Repository, truth: dict[int, bytes]) -> None:
    points = repo.points(VM)
    assert {p.point for p in points} == set(truth)
    for p in points:
        assert bytes(DiskReader(repo, p, "vda").read(0, len(truth[p.point]))) == truth[p.point]


def another_host_reads(tmp_path, url: str, host: str, truth: dict[int, bytes], keys=None) -> None:
    """A new host of the store reads every point of `host` from what it published."""
    n = len(list(tmp_path.glob("other-*")))
    other = tmp_path / f"other-{n}"
    with Repository.init(str(other), store=url, host=f"reader{n}") as b:
        replica = hosts.ensure_replica(str(other), b.store_conf, host)
    with Repository.open(replica, keys=keys) as seen:
        assert seen.replica and seen.host == host
        reads_every_point(seen, truth)


def is_pushed(local: Local, url: str, host: str, packs: dict[int, int], tmp_path) -> None:
    """Everything a finished push leaves: no local packs, no push.json, the
    store holds every pack at its size, every point reads from the store
    with an emptied cache and from another host."""
    path = local.path
    assert local_packs(path) == {} and not os.path.exists(path / push.CLAIM)
    conf = json.loads((path / "store.json").read_text())
    assert conf["store"] == url and conf["host"] == host and conf["instance"]
    assert store_packs(url, host) == packs
    shutil.rmtree(path / "cache", ignore_errors=True)
    with Repository.open(str(path), keys=local.keys()) as repo:
        assert repo.host == host and repo.publishes
        reads_every_point(repo, local.truth)
        assert repo.packs.gets > 0
    another_host_reads(tmp_path, url, host, local.truth, local.keys())


def test_a_pushed_repository_reads_every_point_from_the_store_and_another_host_too(tmp_path, store_url):
    local = local_repo(tmp_path / "repo", random.Random(1))
    packs = local_packs(local.path)
    assert len(packs) == 3
    done = rpofs("store", "push", store_url, "--host", "kvm1", "--cache-size", "64M", repo=local.path)
    assert done.returncode == 0, done.stderr
    assert "is host kvm1 of" in done.stdout and "3 packs uploaded" in done.stdout
    assert json.loads((local.path / "store.json").read_text())["cache_size"] == 64 * MiB
    is_pushed(local, store_url, "kvm1", packs, tmp_path)
    # a process that opened the repository before the switch may not start a local pack after it
    with pytest.raises(RpofsError, match="moved into an object store"):
        LocalPacks(str(local.path / "chunks")).create(99)
    # a backup afterwards goes into the store and is published when the repository closes
    with Repository.open(str(local.path)) as repo:
        write(local.disk, dirty := set(), 4321, b"\x05" * 70000)
        log = back_up(repo, [local.disk], [dirty], "log", repo.points(VM)[-1], T0 + 10 * US)
        local.truth[log.point] = bytes(local.disk)
    assert local_packs(local.path) == {} and os.listdir(local.path / "staging") == []
    assert set(store_packs(store_url, "kvm1")) > set(packs)
    another_host_reads(tmp_path, store_url, "kvm1", local.truth)
    # run again: it is done
    again = rpofs("store", "push", store_url, repo=local.path)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout


def test_backups_go_on_during_the_upload_and_their_packs_follow(tmp_path, store_url, monkeypatch):
    local = local_repo(tmp_path / "repo", random.Random(2))
    new_disk = random.Random(3).randbytes(2 * MiB)
    (tmp_path / "new.raw").write_bytes(new_disk)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from rpofs.store.repo import Repository
        from synth import T0, back_up
        with Repository.open({str(local.path)!r}) as repo:
            disk = bytearray(open({str(tmp_path / 'new.raw')!r}, 'rb').read())
            print(back_up(repo, [disk], [set()], "full", None, T0 + 20 * 10**6).point)
    """)
    real, backups, once = Bucket.put_new, [], threading.Lock()

    def a_backup_meanwhile(self, name, body):
        # in the upload (on an upload thread, the shared lock held): one backup runs and commits
        if "/packs/" in name and once.acquire(blocking=False):
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            backups.append(int(done.stdout))
        return real(self, name, body)
    monkeypatch.setattr(Bucket, "put_new", a_backup_meanwhile)
    shown = io.StringIO()
    with Progress("push", 0, stream=shown, enabled=True) as progress:
        report = push.push(str(local.path), store_url, "kvm1", progress=progress)
    assert backups and report.uploaded == 4 and report.removed == 4
    assert progress.done == progress.total == report.uploaded_bytes > 2 * MiB  # the backup's pack counted too
    assert shown.getvalue().startswith("\rpush: ") and "100.0%" in shown.getvalue()
    local.truth[backups[0]] = new_disk
    monkeypatch.setattr(Bucket, "put_new", real)
    with Repository.open(str(local.path)) as repo:
        assert len(repo.points(VM)) == 4
    assert local_packs(local.path) == {} and len(store_packs(store_url, "kvm1")) == 4
    another_host_reads(tmp_path, store_url, "kvm1", local.truth)


class Killed(BaseException):
    """The push's process dies here."""


def test_a_push_killed_in_its_upload_carries_on_when_run_again(tmp_path, store_url, monkeypatch):
    local = local_repo(tmp_path / "repo", random.Random(4))
    packs = local_packs(local.path)
    real, puts = Bucket.put_new, []

    def dies_at_the_second_pack(self, name, body):
        if "/packs/" in name:
            puts.append(name)
            if len(puts) >= 2:
                raise Killed(name)
        return real(self, name, body)
    monkeypatch.setattr(Bucket, "put_new", dies_at_the_second_pack)
    with pytest.raises(Killed):
        push.push(str(local.path), store_url, "kvm1")
    monkeypatch.setattr(Bucket, "put_new", real)
    claim = push.read_claim(str(local.path))
    assert claim is not None and claim.host == "kvm1"
    assert not os.path.exists(local.path / "store.json") and local_packs(local.path) == packs
    first = store_packs(store_url, "kvm1")
    assert len(first) == 1 and first.items() <= packs.items()
    with Repository.open(str(local.path)) as repo:  # still a local repository, intact
        reads_every_point(repo, local.truth)
    # another machine cannot take the name meanwhile; a push elsewhere is refused while this one is unfinished
    fails_in_one_line(rpofs("init", "--store", store_url, "--host", "kvm1", repo=tmp_path / "c"),
                      "already has a host kvm1")
    fails_in_one_line(rpofs("store", "push", store_url, "--host", "kvm9", repo=local.path), "is being pushed to")
    # an object of another size where a pack goes: not this repository's, said in one line
    rest = sorted(set(packs) - set(first))
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        bucket.put_new(push._key("kvm1", rest[0]), b"not a pack")
        fails_in_one_line(rpofs("store", "push", store_url, repo=local.path), "not this repository's pack")
        bucket.delete(push._key("kvm1", rest[0]))
    done = rpofs("store", "push", store_url, repo=local.path)
    assert done.returncode == 0, done.stderr
    assert "2 packs uploaded" in done.stdout and "1 found there from an interrupted push" in done.stdout
    is_pushed(local, store_url, "kvm1", packs, tmp_path)


def test_a_push_killed_in_its_claim_or_pruned_meanwhile_carries_on(tmp_path, store_url, monkeypatch):
    local = local_repo(tmp_path / "repo", random.Random(10))

    def dies(bucket, name, instance):
        raise Killed("between host.json and the lease")
    monkeypatch.setattr(hosts, "write_lease", dies)
    with pytest.raises(Killed):
        push.push(str(local.path), store_url, "kvm1")
    monkeypatch.undo()
    with Bucket(StoreUrl.parse(store_url)) as bucket:  # a host with no lease: only push.json tells it is ours
        assert hosts.read_host(bucket, "kvm1") is not None and hosts.read_lease(bucket, "kvm1") is None
    puts = []
    real = Bucket.put_new

    def dies_at_the_second_pack(self, name, body):
        if "/packs/" in name:
            puts.append(name)
            if len(puts) >= 2:
                raise Killed(name)
        return real(self, name, body)
    monkeypatch.setattr(Bucket, "put_new", dies_at_the_second_pack)
    with pytest.raises(Killed):
        push.push(str(local.path), store_url)
    monkeypatch.undo()
    assert len(store_packs(store_url, "kvm1")) == 1
    # every point forgotten meanwhile: its packs deleted locally, the object already put goes at the switch
    forgot = rpofs("forget", "m", repo=local.path)
    assert forgot.returncode == 0, forgot.stderr
    assert local_packs(local.path) == {}
    done = rpofs("store", "push", store_url, repo=local.path)
    assert done.returncode == 0, done.stderr
    assert "0 packs uploaded" in done.stdout and "1 deleted again (pruned meanwhile)" in done.stdout
    assert store_packs(store_url, "kvm1") == {} and not os.path.exists(local.path / push.CLAIM)
    with Repository.open(str(local.path)) as repo:
        assert repo.host == "kvm1" and repo.points(VM) == []


def test_a_push_killed_after_its_switch_is_a_store_repository_and_run_again_finishes(tmp_path, store_url,
                                                                                   monkeypatch):
    local = local_repo(tmp_path / "repo", random.Random(5))
    packs = local_packs(local.path)

    def dies(repo):
        raise Killed("before the snapshot")
    monkeypatch.setattr(publish, "snapshot", dies)
    with pytest.raises(Killed):
        push.push(str(local.path), store_url, "kvm1")
    monkeypatch.undo()
    assert os.path.exists(local.path / "store.json") and os.path.exists(local.path / push.CLAIM)
    assert local_packs(local.path) == packs == store_packs(store_url, "kvm1")
    with Repository.open(str(local.path)) as repo:  # a store repository already: reads go to the store
        assert repo.publishes
        reads_every_point(repo, local.truth)
        assert repo.packs.gets > 0
    done = rpofs("store", "push", store_url, repo=local.path)
    assert done.returncode == 0, done.stderr
    assert "0 packs uploaded" in done.stdout and "3 local pack files removed" in done.stdout
    is_pushed(local, store_url, "kvm1", packs, tmp_path)


def test_the_switch_waits_for_no_other_process_to_have_the_repository_open(tmp_path, store_url):
    local = local_repo(tmp_path / "repo", random.Random(6))
    packs = local_packs(local.path)
    with Repository.open(str(local.path)) as held:  # e.g. a mount or the ingester: it would go on using REPO/chunks
        fails_in_one_line(rpofs("store", "push", store_url, "--host", "kvm1", repo=local.path),
                          f"is open in another process (pid {os.getpid()}")
        assert held.points(VM)
    assert not os.path.exists(local.path / "store.json") and local_packs(local.path) == packs
    assert store_packs(store_url, "kvm1") == packs  # uploaded, kept for the next run
    done = rpofs("store", "push", store_url, repo=local.path)
    assert done.returncode == 0, done.stderr
    assert "3 found there" in done.stdout
    is_pushed(local, store_url, "kvm1", packs, tmp_path)


def test_an_encrypted_repository_is_pushed_with_its_key_record_and_read_with_its_passphrase(tmp_path, store_url):
    local = local_repo(tmp_path / "repo", random.Random(7), passphrase="pass one")
    packs = local_packs(local.path)
    done = rpofs("store", "push", store_url, "--host", "kvm1", repo=local.path, env={"RPOFS_PASSPHRASE": "pass one"})
    assert done.returncode == 0, done.stderr
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        assert hosts.read_host(bucket, "kvm1").key is not None
    is_pushed(local, store_url, "kvm1", packs, tmp_path)


# -- refusals: one line each, nothing written ----------------------------------------------


def nothing_written(local: Local, packs: dict[int, int]) -> None:
    assert local_packs(local.path) == packs
    assert not os.path.exists(local.path / "store.json") and not os.path.exists(local.path / push.CLAIM)
    with Repository.open(str(local.path)) as repo:
        reads_every_point(repo, local.truth)


def test_a_repository_in_a_store_already_is_refused(tmp_path, store_url):
    path = tmp_path / "instore"
    Repository.init(str(path), store=store_url, host="kvm1").close()
    fails_in_one_line(rpofs("store", "push", store_url + "-other", repo=path), "in an object store already")
    fails_in_one_line(rpofs("store", "push", store_url, "--host", "kvm7", repo=path), "in an object store already")
    assert not os.path.exists(path / push.CLAIM)
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        assert hosts.host_names(bucket) == ["kvm1"]
    same = rpofs("store", "push", store_url, repo=path)  # where it is: nothing to do
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stderr


def test_a_host_name_in_use_and_a_store_of_another_format_are_refused(tmp_path, store_url):
    Repository.init(str(tmp_path / "kvm1"), store=store_url, host="kvm1").close()
    local = local_repo(tmp_path / "repo", random.Random(8))
    packs = local_packs(local.path)
    fails_in_one_line(rpofs("store", "push", store_url, "--host", "kvm1", repo=local.path), "already has a host kvm1")
    nothing_written(local, packs)
    assert store_packs(store_url, "kvm1") == {}
    with Bucket(StoreUrl.parse(store_url + "-old")) as bucket:
        bucket.ensure_bucket()
        bucket.put_new("config", json.dumps({"rpofs": "repository", "format": 5}).encode())
        fails_in_one_line(rpofs("store", "push", store_url + "-old", repo=local.path), "of format 5")
        assert set(bucket.list()) == {"config"}
    nothing_written(local, packs)


def test_an_unreachable_store_a_second_push_at_once_and_bad_input_are_refused(tmp_path, store_url):
    local = local_repo(tmp_path / "repo", random.Random(9))
    packs = local_packs(local.path)
    fd = os.open(local.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a push running holds it
        fails_in_one_line(rpofs("store", "push", store_url, repo=local.path), "another push of")
    finally:
        os.close(fd)
    nothing_written(local, packs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fails_in_one_line(rpofs("store", "push", store_url, repo=local.path,
                            env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}), "cannot be reached")
    nothing_written(local, packs)
    fails_in_one_line(rpofs("store", "push", "http://x/y", repo=local.path), "not a store URL")
    fails_in_one_line(rpofs("store", "push", store_url, "--host", "Bad Name", repo=local.path), "not a host name")
    fails_in_one_line(rpofs("store", "push", store_url, repo=tmp_path / "none"), "no rpofs repository")
    nothing_written(local, packs)
