"""`rpofs forget VM`: a decommissioned VM's every point, and the data only
it used (and its protection journals), removed from the repository.

Like prune, which removes whole chains the same way: under the repository's exclusive lock, one write transaction drops
the VM's points, its chains' full and log index entries, its `vms` row and
the chunk locations nothing refers to any more (chunks it shared with
other VMs stay); then the packs left dead are deleted and those left mostly
dead compacted. `meta/pruned` is bumped, so a running mount drops the VM
within its refresh period, and `rpofs points` and `rpofs status` no longer
know it. A point that a VM booted by `rpofs run` reads (a hold,
rpofs.store.holds) makes forget refuse, naming that VM.
"""

import shutil

from ..errors import RpofsError
from . import gc, holds, journal, protection, schema
from .prune import PruneReport, delete_prefix
from .repo import points_in


def _refuse_held(repo, vm: str, name: str, points) -> None:
    numbers = {p.point for p in points}
    for hold in holds.every(repo.path):
        if hold.vm == vm and hold.point in numbers:
            vm_name = hold.name or hold.holder
            run, _, host = vm_name.partition("@")   # NAME@HOST: a VM run on another host of the store
            where = f"on host {host}: " if host else ""
            raise RpofsError(f"cannot forget {name}: VM {vm_name} runs on one of its points "
                             f"({where}rpofs run --move {run} --dir DIR, or rpofs run --stop {run}, first)")


def forget(repo, vm: str, name: str = "", dry_run: bool = False, progress=None) -> PruneReport:
    """Remove every point of the VM (uuid); the report lists them.
    progress: as prune's, told the bytes compaction copies."""
    report = PruneReport()
    name = name or vm
    if dry_run:
        with repo.env.begin() as txn:
            report.points_removed = points_in(repo, txn, vm)
        _refuse_held(repo, vm, name, report.points_removed)
        return report
    db = repo.db
    vm_bytes = schema.vm_key(vm)
    with repo.exclusive():  # no backup between finding a chunk stored and committing it; holds are stable
        before = repo.pack_bytes()
        with repo.write_txn() as txn:
            points = points_in(repo, txn, vm)
            _refuse_held(repo, vm, name, points)
            if any(s.state != "ended" for s in protection.of_vm(repo, vm, txn)):
                raise RpofsError(f"cannot forget {name}: it is protected now (rpofs unprotect {name} first)")
            sessions = delete_prefix(txn.cursor(db=db["protection"]), schema.vm_prefix(vm_bytes))
            report.points_removed = points
            for p in points:
                txn.delete(schema.point_key(p.point), db=db["points"])
                txn.delete(schema.vm_point_key(vm_bytes, p.time_us, p.point), db=db["vm_points"])
            for chain in sorted({p.chain for p in points}):  # chains are the VM's own
                prefix = schema.chain_prefix(chain)
                delete_prefix(txn.cursor(db=db["full_index"]), prefix)
                report.log_entries_dropped += delete_prefix(txn.cursor(db=db["log_index"]), prefix)
            txn.delete(vm_bytes, db=db["vms"])
            report.ships_removed = delete_prefix(txn.cursor(db=db["ships"]), schema.vm_prefix(vm_bytes))
            delete_prefix(txn.cursor(db=db["apps"]), schema.vm_prefix(vm_bytes))
            pruned = schema.read_u32(txn.get(schema.META_PRUNED, default=schema.u32(0), db=db["meta"]))
            txn.put(schema.META_PRUNED, schema.u32(pruned + 1), db=db["meta"])  # a running mount reads its lists again
            report.chunks_freed = gc.drop_unused_chunks(repo, txn)
            gc.mark(repo, txn)
        if sessions:  # the journals go after the commit: a crash before leaves only files
            shutil.rmtree(journal.vm_journal_dir(repo.path, vm), ignore_errors=True)
        report.packs_deleted, report.packs_compacted = gc.collect(repo, progress)
        report.bytes_freed = before - repo.pack_bytes()
    return report



def forget_by_name(repo, vm_ref: str, dry_run: bool = False, progress=None) -> tuple[str, PruneReport]:
    """The VM by name or UUID as recorded in the repository. progress(name):
    a Progress for it (or None)."""
    uuid, name = repo.find_vm(vm_ref)
    if progress is None or dry_run:
        return name, forget(repo, uuid, name, dry_run)
    with progress(name) as shown:
        return name, forget(repo, uuid, name, dry_run, shown)
