"""Protection sessions in the catalog (schema: `protection`). The keys and
layout are rpofs.store.schema's; where a session's journal lives is
rpofs.store.journal's."""

from dataclasses import replace

from . import schema
from .repo import Repository
from .schema import ProtectionSession



def put(repo: Repository, txn, session: ProtectionSession) -> None:
    """Write a session's record. journal_from_us never goes back: retention
    raises it (raise_journal_from) while a fold may hold an older copy, and
    a lower one would let an instant read across dropped records."""
    key = schema.protection_key(schema.vm_key(session.vm), session.started_us)
    stored = _get(repo, txn, key)
    if stored is not None and stored.journal_from_us > session.journal_from_us:
        session = replace(session, journal_from_us=stored.journal_from_us)
    txn.put(key, repo.seal_value("protection", key, session.encode()), db=repo.db["protection"])


def _get(repo: Repository, txn, key: bytes) -> ProtectionSession | None:
    value = txn.get(key, db=repo.db["protection"])
    return None if value is None else ProtectionSession.decode(repo.open_value("protection", key, value))


def raise_journal_from(repo: Repository, session: ProtectionSession, to_us: int) -> ProtectionSession:
    """Record that records up to to_us may be gone, on the stored record (not
    a copy that may be older): the session as stored after."""
    key = schema.protection_key(schema.vm_key(session.vm), session.started_us)
    with repo.write_txn() as txn:
        stored = _get(repo, txn, key) or session
        updated = replace(stored, journal_from_us=max(stored.journal_from_us, to_us))
        txn.put(key, repo.seal_value("protection", key, updated.encode()), db=repo.db["protection"])
    return updated


def save(repo: Repository, session: ProtectionSession) -> ProtectionSession:
    with repo.write_txn() as txn:
        put(repo, txn, session)
    return session


def of_vm(repo: Repository, vm: str, txn=None) -> list[ProtectionSession]:
    """A VM's sessions, oldest first."""
    if txn is None:
        with repo.env.begin() as txn:
            return of_vm(repo, vm, txn)
    cur = txn.cursor(db=repo.db["protection"])
    return [ProtectionSession.decode(repo.open_value("protection", key, value))
            for key, value in schema.scan(cur, schema.vm_prefix(schema.vm_key(vm)))]


def current(repo: Repository, vm: str, txn=None) -> ProtectionSession | None:
    """The VM's session that has not ended, if any."""
    found = [s for s in of_vm(repo, vm, txn) if s.state != "ended"]
    return found[-1] if found else None
