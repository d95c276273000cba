"""Protection sessions in the catalog (schema: `protection`), and where a
session's journal lives. The keys and layout are rpofs.store.schema's."""

import os
import uuid as uuidlib

from ..store import schema
from ..store.repo import Repository
from ..store.schema import ProtectionSession

JOURNAL_DIR = "journal"


def journal_dir(repo_path: str, session: ProtectionSession) -> str:
    return os.path.join(repo_path, JOURNAL_DIR, session.vm, session.directory_name)


def vm_journal_dir(repo_path: str, vm: str) -> str:
    return os.path.join(repo_path, JOURNAL_DIR, vm)


def put(repo: Repository, txn, session: ProtectionSession) -> None:
    key = schema.protection_key(uuidlib.UUID(session.vm).bytes, session.started_us)
    txn.put(key, repo.seal_value("protection", key, session.encode()), db=repo.db["protection"])


def save(repo: Repository, session: ProtectionSession) -> ProtectionSession:
    with repo.write_txn() as txn:
        put(repo, txn, session)
    return session


def delete(repo: Repository, txn, session: ProtectionSession) -> None:
    txn.delete(schema.protection_key(uuidlib.UUID(session.vm).bytes, session.started_us),
               db=repo.db["protection"])


def of_vm(repo: Repository, vm: str, txn=None) -> list[ProtectionSession]:
    """A VM's sessions, oldest first."""
    prefix = uuidlib.UUID(vm).bytes
    if txn is None:
        with repo.env.begin() as txn:
            return of_vm(repo, vm, txn)
    out = []
    cur = txn.cursor(db=repo.db["protection"])
    if cur.set_range(prefix):
        for key, value in cur:
            if bytes(key[:16]) != prefix:
                break
            out.append(ProtectionSession.decode(repo.open_value("protection", bytes(key), value)))
    return out


def current(repo: Repository, vm: str, txn=None) -> ProtectionSession | None:
    """The VM's session that has not ended, if any."""
    found = [s for s in of_vm(repo, vm, txn) if s.state != "ended"]
    return found[-1] if found else None
