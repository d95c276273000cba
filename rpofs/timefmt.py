"""Recovery-point times: names in the mount, and times people type.

Times are integers of microseconds since the epoch, UTC. A point's name is its
time in UTC, "2026-11-24T18:59:30Z", with fractional digits only when another
point of the same VM falls in the same second (then the fewest digits that tell
those points apart). A typed time denotes an interval, as precise as it was
written: "18:59:30Z" means the whole second, so the as-of point of a name is
that point itself.
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


def point_names(times: list[int]) -> list[str]:
    """Names for one VM's point times (sorted ascending, distinct)."""
    names = []
    i = 0
    while i < len(times):
        j = i
        while j + 1 < len(times) and times[j + 1] // US == times[i] // US:
            j += 1
        group = times[i:j + 1]
        digits = 0
        while len({t % US // 10 ** (6 - digits) for t in group}) < len(group):
            digits += 1
        names.extend(format_time(t, digits) for t in group)
        i = j + 1
    return names


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
