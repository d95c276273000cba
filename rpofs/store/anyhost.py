"""Any VM of any host: which repository directory holds a VM's points (this
host's catalog, or the replica of another host's, rpofs.store.hosts), and
what each host of a store holds (rpofs hosts)."""

import dataclasses
import logging

from ..errors import RpofsError, UnknownVM
from . import hosts, storeconf
from .repo import Repository

log = logging.getLogger(__name__)


def path_of_host(repo_path: str, name: str) -> str:
    """The repository directory of host `name`: this one, or its replica."""
    conf = storeconf.read(repo_path)
    if conf is None or conf.replica:
        raise RpofsError(f"--host: {repo_path} is not a repository in an object store: it has no hosts")
    if hosts.check_name(name) == conf.host:
        return repo_path
    with hosts.open_bucket(conf.store) as bucket:
        if hosts.read_host(bucket, name) is None:
            raise RpofsError(f"{conf.store} has no host {name} (hosts: {', '.join(hosts.host_names(bucket))})")
    return hosts.ensure_replica(repo_path, conf, name)


def other_hosts(repo_path: str) -> list[str]:
    """The other hosts of this repository's store (none for a local one)."""
    conf = storeconf.read(repo_path)
    if conf is None or conf.replica:
        return []
    with hosts.open_bucket(conf.store) as bucket:
        return [n for n in hosts.host_names(bucket) if n != conf.host]


def repository_of_vm(repo_path: str, ref: str, keys) -> Repository:
    """The repository whose catalog has VM `ref` (a name or UUID), open:
    this host's if it has it, else the one other host's that has it (its
    replica, followed now); one line naming the hosts when several have it."""
    repo = Repository.open(repo_path, keys=keys)
    try:
        repo.find_vm(ref)
        return repo
    except UnknownVM as e:
        missing, conf = e, repo.store_conf
        repo.close()
    except BaseException:
        repo.close()
        raise
    found = []   # (host, its replica, open): followed once, kept for the command
    try:
        for name in other_hosts(repo_path):
            try:
                replica = Repository.open(hosts.ensure_replica(repo_path, conf, name), keys=keys)
            except RpofsError as e:
                log.warning("host %s's catalog is not searched: %s", name, e)
                continue
            try:
                replica.find_vm(ref)
                found.append((name, replica))
            except UnknownVM:
                replica.close()
        if not found:
            raise missing
        if len(found) > 1:
            raise RpofsError(f"VM {ref!r} is on several hosts ({', '.join(n for n, _ in found)}): choose one "
                             f"with rpofs --host NAME")
        return found.pop()[1]
    finally:
        for _, replica in found:
            replica.close()


@dataclasses.dataclass(frozen=True)
class HostRow:
    name: str
    this: bool                  # this machine's host
    vms: int
    points: int
    newest_us: int | None       # the newest point's time
    lease_machine: str
    lease_age_s: float | None
    unpublished: int            # this host's batches not in the store yet (others: 0)
    error: str = ""             # why its catalog could not be read here
    borrowed: int = 0           # full chunks it reads from other hosts' packs (dedup across hosts)
    condemned: int = 0          # chunks of its own no point uses, waiting before they may be deleted


def host_rows(repo_path: str, keys) -> list[HostRow]:
    from . import publish
    conf = storeconf.read(repo_path)
    if conf is None or conf.replica:
        raise RpofsError(f"{repo_path} is not a repository in an object store: it has no hosts")
    with hosts.open_bucket(conf.store) as bucket:
        names = hosts.host_names(bucket)
        leases = {n: hosts.read_lease(bucket, n) for n in names}
    rows = []
    for name in sorted(set(names) | {conf.host}):
        lease = leases.get(name)
        this = name == conf.host
        path = repo_path if this else hosts.ensure_replica(repo_path, conf, name)
        try:
            with Repository.open(path, keys=keys) as repo:
                vms = repo.vms()
                count = sum(repo.point_count(uuid) for uuid, _ in vms)   # counted, not read
                newest = [next(repo.newest_points(uuid), None) for uuid, _ in vms]
                unpublished = publish.backlog(repo).batches if this else 0
                with repo.env.begin() as txn:
                    borrowed, condemned = (txn.stat(repo.db[db])["entries"] for db in ("borrowed", "condemned"))
            rows.append(HostRow(name, this, len(vms), count, max((p.time_us for p in newest if p), default=None),
                                lease.machine if lease else "", lease.age() if lease else None, unpublished,
                                borrowed=borrowed, condemned=condemned))
        except RpofsError as e:
            rows.append(HostRow(name, this, 0, 0, None, lease.machine if lease else "",
                                lease.age() if lease else None, 0, str(e)))
    return rows
