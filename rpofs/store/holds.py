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
(a crash leaves the old file or the new one). Prune reads the holds while it
holds the repository lock alone, and keeps every held point and its chain's
full; a hold is taken under the shared lock, so it cannot slip in between
prune's choice and its commit. A hold whose point is already gone protects
nothing and harms nothing.
"""

import contextlib
import json
import os
import re
from dataclasses import dataclass

from .. import durable
from ..errors import RpofsError

HOLDS_DIR = "holds"
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,200}$")


@dataclass(frozen=True)
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


def put(repo, hold: Hold) -> None:
    """Record the hold (durably) under the repository's shared lock."""
    path = _path(repo.path, hold.holder)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with repo.shared():
        durable.write_file(path, json.dumps({"vm": hold.vm, "point": hold.point, "why": hold.why,
                                                 "name": hold.name, "instant_us": hold.instant_us}).encode())


def drop(repo_path: str, holder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(repo_path, holder))


def every(repo_path: str) -> list[Hold]:
    """All holds; an unreadable file is refused rather than ignored (ignoring
    it could let prune take a point a running VM reads)."""
    folder = os.path.join(repo_path, HOLDS_DIR)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                d = json.load(f)
            out.append(Hold(name[:-5], str(d["vm"]), int(d["point"]), str(d.get("why", "")), str(d.get("name", "")),
                            int(d.get("instant_us", 0))))
        except FileNotFoundError:
            continue  # dropped while we listed
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RpofsError(f"cannot read the hold {path} ({e}): fix or remove it") from None
    return out


def held_points(repo_path: str, vm: str) -> set[int]:
    return {h.point for h in every(repo_path) if h.vm == vm}

