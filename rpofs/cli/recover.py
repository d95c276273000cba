"""Getting things back whole: rpofs restore (a disk, or a VM with --vm),
rpofs run (boot a VM from a point now; --move, --stop, --list)."""

import json
import os
import sys

from ..errors import RpofsError
from .common import add_connect, connect, open_repository


def add_restore(sub) -> None:
    rs = sub.add_parser("restore", help="write a whole disk (or, with --vm, a whole VM) at a point, without a mount",
                        description="A disk: SOURCE is VM@TIME:DISK, TIME as in the mount's at/ (or 'latest'); a "
                        "file is written sparse, as DEST.part renamed to DEST when complete; a block device is "
                        "written in full. A VM (--vm): SOURCE is VM@TIME; every disk is written into --dir and "
                        "the domain defined from the point's captured XML, as a copy (--name: new UUID and MACs) "
                        "or in place of the shut-off original (--replace --force).")
    rs.add_argument("source", metavar="SOURCE")
    rs.add_argument("dest", metavar="DEST", nargs="?", help="the disk's destination (not with --vm)")
    rs.add_argument("--force", action="store_true",
                    help="replace DEST if it is an existing file; with --replace, overwrite the VM's disks")
    rs.add_argument("--vm", action="store_true", help="restore the whole VM as a libvirt domain")
    rs.add_argument("--name", default=None, help="--vm: the new domain's name (default: VM-HHMM of the point)")
    rs.add_argument("--replace", action="store_true",
                    help="--vm: restore the original domain itself (it must be shut off; needs --force)")
    rs.add_argument("--dir", default="", metavar="DIR",
                    help="--vm: where the disks go (default /var/lib/libvirt/images; with --replace, "
                    "the paths the VM uses)")
    rs.add_argument("--format", default="qcow2", choices=("qcow2", "raw"), help="--vm: image format (qcow2)")
    rs.add_argument("--start", action="store_true", help="--vm: start the restored VM")
    add_connect(rs, help="--vm: libvirt URI")
    rs.set_defaults(func=cmd_restore)


def add_run(sub) -> None:
    r = sub.add_parser("run", help="boot a VM from a recovery point now (instant recovery); move it to local "
                       "storage, stop it, or list such VMs",
                       description="rpofs run VM@TIME boots a new VM (new name, UUID and MACs) whose disks are "
                       "qcow2 overlays over the point's disks in an rpofs mount (one is started when the "
                       "repository is not mounted); the point is never written and is kept by prune while the "
                       "VM runs on it. --move copies its disks into standalone qcow2 images while it runs and "
                       "switches to them; --stop destroys and removes it.")
    r.add_argument("source", metavar="VM@TIME", nargs="?", help="TIME as in the mount's at/, or 'latest'")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--move", metavar="NAME", help="copy NAME's disks to --dir while it runs, then switch")
    what.add_argument("--stop", metavar="NAME", help="destroy NAME, undefine it, remove its overlays")
    what.add_argument("--list", action="store_true", help="the VMs rpofs run started")
    r.add_argument("--name", default=None, help="the new VM's name (default: VM-HHMM of the point, made unique)")
    r.add_argument("--dir", default="", metavar="DIR",
                   help="where the overlays go (default REPO/run/<uuid>/); for --move, where the disks go "
                   "(default /var/lib/libvirt/images)")
    r.add_argument("--no-start", action="store_true", help="define the VM but do not start it")
    r.add_argument("--no-network", action="store_true", help="leave out the VM's network interfaces")
    r.add_argument("--json", action="store_true", help="--list: one JSON array")
    add_connect(r)
    r.set_defaults(func=cmd_run)


PARSERS = {"restore": add_restore, "run": add_run}


def split_vm_time(text: str) -> tuple[str, str]:
    """VM@TIME -> (vm, time); TIME is 'latest' or as in the mount's at/.
    Split at the first "@", as cp's and restore's VM@TIME:... are."""
    vm, at, when = text.partition("@")
    if not (vm and at and when):
        raise RpofsError(f"cannot read {text!r}: expected VM@TIME, e.g. db1@2026-11-30T09:41:07Z or db1@latest")
    return vm, when


def cmd_restore(repo_path: str, args) -> None:
    if args.vm:
        return restore_vm(repo_path, args)
    for flag in ("name", "replace", "dir", "start"):
        if getattr(args, flag):
            raise RpofsError(f"restore: --{flag} goes with --vm")
    if not args.dest:
        raise RpofsError("restore: give DEST (or --vm to restore the whole VM)")
    from ..progress import Progress
    from ..recover.disk import restore_disk
    from ..store.restore import parse_disk_ref
    with open_repository(repo_path, args) as repo:
        with Progress(f"restore {parse_disk_ref(args.source)[2]}", 0) as progress:
            moment, size, written = restore_disk(repo, args.source, args.dest, args.force, progress)
    if moment.note():
        print(f"rpofs: note: {moment.note()}", file=sys.stderr)
    print(f"{args.dest}: {size} bytes, {written} written")


def restore_vm(repo_path: str, args) -> None:
    from ..recover.restore_vm import VmRestoreOptions, restore_vm as restore
    if args.dest:
        raise RpofsError("restore --vm: no DEST: the disks go into --dir")
    vm, when = split_vm_time(args.source)
    with open_repository(repo_path, args) as repo, connect(args) as conn:
        done = restore(repo, conn, vm, when, VmRestoreOptions(args.name, args.dir, args.format, args.replace,
                                                              args.force, args.start))
    for note in done.notes:
        print(f"rpofs: note: {note}", file=sys.stderr)
    print(f"{done.name}: defined{' and started' if args.start else ''}, {done.bytes_written} bytes written")
    for target, path in done.disks.items():
        print(f"  {target}: {path}")


def cmd_run(repo_path: str, args) -> None:
    from ..recover import instant
    if not (args.source or args.move or args.stop or args.list):
        raise RpofsError("run: give VM@TIME, or --move NAME, --stop NAME or --list")
    if args.source and (args.move or args.stop or args.list):
        raise RpofsError("run: VM@TIME does not go with --move, --stop or --list")
    with open_repository(repo_path, args) as repo, connect(args) as conn:
        if args.list:
            _print_runs(instant.listing(repo, conn), args.json)
        elif args.stop:
            rec = instant.stop(repo, conn, args.stop)
            print(f"{rec.name}: stopped and removed")
        elif args.move:
            from ..recover.restore_vm import DEFAULT_DIR
            rec = instant.move(repo, conn, args.move, args.dir or DEFAULT_DIR)
            print(f"{rec.name}: moved to {os.path.abspath(args.dir or DEFAULT_DIR)}; "
                  f"it no longer needs the repository")
        else:
            vm, when = split_vm_time(args.source)
            opts = instant.RunOptions(args.name, args.dir, not args.no_start, not args.no_network)
            rec, notes = instant.run(repo, conn, vm, when, opts)
            for note in notes:
                print(f"rpofs: note: {note}", file=sys.stderr)
            print(rec.name)


def _print_runs(states, as_json: bool) -> None:
    from ..timefmt import format_time
    rows = [{"name": s.record.name, "uuid": s.record.uuid, "state": s.state, "on_overlays": s.on_overlays,
             "vm": {"uuid": s.record.vm, "name": s.record.vm_name}, "point": s.record.point,
             "time": format_time(s.record.time_us, 6), "mountpoint": s.record.mountpoint,
             "files": s.record.made} for s in states]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']:20} {row['state']:9} from {row['vm']['name']}@{row['time']}"
              f"{'  (on overlays)' if row['on_overlays'] else ''}")
