"""Repositories whose packs are in a real S3 store (a throwaway Ceph 16 RGW,
tests/objectstore.py): backups read back byte-exact through the store and
its bounded cache, damage in the cache and in the store, the store stopped,
and bad input to `rpofs init --store`. No libvirt: disks are recorded from
memory through the same BackupWriter the ingester uses (tests/synth.py)."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from rpofs.errors import PackMissing, StoreError, StoreUnreachable
from rpofs.store import gc, objectpacks, verify
from rpofs.store.materialize import DiskReader
from rpofs.store.repo import Repository
from rpofs.store.s3 import Bucket, StoreUrl
from rpofs.store.schema import CHUNK_SIZE
from synth import T0, back_up, write

pytestmark = pytest.mark.objstore

MiB = 1 << 20
US = 1_000_000


def disk_of(rnd: random.Random, mib: int) -> bytearray:
    """Random data, a run of zeros and a repeated MiB (deduplicated)."""
    data = bytearray(rnd.randbytes((mib - 3) * MiB)) + bytearray(2 * MiB)
    return data + data[:MiB]


def three_points(path, url, rnd, mib=40, cache=64 * MiB):
    """A full of a `mib` MiB disk and two logs, recorded into the store."""
    repo = Repository.init(str(path), store=url, cache_size=cache)
    disk = disk_of(rnd, mib)
    truth = {}
    full = back_up(repo, [disk], [set()], "full", None, T0)
    truth[full.point] = bytes(disk)
    write(disk, dirty := set(), 5000, rnd.randbytes(300_000))
    log1 = back_up(repo, [disk], [dirty], "log", full, T0 + 10 * US)
    truth[log1.point] = bytes(disk)
    write(disk, dirty := set(), len(disk) // 2 + 3, rnd.randbytes(100))
    log2 = back_up(repo, [disk], [dirty], "log", log1, T0 + 20 * US)
    truth[log2.point] = bytes(disk)
    return repo, (full, log1, log2), truth


def test_a_restore_reads_the_store_ahead_in_large_gets_and_writes_every_byte(tmp_path, store_url):
    from rpofs.store.restore import write_disk
    repo, points, truth = three_points(tmp_path / "repo", store_url, random.Random(3))
    with repo:
        for point in points:
            before, dest = repo.packs.gets, tmp_path / f"vda-{point.point}.raw"
            write_disk(DiskReader(repo, point, "vda", repo.streaming_reader()), str(dest))
            assert dest.read_bytes() == truth[point.point]
            # 40 chunks of 1 MiB in ~3 packs: GETs of up to 16 MiB ahead, not one a chunk
            assert repo.packs.gets - before <= 10, repo.packs.gets - before


def cache_files(path) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(path, "cache")):
        out += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(out)


def test_backups_read_back_byte_exact_through_the_store_with_an_empty_cache(tmp_path, store_url):
    path = tmp_path / "repo"
    repo, points, truth = three_points(path, store_url, random.Random(1))
    repo.close()
    assert os.listdir(path / "chunks") == [] and os.listdir(path / "staging") == []
    shutil.rmtree(path / "cache")
    with Repository.open(str(path)) as repo:
        packs = repo.packs.list()
        keys = {repo.packs.key(p) for p in packs}
        sizes = [repo.packs.size(p) for p in packs]
        # a 40 MiB full rolls over at the target size: packs of at most ~16 MiB
        assert len(packs) >= 4 and max(sizes) <= objectpacks.PACK_TARGET + 2 * CHUNK_SIZE, sizes
        for point in points:
            assert DiskReader(repo, point, "vda").read(0, len(truth[point.point])) == truth[point.point]
        assert repo.packs.gets > 0
        report = verify.verify(repo, read_data=True)
        assert report.ok and report.problems == [] and report.garbage.packs == 0
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        held = bucket.list()
    assert "config" in held and keys <= set(held) and all(k.startswith("hosts/") for k in keys)


def test_a_random_4k_read_fetches_blocks_not_packs(tmp_path, store_url):
    path = tmp_path / "repo"
    repo, points, truth = three_points(path, store_url, random.Random(2))
    repo.close()
    shutil.rmtree(path / "cache")
    rnd = random.Random(3)
    with Repository.open(str(path)) as repo:
        reader = DiskReader(repo, points[0], "vda")
        for _ in range(20):
            offset = rnd.randrange(0, 36 * MiB) // 4096 * 4096
            before = repo.packs.gets
            assert bytes(reader.read(offset, 4096)) == truth[points[0].point][offset:offset + 4096]
            assert repo.packs.gets - before <= 2  # the piece table's block and the piece's
        fetched = sum(os.path.getsize(f) for f in cache_files(path))
        assert fetched <= 40 * objectpacks.BLOCK + 40 * 32  # blocks, never whole 16 MiB packs


def test_a_cache_smaller_than_a_disk_evicts_and_reads_byte_exact(tmp_path, store_url):
    limit = 3 * MiB
    path = tmp_path / "repo"
    repo, points, truth = three_points(path, store_url, random.Random(4), mib=24, cache=limit)
    repo.close()
    with Repository.open(str(path)) as repo:
        cache = repo.packs.cache
        for point in points:
            reader = DiskReader(repo, point, "vda")
            for offset in range(0, 24 * MiB, 2 * MiB):  # sequential, with the mount's read-ahead
                assert bytes(reader.read(offset, 2 * MiB)) == truth[point.point][offset:offset + 2 * MiB]
                assert cache.used() <= limit
        gets = repo.packs.gets
    # measured once the repository is closed: its read-ahead no longer writes or evicts meanwhile
    allocated = sum(os.stat(f).st_blocks * 512 for f in cache_files(path)) + \
        sum(os.stat(e.path).st_blocks * 512 for e in os.scandir(path / "cache") if e.is_dir())
    assert 0 < allocated <= limit
    assert gets * objectpacks.BLOCK > limit  # it had to fetch again what it evicted


def test_a_corrupted_cache_block_is_fetched_again(tmp_path, store_url):
    path = tmp_path / "repo"
    repo, points, truth = three_points(path, store_url, random.Random(5), mib=8)
    want = truth[points[2].point]
    assert DiskReader(repo, points[2], "vda").read(0, len(want)) == want
    files = cache_files(path)
    assert files

    def corrupt(name):
        with open(name, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))

    corrupt(files[0])  # in this process: the file changed since it was checked
    assert DiskReader(repo, points[2], "vda").read(0, len(want)) == want
    assert repo.packs.cache.refetched == 1
    repo.close()
    corrupt(files[1])  # in a new process: nothing checked yet
    with Repository.open(str(path)) as repo:
        assert DiskReader(repo, points[2], "vda").read(0, len(want)) == want
        assert repo.packs.cache.refetched == 1
        with open(files[1], "rb") as f:  # the block was written anew, and is right
            import blake3
            head = f.read(32)
            assert blake3.blake3(f.read()).digest() == head


def test_a_pack_object_deleted_is_named_by_verify_and_reads_fail(tmp_path, store_url):
    path = tmp_path / "repo"
    repo, points, truth = three_points(path, store_url, random.Random(6), mib=8)
    full_pack = repo.packs.list()[0]
    full_key = repo.packs.key(full_pack)
    repo.close()
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        bucket.delete(full_key)
    shutil.rmtree(path / "cache")
    with Repository.open(str(path)) as repo:
        report = verify.verify(repo, read_data=True)
        assert not report.ok
        missing = [p for p in report.problems if p.kind == "missing-pack"]
        assert missing and {p.pack for p in missing} == {full_pack}
        assert any(a.point == points[0].point and a.what == "vda" for p in missing for a in p.affects)
        with pytest.raises(PackMissing):
            DiskReader(repo, points[0], "vda").read(0, MiB)


def test_a_stopped_store_fails_a_backup_in_one_line_and_records_nothing(tmp_path, store_url, rgw):
    path = tmp_path / "repo"
    rnd = random.Random(7)
    repo = Repository.init(str(path), store=store_url, cache_size=16 * MiB)
    disk = disk_of(rnd, 6)
    first = back_up(repo, [disk], [set()], "full", None, T0)
    packs = repo.packs.list()
    rgw.stop_rgw()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as failed:
            back_up(repo, [disk_of(rnd, 6)], [set()], "full", None, T0 + US)
        took = time.monotonic() - started
        # botocore's standard retries: at most 1 + 2 + 4 s of backoff over 4 tries
        assert took < 30, took
        assert "\n" not in str(failed.value) and store_url.split("/")[2] in str(failed.value)
        assert [p.point for p in repo.points(first.vm)] == [first.point]  # nothing recorded
        assert os.listdir(path / "staging") == []
    finally:
        rgw.start()
        rgw.wait_for_put()
    second = back_up(repo, [disk], [set()], "full", None, T0 + 2 * US)
    assert [p.point for p in repo.points(first.vm)] == [first.point, second.point]
    assert set(packs) <= set(repo.packs.list())
    assert DiskReader(repo, second, "vda").read(0, len(disk)) == disk
    repo.close()


def test_a_killed_backups_uploaded_pack_is_garbage_that_gc_removes(tmp_path, store_url):
    path = tmp_path / "repo"
    repo = Repository.init(str(path), store=store_url, cache_size=16 * MiB)
    writer = repo.begin_writer()  # killed between its PUT and its commit
    writer.put_chunk(os.urandom(5000))
    writer.pack.sync()
    orphan = writer.pack.pack
    assert orphan in repo.packs.list()
    report = verify.verify(repo, read_data=True)
    assert report.ok and report.garbage.packs == 1
    writer._unlock()
    with repo.exclusive():
        gc.collect(repo)
    assert orphan not in repo.packs.list()
    repo.close()


def test_a_staged_pack_left_by_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path, store_url):
    path = tmp_path / "repo"
    repo = Repository.init(str(path), store=store_url, cache_size=16 * MiB)
    writer = repo.begin_pack()  # a live writer's staged pack
    writer.append(b"k" * 32, 0, 4, b"abcd")
    with open(path / "staging" / "pack-99999999", "wb") as f:  # a dead one's
        f.write(b"x")
    with Repository.open(str(path)) as second:
        assert second.packs is not repo.packs
        assert os.listdir(path / "staging") == [f"pack-{writer.pack:08d}"]
    writer.discard()
    repo.close()


# -- bad input: one line each, nothing written -----------------------------------------


def rpofs(*args, env=None, repo=None):
    return subprocess.run([sys.executable, "-m", "rpofs.cli", *(["--repo", str(repo)] if repo else []), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def fails_in_one_line(result, fragment):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpofs: ") and fragment in lines[0], result.stderr


def nothing_written(path) -> bool:
    return not os.path.exists(path) or os.listdir(path) == []


def test_init_in_the_store_then_backups_and_a_second_init_refused(tmp_path, store_url):
    path = tmp_path / "repo"
    done = rpofs("init", "--store", store_url, "--cache-size", "1G", "--host", "kvm1", repo=path)
    assert done.returncode == 0, done.stderr
    conf = json.loads((path / "store.json").read_text())
    assert conf["store"] == store_url and conf["cache_size"] == 1 << 30 and conf["host"] == "kvm1"
    other = tmp_path / "other"
    fails_in_one_line(rpofs("init", "--store", store_url, "--host", "kvm1", repo=other), "already has a host kvm1")
    assert nothing_written(other)


@pytest.fixture
def bucket(store_url):
    with Bucket(StoreUrl.parse(store_url)) as bucket:
        yield bucket


def test_init_refuses_a_store_of_another_format_or_with_other_objects(tmp_path, store_url, bucket):
    bucket.ensure_bucket()
    bucket.put_new("config", json.dumps({"rpofs": "repository", "format": 5}).encode())
    path = tmp_path / "repo"
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path), "of format 5")
    assert nothing_written(path)
    bucket.delete("config")
    bucket.put_new("config", b"not json")
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path), "not an rpofs repository")
    bucket.delete("config")
    bucket.put_new("data/x", b"something")
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path), "is not empty")
    assert nothing_written(path) and set(bucket.list()) == {"data/x"}


def test_init_with_wrong_credentials(tmp_path, store_url, bucket):
    path = tmp_path / "repo"
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path, env={"AWS_SECRET_ACCESS_KEY": "wrong"}),
                      "refused the credentials")
    assert nothing_written(path)
    with pytest.raises(StoreError, match="does not exist"):  # and no bucket either
        bucket.list()


def test_init_with_an_endpoint_that_refuses_connections(tmp_path, store_url):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "repo"
    started = time.monotonic()
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path,
                            env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}), "cannot be reached")
    assert time.monotonic() - started < 30
    assert nothing_written(path)


def test_init_with_a_bucket_that_cannot_be_created(tmp_path, store_url, rgw):
    rgw.admin("user", "create", "--uid", "nobuckets", "--display-name", "nobuckets", "--max-buckets=-1",
              "--access-key", "nobuckets-key", "--secret-key", "nobuckets-secret")
    path = tmp_path / "repo"
    fails_in_one_line(rpofs("init", "--store", store_url, repo=path,
                            env={"AWS_ACCESS_KEY_ID": "nobuckets-key", "AWS_SECRET_ACCESS_KEY": "nobuckets-secret"}),
                      "does not exist and cannot be created")
    assert nothing_written(path)


def test_init_refuses_a_bad_url_and_a_cache_size_without_a_store(tmp_path, rgw):
    path = tmp_path / "repo"
    fails_in_one_line(rpofs("init", "--store", "http://x/y", repo=path), "not a store URL")
    fails_in_one_line(rpofs("init", "--cache-size", "1G", repo=path), "--cache-size goes with --store")
    assert nothing_written(path)


def test_a_failing_store_call_is_one_store_error(rgw):
    with Bucket(StoreUrl.parse("s3://rpofs-nothing-here/x")) as bucket:
        with pytest.raises(StoreError) as failed:
            bucket.list()
    assert "does not exist" in str(failed.value)
