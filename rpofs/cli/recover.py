"""Getting things back whole: rpofs restore (a disk, or a VM with --vm),
rpofs run (boot a VM from a point now; --move, --stop, --list, and after a
reboot --resume, --serve-mount)."""

import json
import os
import sys

from ..errors import RpofsError
from .common import (EXIT_ERROR, add_connect, connect, key_source, open_repository, open_repository_of_vm,
                     vm_of)


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
                       "switches to them; --stop destroys and removes it. After a reboot (or a mount daemon "
                       "that died) run VMs cannot start until the mount they read is back: --list says so, "
                       "--resume mounts it again and starts them; systemd's rpofs-run-mount.service runs "
                       "--serve-mount at boot, before libvirt.")
    r.add_argument("source", metavar="VM@TIME", nargs="?", help="TIME as in the mount's at/, or 'latest'")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--move", metavar="NAME", help="copy NAME's disks to --dir while it runs, then switch")
    what.add_argument("--stop", metavar="NAME", help="destroy NAME, undefine it, remove its overlays")
    what.add_argument("--list", action="store_true", help="the VMs rpofs run started")
    what.add_argument("--resume", metavar="NAME", nargs="?", const="",
                      help="after a reboot: mount again what the run VMs (or NAME) read, then start those "
                      "shut off (not with --no-start)")
    what.add_argument("--serve-mount", action="store_true",
                      help="serve REPO/run/mnt in the foreground while a run VM reads through it (for "
                      "rpofs-run-mount.service, before libvirt starts); exits at once when none does")
    r.add_argument("--name", default=None, help="the new VM's name (default: VM-HHMM of the point, made unique)")
    r.add_argument("--dir", default="", metavar="DIR",
                   help="where the overlays go (default REPO/run/<uuid>/); for --move, where the disks go "
                   "(default /var/lib/libvirt/images)")
    r.add_argument("--no-start", action="store_true",
                   help="define the VM but do not start it (--resume: only mount again)")
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
    with open_repository_of_vm(repo_path, args, vm_of(args.source)) as repo:
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
    with open_repository_of_vm(repo_path, args, vm) as repo, connect(args) as conn:
        done = restore(repo, conn, vm, when, VmRestoreOptions(args.name, args.dir, args.format, args.replace,
                                                              args.force, args.start))
    for note in done.notes:
        print(f"rpofs: note: {note}", file=sys.stderr)
    print(f"{done.name}: defined{' and started' if args.start else ''}, {done.bytes_written} bytes written")
    for target, path in done.disks.items():
        print(f"  {target}: {path}")


def cmd_run(repo_path: str, args) -> int | None:
    from ..recover import instant
    resuming = args.resume is not None
    if not (args.source or args.move or args.stop or args.list or resuming or args.serve_mount):
        raise RpofsError("run: give VM@TIME, or --move NAME, --stop NAME, --list, --resume or --serve-mount")
    if args.source and (args.move or args.stop or args.list or resuming or args.serve_mount):
        raise RpofsError("run: VM@TIME does not go with --move, --stop, --list, --resume or --serve-mount")
    if args.serve_mount:
        return _serve_run_mount(repo_path, args)  # before libvirt runs: it opens neither
    with (open_repository_of_vm(repo_path, args, vm_of(args.source)) if args.source else
          open_repository(repo_path, args)) as repo, connect(args) as conn:
        if args.list:
            _print_runs(instant.listing(repo, conn), args.json)
        elif resuming:
            return _print_resumed(instant.resume(repo, conn, args.resume or None, not args.no_start))
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


def _serve_run_mount(repo_path: str, args) -> None:
    """What rpofs-run-mount.service runs at boot, ordered before libvirt:
    REPO/run/mnt served in this process (systemd is told when it is ready)
    while a run VM reads through it; else READY and exit 0, so the unit is
    done and libvirt need not wait. It talks to no libvirt (libvirtd waits
    for this unit) and opens the repository only in the mount itself."""
    from .. import sdnotify
    from ..mount.daemon import mount_foreground
    from ..recover import instant
    mountpoint = instant.run_mountpoint(repo_path)
    if not instant.needs_run_mount(repo_path):
        print(f"rpofs: no VM started by rpofs run reads {mountpoint}: nothing to serve", file=sys.stderr)
        sdnotify.ready("nothing to serve")
        return
    if instant.mount_serves(repo_path, mountpoint):
        print(f"rpofs: {mountpoint} is mounted already", file=sys.stderr)
        sdnotify.ready("mounted already")
        return
    instant.clear_dead_mount(repo_path, mountpoint)
    mount_foreground(instant.run_mount_options(repo_path), None, key_source(repo_path, args))


def _print_resumed(done) -> int | None:
    failed = False
    for r in done:
        again = f" (its mount at {r.record.mountpoint} made again)" if r.mounted else ""
        if r.state == "gone":
            print(f"{r.record.name}: gone from libvirt: rpofs run --stop {r.record.name} removes what is left")
        elif r.state == "failed":
            failed = True
            print(f"{r.record.name}: not resumed: {r.error}", file=sys.stderr)
        elif r.state == "shut off":
            print(f"{r.record.name}: shut off{again}, ready to start")
        else:
            print(f"{r.record.name}: {r.state}{again}")
    return EXIT_ERROR if failed else None


def _print_runs(states, as_json: bool) -> None:
    from ..timefmt import format_time
    rows = [{"name": s.record.name, "uuid": s.record.uuid, "state": s.state, "on_overlays": s.on_overlays,
             "vm": {"uuid": s.record.vm, "name": s.record.vm_name}, "point": s.record.point,
             "time": format_time(s.record.time_us, 6), "mountpoint": s.record.mountpoint,
             "mounted": s.mounted, "todo": s.todo or None, "files": s.record.made} for s in states]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']:20} {row['state']:9} from {row['vm']['name']}@{row['time']}"
              f"{'  (on overlays)' if row['on_overlays'] else ''}{'  ' + row['todo'] if row['todo'] else ''}")
