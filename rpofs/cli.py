"""The command line. Parses arguments into plain values, calls the library,
and turns an RpofsError into one line on stderr and exit status 1 (usage
errors exit 2, as argparse does; no command at all prints the help)."""

import argparse
import getpass
import json
import logging
import os
import sys

from . import memory
from .errors import RpofsError
from .store import crypto
from .store.repo import Repository, default_repo_path
from .timefmt import point_names

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpofs", description="Near-zero RPO backups of libvirt VMs, "
                                "browsable as a filesystem of recovery points.")
    p.add_argument("--repo", default=None, help="repository directory (default $RPOFS_REPO or /var/lib/rpofs)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="an encrypted repository's passphrase: the file's first line (default "
                   "$RPOFS_KEY_FILE, else $RPOFS_PASSPHRASE, else asked on a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ini = sub.add_parser("init", help="create an empty repository",
                         description="With --encrypt, everything stored is encrypted (AES-256-GCM) under a "
                         "random key that the passphrase unlocks: from --key-file (its first line), else "
                         "$RPOFS_KEY_FILE, else $RPOFS_PASSPHRASE, else asked twice on a terminal. Without "
                         "the passphrase the repository cannot be read: keep it safe.")
    ini.add_argument("--encrypt", action="store_true", help="encrypt the repository")
    ini.add_argument("--key-file", dest="init_key_file", default=None, metavar="FILE",
                     help="--encrypt: the passphrase is this file's first line")

    b = sub.add_parser("backup", help="take one recovery point of a VM now",
                       description="Full backup when asked (--full) or when no compatible full exists; "
                       "otherwise a log backup of the blocks changed since the VM's last point.")
    b.add_argument("vm", help="VM name or UUID")
    b.add_argument("--full", action="store_true", help="take a full backup even if a log is possible")
    b.add_argument("--disk", action="append", default=[], metavar="TARGET",
                   help="back up only this disk (repeatable; default: every disk)")
    b.add_argument("--quiesce", nargs="*", metavar="MOUNTPOINT", default=None,
                   help="freeze the guest's filesystems (all, or these mountpoints) through the guest "
                   "agent for the snapshot; a mountpoint the guest does not have fails the backup; "
                   "without an answering agent, or when not every filesystem froze, the point is "
                   "crash-consistent and a warning says why")
    b.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                   metavar="URI", help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")
    b.add_argument("--json", action="store_true", help="print the new point as point.json (its name is what "
                   "scripts keep: it names this point for as long as it exists)")
    b.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait while another backup of the VM runs (default 30)")

    pts = sub.add_parser("points", help="list a VM's recovery points")
    pts.add_argument("vm", help="VM name or UUID (as recorded in the repository)")
    pts.add_argument("--json", action="store_true", help="one JSON array (the point.json objects)")

    sh = sub.add_parser("ship", help="ship a VM's application logs once now (the ingester ships every interval)",
                        description="Reads through the guest agent what each application configured for the "
                        "VM ([vm.NAME.apps.APP] in the config) appended since its last shipment, and records "
                        "it as an app point extending the newest block point that holds the application's "
                        "files in the state the log continues (docs/APPS.md).")
    sh.add_argument("vm", help="VM name or UUID")
    sh.add_argument("--app", action="append", default=[], metavar="APP", help="only this app (repeatable)")
    sh.add_argument("--config", default=None, metavar="FILE", help="the ingester's config (default /etc/rpofs/rpofs.toml)")
    sh.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                    metavar="URI", help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")
    sh.add_argument("--json", action="store_true", help="the new app points as JSON")

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

    u = sub.add_parser("umount", help="unmount a mounted repository")
    u.add_argument("mountpoint")

    i = sub.add_parser("ingest", help="the daemon: full and log backups on schedule, per the config",
                       description="Runs until SIGTERM/SIGINT; logs to stderr (journald). "
                       "--repo overrides the config's repository.")
    i.add_argument("--config", default=None, metavar="FILE", help="TOML config (default /etc/rpofs/rpofs.toml)")
    i.add_argument("--metrics", default=None, metavar="ADDR:PORT", help="serve Prometheus metrics there")

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

    pr = sub.add_parser("prune", help="remove the points a retention policy does not keep, and their data",
                        description="Keeps the points any --keep-* option selects, the VM's newest point, and "
                        "the full of every chain with a kept point; removes the rest and the data only they used. "
                        "Times are UTC; --keep-within counts back from the VM's newest point.")
    pr.add_argument("vm", nargs="?", help="VM name or UUID (as recorded in the repository)")
    pr.add_argument("--all", action="store_true", help="every VM in the repository")
    pr.add_argument("--keep-last", type=int, default=0, metavar="N", help="the newest N points")
    pr.add_argument("--keep-within", default=None, metavar="DURATION",
                    help="every point this close to the newest (e.g. 2h, 7d)")
    for unit, period in (("hourly", "hour"), ("daily", "day"), ("weekly", "week"), ("monthly", "month")):
        pr.add_argument(f"--keep-{unit}", type=int, default=0, metavar="N",
                        help=f"the newest point of each of the last N {period}s that have one")
    pr.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")

    fg = sub.add_parser("forget", help="remove every point of a VM (one decommissioned) and the data only it used",
                        description="Removes all of the VM's points, its chains' index entries and the data no "
                        "other VM uses, under the repository's exclusive lock; the VM leaves rpofs points, the "
                        "mount and rpofs status. Refused while a VM started by rpofs run reads one of its points. "
                        "A VM still backed up (the ingester) comes back with a new full.")
    fg.add_argument("vm", help="VM name or UUID (as recorded in the repository)")
    fg.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")

    vf = sub.add_parser("verify", help="prove the repository (or one VM's data) intact; with --read-data, "
                        "every stored byte",
                        description="Checks the catalog's relations and that every reference finds a pack record "
                        "whose header matches; --read-data also reads every record and checks its blake3. "
                        "Damage is reported as the VMs, points, disks and byte ranges that read EIO because of "
                        "it; exit status 1 when anything is damaged. Runs alongside backups, prune and defrag.")
    vf.add_argument("vm", nargs="?", default=None, help="VM name or UUID: only the data its points read")
    vf.add_argument("--all", action="store_true", help="the whole repository (the default)")
    vf.add_argument("--read-data", action="store_true", help="read every stored byte and check it")
    vf.add_argument("--json", action="store_true", help="print the report as one JSON object")

    ug = sub.add_parser("upgrade", help="convert a repository of an earlier format (2, 3, 4 or 5) to this rpofs's, in place",
                        description="Re-pieces the full chunks earlier formats stored whole, then sets the new "
                        "format in one transaction, under the repository's exclusive lock. Killed at any moment, "
                        "the repository is the old format intact or the new one complete; run it again to "
                        "finish. Needs free space for the converted chunks (checked first).")
    ug.add_argument("--json", action="store_true", help="print the report as JSON")

    df = sub.add_parser("defrag", help="rewrite a VM's scattered log blocks in disk order, so that its "
                        "newest points read like a full",
                        description="Moves the log blocks each chain's newest point reads and that lie "
                        "scattered (runs under 1 MiB) into one pack file in disk order, with the unchanged "
                        "blocks of full chunks that logs changed at least half of; what every point holds "
                        "is unchanged. The ingester does this every defrag_interval.")
    df.add_argument("vm", nargs="?", help="VM name or UUID (as recorded in the repository)")
    df.add_argument("--all", action="store_true", help="every VM in the repository")

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
    rs.add_argument("--name", default="", help="--vm: the new domain's name (default: VM-HHMM of the point)")
    rs.add_argument("--replace", action="store_true",
                    help="--vm: restore the original domain itself (it must be shut off; needs --force)")
    rs.add_argument("--dir", default="", metavar="DIR",
                    help="--vm: where the disks go (default /var/lib/libvirt/images; with --replace, "
                    "the paths the VM uses)")
    rs.add_argument("--format", default="qcow2", choices=("qcow2", "raw"), help="--vm: image format (qcow2)")
    rs.add_argument("--start", action="store_true", help="--vm: start the restored VM")
    rs.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                    metavar="URI", help="--vm: libvirt URI")

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
    r.add_argument("--name", default="", help="the new VM's name (default: VM-HHMM of the point, made unique)")
    r.add_argument("--dir", default="", metavar="DIR",
                   help="where the overlays go (default REPO/run/<uuid>/); for --move, where the disks go "
                   "(default /var/lib/libvirt/images)")
    r.add_argument("--no-start", action="store_true", help="define the VM but do not start it")
    r.add_argument("--no-network", action="store_true", help="leave out the VM's network interfaces")
    r.add_argument("--json", action="store_true", help="--list: one JSON array")
    r.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                   metavar="URI", help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")

    pt = sub.add_parser("protect", help="protect a running VM continuously: every write it completes is "
                        "journaled first (RPO 0); returns once it is protected",
                        description="Mirrors the VM's disks (libvirt block copy, synchronous writes) into a "
                        "journal server of rpofs's, which makes each write durable in the repository before "
                        "QEMU completes it for the guest. The mirror's first pass becomes a full point; the "
                        "journal is folded into log points every journal_fold and can be read at any "
                        "instant through the mount (docs/PROTECT.md). It lasts until `rpofs unprotect`, "
                        "the VM stops, or the mirror fails; `rpofs ingest` with `continuous = true` keeps it "
                        "and folds the journal, and after a failure backs up at once what the journal "
                        "missed. By hand, `rpofs protect` again folds what the journal holds.")
    pt.add_argument("vm", help="VM name or UUID")
    pt.add_argument("--disk", action="append", default=[], metavar="TARGET",
                    help="protect only this disk (repeatable; default: every disk)")
    pt.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                    metavar="URI", help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")
    pt.add_argument("--json", action="store_true", help="the session as JSON")
    up = sub.add_parser("unprotect", help="end a VM's continuous protection (its journal is folded into a "
                        "last point first)")
    up.add_argument("vm", help="VM name or UUID")
    up.add_argument("--connect", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"),
                    metavar="URI", help="libvirt URI (default $LIBVIRT_DEFAULT_URI or qemu:///system)")
    up.add_argument("--json", action="store_true", help="the ended session as JSON")

    s = sub.add_parser("status", help="per VM: last full, last log, achieved RPO, next run, last error")
    s.add_argument("--json", action="store_true", help="one JSON object (documented in docs/INGEST.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(argv)
    daemon = args.command in ("mount", "ingest")
    logging.basicConfig(level=logging.INFO if args.verbose or daemon else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repo_path = os.path.abspath(args.repo or default_repo_path())
    memory.tune()
    try:
        if args.command != "umount" and os.path.exists(repo_path) and not os.path.isdir(repo_path):
            raise RpofsError(f"{repo_path} is a file, not a repository directory")
        return COMMANDS[args.command](repo_path, args) or 0
    except RpofsError as e:
        print(f"rpofs: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # e.g. a full disk: the command failed, nothing was committed
        print(f"rpofs: {e.strerror or e}{': ' + e.filename if e.filename else ''}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rpofs: interrupted", file=sys.stderr)
        return 130


def read_key_file(path: str) -> str:
    """A passphrase: the file's first line, without its line end."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as e:
        raise RpofsError(f"cannot read key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RpofsError(f"key file {path}: its first line is not UTF-8 text") from None
    text = line.rstrip("\r\n")
    if not text:
        raise RpofsError(f"key file {path}: its first line is empty")
    return text


def passphrase_of(repo_path: str, args, config_key_file: str = "") -> str | None:
    """The passphrase from --key-file, the ingester's key_file, $RPOFS_KEY_FILE,
    $RPOFS_PASSPHRASE, or asked on a terminal; None: none to be had."""
    for path in (args.key_file, config_key_file, os.environ.get("RPOFS_KEY_FILE")):
        if path:
            return read_key_file(path)
    if os.environ.get("RPOFS_PASSPHRASE"):
        return os.environ["RPOFS_PASSPHRASE"]
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase for {repo_path}: ")
    return None


def key_source(repo_path: str, args, config_key_file: str = "") -> crypto.KeySource:
    """Where an encrypted repository's keys come from: asked (and a prompt
    shown) only when the repository turns out to be encrypted."""
    key_fd = getattr(args, "key_fd", None)
    if key_fd is not None:  # a mount started by rpofs mount or rpofs run: the key itself
        chunks = []
        with os.fdopen(key_fd, "rb") as f:
            while block := f.read(64):
                chunks.append(block)
        return crypto.MasterKey(b"".join(chunks))
    return crypto.Passphrase(lambda: passphrase_of(repo_path, args, config_key_file))


def open_repository(repo_path: str, args, **kw) -> Repository:
    """The repository, with its keys if it is encrypted (kw: as Repository.open)."""
    return Repository.open(repo_path, keys=key_source(repo_path, args), **kw)


def cmd_init(repo_path: str, args) -> None:
    if not args.encrypt:
        if args.init_key_file:
            raise RpofsError("init: --key-file goes with --encrypt")
        Repository.init(repo_path).close()
        print(f"created repository {repo_path}")
        return
    if os.path.exists(os.path.join(repo_path, "catalog")):
        raise RpofsError(f"{repo_path} already holds a repository")
    key_file = args.init_key_file or args.key_file or os.environ.get("RPOFS_KEY_FILE")
    if key_file:
        passphrase = read_key_file(key_file)
    elif os.environ.get("RPOFS_PASSPHRASE"):
        passphrase = os.environ["RPOFS_PASSPHRASE"]
    elif sys.stdin.isatty():
        passphrase = getpass.getpass(f"new passphrase for {repo_path}: ")
        if not passphrase:
            raise RpofsError("init: the passphrase is empty: nothing created")
        if getpass.getpass("the same again: ") != passphrase:
            raise RpofsError("init: the two passphrases differ: nothing created")
    else:
        raise RpofsError("init --encrypt: give the passphrase with --key-file, $RPOFS_KEY_FILE or $RPOFS_PASSPHRASE")
    repo = Repository.init(repo_path, passphrase)
    fingerprint = repo.keys.fingerprint
    repo.close()
    print(f"created encrypted repository {repo_path} (key fingerprint {fingerprint}); "
          f"without its passphrase it cannot be read")


def cmd_backup(repo_path: str, args) -> None:
    from .ingest.backup import BackupRequest, back_up
    from .ingest.config import Quiesce
    from .mount.vfs import point_json
    from .progress import Progress
    from .virt.client import Connection
    from .virt.disks import DiskChoice
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        # mountpoints named here must exist in the guest: a typo fails the
        # backup rather than recording a point that is not what was asked
        quiesce = Quiesce(True, tuple(args.quiesce), strict=True) if args.quiesce is not None else Quiesce()
        request = BackupRequest(args.vm, "asked for a full backup" if args.full else "",
                                DiskChoice(tuple(args.disk)), quiesce, lock_wait_s=args.wait)
        with Progress(f"backup of {args.vm}", 0) as progress:
            point = back_up(repo, conn, request, progress)
        for warning in point.warnings:
            print(f"rpofs: warning: {warning}", file=sys.stderr)
        if args.disk:
            every = [d.target for d in conn.domain(point.vm).info().disks]
            if len(point.disks) < len(every):
                print(f"rpofs: warning: this point holds only {', '.join(d.target for d in point.disks)} "
                      f"of {', '.join(every)}; the next backup without --disk covers every disk and so "
                      f"starts a new chain with a full", file=sys.stderr)
        if args.json:
            print(point_json(point.name, point).decode(), end="")
            return
        why = f" ({point.reason})" if point.reason else ""
        print(f"{point.vm_name}: {point.kind} point {point.name}: {point.stats['logical_bytes']} bytes read, "
              f"{point.stats['stored_bytes']} stored{why}")
    finally:
        conn.close()
        repo.close()


def cmd_protect(repo_path: str, args) -> None:
    from .progress import Progress
    from .protect import protector
    from .store import journal, protection
    from .store.vmlock import vm_lock
    from .virt.client import Connection
    from .virt.disks import DiskChoice
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        dom = conn.domain(args.vm)
        live = protection.current(repo, dom.uuid)
        with Progress(f"protect {dom.name}: the mirror's first pass", 0) as progress:
            session = protector.protect(repo, dom, DiskChoice(tuple(args.disk)), progress)
        if live is not None and live.started_us == session.started_us:
            with vm_lock(repo.path, dom.uuid, dom.name, "protect", 30.0):  # never beside the daemon's fold
                outcome = protector.tick(repo, dom, protection.current(repo, dom.uuid) or session,
                                         journal.reader(repo.path, session), True)
            session = outcome.session
            if outcome.ended:
                raise RpofsError(f"{dom.name}: protection ended: {outcome.ended}; back it up now with: "
                                 f"rpofs backup {dom.name}")
        _print_session(dom.name, session, args.json)
    finally:
        conn.close()
        repo.close()


def cmd_unprotect(repo_path: str, args) -> None:
    from .protect import protector
    from .virt.client import Connection
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        dom = conn.domain(args.vm)
        session = protector.unprotect(repo, dom)
        if session is None:
            raise RpofsError(f"{dom.name} is not protected")
        _print_session(dom.name, session, args.json)
    finally:
        conn.close()
        repo.close()


def _print_session(name: str, session, as_json: bool) -> None:
    from dataclasses import asdict
    from .timefmt import format_time
    if as_json:
        print(json.dumps(asdict(session), indent=2))
    elif session.state == "ended":
        print(f"{name}: protection ended ({session.reason}); its journal reads from "
              f"{format_time(session.ready_us, 6)} to {format_time(session.last_us, 6)}")
    else:
        print(f"{name}: protected since {format_time(session.ready_us, 6)} "
              f"({', '.join(d.target for d in session.disks)})")


def cmd_points(repo_path: str, args) -> None:
    from .store import shipments
    from .apps.view import app_point_json
    from .mount.vfs import point_json
    repo = open_repository(repo_path, args)
    try:
        vm = repo.find_vm(args.vm)[0]
        points = repo.points(vm)
        names = point_names([p.time_us for p in points], [p.name for p in points])
        by_no = {p.point: (n, p) for n, p in zip(names, points)}
        rows = [(p.time_us, 0, n, p) for n, p in zip(names, points)]
        rows += [(s.time_us, 1, s.name, s) for s in shipments.ships(repo, vm)]
        rows.sort(key=lambda row: row[:2])
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
    finally:
        repo.close()


def cmd_ship(repo_path: str, args) -> int:
    from .apps.shipper import Shipper
    from .apps.view import app_point_json
    from .ingest import config
    from .virt.client import Connection
    cfg = config.load(args.config or config.DEFAULT_CONFIG)
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        dom = conn.domain(args.vm)
        info = dom.info()
        apps = cfg.policy(info.name, info.uuid).apps
        if not apps:
            raise RpofsError(f"{args.config or config.DEFAULT_CONFIG} configures no apps for {info.name} "
                             f"([vm.{info.name}.apps.NAME])")
        unknown = set(args.app) - {a.name for a in apps}
        if unknown:
            raise RpofsError(f"{info.name} has no app {', '.join(sorted(unknown))} "
                             f"(it has {', '.join(a.name for a in apps)})")
        shipper = Shipper(repo, dom, info.uuid, info.name)
        made = []
        for app in apps:
            if args.app and app.name not in args.app:
                continue
            result = shipper.ship(app)
            for why in result.restarts:
                print(f"rpofs: {info.name}/{app.name}: started again: {why}", file=sys.stderr)
            if result.record is None:
                if not args.json:
                    print(f"{info.name}/{app.name}: nothing new")
                continue
            made.append(result.record)
            if not args.json:
                r = result.record
                where = f"extends point {r.base}" if r.base is not None else f"waiting for a block point: {r.waiting}"
                print(f"{info.name}/{app.name}: app point {r.name}: {result.bytes} bytes, {where}")
        if args.json:
            bases = {p.point: p for p in repo.points(info.uuid)}
            print(json.dumps([app_point_json(r, bases.get(r.base)) for r in made], indent=2))
    finally:
        conn.close()
        repo.close()


def cmd_mount(repo_path: str, args) -> None:
    from .mount.daemon import MountOptions, mount_background, mount_foreground
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
    from .mount.daemon import unmount
    unmount(os.path.abspath(args.mountpoint))


def cmd_ingest(repo_path: str, args) -> None:
    import dataclasses
    import signal

    import trio

    from .ingest import config, daemon
    cfg = config.load(args.config or config.DEFAULT_CONFIG)
    if args.repo or not cfg.repository:
        cfg = dataclasses.replace(cfg, repository=repo_path)
    if args.metrics is not None:
        try:
            config.check_metrics_address(args.metrics)
        except ValueError as e:
            raise config.ConfigError(f"--metrics: {e}") from None
        cfg = dataclasses.replace(cfg, metrics=args.metrics)
    keys = key_source(cfg.repository, args, cfg.key_file)
    Repository.open(cfg.repository, keys=keys).close()  # refuse a bad repository before starting anything

    async def until_signalled():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run, cfg, keys)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logging.getLogger("rpofs.ingest").info(
                        "event=stopping signal=%s (running jobs finish first)", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

    trio.run(until_signalled)


def cmd_prune(repo_path: str, args) -> None:
    from .ingest.config import parse_duration
    from .progress import Progress
    from .store.prune import Retention, prune_by_name
    if bool(args.vm) == args.all:
        raise RpofsError("prune: name one VM or give --all")
    counts = [args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly, args.keep_monthly]
    if any(n < 0 for n in counts):
        raise RpofsError("prune: --keep-* counts must be 0 or more")
    try:
        within = parse_duration(args.keep_within) if args.keep_within is not None else 0.0
    except ValueError as e:
        raise RpofsError(f"prune: --keep-within: {e}") from None
    policy = Retention(args.keep_last, within, args.keep_hourly, args.keep_daily, args.keep_weekly,
                       args.keep_monthly)
    if policy.keeps_everything():
        raise RpofsError("prune: no --keep-* option given: nothing says what to keep")
    repo = open_repository(repo_path, args)
    try:
        for ref in [uuid for uuid, _ in repo.vms()] if args.all else [args.vm]:
            name, report = prune_by_name(repo, ref, policy, args.dry_run,
                                         progress=lambda name: Progress(f"prune {name}: compacting", 0))
            if args.dry_run:
                gone = point_names_of(repo, report.points_removed)
                print(f"{name}: would remove {len(gone)} points, keep {report.points_kept}")
                for n in gone:
                    print(f"  {n}")
            else:
                print(f"{name}: {report.summary()}")
    finally:
        repo.close()


def cmd_verify(repo_path: str, args) -> int:
    from .progress import Progress
    from .store import verify
    if args.vm and args.all:
        raise RpofsError("verify: name one VM or give --all, not both")
    repo = open_repository(repo_path, args)
    try:
        vm = repo.find_vm(args.vm)[0] if args.vm else None
        with Progress("verify", 0, enabled=None if args.read_data else False) as progress:
            report = verify.verify(repo, vm, args.read_data, progress)
        verify.save(repo_path, report)
    finally:
        repo.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print("\n".join(verify.describe(report)))
    return 0 if report.ok else EXIT_ERROR


def cmd_upgrade(repo_path: str, args) -> None:
    import dataclasses

    from .progress import Progress
    from .store.upgrade import upgrade
    with Progress("upgrade", 0) as progress:
        report = upgrade(repo_path, progress, key_source(repo_path, args))
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
    else:
        print(f"{repo_path}: {report.summary()}")
    if report.chunks_damaged:
        return EXIT_ERROR


def cmd_forget(repo_path: str, args) -> None:
    from .progress import Progress
    from .store.forget import forget_by_name
    repo = open_repository(repo_path, args)
    try:
        if args.dry_run:
            name, report = forget_by_name(repo, args.vm, dry_run=True)
            gone = point_names_of(repo, report.points_removed)
            print(f"{name}: would remove all {len(gone)} points and the data only they use")
            for n in gone:
                print(f"  {n}")
            return
        name, report = forget_by_name(repo, args.vm, progress=lambda name: Progress(f"forget {name}: compacting", 0))
        print(f"{name}: forgotten; {report.summary()}")
    finally:
        repo.close()


def cmd_defrag(repo_path: str, args) -> None:
    from .progress import Progress
    from .store.defrag import defrag_by_name
    if bool(args.vm) == args.all:
        raise RpofsError("defrag: name one VM or give --all")
    repo = open_repository(repo_path, args)
    try:
        for ref in [uuid for uuid, _ in repo.vms()] if args.all else [args.vm]:
            name, report = defrag_by_name(repo, ref, budget=1 << 62,  # run by hand: all of it at once
                                          progress=lambda name: Progress(f"defrag {name}", 0))
            print(f"{name}: {report.summary()}")
    finally:
        repo.close()


def point_names_of(repo, points) -> list[str]:
    """The names the mount gives these points (names depend on their neighbours)."""
    if not points:
        return []
    every = repo.points(points[0].vm)
    names = dict(zip((p.point for p in every), point_names([p.time_us for p in every], [p.name for p in every])))
    return [names[p.point] for p in points]


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
    from .progress import Progress
    from .store.restore import parse_disk_ref, restore_disk
    repo = open_repository(repo_path, args)
    try:
        with Progress(f"restore {parse_disk_ref(args.source)[2]}", 0) as progress:
            size, written = restore_disk(repo, args.source, args.dest, args.force, progress)
    finally:
        repo.close()
    print(f"{args.dest}: {size} bytes, {written} written")


def restore_vm(repo_path: str, args) -> None:
    from .recover.restore_vm import VmRestoreOptions, restore_vm as restore
    from .virt.client import Connection
    if args.dest:
        raise RpofsError("restore --vm: no DEST: the disks go into --dir")
    vm, when = split_vm_time(args.source)
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        done = restore(repo, conn, vm, when, VmRestoreOptions(args.name, args.dir, args.format, args.replace,
                                                              args.force, args.start))
    finally:
        conn.close()
        repo.close()
    for note in done.notes:
        print(f"rpofs: note: {note}", file=sys.stderr)
    print(f"{done.name}: defined{' and started' if args.start else ''}, {done.bytes_written} bytes written")
    for target, path in done.disks.items():
        print(f"  {target}: {path}")


def cmd_run(repo_path: str, args) -> None:
    from .recover import instant
    from .virt.client import Connection
    if not (args.source or args.move or args.stop or args.list):
        raise RpofsError("run: give VM@TIME, or --move NAME, --stop NAME or --list")
    if args.source and (args.move or args.stop or args.list):
        raise RpofsError("run: VM@TIME does not go with --move, --stop or --list")
    repo = open_repository(repo_path, args)
    conn = Connection(args.connect)
    try:
        if args.list:
            _print_runs(instant.listing(repo, conn), args.json)
        elif args.stop:
            rec = instant.stop(repo, conn, args.stop)
            print(f"{rec.name}: stopped and removed")
        elif args.move:
            from .recover.restore_vm import DEFAULT_DIR
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
    finally:
        conn.close()
        repo.close()


def _print_runs(states, as_json: bool) -> None:
    from .timefmt import format_time
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


def cmd_status(repo_path: str, args) -> None:
    from .ingest.status import gather, render
    repo = open_repository(repo_path, args)
    try:
        report = gather(repo)
        if repo.encrypted:
            report["encryption"] = {"cipher": "aes-256-gcm", "key_fingerprint": repo.keys.fingerprint}
    finally:
        repo.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(render(report))
    if "encryption" in report:
        print(f"repository: encrypted, key fingerprint {report['encryption']['key_fingerprint']}")


def cmd_cp(repo_path: str, args) -> None:
    from .files.copy import copy_out
    repo = open_repository(repo_path, args)
    try:
        copy_out(repo, args.source, args.dest, args.recursive, args.force)
    finally:
        repo.close()


COMMANDS = {"init": cmd_init, "backup": cmd_backup, "points": cmd_points, "mount": cmd_mount,
            "umount": cmd_umount, "ingest": cmd_ingest, "status": cmd_status, "prune": cmd_prune,
            "defrag": cmd_defrag, "forget": cmd_forget, "upgrade": cmd_upgrade, "verify": cmd_verify, "restore": cmd_restore, "cp": cmd_cp, "run": cmd_run, "ship": cmd_ship,
            "protect": cmd_protect, "unprotect": cmd_unprotect}

if __name__ == "__main__":
    sys.exit(main())
