"""Applications in the catalog (schema: `apps`, `ships`): reading and
writing their records, and committing a shipment. The keys and layouts are
rpofs.store.schema's; this module only uses them."""

import dataclasses

from . import schema
from .repo import Repository, name_new_point
from .schema import AppRecord, ShipRecord, ShippedFile


def get_app(repo: Repository, txn, vm: str, name: str) -> AppRecord | None:
    key = schema.app_key(schema.vm_key(vm), name)
    value = txn.get(key, db=repo.db["apps"])
    return None if value is None else AppRecord.decode(repo.open_value("apps", key, value))


def put_app(repo: Repository, txn, vm: str, record: AppRecord) -> None:
    key = schema.app_key(schema.vm_key(vm), record.name)
    txn.put(key, repo.seal_value("apps", key, record.encode()), db=repo.db["apps"])


def apps(repo: Repository, vm: str, txn=None) -> list[AppRecord]:
    """A VM's applications, by name."""
    with _reading(repo, txn) as txn:
        cur = txn.cursor(db=repo.db["apps"])
        return [AppRecord.decode(repo.open_value("apps", key, value))
                for key, value in schema.scan(cur, schema.vm_prefix(schema.vm_key(vm)))]


def ships(repo: Repository, vm: str, since_us: int = 0, until_us: int | None = None, app: str | None = None,
          txn=None, newest_first: bool = False):
    """A VM's shipments with since_us <= time <= until_us (of one app if
    given), oldest first (or newest first), read as consumed."""
    prefix = schema.vm_key(vm)
    until_us = (1 << 64) - 1 if until_us is None else until_us
    with _reading(repo, txn) as txn:
        cur = txn.cursor(db=repo.db["ships"])
        if newest_first:
            found = cur.set_range(schema.ship_key(prefix, until_us, 0xFFFFFFFF))
            found = cur.prev() if found else cur.last()
            step = cur.prev
        else:
            found = cur.set_range(schema.ship_key(prefix, since_us, 0))
            step = cur.next
        while found:
            key = bytes(cur.key())
            vm_bytes, time_us, _ = schema.read_ship_key(key)
            if vm_bytes != prefix or not since_us <= time_us <= until_us:
                break
            record = ShipRecord.decode(repo.open_value("ships", key, cur.value()))
            if app is None or record.app == app:
                yield record
            found = step()


def put_ship(repo: Repository, txn, record: ShipRecord) -> None:
    key = schema.ship_key(schema.vm_key(record.vm), record.time_us, record.ship)
    txn.put(key, repo.seal_value("ships", key, record.encode()), db=repo.db["ships"])


def delete_ship(repo: Repository, txn, record: ShipRecord) -> None:
    txn.delete(schema.ship_key(schema.vm_key(record.vm), record.time_us, record.ship), db=repo.db["ships"])


def all_ships(repo: Repository, txn, unreadable: list | None = None):
    """Every shipment as of `txn`; unreadable as Repository.all_points takes it."""
    for key, value in txn.cursor(db=repo.db["ships"]):
        try:
            yield ShipRecord.decode(repo.open_value("ships", bytes(key), value))
        except Exception as e:
            if unreadable is None:
                raise
            unreadable.append((schema.read_ship_key(bytes(key))[2], str(e)))


def commit(repo: Repository, vm: str, app: AppRecord, pieces: list[tuple[ShippedFile, bytes]], time_us: int,
           relation, stats: dict) -> ShipRecord:
    """Store a shipment: its bytes (one chunk a file, deduplicated) synced
    to a pack first, then one transaction adds the chunk rows, the ship
    record and the app's new stream state, so a crash leaves either all of
    it or none (and at most pack data nothing refers to). relation: a
    rpofs.apps.relate.Relation."""
    with repo.begin_writer() as writer:
        files = []
        for shipped, data in pieces:
            key = writer.put_chunk(data)[0].hex() if data else ""
            files.append(dataclasses.replace(shipped, key=key))

        def record(txn) -> ShipRecord:
            meta = repo.db["meta"]
            found = txn.get(schema.META_NEXT_SHIP, db=meta)
            no = schema.read_u32(found) if found else 1
            txn.put(schema.META_NEXT_SHIP, schema.u32(no + 1), db=meta)
            made = ShipRecord(ship=no, vm=vm, app=app.name, kind=app.kind, time_us=time_us,
                              name=name_new_point(repo, txn, schema.vm_key(vm), time_us),
                              files=tuple(files), base=relation.base, chain=relation.chain,
                              waiting=relation.waiting, reads_from=relation.reads_from, stats=stats)
            put_ship(repo, txn, made)
            put_app(repo, txn, vm, app)
            return made

        return writer.commit_catalog(record)


class _reading:
    """The caller's transaction, or a read transaction of our own."""

    def __init__(self, repo, txn):
        self.repo, self.txn, self.own = repo, txn, None

    def __enter__(self):
        if self.txn is not None:
            return self.txn
        self.own = self.repo.env.begin()
        return self.own

    def __exit__(self, *exc):
        if self.own is not None:
            self.own.abort()
