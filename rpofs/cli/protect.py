"""Continuous protection by hand: rpofs protect, rpofs unprotect
(rpofs.protect.protector decides; this parses and prints)."""

import json

from ..errors import RpofsError
from .common import add_connect, connect, open_repository


def add_protect(sub) -> None:
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
    add_connect(pt)
    pt.add_argument("--json", action="store_true", help="the session as JSON")
    pt.set_defaults(func=cmd_protect)


def add_unprotect(sub) -> None:
    up = sub.add_parser("unprotect", help="end a VM's continuous protection (its journal is folded into a "
                        "last point first)")
    up.add_argument("vm", help="VM name or UUID")
    add_connect(up)
    up.add_argument("--json", action="store_true", help="the ended session as JSON")
    up.set_defaults(func=cmd_unprotect)


PARSERS = {"protect": add_protect, "unprotect": add_unprotect}


def cmd_protect(repo_path: str, args) -> None:
    from ..progress import Progress
    from ..protect import protector
    from ..virt.disks import DiskChoice
    with open_repository(repo_path, args) as repo, connect(args) as conn:
        dom = conn.domain(args.vm)
        outcome = protector.protect_by_hand(
            repo, dom, DiskChoice(tuple(args.disk)),
            progress=lambda name: Progress(f"protect {name}: the mirror's first pass", 0))
        _print_session(dom.name, outcome.session, args.json, outcome.point)


def cmd_unprotect(repo_path: str, args) -> None:
    from ..protect import protector
    with open_repository(repo_path, args) as repo, connect(args) as conn:
        dom = conn.domain(args.vm)
        session = protector.unprotect(repo, dom)
        if session is None:
            raise RpofsError(f"{dom.name} is not protected")
        _print_session(dom.name, session, args.json)


def _print_session(name: str, session, as_json: bool, point=None) -> None:
    from dataclasses import asdict
    from ..protect.protector import readable_span
    from ..timefmt import format_time
    if as_json:
        print(json.dumps(dict(asdict(session), point=point.name if point else None), indent=2))
        return
    if session.state == "ended":
        span = readable_span(session)
        print(f"{name}: protection ended ({session.reason}); " + (
            f"its journal reads from {format_time(span[0], 6)} to {format_time(span[1], 6)}" if span
            else "its journal holds no write after protection began"))
    else:
        print(f"{name}: protected since {format_time(session.ready_us, 6)} "
              f"({', '.join(d.target for d in session.disks)})")
    if point is not None:
        print(f"{name}: folded into point {point.name}")
