"""Recovery-point times: names in the mount, and times people type.

Times are integers of microseconds since the epoch, UTC. A point's name is its
time in UTC, "2026-11-24T18:59:30Z", with fractional digits only when another
point of the same VM already holds that name: the fewest digits that make it
new (truncated, never rounded, so a name's interval holds its point's time).
A name is chosen once, when the point is committed, and stored with it: a
name once printed names the same point for as long as the point exists,
whatever points come or go around it. (Points committed before names were
stored are named as they were then: the fewest digits that tell apart the
unnamed points of one second; prune and the next point of that second store
those names, so they do not change either.)

A typed time denotes an interval, as precise as it was written: "18:59:30Z"
means the whole second. A point's name resolves to that point first
(`Repository.point_at`, the mount's `at/`), then as of the interval.
"""

import datetime as dt
import re

from .errors import BadTime

US = 1_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def now_us() -> int:
    return int(dt.datetime.now(dt.timezone.utc).timestamp() * US)


def format_time(time_us: int, digits: int = 0) -> str:
    seconds, micros = divmod(time_us, US)
    text = (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{micros:06d}"[:digits]
    return text + "Z"


def point_names(times: list[int], stored: list[str] | None = None) -> list[str]:
    """Names for one VM's points, times sorted ascending: the stored name
    where a point has one, else the rule points had before names were
    stored, applied to the unnamed points of each second."""
    stored = stored or [""] * len(times)
    names = list(stored)
    i = 0
    while i < len(times):
        j = i
        while j + 1 < len(times) and times[j + 1] // US == times[i] // US:
            j += 1
        legacy = [k for k in range(i, j + 1) if not stored[k]]
        digits = 0
        while len({times[k] % US // 10 ** (6 - digits) for k in legacy}) < len(legacy):
            digits += 1
        for k in legacy:
            names[k] = format_time(times[k], digits)
        i = j + 1
    return names


def new_point_name(time_us: int, taken: set[str]) -> str:
    """The name of a point being committed: its time to the second, or
    with the fewest fractional digits that no other point of the VM's
    holds. Two points in one microsecond (never seen) get "~2", "~3"."""
    for digits in range(7):
        name = format_time(time_us, digits)
        if name not in taken:
            return name
    n = 2
    while f"{format_time(time_us, 6)[:-1]}~{n}Z" in taken:
        n += 1
    return f"{format_time(time_us, 6)[:-1]}~{n}Z"


_EPOCH_RE = re.compile(r"^\d{1,12}(\.\d{1,6})?$")
_FRACTION_RE = re.compile(r"[T ]\d\d:\d\d:\d\d\.(\d+)")


def parse_as_of(text: str) -> int:
    """The last microsecond of the interval a typed time denotes.

    Accepts RFC 3339 / ISO 8601 with a zone ("Z" or "+01:00"), or epoch
    seconds. A time without a zone is refused: it would mean different
    instants on different hosts.
    """
    if _EPOCH_RE.match(text):
        whole, _, frac = text.partition(".")
        start = int(whole) * US + int(frac.ljust(6, "0") or 0)
        return start + 10 ** (6 - len(frac)) - 1
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadTime(f"cannot read time {text!r}: use e.g. 2026-11-24T18:59:30Z or epoch seconds") from None
    if when.tzinfo is None:
        raise BadTime(f"time {text!r} has no zone: add Z for UTC or an offset like +01:00")
    start = (when - _EPOCH) // dt.timedelta(microseconds=1)
    fraction = _FRACTION_RE.search(text)
    precision_us = 10 ** (6 - min(len(fraction.group(1)), 6)) if fraction else US
    return start - start % precision_us + precision_us - 1
