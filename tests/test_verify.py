"""`rpofs verify` against damage put into real packs and a real LMDB: it
names exactly the damage — the points and byte ranges it reports are exactly
those that read EIO — and nothing else."""

import dataclasses
import json
import os
import random
import uuid

import pytest

from rpofs.errors import ChunkError
from rpofs.store import schema, verify
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, PACK_HEADER, ChunkLocation, DiskRecord
from test_pieces import mixed_disk
from vmlab import run_rpofs

pytestmark = pytest.mark.lmdb

US = 1_000_000
VM_A = str(uuid.UUID(int=0xA))
VM_B = str(uuid.UUID(int=0xB))


def record(repo, vm, name, disk, dirty, kind, parent, time_us, boot=None):
    with repo.begin_writer() as w:
        if kind == "full":
            for c in range(0, len(disk), CHUNK_SIZE):
                w.put_full_chunk(0, c // CHUNK_SIZE, bytes(disk[c:c + CHUNK_SIZE]))
        else:
            for b in sorted(dirty):
                w.put_log_block(0, b, bytes(disk[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]))
        xml, _ = w.put_chunk(f"<domain><name>{name}</name><t>{time_us}</t></domain>".encode())
        firmware = {"nvram": w.put_chunk(boot)[0].hex()} if boot else {}
        return w.commit(vm=vm, vm_name=name, time_us=time_us, parent=parent if kind == "log" else None,
                        consistency="crash-consistent", disks=[DiskRecord("vda", len(disk))], checkpoint="",
                        domain_xml=xml.hex(), firmware=firmware)


def change(rnd, disk, dirty, n):
    for _ in range(n):
        off = rnd.randrange(len(disk) - 3 * BLOCK_SIZE)
        data = rnd.randbytes(rnd.randrange(1, 2 * BLOCK_SIZE))
        disk[off:off + len(data)] = data
        dirty.update(range(off // BLOCK_SIZE, (off + len(data) - 1) // BLOCK_SIZE + 1))


@pytest.fixture(params=["plain", "encrypted"])
def repo(tmp_path, request, monkeypatch):
    """Two VMs: A with two chains (logs on both), B a full sharing most of
    A's first full. Every point's disk is kept as the truth. Also encrypted:
    the same damage is found through the sealing."""
    rnd = random.Random(42)
    passphrase = None
    if request.param == "encrypted":
        passphrase = "verify me"
        monkeypatch.setenv("RPOFS_PASSPHRASE", passphrase)  # for the command line
    repo = Repository.init(str(tmp_path / "r"), passphrase)
    repo.truth = {}
    disk = mixed_disk(rnd, 5 * CHUNK_SIZE + 3 * BLOCK_SIZE + 100)
    b_disk = bytearray(disk)
    p = record(repo, VM_A, "alpha", disk, None, "full", None, 1 * US, boot=b"nvram of alpha" * 100)
    repo.truth[p.point] = bytes(disk)
    for t in range(2, 5):
        change(rnd, disk, dirty := set(), 4)
        p = record(repo, VM_A, "alpha", disk, dirty, "log", p, t * US)
        repo.truth[p.point] = bytes(disk)
    b_disk[:BLOCK_SIZE] = rnd.randbytes(BLOCK_SIZE)
    q = record(repo, VM_B, "beta", b_disk, None, "full", None, 5 * US)
    repo.truth[q.point] = bytes(b_disk)
    change(rnd, disk, set(), 6)
    p = record(repo, VM_A, "alpha", disk, None, "full", None, 6 * US)
    repo.truth[p.point] = bytes(disk)
    change(rnd, disk, dirty := set(), 3)
    p = record(repo, VM_A, "alpha", disk, dirty, "log", p, 7 * US)
    repo.truth[p.point] = bytes(disk)
    yield repo
    repo.close()


def every_point(repo):
    return [p for vm in (VM_A, VM_B) for p in repo.points(vm)]


def eio_blocks(repo) -> dict[int, set[int]]:
    """What really reads EIO: point -> blocks; every other block must read its truth."""
    repo.reader.close()
    repo.reader._cache_limit = 0
    out = {}
    for p in every_point(repo):
        reader = DiskReader(repo, p, "vda")
        size = p.disks[0].size
        for b in range(-(-size // BLOCK_SIZE)):
            start, stop = b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, size)
            try:
                got = bytes(reader.read(start, stop - start))
            except ChunkError:
                out.setdefault(p.point, set()).add(b)
                continue
            assert got == repo.truth[p.point][start:stop], f"point {p.point} block {b}: wrong bytes"
    return out


def reported_blocks(report) -> dict[int, set[int]]:
    out = {}
    for problem in report.problems:
        for a in problem.affects:
            if a.what == "vda":
                for start, stop in a.ranges:
                    out.setdefault(a.point, set()).update(range(start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)))
    return out


def pack_path(repo, pack):
    return os.path.join(repo.chunks_dir, schema.pack_name(pack))


def flip(repo, pack, offset):
    with open(pack_path(repo, pack), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def full_loc(repo, chain, chunk) -> ChunkLocation:
    with repo.env.begin() as txn:
        key = txn.get(schema.full_key(chain, 0, chunk), db=repo.db["full_index"])
        return ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))


def a_log_loc(repo, chain) -> tuple[tuple, ChunkLocation]:
    with repo.env.begin() as txn:
        for key, value in txn.cursor(db=repo.db["log_index"]):
            parts = schema.read_log_key(key)
            if parts[0] == chain and value:
                return parts, schema.read_log_value(value, BLOCK_SIZE)
    raise AssertionError("no log block")


def test_an_intact_repository_verifies_clean(repo):
    for read_data in (False, True):
        report = verify.verify(repo, read_data=read_data)
        assert report.ok and report.problems == [] and report.garbage.bytes == 0
        assert report.points == 7 and set(report.vms) == {VM_A, VM_B}
    assert report.bytes_read == sum(os.path.getsize(pack_path(repo, p)) for p in repo.packs.list())


def test_a_flipped_bit_in_a_shared_full_chunk_names_both_vms_and_exactly_the_eio_ranges(repo):
    a_full = every_point(repo)[0]
    loc = full_loc(repo, a_full.chain, 2)  # chunk 2: B's full shares it
    flip(repo, loc.pack, loc.offset + repo.reader.sealed_len(loc) - 100)  # inside the last piece
    assert verify.verify(repo).ok  # headers only: the content is not read
    report = verify.verify(repo, read_data=True)
    assert not report.ok and len(report.problems) == 1
    problem = report.problems[0]
    assert problem.kind == "corrupt" and (problem.pack, problem.offset) == (loc.pack, loc.offset)
    assert {a.vm_name for a in problem.affects} == {"alpha", "beta"}
    assert reported_blocks(report) == eio_blocks(repo)


def test_a_flipped_bit_in_a_log_block_names_the_points_that_read_it(repo):
    parts, loc = a_log_loc(repo, every_point(repo)[0].chain)
    flip(repo, loc.pack, loc.offset + 7)
    report = verify.verify(repo, read_data=True)
    assert [p.kind for p in report.problems] == ["corrupt"]
    assert reported_blocks(report) == eio_blocks(repo)
    assert all(parts[3] <= a.point for a in report.problems[0].affects)


def test_a_record_whose_header_lies(repo):
    parts, loc = a_log_loc(repo, every_point(repo)[0].chain)
    header_at = loc.offset - PACK_HEADER.size
    with open(pack_path(repo, loc.pack), "r+b") as f:  # raw length: one byte more
        f.seek(header_at + 33)
        raw = int.from_bytes(f.read(4), "big")
        f.seek(header_at + 33)
        f.write((raw + 1).to_bytes(4, "big"))
    for read_data in (False, True):
        report = verify.verify(repo, read_data=read_data)
        assert [p.kind for p in report.problems] == ["header"]
        assert reported_blocks(report) == eio_blocks(repo)


def test_a_truncated_pack_and_a_deleted_pack(repo):
    points = every_point(repo)
    last = repo.points(VM_A)[-1]  # A's newest log: its own pack
    parts, loc = a_log_loc(repo, last.chain)
    os.truncate(pack_path(repo, loc.pack), loc.offset + 10)
    for read_data in (False, True):
        report = verify.verify(repo, read_data=read_data)
        assert report.problems and {p.kind for p in report.problems} == {"truncated"}
        assert reported_blocks(report) == eio_blocks(repo)
    b_full = [p for p in points if p.vm == VM_B][0]
    b_pack = full_loc(repo, b_full.chain, 0).pack
    os.unlink(pack_path(repo, b_pack))
    report = verify.verify(repo, read_data=True)
    missing = [p for p in report.problems if p.kind == "missing-pack"]
    assert missing and all(p.pack == b_pack for p in missing)
    assert {a.vm_name for p in missing for a in p.affects} == {"beta"}
    assert reported_blocks(report) == eio_blocks(repo)
    # one VM's verify: only what that VM reads
    alpha = verify.verify(repo, VM_A, read_data=True)
    assert {a.vm_name for p in alpha.problems for a in p.affects} == {"alpha"}
    assert alpha.vms == [VM_A]


def test_damaged_boot_state_and_xml_name_the_point(repo):
    first = every_point(repo)[0]
    with repo.env.begin() as txn:
        loc = ChunkLocation.decode(txn.get(bytes.fromhex(first.firmware["nvram"]), db=repo.db["chunks"]))
    flip(repo, loc.pack, loc.offset + 3)
    report = verify.verify(repo, read_data=True)
    assert [(a.point, a.what) for p in report.problems for a in p.affects] == [(first.point, "firmware/nvram")]


def test_garbage_is_reported_and_is_not_damage(repo):
    writer = repo.begin_writer()  # a backup killed before its commit: its pack stays
    writer.put_chunk(os.urandom(5000))
    writer.pack.sync()
    report = verify.verify(repo, read_data=True)
    assert report.ok and report.garbage.packs == 1 and report.garbage.bytes > 5000
    writer.abort()


def test_a_catalog_whose_relations_are_broken(repo):
    points = every_point(repo)
    log_point, other_chain = points[2], points[-1]
    with repo.write_txn() as txn:  # a log whose parent is another chain's point; a listed point with no record
        txn.put(schema.point_key(log_point.point),
                repo.encode_point(dataclasses.replace(log_point, parent=other_chain.point)), db=repo.db["points"])
        txn.delete(schema.point_key(points[1].point), db=repo.db["points"])
    report = verify.verify(repo)
    assert not report.ok
    messages = [p.message for p in report.problems]
    assert any(f"lists point {points[1].point}, which has no record" in m for m in messages)
    assert any(f"names parent {other_chain.point}" in m for m in messages)
    assert len(messages) == 2, messages


def test_prune_meanwhile_is_not_damage(repo, monkeypatch):
    """A record moved or freed by prune after verify's snapshot is checked
    where it is now, not reported."""
    real = verify._check_data

    def prune_first(repo_, *args, **kwargs):
        prune(repo_, VM_A, Retention(last=1))
        return real(repo_, *args, **kwargs)

    monkeypatch.setattr(verify, "_check_data", prune_first)
    report = verify.verify(repo, read_data=True)
    assert report.ok, report.problems


def test_the_command_line(repo):
    path = repo.path
    a_full = every_point(repo)[0]
    loc = full_loc(repo, a_full.chain, 0)
    ok = run_rpofs("--repo", path, "verify", "--read-data")
    assert "no damage" in ok.stdout
    flip(repo, loc.pack, loc.offset + 600)
    bad = run_rpofs("--repo", path, "verify", "--read-data", "--json", check=False)
    assert bad.returncode == 1
    body = json.loads(bad.stdout)
    assert body["ok"] is False and body["problems"][0]["kind"] == "corrupt"
    assert body["problems"][0]["affects"][0]["vm_name"] == "alpha"
    text = run_rpofs("--repo", path, "verify", "alpha", "--read-data", check=False)
    assert text.returncode == 1 and "DAMAGED: pack-" in text.stdout and "alpha" in text.stdout
    kept = verify.load(path)
    assert kept["vms"][VM_A]["ok"] is False and kept["vms"][VM_B]["ok"] is True
    missing = run_rpofs("--repo", path, "verify", "nosuchvm", check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


def test_after_prune_the_catalog_still_verifies(repo):
    """Prune leaves logs whose parent it removed (their changes live on): not damage."""
    report = prune(repo, VM_A, Retention(last=3))  # keeps A's two newest, chain 1's newest log and its full
    kept = {p.point for p in repo.points(VM_A)}
    assert any(p.kind == "log" and p.parent not in kept for p in repo.points(VM_A)) and report.points_removed
    for read_data in (False, True):
        report = verify.verify(repo, read_data=read_data)
        assert report.ok, report.problems


def test_a_damaged_point_record_is_named(repo):
    """A point record that no longer reads (bad JSON; a sealed value that does not open)."""
    victim = every_point(repo)[1]
    with repo.write_txn() as txn:
        value = bytearray(txn.get(schema.point_key(victim.point), db=repo.db["points"]))
        value[0] ^= 0x55  # plain: no longer JSON; sealed: the nonce, so it does not open
        txn.put(schema.point_key(victim.point), bytes(value), db=repo.db["points"])
    report = verify.verify(repo)
    assert any(f"point record {victim.point} cannot be read" in p.message for p in report.problems)


def test_packs_walked_in_ranges_by_several_threads_find_the_same(repo, monkeypatch):
    """A pack cut into many ranges (as a big full's is), windows refilled
    mid-pack: the same damage found, every record read once."""
    monkeypatch.setattr(verify, "RANGE", 256 << 10)
    monkeypatch.setattr(verify, "WINDOW", (1 << 20) + (128 << 10))
    clean = verify.verify(repo, read_data=True)
    assert clean.ok and clean.garbage.bytes == 0
    assert clean.bytes_read == sum(os.path.getsize(pack_path(repo, p)) for p in repo.packs.list())
    a_full = every_point(repo)[0]
    loc = full_loc(repo, a_full.chain, 3)
    flip(repo, loc.pack, loc.offset + repo.reader.sealed_len(loc) // 2)
    parts, log_loc = a_log_loc(repo, a_full.chain)
    flip(repo, log_loc.pack, log_loc.offset + 100)
    report = verify.verify(repo, read_data=True)
    assert sorted(p.kind for p in report.problems) == ["corrupt", "corrupt"]
    assert reported_blocks(report) == eio_blocks(repo)


def test_a_whole_repository_run_is_kept_as_such_with_one_vm(tmp_path):
    """The ingester schedules from the repository-wide result: a repository
    of one VM must get one too (else it would verify without a pause); one
    VM's run does not count as one."""
    repo = Repository.init(str(tmp_path / "r"))
    record(repo, VM_A, "alpha", mixed_disk(random.Random(3), CHUNK_SIZE), None, "full", None, US)
    verify.save(repo.path, verify.verify(repo, VM_A))
    assert "repository" not in verify.load(repo.path)
    report = verify.verify(repo)
    verify.save(repo.path, report)
    assert verify.load(repo.path)["repository"]["time_us"] == report.time_us
    repo.close()
