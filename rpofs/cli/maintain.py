"""Keeping the repository: rpofs prune (retention), forget (a VM gone),
verify (proof it is intact), defrag (newest points quick to read)."""

import json

from ..errors import RpofsError
from ..timefmt import point_names
from .common import EXIT_ERROR, open_repository


def add_prune(sub) -> None:
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
    pr.set_defaults(func=cmd_prune)


def add_forget(sub) -> None:
    fg = sub.add_parser("forget", help="remove every point of a VM (one decommissioned) and the data only it used",
                        description="Removes all of the VM's points, its chains' index entries and the data no "
                        "other VM uses, under the repository's exclusive lock; the VM leaves rpofs points, the "
                        "mount and rpofs status. Refused while a VM started by rpofs run reads one of its points. "
                        "A VM still backed up (the ingester) comes back with a new full.")
    fg.add_argument("vm", help="VM name or UUID (as recorded in the repository)")
    fg.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")
    fg.set_defaults(func=cmd_forget)


def add_verify(sub) -> None:
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
    vf.set_defaults(func=cmd_verify)


def add_defrag(sub) -> None:
    df = sub.add_parser("defrag", help="rewrite a VM's scattered log blocks in disk order, so that its "
                        "newest points read like a full",
                        description="Moves the log blocks each chain's newest point reads and that lie "
                        "scattered (runs under 1 MiB) into one pack file in disk order, with the unchanged "
                        "blocks of full chunks that logs changed at least half of; what every point holds "
                        "is unchanged. The ingester does this every defrag_interval.")
    df.add_argument("vm", nargs="?", help="VM name or UUID (as recorded in the repository)")
    df.add_argument("--all", action="store_true", help="every VM in the repository")
    df.set_defaults(func=cmd_defrag)


PARSERS = {"prune": add_prune, "forget": add_forget, "verify": add_verify, "defrag": add_defrag}


def point_names_of(repo, points) -> list[str]:
    """The names the mount gives these points (names depend on their neighbours)."""
    if not points:
        return []
    every = repo.points(points[0].vm)
    names = dict(zip((p.point for p in every), point_names([p.time_us for p in every], [p.name for p in every])))
    return [names[p.point] for p in points]


def cmd_prune(repo_path: str, args) -> None:
    from ..ingest.config import parse_duration
    from ..progress import Progress
    from ..store.prune import Retention, prune_by_name
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
    with open_repository(repo_path, args) as repo:
        for ref in [uuid for uuid, _ in repo.vms()] if args.all else [args.vm]:
            name, report = prune_by_name(repo, ref, policy, args.dry_run,
                                         progress=lambda name: Progress(f"prune {name}: compacting", 0))
            if args.dry_run:
                gone = point_names_of(repo, report.points_removed)
                apps = (f" and {report.ships_removed} app points" if report.ships_removed else "")
                unbased = (f" ({report.ships_unbased} app points would be left without a base, waiting)"
                           if report.ships_unbased else "")
                print(f"{name}: would remove {len(gone)} points{apps}, keep {report.points_kept}{unbased}")
                for n in gone:
                    print(f"  {n}")
                for ship in report.app_points_removed:
                    print(f"  {ship.name} (app point of {ship.app})")
            else:
                print(f"{name}: {report.summary()}")


def cmd_forget(repo_path: str, args) -> None:
    from ..progress import Progress
    from ..store.forget import forget_by_name
    with open_repository(repo_path, args) as repo:
        if args.dry_run:
            name, report = forget_by_name(repo, args.vm, dry_run=True)
            gone = point_names_of(repo, report.points_removed)
            print(f"{name}: would remove all {len(gone)} points and the data only they use")
            for n in gone:
                print(f"  {n}")
            return
        name, report = forget_by_name(repo, args.vm, progress=lambda name: Progress(f"forget {name}: compacting", 0))
        print(f"{name}: forgotten; {report.summary()}")


def cmd_verify(repo_path: str, args) -> int:
    from ..progress import Progress
    from ..store import verify
    if args.vm and args.all:
        raise RpofsError("verify: name one VM or give --all, not both")
    with open_repository(repo_path, args) as repo:
        vm = repo.find_vm(args.vm)[0] if args.vm else None
        with Progress("verify", 0, enabled=None if args.read_data else False) as progress:
            report = verify.verify(repo, vm, args.read_data, progress)
        verify.save(repo_path, report)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print("\n".join(verify.describe(report)))
    return 0 if report.ok else EXIT_ERROR


def cmd_defrag(repo_path: str, args) -> None:
    from ..progress import Progress
    from ..store.defrag import BY_HAND, defrag_by_name
    if bool(args.vm) == args.all:
        raise RpofsError("defrag: name one VM or give --all")
    with open_repository(repo_path, args) as repo:
        for ref in [uuid for uuid, _ in repo.vms()] if args.all else [args.vm]:
            name, report = defrag_by_name(repo, ref, budget=BY_HAND,
                                          progress=lambda name: Progress(f"defrag {name}", 0))
            print(f"{name}: {report.summary()}")
