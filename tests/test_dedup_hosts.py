"""Dedup across the hosts of one store, and collection that is safe with it,
against a real Ceph RGW (tools/ceph-rgw): a host borrows the full chunks
another host holds instead of storing them again; the lender's collection
condemns what it no longer uses and deletes it only when no host can be
borrowing it (rpofs.store.lending, docs/OBJECTSTORE.md)."""

import dataclasses
import json
import random
import subprocess
import sys
import time

import pytest

from rpofs.errors import RpofsError

from rpofs.store import forget, gc, hosts
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.s3 import Bucket, StoreUrl
from rpofs.store.schema import CHUNK_SIZE, Condemned, DiskRecord
from rpofs.store.verify import verify
from synth import T0, VM, back_up

pytestmark = pytest.mark.objstore

MiB = 1 << 20
GRACE = 0.5
OTHER_VM = "6e0f1d2c-3b4a-4958-8776-5a4b3c2d1e0f"


def host(path, url, name, grace=None) -> Repository:
    repo = Repository.init(str(path), store=url, host=name, cache_size=64 * MiB)
    if grace is not None:   # a short grace, as store.json's "grace" sets it
        repo.store_conf = dataclasses.replace(repo.store_conf, grace=grace)
    return repo


def pack_bytes(url: str, name: str) -> int:
    with Bucket(StoreUrl.parse(url)) as bucket:
        return sum(bucket.list(hosts.packs_dir(name)).values())


def reads(repo: Repository, vm: str, disk: bytes) -> bytes:
    point = repo.points(vm)[-1]
    return bytes(DiskReader(repo, point, "vda").read(0, len(disk)))


def refresh_lease(repo: Repository) -> None:
    """What the ingester's publication does every LEASE_REFRESH_S, now: the
    lease says when the host's publication was last drained."""
    repo.publish()
    repo.lease_checked = float("-inf")
    repo.publish()


def until(done, step, seconds: float = 60) -> None:
    """step() until done(): a wait for a condition, failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the condition did not come"
        step()


def condemned(repo: Repository) -> set[bytes]:
    with repo.env.begin(db=repo.db["condemned"]) as txn:
        return {bytes(k) for k in txn.cursor().iternext(values=False)}


def condemnations(repo: Repository) -> list[Condemned]:
    with repo.env.begin(db=repo.db["condemned"]) as txn:
        return [Condemned.decode(v) for v in txn.cursor().iternext(keys=False)]


def chunk_rows(repo: Repository, db: str = "chunks") -> set[bytes]:
    with repo.env.begin(db=repo.db[db]) as txn:
        return {bytes(k) for k in txn.cursor().iternext(values=False)}


def lender_and_borrower(tmp_path, store_url, disk: bytes) -> tuple[Repository, Repository]:
    """kvm1 with a full of `disk` published, and kvm2 beside it; both with a
    short grace and a fresh lease."""
    a = host(tmp_path / "a", store_url, "kvm1", grace=GRACE)
    back_up(a, [bytearray(disk)], [set()], "full", None, T0)
    refresh_lease(a)
    b = host(tmp_path / "b", store_url, "kvm2", grace=GRACE)
    refresh_lease(b)
    return a, b


def until_swept(a: Repository, b: Repository) -> None:
    """kvm1 collects, both publishing, until it holds no chunk any more."""
    def step():
        refresh_lease(b)
        collect(a)
        refresh_lease(a)
    until(lambda: not chunk_rows(a), step)


def collect(repo: Repository) -> None:
    """A collection as prune runs it when nothing new is unused."""
    with repo.exclusive():
        gc.collect(repo)


def test_a_second_host_stores_only_what_the_first_does_not_hold_and_reads_it_byte_exact(tmp_path, store_url):
    rnd = random.Random(11)
    shared = rnd.randbytes(6 * MiB)
    a = host(tmp_path / "a", store_url, "kvm1")
    back_up(a, [bytearray(shared)], [set()], "full", None, T0)
    a.publish()
    a_bytes = pack_bytes(store_url, "kvm1")
    b = host(tmp_path / "b", store_url, "kvm2")
    own = shared[:5 * MiB] + rnd.randbytes(MiB)   # one chunk of its own
    point = back_up(b, [bytearray(own)], [set()], "full", None, T0 + 5_000_000, vm=OTHER_VM, vm_name="web")
    b.publish()
    assert point.stats["borrowed_chunks"] == 5
    assert point.stats["new_chunks"] == 2   # its own chunk and the domain XML
    b_bytes = pack_bytes(store_url, "kvm2")
    assert b_bytes < a_bytes / 4, (a_bytes, b_bytes)   # one chunk of six, not all six again
    assert reads(b, OTHER_VM, own) == own
    report = verify(b, read_data=True)
    assert report.ok, report.problems
    shown = subprocess.run([sys.executable, "-m", "rpofs.cli", "--repo", str(tmp_path / "b"), "hosts", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert {r["name"]: r["borrowed"] for r in json.loads(shown.stdout)} == {"kvm1": 0, "kvm2": 5}
    # a third host reads kvm2's point through its replica: the borrowed chunks from kvm1's packs
    c = host(tmp_path / "c", store_url, "kvm3")
    with Repository.open(hosts.ensure_replica(str(tmp_path / "c"), c.store_conf, "kvm2")) as seen:
        assert reads(seen, OTHER_VM, own) == own
    for repo in (a, b, c):
        repo.close()


def test_the_gc_race_a_borrow_not_yet_published_survives_the_lenders_collections(tmp_path, store_url):
    """kvm2 borrows a chunk only kvm1's point uses; kvm1 forgets that point
    and collects twice with a short grace before kvm2 publishes; kvm2's
    point reads byte-exact. Once kvm2 gives the chunk back, kvm1 deletes it."""
    rnd = random.Random(12)
    disk = rnd.randbytes(3 * MiB)
    a, b = lender_and_borrower(tmp_path, store_url, disk)
    back_up(b, [bytearray(disk)], [set()], "full", None, T0 + 1_000_000, vm=OTHER_VM, vm_name="web")
    borrowed = chunk_rows(b, "borrowed")
    assert len(borrowed) == 3 and borrowed <= chunk_rows(a)
    # not published: kvm2's commit is in its outbox only
    forget.forget(a, VM)   # condemned
    refresh_lease(a)       # the condemnation published
    collect(a)             # known published
    refresh_lease(a)
    due = max(c.published_us for c in condemnations(a)) / 1e6 + GRACE
    assert len(condemnations(a)) == len(chunk_rows(a)) and due > 1e9
    until(lambda: time.time() > due, lambda: time.sleep(0.05))   # the grace passes
    for _ in range(2):
        collect(a)
        refresh_lease(a)
    assert condemned(a) == chunk_rows(a) and borrowed <= chunk_rows(a)   # kept: kvm2 has not published
    b.publish()
    refresh_lease(b)
    collect(a)
    assert not borrowed & condemned(a) and borrowed <= chunk_rows(a)   # borrowed: uncondemned
    assert reads(b, OTHER_VM, disk) == disk
    assert verify(b, read_data=True).ok
    # kvm2 forgets its point too: the chunks are given back, and kvm1 deletes them after the grace
    forget.forget(b, OTHER_VM)
    assert not chunk_rows(b, "borrowed")
    until_swept(a, b)
    assert not condemned(a) and a.packs.list() == []   # its pack deleted
    a.close()
    b.close()


def test_a_borrow_the_lender_condemned_during_the_backup_is_copied_and_reads_after_the_lenders_sweep(
        tmp_path, store_url):
    rnd = random.Random(13)
    disk = rnd.randbytes(2 * MiB)
    a, b = lender_and_borrower(tmp_path, store_url, disk)
    w = b.begin_writer()
    for c in range(0, len(disk), CHUNK_SIZE):   # the backup finds both chunks at kvm1's
        w.put_full_chunk(0, c // CHUNK_SIZE, disk[c:c + CHUNK_SIZE])
    assert w.stats["borrowed_chunks"] == 2
    forget.forget(a, VM)        # meanwhile kvm1 condemns them and publishes that
    refresh_lease(a)
    xml, _ = w.put_chunk(b"<domain><name>web</name></domain>")
    point = w.commit(vm=OTHER_VM, vm_name="web", time_us=T0 + 1_000_000, parent=None,
                     consistency="crash-consistent", disks=[DiskRecord("vda", len(disk))], checkpoint="",
                     domain_xml=xml.hex())
    assert point.stats["borrowed_chunks"] == 0     # copied from kvm1 before the commit
    refresh_lease(b)
    until_swept(a, b)   # kvm1 sweeps them once the grace has passed
    assert a.packs.list() == []
    assert reads(b, OTHER_VM, disk) == disk
    a.close()
    b.close()


def test_encrypted_hosts_share_the_stores_key_and_borrow_only_within_it(tmp_path, store_url):
    rnd = random.Random(14)
    disk = rnd.randbytes(MiB)
    a = host(tmp_path / "a", store_url, "kvm1")   # unencrypted
    back_up(a, [bytearray(disk)], [set()], "full", None, T0)
    a.publish()
    b = Repository.init(str(tmp_path / "b"), store=store_url, host="kvm2", passphrase="pass one", cache_size=64 * MiB)
    point = back_up(b, [bytearray(disk)], [set()], "full", None, T0, vm=OTHER_VM)
    assert point.stats.get("borrowed_chunks", 0) == 0 and point.stats["new_chunks"] == 2   # another key space
    b.publish()
    with pytest.raises(RpofsError, match="under other passphrases"):   # nothing claimed
        Repository.init(str(tmp_path / "c"), store=store_url, host="kvm3", passphrase="pass two")
    assert not (tmp_path / "c" / "catalog").exists()
    c = Repository.init(str(tmp_path / "c"), store=store_url, host="kvm3", passphrase="pass one",
                        cache_size=64 * MiB)
    assert c.keys.fingerprint == b.keys.fingerprint and c.key_record != b.key_record   # one key, wrapped anew
    third = "0d1e2f30-4152-4637-8899-aabbccddeeff"
    point = back_up(c, [bytearray(disk)], [set()], "full", None, T0, vm=third)
    assert point.stats["borrowed_chunks"] == 1   # from kvm2, whose key it shares
    assert reads(c, third, disk) == disk
    assert verify(c, read_data=True).ok
    for repo in (a, b, c):
        repo.close()


def test_a_host_alone_in_its_store_frees_what_its_prune_removes_at_once(tmp_path, store_url):
    """Nothing can be borrowing: no grace to wait out (a host that joins
    later claims its name before it follows, so it sees the condemnation)."""
    rnd = random.Random(15)
    a = host(tmp_path / "a", store_url, "kvm1")
    disk = bytearray(rnd.randbytes(2 * MiB))
    back_up(a, [disk], [set()], "full", None, T0)
    refresh_lease(a)
    first = a.packs.list()
    disk[:] = rnd.randbytes(2 * MiB)   # nothing shared with the first full
    back_up(a, [disk], [set()], "full", None, T0 + 1_000_000)
    from rpofs.store.prune import Retention, prune
    prune(a, VM, Retention(last=1))
    assert not condemned(a) and not set(first) & set(a.packs.list())   # the first full's pack deleted
    assert reads(a, VM, bytes(disk)) == bytes(disk)
    a.close()
