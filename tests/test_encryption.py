"""Encryption at rest, on a real LMDB and real pack files: every point reads
back byte-exact; nothing of the disks, the VM's name or its XML is in the
repository's files; keyed chunk ids (dedup inside a repository, nothing
shared across two); damage and moved records fail, never return wrong bytes;
prune, compaction, defrag and upgrade re-seal what they copy; the command
line's key handling."""

import os
import random

import pytest

from rpofs.errors import CorruptChunk, KeyRequired, RpofsError, WrongKey
from rpofs.store import crypto, schema
from rpofs.store import gc as gc_mod
from rpofs.store import repo as repo_mod
from rpofs.store.defrag import defrag
from rpofs.store.materialize import DiskReader
from rpofs.store.prune import Retention, prune
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, CODEC_PIECES, PACK_HEADER, SEAL_OVERHEAD, ChunkLocation
from rpofs.store.upgrade import upgrade
from rpofs.timefmt import US
from synth import VM, back_up, write
from test_defrag import chain_of_scattered_logs
from test_prune import check_repository
from vmlab import run_rpofs

pytestmark = pytest.mark.lmdb

PASS = "correct horse battery staple"
MARKER = b"RPOFS-PLAINTEXT-MARKER-7f3a9c"
NAME = "vm-name-secret-q8x2"
# incompressible around the marker, so that an unencrypted repository stores it raw (the search finds it there)
XML = b"<domain><description>" + random.Random(0).randbytes(300) + b"XMLMARKER-b71d</description></domain>"


def enc_init(path) -> Repository:
    return Repository.init(str(path), PASS)


def enc_open(path, passphrase=PASS) -> Repository:
    return Repository.open(str(path), keys=crypto.Passphrase(lambda: passphrase))


def marked_disk(rnd: random.Random, size: int) -> bytearray:
    """Random data, zeros, repeats, and MARKER written into incompressible
    and compressible places alike."""
    disk = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(4096, 200_000), size - pos)
        kind = rnd.random()
        if kind < 0.5:
            disk[pos:pos + n] = rnd.randbytes(n)
        elif kind < 0.7:
            disk[pos:pos + n] = (MARKER * (n // len(MARKER) + 1))[:n]
        pos += n
    for at in range(1000, size - 100, 150_000):
        disk[at:at + len(MARKER)] = MARKER
    return disk


def read_disk(repo, point, target="vda"):
    reader = DiskReader(repo, point, target)
    return bytes(reader.read(0, reader.size))


def cold(repo) -> None:
    repo.reader.close()


def history(repo, rnd, size, logs, vm_name=NAME, xml=XML):
    """A full, logs of scattered writes, a second full, a log: (points, truth)."""
    disk = marked_disk(rnd, size)
    points = [back_up(repo, [disk], [set()], "full", None, US, vm_name, xml)]
    truth = {points[0].point: bytes(disk)}
    for i in range(logs):
        dirty = set()
        for _ in range(rnd.randrange(1, 5)):
            off = rnd.randrange(0, size - 1)
            data = rnd.choice([rnd.randbytes(BLOCK_SIZE), bytes(BLOCK_SIZE), MARKER * 50, rnd.randbytes(777)])
            write(disk, dirty, off, data[:size - off])
        full = i == logs - 2
        points.append(back_up(repo, [disk], [set() if full else dirty], "full" if full else "log",
                              None if full else points[-1], (2 + i) * US, vm_name, xml))
        truth[points[-1].point] = bytes(disk)
    return points, truth


def test_encrypted_repository_round_trips_every_point(tmp_path):
    rnd = random.Random(3)
    size = 3 * CHUNK_SIZE + 5000
    repo = enc_init(tmp_path / "r")
    assert repo.encrypted and isinstance(repo.ids, crypto.KeyedIds)
    points, truth = history(repo, rnd, size, 12)
    repo.close()
    repo = enc_open(tmp_path / "r")
    try:
        assert [p.point for p in repo.points(VM)] == [p.point for p in points]
        assert repo.find_vm(NAME) == (VM, NAME)
        for point in points:
            cold(repo)
            assert read_disk(repo, point) == truth[point.point]
            reader = DiskReader(repo, point, "vda")
            for i in range(40):
                if i % 7 == 0:
                    cold(repo)
                start = rnd.randrange(size)
                stop = min(size, start + rnd.choice([1, 4096, BLOCK_SIZE + 3, CHUNK_SIZE + 5]))
                assert bytes(reader.read(start, stop - start)) == truth[point.point][start:stop]
            assert repo.read_chunk(bytes.fromhex(point.domain_xml)) == XML
    finally:
        repo.close()


def repository_files(path):
    """(name, bytes) of the catalog and every pack."""
    yield "data.mdb", (path / "catalog" / "data.mdb").read_bytes()
    for name in sorted(os.listdir(path / "chunks")):
        yield name, (path / "chunks" / name).read_bytes()


def test_no_plaintext_of_disks_names_or_xml_in_the_repository_files(tmp_path):
    rnd = random.Random(5)
    for kind in ("plain", "encrypted"):
        path = tmp_path / kind
        repo = Repository.init(str(path), PASS if kind == "encrypted" else None)
        history(repo, random.Random(5), 2 * CHUNK_SIZE + 999, 6)
        repo.close()
        found = {needle: [name for name, blob in repository_files(path) if needle in blob]
                 for needle in (MARKER, NAME.encode(), b"XMLMARKER-b71d")}
        if kind == "plain":  # the search finds them where they are in clear
            assert all(found.values()), found
        else:
            assert not any(found.values()), found
    del rnd


def full_keys(repo, chain) -> list[bytes]:
    with repo.env.begin() as txn:
        cur = txn.cursor(db=repo.db["full_index"])
        return [bytes(v) for _, v in schema.scan(cur, schema.chain_prefix(chain))]


def test_chunk_keys_are_keyed_per_repository_and_dedup_still_works(tmp_path):
    disk = bytearray(random.Random(7).randbytes(2 * CHUNK_SIZE + 4096))
    a, b, plain = enc_init(tmp_path / "a"), enc_init(tmp_path / "b"), Repository.init(str(tmp_path / "p"))
    try:
        pa, pb, pp = (back_up(r, [disk], [set()], "full", None, US) for r in (a, b, plain))
        ka, kb, kp = full_keys(a, pa.chain), full_keys(b, pb.chain), full_keys(plain, pp.chain)
        assert len(ka) == len(kb) == len(kp) == 3
        assert not set(ka) & set(kb) and not set(ka) & set(kp) and not set(kb) & set(kp)
        assert pa.domain_xml != pb.domain_xml
        again = back_up(a, [disk], [set()], "full", None, 2 * US)  # the same data: nothing new stored
        assert again.stats["new_chunks"] == 0 and again.stats["stored_bytes"] == 0
        assert full_keys(a, again.chain) == ka
        assert read_disk(a, again) == bytes(disk)
    finally:
        for r in (a, b, plain):
            r.close()


def flip(repo, pack: int, at: int) -> None:
    with open(os.path.join(repo.chunks_dir, schema.pack_name(pack)), "r+b") as f:
        b = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([b[0] ^ 0x04]), at)


def full_location(repo, point, chunk_no) -> tuple[bytes, ChunkLocation]:
    key = full_keys(repo, point.chain)[chunk_no]
    return key, repo.locate(key)


def log_locations(repo, point) -> list[tuple[bytes, ChunkLocation]]:
    """(log_index key, location) of the blocks a log point stored."""
    out = []
    with repo.env.begin() as txn:
        for k, v in txn.cursor(db=repo.db["log_index"]):
            chain, disk, block, at = schema.read_log_key(k)
            if at == point.point and v:
                out.append((bytes(k), schema.read_log_value(v, BLOCK_SIZE)))
    return out


def test_damage_fails_and_never_returns_wrong_bytes(tmp_path):
    rnd = random.Random(11)
    repo = enc_init(tmp_path / "r")
    size = 2 * CHUNK_SIZE
    disk = bytearray(rnd.randbytes(size))
    full = back_up(repo, [disk], [set()], "full", None, US)
    dirty = set()
    for b in (3, 9, 20):
        write(disk, dirty, b * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
    log = back_up(repo, [disk], [dirty], "log", full, 2 * US)
    try:
        # a piece: that piece fails, its neighbours still read
        key, loc = full_location(repo, full, 0)
        repo.reader.read_range(key, loc, 0, 1)
        table = repo.reader._tables[key]
        piece = table.piece(3)
        assert piece.stop - piece.start == BLOCK_SIZE + SEAL_OVERHEAD
        flip(repo, loc.pack, loc.offset + piece.start + 100)
        cold(repo)
        with pytest.raises(CorruptChunk, match="does not decrypt"):
            repo.reader.read_range(key, loc, 3 * BLOCK_SIZE + 5, 3 * BLOCK_SIZE + 6)
        assert bytes(repo.reader.read_range(key, loc, 5 * BLOCK_SIZE, 6 * BLOCK_SIZE)) == disk[5 * BLOCK_SIZE:6 * BLOCK_SIZE]
        with pytest.raises(CorruptChunk):
            repo.read_chunk(key)
        with pytest.raises(CorruptChunk):
            repo.reader.verified(key, loc)
        # a table: every read of the chunk fails
        key, loc = full_location(repo, full, 1)
        flip(repo, loc.pack, loc.offset + 20)
        cold(repo)
        for start in (0, 7 * BLOCK_SIZE):
            with pytest.raises(CorruptChunk):
                repo.reader.read_range(key, loc, start, start + 10)
        # a log block
        (_, block_loc), *_ = log_locations(repo, log)
        flip(repo, block_loc.pack, block_loc.offset + 30)
        cold(repo)
        reader = DiskReader(repo, log, "vda")
        with pytest.raises(CorruptChunk):
            reader.read(3 * BLOCK_SIZE, 10)
        assert bytes(reader.read(9 * BLOCK_SIZE, BLOCK_SIZE)) == disk[9 * BLOCK_SIZE:10 * BLOCK_SIZE]
        # a point's record in the catalog, and a VM's name
        with repo.env.begin(write=True) as txn:
            value = bytearray(txn.get(schema.point_key(log.point), db=repo.db["points"]))
            value[20] ^= 1
            txn.put(schema.point_key(log.point), bytes(value), db=repo.db["points"])
        with pytest.raises(RpofsError, match="does not decrypt") as e:
            repo.points(VM)
        assert "\n" not in str(e.value)
        with repo.env.begin(write=True) as txn:  # a value moved to another entry fails too
            other = txn.get(schema.point_key(full.point), db=repo.db["points"])
            txn.put(schema.point_key(log.point), other, db=repo.db["points"])
        with pytest.raises(RpofsError, match="does not decrypt"):
            repo.points(VM)
        with repo.env.begin(write=True) as txn:
            vm_key = bytes(next(iter(txn.cursor(db=repo.db["vms"]).iternext(values=False))))
            value = bytearray(txn.get(vm_key, db=repo.db["vms"]))
            value[-1] ^= 1
            txn.put(vm_key, bytes(value), db=repo.db["vms"])
        with pytest.raises(RpofsError, match="does not decrypt"):
            repo.vms()
    finally:
        repo.close()


def test_records_moved_or_swapped_in_their_packs_fail(tmp_path):
    rnd = random.Random(13)
    repo = enc_init(tmp_path / "r")
    disk = bytearray(CHUNK_SIZE)
    full = back_up(repo, [disk], [set()], "full", None, US)
    dirty = set()
    for b in (1, 2, 5):
        write(disk, dirty, b * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
    log = back_up(repo, [disk], [dirty], "log", full, 2 * US)
    try:
        (k1, l1), (k2, l2), (k3, l3) = log_locations(repo, log)
        assert repo.reader.record_len(l1) == PACK_HEADER.size + BLOCK_SIZE + SEAL_OVERHEAD
        path = os.path.join(repo.chunks_dir, schema.pack_name(l1.pack))
        head = PACK_HEADER.size
        with open(path, "r+b") as f:
            r1 = os.pread(f.fileno(), repo.reader.record_len(l1), l1.offset - head)
            r2 = os.pread(f.fileno(), repo.reader.record_len(l2), l2.offset - head)
            # swapped: each record at the other's place
            os.pwrite(f.fileno(), r2, l1.offset - head)
            os.pwrite(f.fileno(), r1, l2.offset - head)
            # copied: block 5's record appended, and its entry pointed there
            r3 = os.pread(f.fileno(), repo.reader.record_len(l3), l3.offset - head)
            end = os.fstat(f.fileno()).st_size
            os.pwrite(f.fileno(), r3, end)
        moved = ChunkLocation(l3.pack, end + head, l3.stored_len, l3.raw_len, l3.codec)
        with repo.env.begin(write=True) as txn:
            txn.put(k3, schema.log_value(moved), db=repo.db["log_index"])
        cold(repo)
        reader = DiskReader(repo, log, "vda")
        for block in (1, 2, 5):
            with pytest.raises(CorruptChunk):
                reader.read(block * BLOCK_SIZE, BLOCK_SIZE)
        with pytest.raises(CorruptChunk):  # the run path too (blocks 1 and 2 follow one another)
            reader.read(BLOCK_SIZE, 2 * BLOCK_SIZE)
        assert bytes(reader.read(3 * BLOCK_SIZE, BLOCK_SIZE)) == bytes(BLOCK_SIZE)
    finally:
        repo.close()


def test_missing_or_wrong_key_is_refused_clearly(tmp_path):
    path = tmp_path / "r"
    repo = enc_init(path)
    master, fingerprint = repo.master_key(), repo.keys.fingerprint
    repo.close()
    with pytest.raises(KeyRequired, match=f"^repository {path} is encrypted: give the passphrase with --key-file, "
                       r"\$RPOFS_KEY_FILE or \$RPOFS_PASSPHRASE$"):
        Repository.open(str(path))
    with pytest.raises(KeyRequired):
        Repository.open(str(path), keys=crypto.Passphrase(lambda: None))
    with pytest.raises(WrongKey, match=f"^wrong passphrase for repository {path}$"):
        enc_open(path, "not it")
    with pytest.raises(WrongKey):
        Repository.open(str(path), keys=crypto.MasterKey(os.urandom(32)))
    repo = Repository.open(str(path), keys=crypto.MasterKey(master))
    assert repo.keys.fingerprint == fingerprint
    repo.close()
    # an unencrypted repository never asks
    Repository.init(str(tmp_path / "p")).close()
    asked = []
    Repository.open(str(tmp_path / "p"), keys=crypto.Passphrase(lambda: asked.append(1))).close()
    assert not asked
    # a key record this rpofs cannot read is refused, not guessed at
    repo = enc_open(path)
    with repo.env.begin(write=True) as txn:
        txn.put(schema.META_ENCRYPTION, b'{"version": 2, "kdf": "argon2id", "cipher": "x"}', db=repo.db["meta"])
    repo.close()
    with pytest.raises(RpofsError, match="encrypted in a way this rpofs cannot read"):
        enc_open(path)


def test_defrag_prune_and_compaction_re_seal_what_they_copy(tmp_path, monkeypatch):
    rnd = random.Random(17)
    repo = enc_init(tmp_path / "r")
    try:
        _, points, truth = chain_of_scattered_logs(repo, rnd)
        report = defrag(repo, VM)
        assert report.blocks_moved > 0
        check_repository(repo)
        cold(repo)
        for p in points:
            assert read_disk(repo, p) == truth[p.point], p.point
        monkeypatch.setattr(gc_mod, "COMPACT_BELOW", 1.01)  # every pack with garbage is compacted
        pruned = prune(repo, VM, Retention(last=5))
        assert pruned.packs_compacted > 0 and len(pruned.points_removed) > 0
        check_repository(repo)
        cold(repo)
        kept = repo.points(VM)
        assert len(kept) >= 5
        for p in kept:
            assert read_disk(repo, p) == truth[p.point], p.point
    finally:
        repo.close()
    repo = enc_open(tmp_path / "r")
    try:
        for p in repo.points(VM):
            assert read_disk(repo, p) == truth[p.point]
    finally:
        repo.close()


def test_upgrade_re_pieces_an_encrypted_repository(tmp_path, monkeypatch):
    """An encrypted repository is format 4 from its start; the re-piecing of
    `rpofs upgrade` still goes through the repository's keys (here on one
    made to look like format 2)."""
    rnd = random.Random(19)
    path = str(tmp_path / "r")
    disk = bytearray(rnd.randbytes(2 * CHUNK_SIZE + 12345))
    with monkeypatch.context() as m:
        m.setattr(repo_mod, "FORMAT", 2)
        m.setattr(repo_mod.BackupWriter, "put_pieced_chunk", repo_mod.BackupWriter.put_chunk)
        repo = Repository.init(path, PASS)
        point = back_up(repo, [disk], [set()], "full", None, US)
        repo.close()
    report = upgrade(path, keys=crypto.Passphrase(lambda: PASS))
    assert (report.old_format, report.new_format, report.chunks_converted, report.chunks_damaged) == (2, 6, 3, 0)
    repo = enc_open(path)
    try:
        assert all(repo.locate(k).codec == CODEC_PIECES for k in full_keys(repo, point.chain))
        assert read_disk(repo, repo.points(VM)[0]) == bytes(disk)
        check_repository(repo)
    finally:
        repo.close()


def test_command_line_key_handling(tmp_path, monkeypatch):
    for var in ("RPOFS_PASSPHRASE", "RPOFS_KEY_FILE", "RPOFS_REPO"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "r"
    assert run_rpofs("init", "--encrypt", repo=path, check=False).stderr == (
        "rpofs: init --encrypt: give the passphrase with --key-file, $RPOFS_KEY_FILE or $RPOFS_PASSPHRASE\n")
    monkeypatch.setenv("RPOFS_PASSPHRASE", PASS)
    assert "created encrypted repository" in run_rpofs("init", "--encrypt", repo=path).stdout
    repo = enc_open(path)
    back_up(repo, [bytearray(random.Random(1).randbytes(CHUNK_SIZE))], [set()], "full", None, US, NAME, XML)
    repo.close()
    assert NAME in run_rpofs("status", repo=path).stdout
    monkeypatch.delenv("RPOFS_PASSPHRASE")
    missing = run_rpofs("points", NAME, repo=path, check=False)
    assert (missing.returncode, missing.stderr) == (1, f"rpofs: repository {path} is encrypted: give the passphrase "
                                                       "with --key-file, $RPOFS_KEY_FILE or $RPOFS_PASSPHRASE\n")
    key_file, wrong_file = tmp_path / "key", tmp_path / "wrong"
    key_file.write_text(PASS + "\nthe first line only counts\n")
    wrong_file.write_text("not it\n")
    wrong = run_rpofs("--key-file", wrong_file, "points", NAME, repo=path, check=False)
    assert (wrong.returncode, wrong.stderr) == (1, f"rpofs: wrong passphrase for repository {path}\n")
    listed = run_rpofs("--key-file", key_file, "points", NAME, repo=path)
    assert " full " in listed.stdout
    monkeypatch.setenv("RPOFS_KEY_FILE", str(key_file))
    assert "encrypted, key fingerprint" in run_rpofs("status", repo=path).stdout
    # an unencrypted repository: no key asked for, none needed
    monkeypatch.delenv("RPOFS_KEY_FILE")
    run_rpofs("init", repo=tmp_path / "p")
    assert run_rpofs("status", repo=tmp_path / "p").returncode == 0
    assert run_rpofs("init", "--key-file", key_file, repo=tmp_path / "q", check=False).stderr == (
        "rpofs: init: --key-file goes with --encrypt\n")
