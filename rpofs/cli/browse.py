"""Looking at points: rpofs points (a VM's list), rpofs mount / umount (the
filesystem of recovery points), rpofs cp (a guest file out, without a
mount)."""

import argparse
import json
import os

from ..errors import RpofsError
from .common import key_source, open_repository_of_vm, vm_of


def add_points(sub) -> None:
    pts = sub.add_parser("points", help="list a VM's recovery points")
    pts.add_argument("vm", help="VM name or UUID (as recorded in the repository)")
    pts.add_argument("--json", action="store_true", help="one JSON array (the point.json objects)")
    pts.add_argument("--since", default=None, metavar="TIME", help="only points at or after TIME (as in at/)")
    pts.add_argument("--until", default=None, metavar="TIME", help="only points at or before TIME (as in at/)")
    pts.add_argument("--limit", default=None, type=int, metavar="N",
                     help="only the newest N of the points listed (block and app points together)")
    pts.set_defaults(func=cmd_points)


def add_mount(sub) -> None:
    m = sub.add_parser("mount", help="mount the repository; returns once the mount is ready")
    m.add_argument("mountpoint")
    m.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users read, with the kernel checking permissions")
    m.add_argument("--journal-spacing", type=float, default=1.0, metavar="SECONDS",
                   help="a continuously protected VM lists one instant per this many seconds that had "
                   "writes (default 1); at/ reaches every instant to the microsecond")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.add_argument("--key-fd", type=int, default=None, help=argparse.SUPPRESS)  # the master key, from rpofs mount
    m.set_defaults(func=cmd_mount, daemon=True)


def add_umount(sub) -> None:
    u = sub.add_parser("umount", help="unmount a mounted repository")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount, needs_repo=False)


def add_cp(sub) -> None:
    c = sub.add_parser("cp", help="copy a guest file out of a recovery point, without a mount",
                       description="SOURCE is VM@TIME:DISK/VOLUME/PATH, TIME as in the mount's at/ "
                       "(or 'latest'), VOLUME a partition number or 0 for a whole-disk filesystem; or "
                       "VM@TIME:apps/APP/FILE, an application's file as of TIME (its newest app point "
                       "or block point at or before it, as in the mount's apps/; docs/APPS.md).")
    c.add_argument("source", metavar="SOURCE")
    c.add_argument("dest", metavar="DEST")
    c.add_argument("-r", "--recursive", action="store_true", help="copy a directory and what it holds")
    c.add_argument("--force", action="store_true",
                   help="replace DEST (or DEST/NAME) if it exists; without it an existing one is refused")
    c.set_defaults(func=cmd_cp)


PARSERS = {"points": add_points, "mount": add_mount, "umount": add_umount, "cp": add_cp}


def cmd_points(repo_path: str, args) -> None:
    from ..store import shipments
    from ..apps.view import app_point_json
    from ..mount.pointfiles import point_json
    from ..timefmt import format_time, parse_as_of
    if args.limit is not None and args.limit < 1:
        raise RpofsError("points: --limit must be 1 or more")
    since = parse_as_of(args.since) if args.since else 0   # BadTime: one line
    until = parse_as_of(args.until) if args.until else None
    with open_repository_of_vm(repo_path, args, args.vm) as repo:
        vm = repo.find_vm(args.vm)[0]
        named = repo.named_points(vm, since, until, args.limit)
        by_no = {p.point: (n, p) for n, p in named}
        rows = [(p.time_us, 0, n, p) for n, p in named]
        ships = list(shipments.ships(repo, vm, since, until, newest_first=args.limit is not None))
        rows += [(s.time_us, 1, s.name, s) for s in ships[:args.limit]]
        rows.sort(key=lambda row: row[:2])
        rows = rows[-args.limit:] if args.limit else rows
        for _, kind, _, p in rows:  # an app point's base outside what is listed
            if kind == 1 and p.base is not None and p.base not in by_no:
                with repo.env.begin() as txn:
                    base = repo.get_point(txn, p.base)
                if base is not None:
                    by_no[p.base] = (base.name or format_time(base.time_us), base)
        if args.json:
            print(json.dumps([json.loads(point_json(n, p)) if kind == 0
                              else app_point_json(p, by_no.get(p.base, (None, None))[1])
                              for _, kind, n, p in rows], indent=2))
            return
        for _, kind, n, p in rows:
            if kind == 0:
                print(f"{n}  {p.kind:4}  chain {p.chain:<6} {p.consistency:18} "
                      f"{', '.join(d.target for d in p.disks)}{'  (' + p.reason + ')' if p.reason else ''}")
            else:
                extends = f"extends {by_no[p.base][0]}" if p.base in by_no else f"waiting: {p.waiting}"
                print(f"{n}  app   {p.app}  {sum(f.length for f in p.files)} bytes  {extends}")


def cmd_mount(repo_path: str, args) -> None:
    from ..mount.daemon import MountOptions, mount_background, mount_foreground
    if not args.journal_spacing > 0:
        raise RpofsError("--journal-spacing must be more than 0 seconds")
    opts = MountOptions(repo=repo_path, mountpoint=os.path.abspath(args.mountpoint), allow_other=args.allow_other,
                        journal_spacing_s=args.journal_spacing)
    keys = key_source(repo_path, args)
    if args.foreground:
        mount_foreground(opts, args.ready_fd, keys)
    else:
        mount_background(opts, keys)


def cmd_umount(repo_path: str, args) -> None:
    from ..mount.daemon import unmount
    unmount(os.path.abspath(args.mountpoint))


def cmd_cp(repo_path: str, args) -> None:
    from ..mount.copy import copy_out
    with open_repository_of_vm(repo_path, args, vm_of(args.source)) as repo:
        copy_out(repo, args.source, args.dest, args.recursive, args.force)
