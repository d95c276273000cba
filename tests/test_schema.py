"""The schema's own functions against a real LMDB (a temporary directory, no
FUSE, no libvirt): the prefix scans stop exactly where their prefix does,
keys read back as they were built, and a new repository's meta holds the
keys the spec names and nothing else."""

import random
import uuid

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpofs.store import schema
from rpofs.store.repo import Repository

pytestmark = pytest.mark.lmdb


@pytest.fixture
def env(tmp_path):
    e = lmdb.open(str(tmp_path / "db"), map_size=1 << 26, max_dbs=2)
    yield e
    e.close()


def fill(env, keys, db=None) -> None:
    with env.begin(write=True, db=db) as txn:
        for k in keys:
            txn.put(k, b"v" + k)


@settings(max_examples=150, deadline=None)
@given(keys=st.sets(st.binary(min_size=1, max_size=4), max_size=40), prefix=st.binary(min_size=1, max_size=3),
       suffix=st.none() | st.binary(max_size=3))
def test_scans_give_exactly_the_keys_with_the_prefix(tmp_path_factory, keys, prefix, suffix):
    """Against a filter of every key: in order, forwards from `start` (a key
    with the prefix) and backwards, whatever 0x00 / 0xff bytes surround it."""
    start = None if suffix is None else prefix + suffix
    keys |= {prefix, prefix + b"\xff", prefix[:-1] + b"\xff"}  # edges: the prefix itself, its last and its neighbour
    e = lmdb.open(str(tmp_path_factory.mktemp("db")), map_size=1 << 24)
    try:
        fill(e, keys)
        want = sorted(k for k in keys if k.startswith(prefix))
        from_start = [k for k in want if start is None or k >= start]
        with e.begin() as txn:
            assert list(schema.scan_keys(txn.cursor(), prefix, start)) == from_start
            assert list(schema.scan(txn.cursor(), prefix, start)) == [(k, b"v" + k) for k in from_start]
            assert list(schema.scan_keys_back(txn.cursor(), prefix)) == want[::-1]
    finally:
        e.close()


def test_scans_of_a_vm_and_of_a_chain(env):
    rnd = random.Random(1)
    vms = sorted(uuid.UUID(int=rnd.getrandbits(128)).bytes for _ in range(3)) + [b"\xff" * 16]
    keys = [schema.vm_point_key(vm, t, p) for vm in vms for t, p in ((0, 1), (5, 2), ((1 << 64) - 1, 0xFFFFFFFF))]
    fill(env, keys, env.open_db(b"vm_points"))
    with env.begin(db=env.open_db(b"vm_points")) as txn:
        for vm in vms:
            mine = [k for k in keys if schema.read_vm_point_key(k)[0] == vm]
            assert list(schema.scan_keys(txn.cursor(), schema.vm_prefix(vm))) == mine
            assert list(schema.scan_keys_back(txn.cursor(), schema.vm_prefix(vm))) == mine[::-1]
            later = schema.vm_point_key(vm, 5, 2)
            assert list(schema.scan_keys(txn.cursor(), schema.vm_prefix(vm), later)) == mine[1:]
    logs = [schema.log_key(chain, disk, block, point) for chain in (1, 2, 0xFFFFFFFF) for disk in (0, 1)
            for block in (0, 7) for point in (chain, chain + 3 if chain < 9 else chain)]
    db = env.open_db(b"log_index")
    fill(env, logs, db)
    with env.begin(db=db) as txn:
        for chain in (1, 2, 0xFFFFFFFF):
            got = [schema.read_log_key(k) for k in schema.scan_keys(txn.cursor(), schema.chain_prefix(chain))]
            assert got and {g[0] for g in got} == {chain}
            assert len(got) == len({k for k in logs if schema.read_log_key(k)[0] == chain})
            block = [schema.read_log_key(k)[3]
                     for k in schema.scan_keys(txn.cursor(), schema.log_block_prefix(chain, 1, 7))]
            assert block == sorted({chain, chain + 3 if chain < 9 else chain}, reverse=True)  # newest first


def test_keys_read_back_as_built():
    vm = str(uuid.UUID(int=random.Random(2).getrandbits(128)))
    b = schema.vm_key(vm)
    assert len(b) == 16 and schema.read_vm_key(b) == vm and schema.vm_prefix(b) == b
    assert schema.read_app_key(schema.app_key(b, "orders")) == (b, "orders")
    assert schema.read_ship_key(schema.ship_key(b, 7, 9)) == (b, 7, 9)
    assert schema.read_protection_key(schema.protection_key(b, 123)) == (b, 123)
    assert schema.read_vm_point_key(schema.vm_point_key(b, 5, 6)) == (b, 5, 6)
    assert schema.read_full_key(schema.full_key(3, 1, 4)) == (3, 1, 4)
    assert schema.read_log_key(schema.log_key(3, 1, 4, 5)) == (3, 1, 4, 5)
    assert schema.log_key(3, 1, 4, 5).startswith(schema.log_block_prefix(3, 1, 4))
    assert schema.full_key(3, 1, 4).startswith(schema.chain_prefix(3))
    assert schema.read_format(schema.format_value(schema.FORMAT)) == schema.FORMAT == 6
    assert set(schema.SEALED) < set(schema.DATABASES)


def test_a_new_repository_has_the_meta_keys_of_the_spec(tmp_path):
    for path, passphrase in ((tmp_path / "plain", None), (tmp_path / "enc", "pw")):
        repo = Repository.init(str(path), passphrase)
        try:
            with repo.env.begin(db=repo.db["meta"]) as txn:
                meta = {bytes(k): bytes(v) for k, v in txn.cursor()}
        finally:
            repo.close()
        want = {schema.META_FORMAT: schema.format_value(6), schema.META_NEXT_POINT: schema.u32(1),
                schema.META_NEXT_PACK: schema.u32(1)}
        if passphrase:
            assert meta.pop(schema.META_ENCRYPTION).startswith(b"{")
        assert meta == want
