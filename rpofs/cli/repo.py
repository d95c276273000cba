"""The repository itself: rpofs init (encrypted or not), rpofs upgrade,
rpofs key change (an encrypted repository's passphrase)."""

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


PARSERS = {"init": add_init, "upgrade": add_upgrade, "key": add_key}


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
    if args.cache_size is not None and args.store is None:
        raise RpofsError("init: --cache-size goes with --store")
    where = f" with its packs in {args.store}" if args.store else ""
    if not args.encrypt:
        if args.init_key_file:
            raise RpofsError("init: --key-file goes with --encrypt")
        Repository.init(repo_path, store=args.store, cache_size=args.cache_size).close()
        print(f"created repository {repo_path}{where}")
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
    with Repository.init(repo_path, passphrase, store=args.store, cache_size=args.cache_size) as repo:
        fingerprint = repo.keys.fingerprint
    print(f"created encrypted repository {repo_path}{where} (key fingerprint {fingerprint}); "
          f"without its passphrase it cannot be read")


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
