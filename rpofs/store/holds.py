"""Points held by something outside the catalog, so retention keeps them.

A VM booted from a point (`rpofs run`) reads that point's disks through the
mount for as long as it runs on its overlays: pruning the point under it
would turn the guest's reads into EIO. Such a user records a hold:

    REPO/holds/<holder>.json    {"vm": uuid, "point": number, "why": text, "name": text,
                                 "instant_us": time}

A VM run at a journal instant holds the instant's fold (`point`) and names
the instant (`instant_us`): the journal's retention keeps the records after
that fold (rpofs.protect.protector.drop_journal), so the instant stays
readable for as long as the VM reads it.

one small file per holder, written to a temporary name, fsync'ed and renamed
(a crash leaves the old file or the new one).

Across the hosts of an object store: a VM run here from another host's
point (through this machine's replica of that host's catalog) holds it in
the store too, as PREFIX/hosts/<this host>/holds/<owner host>/<holder>.json
(put before the local file; each host writes only under its own name), and
the owner's prune and forget read every host's holds on its points. The
owner's prune reads them inside its transaction and `run` checks the point
is still there after holding it, so a prune choosing at the moment a VM
starts is caught on one side or the other unless both fall within the
same few milliseconds (docs/OBJECTSTORE.md). Prune reads the holds while it
holds the repository lock alone, and keeps every held point and its chain's
full; a hold is taken under the shared lock, so it cannot slip in between
prune's choice and its commit. A hold whose point is already gone protects
nothing and harms nothing.
"""

import contextlib
import dataclasses
import json
import os
import re

from .. import durable
from ..errors import RpofsError, StoreError
from . import storeconf

HOLDS_DIR = "holds"
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,200}$")


@dataclasses.dataclass(frozen=True)
class Hold:
    holder: str   # who holds it (a recovered VM's name)
    vm: str       # the held point's VM (uuid)
    point: int    # the held point's number
    why: str = ""
    name: str = ""  # what a person calls the holder (a run VM's libvirt name); "": the holder
    instant_us: int = 0  # a journal instant read on top of the point (0: the point itself)


def _path(repo_path: str, holder: str) -> str:
    if not _NAME.match(holder) or holder.startswith("."):
        raise RpofsError(f"cannot hold a point for {holder!r}: not a plain name")
    return os.path.join(repo_path, HOLDS_DIR, holder + ".json")


def _encode(hold: Hold) -> bytes:
    return json.dumps({"vm": hold.vm, "point": hold.point, "why": hold.why, "name": hold.name,
                       "instant_us": hold.instant_us}).encode()


def _decode(holder: str, raw) -> Hold:
    d = json.loads(raw)
    return Hold(holder, str(d["vm"]), int(d["point"]), str(d.get("why", "")), str(d.get("name", "")),
                int(d.get("instant_us", 0)))


@dataclasses.dataclass(frozen=True)
class _Remote:
    """Where a hold on another host's point goes in the store."""
    store: str
    holder_host: str   # this machine's host
    owner: str         # the host whose point it is

    def name(self, holder: str) -> str:
        from . import hosts
        return f"{hosts.host_dir(self.holder_host)}{HOLDS_DIR}/{self.owner}/{holder}.json"


def _remote(repo_path: str) -> _Remote | None:
    """A replica of another host's catalog (REPO/hosts/NAME): where its holds go in the store."""
    conf = storeconf.read(repo_path)
    if conf is None or not conf.replica:
        return None
    top = storeconf.read(os.path.dirname(os.path.dirname(os.path.abspath(repo_path))))
    return _Remote(conf.store, top.host, conf.host) if top is not None else None


def put(repo, hold: Hold) -> None:
    """Record the hold (durably) under the repository's shared lock; on
    another host's point, in the store first."""
    path = _path(repo.path, hold.holder)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    remote = _remote(repo.path)
    if remote is not None:
        from . import hosts
        with hosts.open_bucket(remote.store) as bucket:
            bucket.put(remote.name(hold.holder), _encode(hold))
    with repo.shared():
        durable.write_file(path, _encode(hold))


def drop(repo_path: str, holder: str) -> None:
    remote = _remote(repo_path)
    if remote is not None:
        from . import hosts
        try:
            with hosts.open_bucket(remote.store) as bucket:
                bucket.delete(remote.name(holder))
        except StoreError as e:   # kept in the store: the owner keeps that point until it is removed
            raise RpofsError(f"the hold of {holder} on host {remote.owner}'s point is still in the store "
                             f"({e}): run the same command again to remove it") from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(repo_path, holder))


def _held_elsewhere(repo_path: str) -> list[Hold]:
    """In a host's own repository in a store: the other hosts' holds on its
    points (a StoreError if they cannot be read: prune must not go on)."""
    conf = storeconf.read(repo_path)
    if conf is None or conf.replica:
        return []
    from . import hosts
    out = []
    with hosts.open_bucket(conf.store) as bucket:
        for host in hosts.host_names(bucket):
            if host == conf.host:
                continue
            where = _Remote(conf.store, host, conf.host)
            folder = where.name("")[:-len(".json")]
            for name in bucket.list(folder):
                holder = name[len(folder):-len(".json")]
                try:
                    raw = bucket.get(name)[0]
                except RpofsError:
                    continue   # dropped while we listed
                try:
                    hold = _decode(f"{holder}@{host}", raw)
                    out.append(dataclasses.replace(hold, name=f"{hold.name or holder}@{host}"))
                except (ValueError, KeyError, TypeError) as e:
                    raise RpofsError(f"cannot read the hold {name} in {conf.store} ({e}): fix or remove it") from None
    return out


def every(repo_path: str) -> list[Hold]:
    """All holds (in a store: the other hosts' on this host's points too);
    an unreadable one is refused rather than ignored (ignoring it could let
    prune take a point a running VM reads)."""
    return _held_here(repo_path) + _held_elsewhere(repo_path)


def _held_here(repo_path: str) -> list[Hold]:
    folder = os.path.join(repo_path, HOLDS_DIR)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                out.append(_decode(name[:-5], f.read()))
        except FileNotFoundError:
            continue  # dropped while we listed
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RpofsError(f"cannot read the hold {path} ({e}): fix or remove it") from None
    return out


def held_points(repo_path: str, vm: str) -> set[int]:
    return {h.point for h in every(repo_path) if h.vm == vm}

