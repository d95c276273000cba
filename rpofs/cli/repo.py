"""The repository itself: rpofs init (encrypted or not), rpofs upgrade,
rpofs key change (an encrypted repository's passphrase), rpofs store push
(a local repository moved into an object store)."""

import getpass
import json
import os
import sys

from ..errors import RpofsError
from ..store.repo import Repository
from .common import EXIT_ERROR, env_passphrase, key_source, open_repository, read_key_file


def add_init(sub) -> None:
    ini = sub.add_parser("init", help="create an empty repository",
                         description="With --encrypt, everything stored is encrypted (AES-256-GCM) under a "
                         "random key that the passphrase unlocks: from --key-file (its first line), else "
                         "$RPOFS_KEY_FILE, else $RPOFS_PASSPHRASE, else asked twice on a terminal. Without "
                         "the passphrase the repository cannot be read: keep it safe.")
    ini.add_argument("--encrypt", action="store_true", help="encrypt the repository")
    ini.add_argument("--store", default=None, metavar="s3://BUCKET/PREFIX",
                     help="keep the packs in this S3 object store (endpoint and credentials as for any S3 "
                     "tool: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE); the "
                     "bucket is created when missing, the prefix must be empty (docs/OBJECTSTORE.md)")
    ini.add_argument("--cache-size", default=None, metavar="SIZE", type=parse_size,
                     help="--store: the local cache of pack data never grows past this (e.g. 50G; default "
                     "10G; the key cache_size in REPO/store.json)")
    ini.add_argument("--host", dest="init_host", default=None, metavar="NAME",
                     help="--store: this machine's name in the store (default: its short host name); each "
                     "host writes its own chains, every host reads all of them (docs/OBJECTSTORE.md)")
    ini.add_argument("--take-over", action="store_true",
                     help="--store: carry on host NAME's chains on this machine (its catalog is read back "
                     "from the store; refused while its lease is younger than 5 minutes)")
    ini.add_argument("--force", action="store_true",
                     help="--take-over: even while its lease is young (the machine that held it is gone "
                     "for good; it stops publishing if it comes back)")
    ini.add_argument("--key-file", dest="init_key_file", default=None, metavar="FILE",
                     help="--encrypt: the passphrase is this file's first line")
    ini.set_defaults(func=cmd_init)


def add_upgrade(sub) -> None:
    ug = sub.add_parser("upgrade", help="convert a repository of an earlier format (2, 3, 4 or 5) to this rpofs's, in place",
                        description="Re-pieces the full chunks earlier formats stored whole, then sets the new "
                        "format in one transaction, under the repository's exclusive lock. Killed at any moment, "
                        "the repository is the old format intact or the new one complete; run it again to "
                        "finish. Needs free space for the converted chunks (checked first).")
    ug.add_argument("--json", action="store_true", help="print the report as JSON")
    ug.set_defaults(func=cmd_upgrade)


def add_key(sub) -> None:
    k = sub.add_parser("key", help="an encrypted repository's passphrase: rpofs key change",
                       description="rpofs key change: the repository's master key is wrapped anew under a "
                       "new passphrase; nothing else is rewritten (no data, no catalog entry), the key "
                       "fingerprint stays. The old passphrase comes as for every command (--key-file, "
                       "$RPOFS_KEY_FILE, $RPOFS_PASSPHRASE, or asked on a terminal); the new one from "
                       "--new-key-file, or asked twice on a terminal. One transaction replaces the key "
                       "record: interrupted, the old passphrase opens the repository, or the new one.")
    actions = k.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    change = actions.add_parser("change", help="change the passphrase (the master key rewrapped)")
    change.add_argument("--new-key-file", default=None, metavar="FILE",
                        help="the new passphrase is this file's first line (default: asked twice on a terminal)")
    change.set_defaults(func=cmd_key_change)


def add_hosts(sub) -> None:
    h = sub.add_parser("hosts", help="the hosts of the object store this repository is in, and what each holds",
                       description="Every host of the store: its VMs and points (as published to the store "
                       "and followed here), its newest point, who holds its lease and how fresh it is, and "
                       "for this host the catalog changes not published yet.")
    h.add_argument("--json", action="store_true", help="one JSON array")
    h.set_defaults(func=cmd_hosts)


def add_store(sub) -> None:
    described = ("rpofs store push s3://BUCKET/PREFIX: this local repository becomes host NAME of the store, "
                 "as if made there by init --store: its packs uploaded (one PUT each), its catalog published, "
                 "then its local pack files removed (reads go through a bounded cache). Backups go on while the "
                 "packs are uploaded; the last step waits for a moment without one and needs every other "
                 "process that has the repository open (the ingester, a mount) stopped. Killed at any moment, "
                 "run it again: it carries on (docs/OBJECTSTORE.md).")
    s = sub.add_parser("store", help="a local repository moved into an S3 object store: rpofs store push",
                       description=described)
    actions = s.add_subparsers(dest="store_action", required=True, metavar="ACTION")
    p = actions.add_parser("push", help="move this local repository into the store, as host NAME",
                           description=described)
    p.add_argument("store", metavar="s3://BUCKET/PREFIX",
                   help="the store (endpoint and credentials as for init --store); the bucket is created when "
                   "missing; the prefix is empty or holds a store of this rpofs's format")
    p.add_argument("--host", dest="push_host", default=None, metavar="NAME",
                   help="this machine's name in the store (default: its short host name); refused when the "
                   "store has a host by that name")
    p.add_argument("--cache-size", default=None, metavar="SIZE", type=parse_size,
                   help="the local cache of pack data never grows past this (e.g. 50G; default 10G)")
    p.set_defaults(func=cmd_store_push)


PARSERS = {"init": add_init, "hosts": add_hosts, "store": add_store, "upgrade": add_upgrade, "key": add_key}


def parse_size(text: str) -> int:
    """Bytes from "50G", "512M", "1T", "4096" (powers of 1024)."""
    import argparse
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 50G, 512M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(value * units[unit])


def cmd_init(repo_path: str, args) -> None:
    args.init_host = args.init_host or args.host
    for flag, given in (("--cache-size", args.cache_size is not None), ("--host", args.init_host is not None),
                        ("--take-over", args.take_over)):
        if given and args.store is None:
            raise RpofsError(f"init: {flag} goes with --store")
    if args.force and not args.take_over:
        raise RpofsError("init: --force goes with --take-over")
    where = f" with its packs in {args.store}" if args.store else ""
    store = dict(store=args.store, cache_size=args.cache_size, host=args.init_host, take_over=args.take_over,
                 force=args.force)
    if not args.encrypt:
        if args.init_key_file:
            raise RpofsError("init: --key-file goes with --encrypt")
        with Repository.init(repo_path, **store) as repo:
            told = _told_host(repo, args.take_over)
        print(f"created repository {repo_path}{where}{told}")
        return
    if os.path.exists(os.path.join(repo_path, "catalog")):
        raise RpofsError(f"{repo_path} already holds a repository")
    key_file = args.init_key_file or args.key_file or os.environ.get("RPOFS_KEY_FILE")
    if key_file:
        passphrase = read_key_file(key_file)
    elif env_passphrase():
        passphrase = env_passphrase()
    elif sys.stdin.isatty():
        passphrase = getpass.getpass(f"new passphrase for {repo_path}: ")
        if not passphrase:
            raise RpofsError("init: the passphrase is empty: nothing created")
        if getpass.getpass("the same again: ") != passphrase:
            raise RpofsError("init: the two passphrases differ: nothing created")
    else:
        raise RpofsError("init --encrypt: give the passphrase with --key-file, $RPOFS_KEY_FILE or $RPOFS_PASSPHRASE")
    with Repository.init(repo_path, passphrase, **store) as repo:
        fingerprint = repo.keys.fingerprint
        told = _told_host(repo, args.take_over)
    print(f"created encrypted repository {repo_path}{where}{told} (key fingerprint {fingerprint}); "
          f"without its passphrase it cannot be read")


def _told_host(repo, took_over: bool) -> str:
    if not repo.host:
        return ""
    if took_over:
        return f" as host {repo.host}, taken over with its {len(repo.vms())} VMs"
    return f" as host {repo.host}"


def cmd_hosts(repo_path: str, args) -> int | None:
    import dataclasses

    from ..store.anyhost import host_rows
    from ..timefmt import format_time
    rows = host_rows(repo_path, key_source(repo_path, args))
    if args.json:
        print(json.dumps([dict(dataclasses.asdict(r), newest=format_time(r.newest_us, 6) if r.newest_us else None)
                          for r in rows], indent=2))
    else:
        for r in rows:
            lease = (f"lease {r.lease_machine or '?'} {r.lease_age_s:.0f} s ago" if r.lease_age_s is not None
                     else "no lease")
            newest = format_time(r.newest_us, 0) if r.newest_us else "-"
            extra = f"  {r.unpublished} changes not published yet" if r.unpublished else ""
            if r.borrowed:
                extra += f"  {r.borrowed} chunks borrowed"
            if r.condemned:
                extra += f"  {r.condemned} chunks condemned"
            if r.error:
                extra += f"  (not readable here: {r.error})"
            print(f"{r.name + (' (this host)' if r.this else ''):24} {r.vms:4} VMs {r.points:7} points  "
                  f"newest {newest:20}  {lease}{extra}")
    return EXIT_ERROR if any(r.error for r in rows) else None


def cmd_key_change(repo_path: str, args) -> None:
    # the old passphrase is checked first: a wrong one is said before a new one is asked for
    with open_repository(repo_path, args) as repo:
        if not repo.encrypted:
            raise RpofsError(f"repository {repo_path} is not encrypted: it has no passphrase to change")
        if args.new_key_file:
            new = read_key_file(args.new_key_file)
        elif sys.stdin.isatty():
            new = getpass.getpass(f"new passphrase for {repo_path}: ")
            if not new:
                raise RpofsError("key change: the new passphrase is empty: nothing changed")
            if getpass.getpass("the same again: ") != new:
                raise RpofsError("key change: the two passphrases differ: nothing changed")
        else:
            raise RpofsError("key change: give the new passphrase with --new-key-file (or run it on a terminal)")
        repo.change_passphrase(new)
        fingerprint = repo.keys.fingerprint
    print(f"changed the passphrase of repository {repo_path} (key fingerprint {fingerprint}, unchanged); "
          f"the old one no longer opens it")


def cmd_store_push(repo_path: str, args) -> None:
    from ..progress import Progress
    from ..store.push import push
    with Progress("push", 0) as progress:
        report = push(repo_path, args.store, args.push_host or args.host, args.cache_size,
                      key_source(repo_path, args), progress)
    print(report.summary())


def cmd_upgrade(repo_path: str, args) -> int | None:
    import dataclasses

    from ..progress import Progress
    from ..store.upgrade import upgrade
    with Progress("upgrade", 0) as progress:
        report = upgrade(repo_path, progress, key_source(repo_path, args))
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
    else:
        print(f"{repo_path}: {report.summary()}")
    if report.chunks_damaged:
        return EXIT_ERROR
    return None
