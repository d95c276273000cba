"""The command line. Parses arguments into plain values, calls the library,
and turns an RpofsError into one line on stderr and exit status 1 (usage
errors exit 2, as argparse does; no command at all prints the help).

One module per family of commands, each owning its subparsers and their
handlers (PARSERS: command -> a function adding its subparser, bound to its
handler with set_defaults(func=...)); what they share is in common.py. The
handlers import what they call when they run, so `rpofs --help` stays quick.
A subparser may also set daemon=True (logs at INFO without -v) or
needs_repo=False (the repository path is not checked)."""

import argparse
import logging
import os
import sys

from .. import memory
from ..errors import RpofsError
from ..store.repo import default_repo_path
from . import backup, browse, maintain, protect, recover, repo
from .common import EXIT_ERROR, EXIT_USAGE, take_secrets

FAMILIES = (repo, backup, browse, recover, protect, maintain)
# the order `rpofs --help` lists them in
ORDER = ("init", "hosts", "store", "backup", "points", "ship", "mount", "umount", "ingest", "cp", "prune", "forget",
         "verify", "upgrade", "key", "defrag", "restore", "run", "protect", "unprotect", "status")
# the commands whose --host names this machine's host in a store (not another host's catalog to read)
OWN_HOST = ("init", "store")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpofs", description="Near-zero RPO backups of libvirt VMs, "
                                "browsable as a filesystem of recovery points.")
    p.add_argument("--repo", default=None, help="repository directory (default $RPOFS_REPO or /var/lib/rpofs)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="an encrypted repository's passphrase: the file's first line (default "
                   "$RPOFS_KEY_FILE, else $RPOFS_PASSPHRASE, else asked on a terminal)")
    p.add_argument("--host", default=None, metavar="NAME",
                   help="in an object store: the VMs of host NAME (its catalog as this machine follows it "
                   "from the store); by default a VM's host is found by its name")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: add for family in FAMILIES for name, add in family.PARSERS.items()}
    for name in sorted(parsers, key=ORDER.index):
        parsers[name](sub)
    return p


def main(argv: list[str] | None = None) -> int:
    take_secrets()  # no child of rpofs (nor a library's) inherits the passphrase
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or getattr(args, "daemon", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repo_path = os.path.abspath(args.repo or default_repo_path())
    memory.tune()
    try:
        if getattr(args, "needs_repo", True) and os.path.exists(repo_path) and not os.path.isdir(repo_path):
            raise RpofsError(f"{repo_path} is a file, not a repository directory")
        if args.host and args.command not in OWN_HOST:
            from ..store.anyhost import path_of_host
            repo_path = path_of_host(repo_path, args.host)
        return args.func(repo_path, args) or 0
    except RpofsError as e:
        print(f"rpofs: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # e.g. a full disk: the command failed, nothing was committed
        print(f"rpofs: {e.strerror or e}{': ' + e.filename if e.filename else ''}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rpofs: interrupted", file=sys.stderr)
        return 130
