"""The repository: opening it, listing what it holds, and recording backups.

One Repository per process (LMDB forbids opening an environment twice in one
process). Reads use short read transactions; a backup is staged in a
BackupWriter and made visible by one write transaction in commit().
"""

import collections
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
import threading

import lmdb

from ..errors import (BadTime, ChunkMissing, NeedsUpgrade, NoRepository, PackMissing, RpofsError, StoreError,
                      UnknownFormat, UnknownVM, WrongKey)
from . import crypto, schema, storeconf
from .packs import LocalPacks, PackStore
from .chunks import ChunkReader, PackWriter, encode, encode_pieces
from .schema import CODEC_PIECES, FORMAT, UPGRADES_FROM, ChunkLocation, DiskRecord, PointRecord
from ..timefmt import US, new_point_name, parse_as_of, point_names

log = logging.getLogger(__name__)

DEFAULT_REPO = "/var/lib/rpofs"
MAP_SIZE = 1 << 40  # address space only; the file grows as needed


# The repositories open in this process, by real path: a lookup in another
# host's catalog uses the one open already (LMDB: an environment once per process).
_OPEN: dict[str, "Repository"] = {}


def default_repo_path() -> str:
    return os.environ.get("RPOFS_REPO") or DEFAULT_REPO


class Repository:
    """keys: an encrypted repository's (crypto.Keys), None for one that is
    not. Every chunk key is computed by `ids`, every pack record read by
    `reader` and written by a writer from `begin_pack`, every `points` and
    `vms` value made and read by encode_point / decode_point / encode_name /
    decode_name: those are the places that know whether it is encrypted."""

    def __init__(self, path: str, env: lmdb.Environment, keys: "crypto.Keys | None" = None,
                 packs: PackStore | None = None):
        self.path = path
        self.env = env
        self.keys = keys
        self.ids: crypto.Ids = keys.ids if keys else crypto.PLAIN_IDS
        self.db = {name: env.open_db(name.encode()) for name in schema.DATABASES}
        self._db_names = {id(handle): name for name, handle in self.db.items()}
        self.chunks_dir = os.path.join(path, "chunks")
        # in an object store: whose catalog this is, and whether it publishes (rpofs.store.hosts)
        self.store_conf: storeconf.StoreConf | None = storeconf.read(path)
        self.publishes = self.store_conf is not None and not self.store_conf.replica
        self.lease_checked = float("-inf")
        self.drained_at = 0.0       # when this process's publication last emptied the outbox
        self._lenders = None        # other hosts' replicas (rpofs.store.lending), opened on first use
        self._lender_readers: dict[tuple[str, bool], ChunkReader] = {}   # (host, streaming) -> reader
        self._lenders_lock = threading.Lock()
        self.packs: PackStore = packs if packs is not None else _open_packs(path, self.chunks_dir, self.store_conf)
        self.reader = ChunkReader(self.packs, ids=self.ids, sealer=keys.packs if keys else None)
        self._streaming: ChunkReader | None = None
        self._write_lock = threading.Lock()
        self.key_record: bytes | None = None   # meta/encryption as the keys were unlocked from it
        _OPEN.setdefault(os.path.realpath(path), self)

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    def master_key(self) -> bytes | None:
        """The unwrapped master key, for a mount this process starts (handed
        over through a pipe, crypto.MasterKey); None: not encrypted."""
        return self.keys.master if self.keys else None

    # -- the catalog's values: sealed in an encrypted repository -------------

    def encode_point(self, record: PointRecord) -> bytes:
        plain = record.encode()
        return self.keys.catalog.seal("points", schema.point_key(record.point), plain) if self.keys else plain

    def decode_point(self, key: bytes, value) -> PointRecord:
        """The record stored under `points` key `key`."""
        if self.keys:
            value = self.keys.catalog.open("points", key, value)
        return PointRecord.decode(value)

    def encode_name(self, vm_bytes: bytes, name: str) -> bytes:
        plain = json.dumps({"name": name}).encode()
        return self.keys.catalog.seal("vms", vm_bytes, plain) if self.keys else plain

    def decode_name(self, vm_bytes: bytes, value) -> str:
        if self.keys:
            value = self.keys.catalog.open("vms", vm_bytes, value)
        return json.loads(bytes(value))["name"]

    def seal_value(self, db: str, key: bytes, plain: bytes) -> bytes:
        """A catalog value as stored under `db`/`key` (sealed when encrypted:
        `db` is one of schema.SEALED)."""
        assert db in schema.SEALED, db
        return self.keys.catalog.seal(db, key, plain) if self.keys else plain

    def open_value(self, db: str, key: bytes, value) -> bytes:
        assert db in schema.SEALED, db
        return self.keys.catalog.open(db, key, value) if self.keys else bytes(value)

    def get_point(self, txn, point: int) -> PointRecord | None:
        """Point `point` as of `txn`; None if there is none."""
        key = schema.point_key(point)
        value = txn.get(key, db=self.db["points"])
        return None if value is None else self.decode_point(key, value)

    def put_point(self, txn, record: PointRecord) -> None:
        txn.put(schema.point_key(record.point), self.encode_point(record), db=self.db["points"])

    def all_points(self, txn, unreadable: list | None = None):
        """Every point record as of `txn`, in point order. unreadable: where
        a record that does not decode goes, as (point no, why), skipped
        (verify reports them); None: it raises (prune must not go on)."""
        for key, value in txn.cursor(db=self.db["points"]):
            try:
                yield self.decode_point(bytes(key), value)
            except (RpofsError, ValueError, TypeError, KeyError) as e:
                if unreadable is None:
                    raise RpofsError(f"point record {schema.read_u32(key)} cannot be read: {e}") from None
                unreadable.append((schema.read_u32(key), str(e)))

    def streaming_reader(self) -> ChunkReader:
        """A reader for whole-disk copies (restore): in an object store, every
        record GET from the store itself, not through the block cache (the
        bench: a restore through an empty cache ran at 0.49x restic's, while
        the GETs alone ran at 1,140 MB/s; filling the cache with a disk read
        once costs its hashing and writes, and evicts what the mount uses).
        A local repository's packs are read as ever."""
        if self._streaming is None:
            self._streaming = ChunkReader(self.packs.uncached(), ids=self.ids,
                                          sealer=self.keys.packs if self.keys else None)
        return self._streaming

    def lenders(self):
        """The other hosts of the store this repository borrows chunks from
        and lends them to (rpofs.store.lending); None for a local repository
        or a replica."""
        if not self.publishes:
            return None
        if self._lenders is None:
            from .lending import Lenders
            self._lenders = Lenders(self)
        return self._lenders

    def lender_reader(self, host: str, streaming: bool = False) -> ChunkReader:
        """A reader of host `host`'s packs, for the chunks this catalog
        borrows from it (schema: `borrowed`): through the block cache (its
        blocks named by host, as a replica's are) or, streaming, straight
        from the store."""
        with self._lenders_lock:
            reader = self._lender_readers.get((host, False))
            if reader is None:
                from . import hosts
                conf = self.store_conf
                cache = os.path.relpath(conf.cache_dir(self.path), self.path)
                lent = hosts.open_packs(self.path, storeconf.StoreConf(conf.store, conf.cache_size, host,
                                                                       replica=True, cache=cache))
                reader = self._lender_readers[(host, False)] = ChunkReader(
                    lent, ids=self.ids, sealer=self.keys.packs if self.keys else None)
            if streaming:
                cached = reader
                reader = self._lender_readers.get((host, True))
                if reader is None:
                    reader = self._lender_readers[(host, True)] = ChunkReader(
                        cached.packs.uncached(), ids=self.ids, sealer=self.keys.packs if self.keys else None)
            return reader

    def relocate_borrowed(self, host: str, key: bytes) -> ChunkLocation:
        """Where host `host` holds chunk `key` now (its compaction moved it
        since this catalog borrowed it): its replica, followed."""
        from .lending import place
        lenders = self.lenders()
        if lenders is not None:
            replica = lenders.replica(host)
            found = place(replica, key) if replica is not None else None
        else:  # a replica: the lender is this machine's own host, or its replica beside this one
            from . import hosts
            root = os.path.dirname(os.path.dirname(self.path)) if self.replica else self.path
            path = os.path.realpath(root if storeconf.read(root).host == host else hosts.replica_path(root, host))
            lender = self.opened(path)
            if lender is not None:
                if lender.replica:
                    lender.follow()
                found = place(lender, key)
            else:
                with Repository.open(path, keys=crypto.MasterKey(self.keys.master) if self.keys else None) as lender:
                    found = place(lender, key)
        if found is None:
            raise ChunkMissing(f"chunk {key.hex()[:16]}, borrowed from host {host}, is no longer there")
        return found

    @property
    def host(self) -> str:
        """The host whose catalog this is ("" for a local repository)."""
        return self.store_conf.host if self.store_conf else ""

    @property
    def replica(self) -> bool:
        return self.store_conf is not None and self.store_conf.replica

    @contextlib.contextmanager
    def write_txn(self, publish: bool = True):
        """The one write transaction at a time: LMDB allows one per
        environment, and py-lmdb raises rather than waits for a second one
        in the same process (concurrent backups in the ingester). First the
        reader slots of processes that died inside a read transaction are
        freed: a dead reader pins every page freed after its snapshot, and
        while another process keeps the catalog open (the daemon, a mount)
        it would grow with every commit.
        In a repository that publishes (in an object store), the changes
        made through the transaction are queued for publication in it
        (rpofs.store.publish); publish=False is the publisher's own
        bookkeeping. A replica of another host's catalog is never written."""
        if self.replica:
            raise RpofsError(f"{self.path} is host {self.host}'s catalog as this machine follows it from the "
                             f"store: only {self.host} writes it (or a machine that takes it over: "
                             f"init --host {self.host} --take-over)")
        with self._write_lock, _catalog_errors(self.path):
            self.env.reader_check()
            with self.env.begin(write=True) as txn:
                if not (self.publishes and publish):
                    yield txn
                    return
                from . import publish as publication
                recorder = publication.Recorder(txn, self._db_names)
                yield recorder
                if recorder.changes:
                    publication.enqueue(txn, self.db, recorder.changes)

    def _flock(self, mode: int) -> int:
        """A lock on REPO/lock shared by backups and held alone by prune (see
        rpofs.store.prune): a backup that finds a chunk already stored must
        commit before that chunk can be collected. Returns the fd to close."""
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _locked(self, mode: int):
        fd = self._flock(mode)
        try:
            yield
        finally:
            os.close(fd)

    def exclusive(self):
        """The lock as prune holds it: no backup stores meanwhile."""
        return self._locked(fcntl.LOCK_EX)

    def shared(self):
        """The lock as a backup holds it: no prune runs meanwhile."""
        return self._locked(fcntl.LOCK_SH)

    # -- opening -------------------------------------------------------------

    @classmethod
    def init(cls, path: str, passphrase: str | None = None, store: str | None = None,
             cache_size: int | None = None, host: str | None = None, take_over: bool = False,
             force: bool = False) -> "Repository":
        """A new repository; encrypted under `passphrase` if one is given;
        with its packs and its published catalog in the object store
        `store` (s3://BUCKET/PREFIX, a local cache of `cache_size` bytes)
        as host `host` if one is given (rpofs.store.hosts): a new host, or
        with take_over an existing one whose catalog is read back from the
        store and whose chains this repository carries on."""
        catalog = os.path.join(path, "catalog")
        if os.path.exists(catalog):
            raise RpofsError(f"{path} already holds a repository")
        if store is not None:
            return cls._init_in_store(path, passphrase, store, cache_size, host, take_over, force)
        if host is not None or take_over:
            raise RpofsError("init: --host and --take-over go with --store")
        keys = None
        if passphrase is not None:
            record, keys = crypto.new_key_record(passphrase, path)
        for sub in ("catalog", "chunks"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        env = cls._open_env(catalog, create=True)
        with env.begin(write=True) as txn:
            db = {name: env.open_db(name.encode(), txn=txn) for name in schema.DATABASES}
            _first_meta(txn, db, record if keys is not None else None)
        repo = cls(path, env, keys)
        repo.key_record = record if keys is not None else None
        return repo

    @classmethod
    def _init_in_store(cls, path, passphrase, store, cache_size, host, take_over, force) -> "Repository":
        """The store and the host are claimed first, so a store that cannot
        be used leaves nothing written; then the local catalog is made (a
        new one whose first batch is published at once, or the host's as
        the store holds it)."""
        from . import hosts, publish as publication
        from .objectpacks import DEFAULT_CACHE
        name = hosts.check_name(host) if host is not None else hosts.default_name()
        instance = hosts.new_instance()
        bucket = hosts.open_bucket(store)
        made, claimed, keys, record = [], False, None, None
        try:
            hosts.claim_store(bucket, FORMAT)
            if take_over:
                found = hosts.take_over(bucket, name, instance, force)
                if found.key is not None:
                    if passphrase is None:
                        raise RpofsError(f"host {name} is encrypted: take it over with --encrypt and its passphrase")
                    keys = crypto.unwrap(found.key, passphrase, path)
            else:
                if passphrase is not None:
                    record, keys = _store_key(bucket, passphrase, path)
                hosts.claim_host(bucket, name, instance, record)
                claimed = True
            for sub in ("catalog", "chunks"):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
                made.append(os.path.join(path, sub))
            made.append(os.path.join(path, storeconf.NAME))
            storeconf.write(path, storeconf.StoreConf(str(bucket.url), DEFAULT_CACHE if cache_size is None
                                                      else cache_size, name, instance))
            env = cls._open_env(os.path.join(path, "catalog"), create=True)
            with env.begin(write=True) as txn:
                db = {n: env.open_db(n.encode(), txn=txn) for n in schema.DATABASES}
            if take_over:
                through = publication.follow(env, db, bucket, name, keys).through
                with env.begin(write=True) as txn:
                    found_format = txn.get(schema.META_FORMAT, db=db["meta"])
                    if found_format != schema.format_value(FORMAT):
                        raise RpofsError(f"host {name}'s published catalog has format "
                                         f"{bytes(found_format or b'none').decode(errors='replace')}: this rpofs "
                                         f"takes over format {FORMAT}")
                    txn.put(schema.META_NEXT_SEQ, schema.u64(through + 1), db=db["meta"])
                    record = txn.get(schema.META_ENCRYPTION, db=db["meta"])
                    record = bytes(record) if record is not None else None
            else:
                with env.begin(write=True) as txn:
                    recorder = publication.Recorder(txn, {id(h): n for n, h in db.items()})
                    _first_meta(recorder, db, record)
                    publication.enqueue(txn, db, recorder.changes)
        except BaseException:
            if claimed:
                hosts.release_host(bucket, name)
            for made_path in reversed(made):
                with contextlib.suppress(OSError):
                    if os.path.isdir(made_path):
                        shutil.rmtree(made_path)
                    else:
                        os.unlink(made_path)
            raise
        finally:
            bucket.close()
        repo = cls(path, env, keys)
        repo.key_record = record if keys is not None else None
        if take_over:
            with repo.write_txn() as txn:  # packs a previous machine left past its last published commit
                listed = repo.packs.list()
                stored = schema.read_u32(txn.get(schema.META_NEXT_PACK, db=repo.db["meta"]))
                if listed and listed[-1] >= stored:
                    txn.put(schema.META_NEXT_PACK, schema.u32(listed[-1] + 1), db=repo.db["meta"])
        try:
            repo.publish()
        except RpofsError as e:
            log.warning("the new catalog is not published yet: %s", e)
        return repo

    @staticmethod
    def opened(path: str) -> "Repository | None":
        """The repository at `path` if this process has it open already."""
        return _OPEN.get(os.path.realpath(path))

    @classmethod
    def open(cls, path: str, upgrading: bool = False, keys: "crypto.KeySource | None" = None) -> "Repository":
        """upgrading: also a repository of a format `rpofs upgrade` converts
        (rpofs.store.upgrade); every other caller gets NeedsUpgrade for one.
        keys: where an encrypted repository's keys come from (asked only if
        it is encrypted); KeyRequired if it is and none is given, WrongKey
        if the one given is not its."""
        catalog = os.path.join(path, "catalog")
        conf = storeconf.read(path)
        if conf is not None and conf.replica:
            cls._follow(path, conf, keys)
        if not os.path.isfile(os.path.join(catalog, "data.mdb")):
            raise NoRepository(f"no rpofs repository at {path} (create one with: rpofs --repo {path} init)")
        env = cls._open_env(catalog, create=False)
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            found = txn.get(schema.META_FORMAT, db=meta)
            key_record = txn.get(schema.META_ENCRYPTION, db=meta)
        old = [schema.format_value(f) for f in UPGRADES_FROM]
        if found != schema.format_value(FORMAT) and not (upgrading and found in old):
            env.close()
            shown = found.decode(errors="replace") if found else "none"
            if found in old:
                raise NeedsUpgrade(f"repository {path} has format {shown}; convert it to format {FORMAT} with: "
                                   f"rpofs --repo {path} upgrade")
            raise UnknownFormat(f"repository {path} has format {shown}; this rpofs reads format {FORMAT}")
        unlocked = None
        if key_record is not None:
            try:
                unlocked = keys.unlock(key_record, path) if keys is not None else None
                if unlocked is None:
                    raise crypto.key_required(path)
            except BaseException:
                env.close()
                raise
        repo = cls(path, env, unlocked)
        repo.key_record = bytes(key_record) if unlocked is not None else None
        return repo

    @classmethod
    def _follow(cls, path: str, conf: "storeconf.StoreConf", keys: "crypto.KeySource | None") -> None:
        """A replica (another host's catalog) brought up to what the store
        holds of it. When the store cannot be reached, a replica that
        followed before is read as it is, with a warning."""
        from . import hosts, publish as publication
        os.makedirs(os.path.join(path, "catalog"), mode=0o700, exist_ok=True)
        env = cls._open_env(os.path.join(path, "catalog"), create=True)
        try:
            db = {n: env.open_db(n.encode()) for n in schema.DATABASES}
            with env.begin(db=db["meta"]) as txn:
                record = txn.get(schema.META_ENCRYPTION)
                record = bytes(record) if record is not None else None
            try:
                with hosts.open_bucket(conf.store) as bucket:
                    if record is None:
                        found = hosts.read_host(bucket, conf.host)
                        record = found.key if found is not None else None
                    unlocked = None
                    if record is not None:
                        unlocked = keys.unlock(record, path) if keys is not None else None
                        if unlocked is None:
                            raise crypto.key_required(path)
                    publication.follow(env, db, bucket, conf.host, unlocked)
            except StoreError as e:
                if not publication.followed(env, db):
                    raise
                log.warning("host %s's catalog is read as this machine last followed it: %s", conf.host, e)
        finally:
            env.close()

    def change_passphrase(self, new_passphrase: str) -> None:
        """Wrap the master key under `new_passphrase` (rpofs key change).
        Nothing but meta/encryption is rewritten: the master key, hence
        every subkey, chunk key and sealed byte, stays. The new record is
        made first (scrypt, outside the write transaction), then one write
        transaction replaces the record these keys were unlocked from: a
        crash before its commit leaves the old passphrase working, after it
        the new one, never neither (LMDB's commit is atomic and synced). A
        record changed meanwhile (another key change) is not overwritten."""
        if self.keys is None or self.key_record is None:
            raise RpofsError(f"repository {self.path} is not encrypted: it has no passphrase to change")
        record = crypto.rewrap(self.key_record, self.keys, new_passphrase, self.path)
        with self.write_txn() as txn:
            if bytes(txn.get(schema.META_ENCRYPTION, db=self.db["meta"]) or b"") != self.key_record:
                raise RpofsError(f"repository {self.path}: its passphrase was changed meanwhile; "
                                 f"nothing changed by this command")
            txn.put(schema.META_ENCRYPTION, record, db=self.db["meta"])
        self.key_record = record
        if self.publishes:
            from . import hosts
            hosts.set_host_key(self.packs.bucket, self.host, record)

    def format(self) -> int:
        with self.env.begin(db=self.db["meta"]) as txn:
            return schema.read_format(txn.get(schema.META_FORMAT))

    @staticmethod
    def _open_env(catalog: str, create: bool) -> lmdb.Environment:
        try:
            return lmdb.open(catalog, map_size=MAP_SIZE, max_dbs=len(schema.DATABASES),
                             subdir=True, create=create, max_readers=512)
        except lmdb.Error as e:
            raise NoRepository(f"cannot open catalog {catalog}: {e}") from None

    def follow(self):
        """A replica: what its host published since it was opened, applied
        (a mount of another host's VMs calls it every few seconds)."""
        from . import publish as publication
        assert self.replica
        return publication.follow(self.env, self.db, self.packs.bucket, self.host, self.keys)

    def publish(self):
        """What this process committed, put in the store (rpofs.store.publish)."""
        from . import publish as publication
        return publication.publish(self)

    def close(self) -> None:
        """Closed; in a repository that publishes, what is queued is put in
        the store first (left queued, with a warning, when it cannot be)."""
        try:
            if self.publishes:
                from . import publish as publication
                if publication.backlog(self).batches:
                    try:
                        publication.publish(self)
                    except RpofsError as e:
                        log.warning("catalog changes not published yet (the next command or the ingester "
                                    "publishes them): %s", e)
        finally:
            if _OPEN.get(os.path.realpath(self.path)) is self:
                del _OPEN[os.path.realpath(self.path)]
            if self._lenders is not None:
                self._lenders.close()
            for (_, streaming), reader in self._lender_readers.items():
                if not streaming:   # a streaming reader reads through its cached twin's store
                    reader.close()
            self.reader.close()
            self.env.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading the relations ----------------------------------------------

    def vms(self) -> list[tuple[str, str]]:
        """(uuid, last known name) of every VM with points."""
        with self.env.begin(db=self.db["vms"]) as txn:
            return [(schema.read_vm_key(k), self.decode_name(bytes(k), v)) for k, v in txn.cursor()]

    def find_vm(self, ref: str) -> tuple[str, str]:
        """(uuid, name) of the VM with that name or UUID in the repository."""
        matches = [(uuid, name) for uuid, name in self.vms() if ref in (uuid, name)]
        if not matches:
            raise UnknownVM(f"no VM {ref!r} in repository {self.path}")
        if len(matches) > 1:
            raise RpofsError(f"several VMs are named {ref!r}: name one by UUID "
                             f"({', '.join(uuid for uuid, _ in matches)})")
        return matches[0]

    def point_at(self, ref: str, when: str) -> PointRecord:
        """The block point named `when`; else the VM's newest block point at
        or before `when`; its newest for "latest". Block points only: what a
        command's VM@TIME names (app points and journal instants too, as
        at/ shows them) is rpofs.mount.tree.resolve's."""
        uuid, name = self.find_vm(ref)
        newest = self.newest_points(uuid)
        if when == "latest":
            return next(newest)
        named = self._point_named(uuid, when)
        if named is not None:
            return named
        bound = parse_as_of(when)
        for point in newest:
            if point.time_us <= bound:
                return point
        raise BadTime(f"{name} has no point at or before {when}")

    def _point_named(self, vm: str, name: str) -> PointRecord | None:
        """The point with this name: names start with their point's time
        to the second, so only that second's points are read."""
        try:
            second = parse_as_of(name[:19] + "Z") // US
        except BadTime:
            return None
        with self.env.begin() as txn:
            group = second_group(self, txn, schema.vm_key(vm), second)
        for point, effective in zip(group, point_names([p.time_us for p in group], [p.name for p in group])):
            if effective == name:
                return point
        return None

    def points(self, vm: str, after: PointRecord | None = None) -> list[PointRecord]:
        """A VM's points, oldest first; only those newer than `after` if given
        (a running mount reads just what was added)."""
        vm_bytes = schema.vm_key(vm)
        start = schema.vm_point_key(vm_bytes, after.time_us, after.point + 1) if after else None
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["vm_points"])
            points = txn.cursor(db=self.db["points"])
            for key in schema.scan_keys(cur, schema.vm_prefix(vm_bytes), start):
                _, _, no = schema.read_vm_point_key(key)
                out.append(self.decode_point(schema.point_key(no), points.get(schema.point_key(no))))
        return out

    def named_points(self, vm: str, since_us: int = 0, until_us: int | None = None,
                     newest: int | None = None) -> list[tuple[str, PointRecord]]:
        """(name, point) of a VM's points with since_us <= time <= until_us,
        oldest first; with `newest`, only the newest that many. Range scans
        of vm_points (keyed by time), so the cost follows what is listed,
        not the VM's history. The points sharing a second with the first or
        last one listed are read too: a name is worked out among its
        second's points (timefmt.point_names)."""
        until_us = (1 << 63) if until_us is None else until_us
        vm_bytes, prefix = schema.vm_key(vm), schema.vm_prefix(schema.vm_key(vm))
        low = since_us // US * US          # whole seconds at both ends
        high = (until_us // US + 1) * US - 1
        keys = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["vm_points"])
            if newest is None:
                for key in schema.scan_keys(cur, prefix, schema.vm_point_key(vm_bytes, low, 0)):
                    if schema.read_vm_point_key(key)[1] > high:
                        break
                    keys.append(key)
            else:
                wanted = 0
                for key in schema.scan_keys_back(cur, prefix):
                    t = schema.read_vm_point_key(key)[1]
                    if t > high:
                        continue
                    if t < low or (wanted >= newest and t // US != schema.read_vm_point_key(keys[-1])[1] // US):
                        break
                    keys.append(key)
                    wanted += since_us <= t <= until_us
                keys.reverse()
            records = txn.cursor(db=self.db["points"])
            points = [self.decode_point(schema.point_key(no), records.get(schema.point_key(no)))
                      for _, _, no in map(schema.read_vm_point_key, keys)]
        named = [(n, p) for n, p in zip(point_names([p.time_us for p in points], [p.name for p in points]), points)
                 if since_us <= p.time_us <= until_us]
        return named[-newest:] if newest else named

    def newest_points(self, vm: str):
        """A VM's points, newest first, read as they are consumed."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["vm_points"])
            points = txn.cursor(db=self.db["points"])
            for key in schema.scan_keys_back(cur, schema.vm_prefix(schema.vm_key(vm))):
                _, _, no = schema.read_vm_point_key(key)
                yield self.decode_point(schema.point_key(no), points.get(schema.point_key(no)))

    def has_point(self, point: int) -> bool:
        with self.env.begin(db=self.db["points"]) as txn:
            return txn.get(schema.point_key(point)) is not None

    def point_count(self, vm: str) -> int:
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["vm_points"])
            return sum(1 for _ in schema.scan_keys(cur, schema.vm_prefix(schema.vm_key(vm))))

    def stored_bytes(self) -> int:
        """Bytes the repository takes on disk (allocated: sparse files count what they use)."""
        catalog = os.stat(os.path.join(self.path, "catalog", "data.mdb")).st_blocks * 512
        return catalog + self.pack_bytes()

    def pack_bytes(self) -> int:
        """Bytes the pack files take on disk: what removing data frees (the
        catalog's file never shrinks; its freed pages are reused)."""
        return sum(self.packs.usage(pack) for pack in self.packs.list())

    def pruned_count(self) -> int:
        """How many prunes removed points: a running mount re-reads its lists when it changes."""
        with self.env.begin(db=self.db["meta"]) as txn:
            found = txn.get(schema.META_PRUNED)
        return schema.read_u32(found) if found else 0

    def locate(self, key: bytes) -> ChunkLocation:
        with self.env.begin(db=self.db["chunks"]) as txn:
            raw = txn.get(key)
        if raw is None:
            raise ChunkMissing(f"chunk {key.hex()[:16]} is not in the catalog")
        return ChunkLocation.decode(raw)

    def read_chunk(self, key: bytes, loc: ChunkLocation | None = None):
        """A chunk's bytes, verified; `loc` as a reader's transaction saw it.
        A pack gone since (compacted by prune) sends us to the chunk's new place."""
        loc = loc or self.locate(key)
        try:
            return self.reader.read(key, loc)
        except PackMissing:
            now = self.locate(key)
            if now == loc:
                raise
            return self.reader.read(key, now)

    def read_chunk_range(self, key: bytes, start: int, stop: int):
        """Bytes [start, stop) of a chunk (stop clipped to its length),
        verified: of a pieced full chunk only the pieces they lie in are read."""
        loc = self.locate(key)
        try:
            return self.reader.read_range(key, loc, start, min(stop, loc.raw_len))
        except PackMissing:
            now = self.locate(key)
            if now == loc:
                raise
            return self.reader.read_range(key, now, start, min(stop, now.raw_len))

    # -- writing ---------------------------------------------------------------

    def new_pack_number(self) -> int:
        with self.write_txn() as txn:
            pack = schema.read_u32(txn.get(schema.META_NEXT_PACK, db=self.db["meta"]))
            txn.put(schema.META_NEXT_PACK, schema.u32(pack + 1), db=self.db["meta"])
        return pack

    def begin_pack(self) -> PackWriter:
        """A writer of new packs: one, or one per `packs.target` bytes."""
        return PackWriter(self.packs, self.new_pack_number(), self.keys.packs if self.keys else None,
                          allocate=self.new_pack_number)

    def begin_writer(self) -> "BackupWriter":
        lock = self._flock(fcntl.LOCK_SH)
        try:
            return BackupWriter(self, self.begin_pack(), lock)
        except BaseException:
            os.close(lock)
            raise


class BackupWriter:
    """Stages one point: chunks go to new packs (one, or one per
    `packs.target` bytes), index entries to memory.

    put_* are thread-safe (hashing and compression run in the caller's
    thread). commit() makes the point visible atomically; abort() or an
    exception inside `with` discards everything.
    """

    def __init__(self, repo: Repository, pack: PackWriter, lock_fd: int):
        self.repo = repo
        self.pack = pack
        self._lock_fd = lock_fd  # shared repository lock, held until commit or abort
        self._new: dict[bytes, ChunkLocation] = {}
        self._borrowed: dict[bytes, schema.Borrow] = {}   # full chunks another host of the store holds
        self._lenders = repo.lenders()
        self._lock = threading.Lock()
        self._full: list[tuple[int, int, bytes]] = []    # (disk, chunk no, key)
        self._log: list[tuple[int, int, bytes]] = []     # (disk, block no, log_index value)
        self._wrote_blocks = False
        self.stats = {"logical_bytes": 0, "stored_bytes": 0, "new_chunks": 0, "zero_bytes": 0}
        self._disk_bytes: collections.Counter[int] = collections.Counter()  # stored bytes each disk draws on
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self.abort()

    def put_chunk(self, data) -> tuple[bytes, int]:
        """Store data whole unless already stored (the points' XML): its key
        and stored size. data must not be all zeros."""
        return self._put(self.repo.ids.chunk_key(data), len(data), lambda: encode(data))

    def put_pieced_chunk(self, data) -> tuple[bytes, int]:
        """Store a full chunk pieced (schema: CODEC_PIECES) unless already
        stored: its key and stored size. Hashing comes first and is all a
        chunk stored before costs; compressing only for a new one."""
        ids = self.repo.ids
        hashes = ids.piece_hashes(data)
        return self._put(ids.pieces_key(hashes), len(data), lambda: (CODEC_PIECES, encode_pieces(data, hashes)),
                         borrow=True)

    def _put(self, key: bytes, raw_len: int, encoded, borrow: bool = False) -> tuple[bytes, int]:
        """borrow: the chunk may be borrowed from another host of the store
        (a full's chunk: rpofs.store.lending) rather than stored."""
        with self._lock:
            if key in self._new:
                return key, self._new[key].stored_len
            if key in self._borrowed:
                return key, 0
        with self.repo.env.begin() as txn:
            found = txn.get(key, db=self.repo.db["chunks"])
            if found is not None:
                return key, ChunkLocation.decode(found).stored_len
            if borrow and txn.get(key, db=self.repo.db["borrowed"]) is not None:
                return key, 0
        if borrow and self._lenders is not None:
            lent = self._lenders.find(key)
            if lent is not None:
                with self._lock:
                    if key not in self._borrowed:
                        self._borrowed[key] = lent
                        self.stats["borrowed_chunks"] = self.stats.get("borrowed_chunks", 0) + 1
                return key, 0
        codec, stored = encoded()
        loc = self.pack.append(key, codec, raw_len, stored)
        with self._lock:
            self._new.setdefault(key, loc)
            self.stats["stored_bytes"] += len(stored)
            self.stats["new_chunks"] += 1
        return key, len(stored)

    def _count(self, disk: int, data) -> bool:
        """Count the data read; whether it holds anything but zeros."""
        nonzero = any_nonzero(data)
        with self._lock:
            self.stats["logical_bytes"] += len(data)
            if not nonzero:
                self.stats["zero_bytes"] += len(data)
        return nonzero

    def put_full_chunk(self, disk: int, chunk_no: int, data) -> None:
        if self._count(disk, data):  # absent from the full index means zeros
            key, stored = self.put_pieced_chunk(data)
            with self._lock:
                self._disk_bytes[disk] += stored
                self._full.append((disk, chunk_no, key))

    def put_log_block(self, disk: int, block_no: int, data) -> None:
        """A changed block: its record goes to the pack as it is (log blocks
        are not deduplicated: the catalog keeps their place, not their key);
        an all-zero block is recorded as zeros, overriding the full."""
        loc = None
        if self._count(disk, data):
            codec, stored = encode(data)
            loc = self.pack.append(self.repo.ids.chunk_key(data), codec, len(data), stored)
            with self._lock:
                self._wrote_blocks = True
                self.stats["stored_bytes"] += len(stored)
                self.stats["new_chunks"] += 1
                self._disk_bytes[disk] += len(stored)
        with self._lock:
            self._log.append((disk, block_no, schema.log_value(loc)))

    def commit(self, *, vm: str, vm_name: str, time_us: int, parent: PointRecord | None,
               consistency: str, disks: list[DiskRecord], checkpoint: str, domain_xml: str,
               reason: str = "", checkpoint_xml: str = "", warnings: tuple[str, ...] = (),
               firmware: dict | None = None, origin: str = "", stats: dict | None = None,
               also=None) -> PointRecord:
        """Record the point: a log extending `parent`'s chain, or a full when
        parent is None. origin, stats: PointRecord's (stats added to the
        writer's own). also(txn, record): more catalog entries committed in
        the same transaction (a protection session's progress)."""
        kind = "log" if parent else "full"
        chain = parent.chain if parent else None
        # What each disk draws on in the repository, for du through the mount:
        # its full's chunks and every log block since (shared chunks counted
        # for each disk that uses them).
        drawn = dict(parent.stats.get("disk_bytes", {})) if parent else {}
        for index, d in enumerate(disks):
            drawn[d.target] = drawn.get(d.target, 0) + self._disk_bytes[index]
        self.stats["disk_bytes"] = drawn
        self._confirm_borrows()
        self.pack.sync()
        db = self.repo.db
        vm_bytes = schema.vm_key(vm)
        with self.repo.write_txn() as txn:
            no = schema.read_u32(txn.get(schema.META_NEXT_POINT, db=db["meta"]))
            txn.put(schema.META_NEXT_POINT, schema.u32(no + 1), db=db["meta"])
            self._put_chunks(txn)
            if kind == "full":
                chain = no
                for disk, chunk_no, key in sorted(self._full):
                    txn.put(schema.full_key(chain, disk, chunk_no), key, db=db["full_index"], append=True)
            else:
                cur = txn.cursor(db=db["log_index"])
                for disk, block_no, value in self._log:
                    cur.put(schema.log_key(chain, disk, block_no, no), value)
            record = PointRecord(
                point=no, vm=vm, vm_name=vm_name, kind=kind, time_us=time_us, chain=chain,
                parent=parent.point if parent else None, consistency=consistency, disks=tuple(disks), checkpoint=checkpoint,
                domain_xml=domain_xml, reason=reason, stats=dict(self.stats),
                checkpoint_xml=checkpoint_xml, warnings=tuple(warnings), firmware=firmware,
                name=name_new_point(self.repo, txn, vm_bytes, time_us), origin=origin)
            if stats:
                record.stats.update(stats)
            self.repo.put_point(txn, record)
            if also is not None:
                also(txn, record)
            txn.put(schema.vm_point_key(vm_bytes, time_us, no), b"", db=db["vm_points"])
            txn.put(vm_bytes, self.repo.encode_name(vm_bytes, vm_name), db=db["vms"])
        self._finish()
        return record

    def commit_catalog(self, entries):
        """Commit what was stored with the catalog entries `entries(txn)`
        writes, in one transaction (a shipment: rpofs.store.shipments); its
        result."""
        self._confirm_borrows()
        self.pack.sync()
        with self.repo.write_txn() as txn:
            self._put_chunks(txn)
            result = entries(txn)
        self._finish()
        return result

    def _confirm_borrows(self) -> None:
        """Before the commit: each new borrow confirmed against its lender
        as the store says now (rpofs.store.lending); a chunk the lender
        condemned meanwhile is copied here after all."""
        if not self._borrowed:
            return
        from .lending import copy_from_lender
        for key, lent in self._lenders.confirm(self._borrowed).items():
            if lent is None:
                self._new[key] = copy_from_lender(self.repo, self.pack, key, self._borrowed.pop(key))
                self.stats["borrowed_chunks"] -= 1
            else:
                self._borrowed[key] = lent

    def _put_chunks(self, txn) -> None:
        cur = txn.cursor(db=self.repo.db["chunks"])
        for key, loc in self._new.items():
            # overwrite=False: another session may have stored the same chunk first
            cur.put(key, loc.encode(), overwrite=False)
        for key, lent in self._borrowed.items():
            if txn.get(key, db=self.repo.db["chunks"]) is None:   # (a session beside this one stored it here)
                txn.put(key, lent.encode(), db=self.repo.db["borrowed"], overwrite=False)

    def _finish(self) -> None:
        self._done = True
        self.pack.close()
        if not self._new and not self._wrote_blocks:
            self.pack.discard()
        self._unlock()

    def abort(self) -> None:
        self._done = True
        self.pack.discard()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _first_meta(txn, db: dict, key_record: bytes | None) -> None:
    """A new catalog's meta: its format, the first numbers, its key record."""
    txn.put(schema.META_FORMAT, schema.format_value(FORMAT), db=db["meta"])
    txn.put(schema.META_NEXT_POINT, schema.u32(1), db=db["meta"])
    txn.put(schema.META_NEXT_PACK, schema.u32(1), db=db["meta"])
    if key_record is not None:
        txn.put(schema.META_ENCRYPTION, key_record, db=db["meta"])


def _store_key(bucket, passphrase: str, path: str) -> tuple[bytes, "crypto.Keys"]:
    """(key record, keys) of an encrypted host joining a store: the store's
    master key when it has encrypted hosts, so that all of them share one
    key space and dedup across hosts (rpofs.store.lending); a new one for
    the store's first. The passphrase must open one of theirs (each host
    wraps the key under its own afterwards: rpofs key change)."""
    from . import hosts
    held = [(n, r.key) for n in hosts.host_names(bucket) if (r := hosts.read_host(bucket, n)) and r.key]
    if not held:
        return crypto.new_key_record(passphrase, path)
    for _, record in held:
        try:
            keys = crypto.unwrap(record, passphrase, path)
        except WrongKey:
            continue
        return crypto.rewrap(record, keys, passphrase, path), keys
    raise RpofsError(f"{bucket.url}: its encrypted hosts ({', '.join(n for n, _ in held)}) hold the store's key "
                     f"under other passphrases: give one of theirs to join (each host may change its own "
                     f"afterwards with rpofs key change)")


def _open_packs(path: str, chunks_dir: str, conf: "storeconf.StoreConf | None") -> PackStore:
    """Where the repository's packs are: REPO/chunks, or the object store
    REPO/store.json names (rpofs.store.hosts; boto3 is imported only then)."""
    if conf is None:
        return LocalPacks(chunks_dir)
    from . import hosts
    return hosts.open_packs(path, conf)


def points_in(repo: Repository, txn, vm: str) -> list[PointRecord]:
    """A VM's points, oldest first, as of `txn`."""
    cur, records = txn.cursor(db=repo.db["vm_points"]), txn.cursor(db=repo.db["points"])
    out = []
    for key in schema.scan_keys(cur, schema.vm_prefix(schema.vm_key(vm))):
        point_key = schema.point_key(schema.read_vm_point_key(key)[2])
        out.append(repo.decode_point(point_key, records.get(point_key)))
    return out


def second_group(repo: Repository, txn, vm_bytes: bytes, second: int) -> list[PointRecord]:
    """The VM's points whose time falls in this second, oldest first."""
    cur = txn.cursor(db=repo.db["vm_points"])
    out = []
    for key in schema.scan_keys(cur, schema.vm_prefix(vm_bytes), schema.vm_point_key(vm_bytes, second * US, 0)):
        _, time_us, no = schema.read_vm_point_key(key)
        if time_us >= (second + 1) * US:
            break
        out.append(repo.get_point(txn, no))
    return out


def fix_names(repo: Repository, txn, group: list[PointRecord]) -> list[str]:
    """Store the names the points of one second have now in those that have
    none stored (points from before names were stored), so that no later
    change to the second's points renames them; the group's names."""
    names = point_names([p.time_us for p in group], [p.name for p in group])
    for point, name in zip(group, names):
        if not point.name:
            repo.put_point(txn, dataclasses.replace(point, name=name))
    return names


def name_new_point(repo: Repository, txn, vm_bytes: bytes, time_us: int) -> str:
    """A new point's name, block point or app point (rpofs.store.shipments),
    unique among the VM's and never to change."""
    second = time_us // US
    taken = set(fix_names(repo, txn, second_group(repo, txn, vm_bytes, second)))
    cur = txn.cursor(db=repo.db["ships"])
    for key, value in schema.scan(cur, schema.vm_prefix(vm_bytes), schema.ship_key(vm_bytes, second * US, 0)):
        _, when, _ = schema.read_ship_key(key)
        if when >= (second + 1) * US:
            break
        taken.add(json.loads(repo.open_value("ships", key, value))["name"])
    return new_point_name(time_us, taken)


@contextlib.contextmanager
def _catalog_errors(path: str):
    """An LMDB failure (disk full, map full) aborts the transaction: say so.
    LMDB reports a disk that filled in the middle of its write as an I/O
    error, so the filesystem's free space is looked at too."""
    try:
        yield
    except lmdb.Error as e:
        hint = ""
        try:
            fs = os.statvfs(path)
            if fs.f_bavail * fs.f_frsize < 1 << 20:
                hint = f" (the repository's filesystem has {fs.f_bavail * fs.f_frsize} bytes free)"
        except OSError:
            pass
        raise RpofsError(f"writing the catalog failed, nothing was recorded: {e}{hint}") from None


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    return bytes(n)


def any_nonzero(data) -> bool:
    return data != _zeros(len(data))  # a memcmp: ~15 us per MiB

