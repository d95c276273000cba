"""Taking points: rpofs backup (one now), rpofs ship (an application's log
once now), rpofs ingest (the daemon, on schedule), rpofs status (how that
goes)."""

import json
import logging
import sys

from ..errors import RpofsError
from ..store.repo import Repository
from .common import add_connect, connect, key_source, open_repository


def add_backup(sub) -> None:
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
    add_connect(b)
    b.add_argument("--json", action="store_true", help="print the new point as point.json (its name is what "
                   "scripts keep: it names this point for as long as it exists)")
    b.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait while another backup of the VM runs (default 30)")
    b.set_defaults(func=cmd_backup)


def add_ship(sub) -> None:
    sh = sub.add_parser("ship", help="ship a VM's application logs once now (the ingester ships every interval)",
                        description="Reads through the guest agent what each application configured for the "
                        "VM ([vm.NAME.apps.APP] in the config) appended since its last shipment, and records "
                        "it as an app point extending the newest block point that holds the application's "
                        "files in the state the log continues (docs/APPS.md).")
    sh.add_argument("vm", help="VM name or UUID")
    sh.add_argument("--app", action="append", default=[], metavar="APP", help="only this app (repeatable)")
    sh.add_argument("--config", default=None, metavar="FILE", help="the ingester's config (default /etc/rpofs/rpofs.toml)")
    add_connect(sh)
    sh.add_argument("--json", action="store_true", help="the new app points as JSON")
    sh.set_defaults(func=cmd_ship)


def add_ingest(sub) -> None:
    i = sub.add_parser("ingest", help="the daemon: full and log backups on schedule, per the config",
                       description="Runs until SIGTERM/SIGINT; logs to stderr (journald). "
                       "--repo overrides the config's repository.")
    i.add_argument("--config", default=None, metavar="FILE", help="TOML config (default /etc/rpofs/rpofs.toml)")
    i.add_argument("--metrics", default=None, metavar="ADDR:PORT", help="serve Prometheus metrics there")
    i.set_defaults(func=cmd_ingest, daemon=True)


def add_status(sub) -> None:
    s = sub.add_parser("status", help="per VM: last full, last log, achieved RPO, next run, last error")
    s.add_argument("--json", action="store_true", help="one JSON object (documented in docs/INGEST.md)")
    s.set_defaults(func=cmd_status)


PARSERS = {"backup": add_backup, "ship": add_ship, "ingest": add_ingest, "status": add_status}


def cmd_backup(repo_path: str, args) -> None:
    from ..ingest.backup import BackupRequest, back_up
    from ..ingest.config import Quiesce
    from ..virt.disks import DiskChoice
    from ..mount.pointfiles import point_json
    from ..progress import Progress
    with open_repository(repo_path, args) as repo, connect(args) as conn:
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


def cmd_ship(repo_path: str, args) -> None:
    from ..apps.shipper import Shipper
    from ..apps.view import app_point_json
    from ..ingest import config
    cfg = config.load(args.config or config.DEFAULT_CONFIG)
    with open_repository(repo_path, args) as repo, connect(args) as conn:
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


def cmd_ingest(repo_path: str, args) -> None:
    import dataclasses
    import signal

    import trio

    from ..ingest import config, daemon
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


def cmd_status(repo_path: str, args) -> None:
    from ..ingest.status import gather, render
    with open_repository(repo_path, args) as repo:
        report = gather(repo)
        if repo.encrypted:
            report["encryption"] = {"cipher": "aes-256-gcm", "key_fingerprint": repo.keys.fingerprint}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(render(report))
    if "encryption" in report:
        print(f"repository: encrypted, key fingerprint {report['encryption']['key_fingerprint']}")
