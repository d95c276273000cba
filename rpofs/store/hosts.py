"""Many hosts, one store: the store's layout of hosts, claiming a host's
name, its lease, taking a host over, and the replicas of other hosts'
catalogs kept under REPO/hosts/.

    PREFIX/config                   what the store holds (format), written once
    PREFIX/hosts/NAME/host.json     a host's claim: written once (If-None-Match)
                                    when `init --host NAME` (or `store push`)
                                    creates it, with the claiming instance; an
                                    encrypted host's key record (wrapped: as
                                    safe to publish as the local catalog's)
    PREFIX/hosts/NAME/lease         {"instance", "machine", "refreshed",
                                    "drained"}: the machine that writes NAME
                                    now, refreshed while it publishes, and
                                    when its publication was last drained
                                    (rpofs.store.lending)
    PREFIX/hosts/NAME/packs/pack-N  its packs (rpofs.store.objectpacks)
    PREFIX/hosts/NAME/log/F-L       its catalog's changes, batches F..L
    PREFIX/hosts/NAME/snap/S        its catalog compacted, as of batch S - 1
                                    (the last two: rpofs.store.publish)

Each host writes only under its own name: its packs, its catalog's
publications, its lease. So no two hosts ever write the same object, pack
numbers need no coordination, and a host's prune and garbage collection
delete only what its own catalog referred to (docs/OBJECTSTORE.md, "Hosts").

A lease is refreshed at most every LEASE_REFRESH_S by the host's
publications and is taken to be dead after LEASE_S: `init --take-over`
refuses a host whose lease is younger (unless forced), then writes its own
instance into it. The machine that held it sees another instance in the
lease at its next publication and stops publishing (a fence: S3 has no
compare-and-swap, so this is checked at each publication, not atomically).
"""

import dataclasses
import json
import os
import re
import socket
import time

from ..errors import PackMissing, RpofsError, StoreConflict, TakenOver
from .s3 import Bucket, StoreUrl

CONFIG = "config"
HOSTS = "hosts/"
LEASE_S = 300            # a lease older than this is a host gone (take-over without --force)
LEASE_REFRESH_S = 30     # a publishing host refreshes its lease at most this often
REPLICAS = "hosts"       # REPO/hosts/NAME/: the replica of host NAME's catalog

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise RpofsError(f"not a host name: {name!r} (1-63 lower-case letters, digits, '.', '_' and '-')")
    return name


def default_name() -> str:
    """This machine's short host name, as a host name."""
    short = re.sub(r"[^a-z0-9._-]", "-", socket.gethostname().split(".")[0].lower()).strip("-.") or "host"
    return check_name(short[:63])


def host_dir(name: str) -> str:
    return f"{HOSTS}{name}/"


def packs_dir(name: str) -> str:
    return host_dir(name) + "packs/"


def log_dir(name: str) -> str:
    return host_dir(name) + "log/"


def snap_dir(name: str) -> str:
    return host_dir(name) + "snap/"


# -- the store and the hosts in it ------------------------------------------------

def open_bucket(url: str) -> Bucket:
    return Bucket(StoreUrl.parse(url))


def claim_store(bucket: Bucket, format: int) -> bool:
    """The store for a host that joins it: its bucket (created when
    missing) and its config (written if absent). Refused, with nothing
    written, when the prefix holds a repository of another format, or
    objects that are no rpofs repository. True if the config was written
    now (a new store)."""
    bucket.ensure_bucket()
    if _check_config(bucket, format):
        return False
    if bucket.any() is not None:
        raise RpofsError(f"{bucket.url} is not empty and holds no rpofs repository: give an empty prefix")
    config = json.dumps({"rpofs": "repository", "format": format, "hosts": HOSTS,
                         "created": int(time.time())}, indent=1).encode()
    try:
        bucket.put_new(CONFIG, config)
    except StoreConflict:  # written meanwhile by another host's init
        _check_config(bucket, format)
        return False
    return True


def _check_config(bucket: Bucket, format: int) -> bool:
    try:
        raw = bucket.get(CONFIG)[0]
    except PackMissing:
        return False
    try:
        held = json.loads(raw)
        kind, found = held["rpofs"], held["format"]
    except (ValueError, KeyError, TypeError):
        raise RpofsError(f"{bucket.url} holds a {CONFIG} object that is not an rpofs repository's: "
                         f"nothing written") from None
    if kind != "repository" or found != format or held.get("hosts") != HOSTS:
        raise RpofsError(f"{bucket.url} holds an rpofs repository of format {found}"
                         f"{'' if held.get('hosts') == HOSTS else ' without hosts'}; this rpofs writes "
                         f"format {format} with hosts: nothing written")
    return True


def host_names(bucket: Bucket) -> list[str]:
    return [n for n in bucket.dirs(HOSTS) if _NAME.fullmatch(n)]


@dataclasses.dataclass(frozen=True)
class HostRecord:
    name: str
    created: int
    machine: str
    key: bytes | None        # an encrypted host's key record
    instance: str = ""       # the claim that made it: before its lease is written (a claim cut
                             # short), what tells a resumed `store push` that the host is its own


def read_host(bucket: Bucket, name: str) -> HostRecord | None:
    try:
        raw = json.loads(bucket.get(host_dir(name) + "host.json")[0])
        return HostRecord(raw["name"], raw["created"], raw.get("machine", ""),
                          raw["key"].encode() if raw.get("key") else None, str(raw.get("instance", "")))
    except PackMissing:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RpofsError(f"{bucket.url}: {host_dir(name)}host.json is damaged") from None


def claim_host(bucket: Bucket, name: str, instance: str, key_record: bytes | None) -> None:
    """Host `name` made in the store, its lease ours; refused in one line
    when it exists (a second machine with the same name). host.json names
    `instance` too: a claim killed between its two PUTs leaves a host with
    no lease, which the claimer alone can then tell is its own
    (rpofs.store.push resumes so)."""
    record = {"name": name, "created": int(time.time()), "machine": socket.gethostname(), "instance": instance}
    if key_record is not None:
        record["key"] = key_record.decode()
    try:
        bucket.put_new(host_dir(name) + "host.json", json.dumps(record).encode())
    except StoreConflict:
        lease = read_lease(bucket, name)
        seen = f" (its lease: {lease.describe()})" if lease else ""
        raise RpofsError(f"{bucket.url} already has a host {name}{seen}: give this machine another --host, "
                         f"or carry on {name}'s chains here with --take-over") from None
    write_lease(bucket, name, instance)


def set_host_key(bucket: Bucket, name: str, key_record: bytes) -> None:
    """host.json with a new key record (rpofs key change: the same master
    key, wrapped anew), so a new follower unlocks it with the new passphrase."""
    record = read_host(bucket, name)
    body = {"name": name, "created": record.created if record else int(time.time()),
            "machine": record.machine if record else socket.gethostname(), "key": key_record.decode()}
    if record is not None and record.instance:
        body["instance"] = record.instance
    bucket.put(host_dir(name) + "host.json", json.dumps(body).encode())


def release_host(bucket: Bucket, name: str) -> None:
    """Undo claim_host when the local half of init failed (best effort)."""
    for obj in ("lease", "host.json"):
        try:
            bucket.delete(host_dir(name) + obj)
        except RpofsError:
            pass


# -- leases -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Lease:
    instance: str
    machine: str
    refreshed: float
    drained: float = 0.0     # every commit of the host before this time is published (0: not known;
                             # rpofs.store.lending's collections wait for it)

    def age(self) -> float:
        return max(0.0, time.time() - self.refreshed)

    def describe(self) -> str:
        return f"held by {self.machine or 'a machine'}, refreshed {self.age():.0f} s ago"


def new_instance() -> str:
    return os.urandom(8).hex()


def read_lease(bucket: Bucket, name: str) -> Lease | None:
    try:
        raw = json.loads(bucket.get(host_dir(name) + "lease")[0])
        return Lease(raw["instance"], raw.get("machine", ""), float(raw["refreshed"]), float(raw.get("drained", 0)))
    except PackMissing:
        return None
    except (ValueError, KeyError, TypeError):
        return Lease("", "", 0.0)  # damaged: as good as expired


def write_lease(bucket: Bucket, name: str, instance: str, drained: float = 0.0) -> None:
    body = {"instance": instance, "machine": socket.gethostname(), "refreshed": time.time(), "drained": drained}
    bucket.put(host_dir(name) + "lease", json.dumps(body).encode())


def take_over(bucket: Bucket, name: str, instance: str, force: bool) -> HostRecord:
    """Host `name`'s lease made ours, for a machine that carries on its
    chains; refused while another machine may be writing it."""
    record = read_host(bucket, name)
    if record is None:
        raise RpofsError(f"{bucket.url} has no host {name} to take over (hosts: "
                         f"{', '.join(host_names(bucket)) or 'none'})")
    lease = read_lease(bucket, name)
    if lease is not None and lease.age() < LEASE_S and not force:
        raise RpofsError(f"host {name} looks alive ({lease.describe()}): take it over after its lease expires "
                         f"({LEASE_S - lease.age():.0f} s), or with --force if that machine is gone for good")
    write_lease(bucket, name, instance)
    return record


def check_lease(bucket: Bucket, name: str, instance: str, drained: float = 0.0) -> None:
    """The lease still ours (TakenOver if not), refreshed, saying when the
    host's publication was last drained."""
    lease = read_lease(bucket, name)
    if lease is not None and lease.instance and lease.instance != instance:
        raise TakenOver(f"host {name} was taken over ({lease.describe()}): this repository no longer "
                        f"writes to {bucket.url}")
    write_lease(bucket, name, instance, drained)


# -- replicas -----------------------------------------------------------------------

def replica_path(repo_path: str, name: str) -> str:
    return os.path.join(repo_path, REPLICAS, name)


def known_replicas(repo_path: str) -> list[str]:
    """The hosts with a replica here already."""
    try:
        return sorted(n for n in os.listdir(os.path.join(repo_path, REPLICAS)) if _NAME.fullmatch(n))
    except FileNotFoundError:
        return []


def open_packs(repo_path: str, conf):
    """The packs of the host `conf` names (a StoreConf), through the cache
    its repository uses (a replica's blocks are named by host in it)."""
    from .objectpacks import ObjectPacks
    space = f"{conf.host}." if conf.replica else ""
    return ObjectPacks(open_bucket(conf.store), repo_path, conf.cache_size, packs_dir(conf.host),
                       conf.cache_dir(repo_path), space)


def ensure_replica(repo_path: str, conf, name: str) -> str:
    """REPO/hosts/NAME, the directory of host `name`'s replica (made when
    missing): a repository directory that Repository.open follows from the
    store before it reads it, and never writes otherwise."""
    from . import storeconf
    path = replica_path(repo_path, check_name(name))
    if storeconf.read(path) is None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        storeconf.write(path, storeconf.StoreConf(conf.store, conf.cache_size, name, replica=True,
                                                  cache=os.path.relpath(conf.cache_dir(repo_path), path)))
    return path
