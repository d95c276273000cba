"""The ingester's configuration: TOML, parsed once into frozen dataclasses.
A bad file is refused with the file, the key and what is wrong. The format
is documented in docs/INGEST.md, with an example in systemd/rpofs.toml.

The per-VM settings that floors below the ingester take are built here and
declared there: DiskChoice (rpofs.virt.disks, for backups and protection)
and AppConfig (rpofs.vmconfig, for rpofs.apps). Quiesce, which only the
backup machinery (rpofs.ingest.backup) reads, is declared here."""

import dataclasses
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field

from ..errors import RpofsError
from ..store.prune import Retention
from ..virt.disks import DiskChoice
from ..vmconfig import AppConfig

DEFAULT_CONFIG = "/etc/rpofs/rpofs.toml"


class ConfigError(RpofsError):
    pass


@dataclass(frozen=True)
class Quiesce:
    """Freeze guest filesystems through the agent around the snapshot."""
    enabled: bool = False
    mountpoints: tuple[str, ...] = ()   # empty: every filesystem
    timeout_s: float = 10.0
    strict: bool = False                # a mountpoint the guest lacks fails the backup (the command
                                        # line); else the point is crash-consistent, with a warning


STALE_INTERVALS = 3      # an app's newest readable app point older than this many intervals...
STALE_MARGIN_S = 10.0    # ...and than its interval plus this is stale: its log is not being shipped


def app_stale(age_s: float | None, interval_s: float) -> bool:
    """Whether an app shipped every interval_s is behind: no readable app
    point, or the newest one older than the schedule and a rebase allow."""
    return age_s is None or age_s > max(STALE_INTERVALS * interval_s, interval_s + STALE_MARGIN_S)


_APP_KINDS = ("sqlite", "files")
# what a path may hold: it reaches the guest's /bin/sh for a glob (rpofs.apps.guestio)
_GUEST_PATH = re.compile(r"^/[A-Za-z0-9_.,+@%=:/*?\[\]-]*$")


@dataclass(frozen=True)
class VmPolicy:
    full_interval_s: float = 24 * 3600.0
    log_interval_s: float = 5.0
    disks: DiskChoice = DiskChoice()
    quiesce: Quiesce = Quiesce()
    retention: Retention = Retention()     # keeps everything unless a keep_* key is given
    prune_interval_s: float = 600.0
    defrag_interval_s: float = 600.0       # how often a VM's newest chain is defragmented (0: never)
    apps: tuple[AppConfig, ...] = ()       # application logs shipped through the guest agent
    # continuous protection (rpofs.protect, docs/PROTECT.md): the disks mirrored into the
    # journal, folded into a log point every journal_fold; the journal's microsecond
    # instants kept keep_journal_within, then only the folds
    continuous: bool = False
    journal_fold_s: float = 60.0
    keep_journal_within_s: float = 3600.0


@dataclass(frozen=True)
class IngestConfig:
    uri: str = "qemu:///system"
    repository: str = ""                # "" : --repo, $RPOFS_REPO or /var/lib/rpofs
    max_jobs: int = 2
    vms: tuple[str, ...] = ()           # names or UUIDs; empty: every running VM
    exclude: tuple[str, ...] = ()       # glob patterns on names
    defaults: VmPolicy = VmPolicy()
    per_vm: dict = field(default_factory=dict)   # name or UUID -> VmPolicy
    metrics: str = ""                   # "ADDR:PORT" for Prometheus, "" for none
    # rpofs verify on schedule (rpofs.store.verify): every verify_interval the
    # catalog and every record header; while a read-data pass is under way
    # (one starts every verify_read_data_interval) also the data of the next
    # verify_read_mib MiB of packs, so one run's I/O stays bounded. 0: never.
    verify_interval_s: float = 3600.0
    verify_read_data_interval_s: float = 7 * 86400.0
    verify_read_mib: int = 4096
    key_file: str = ""                  # an encrypted repository's passphrase: this file's first line
    max_agent_calls: int = 8            # app shipping rounds (guest agent reads) running at once

    def policy(self, name: str, uuid: str) -> VmPolicy:
        return self.per_vm.get(name) or self.per_vm.get(uuid) or self.defaults

    def wants(self, name: str, uuid: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        return not self.vms or name in self.vms or uuid in self.vms


_ZERO = re.compile(r"^\s*0+(\.0*)?\s*(ms|s|m|h|d|w)?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(text: str) -> float:
    """Seconds in "500ms", "5s", "10m", "24h", "7d", "2w" (a bare number: seconds); ValueError if not."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a duration like 500ms, 5s, 10m, 24h, 7d, 2w, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$")


def check_metrics_address(text: str) -> tuple[str, int]:
    """(host, port) of "ADDRESS:PORT" ("127.0.0.1:9101", "[::1]:9101",
    "localhost:9101", ":9101" for every address); ValueError saying what is
    wrong otherwise."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or ("[" not in host and ":" in host) or (host and not _HOST.match(host)):
        raise ValueError(f"expected ADDRESS:PORT (e.g. 127.0.0.1:9101, [::1]:9101), got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} is not in 1-65535 in {text!r}")
    return host.strip("[]"), int(port)


class _Reader:
    """Reads values out of one TOML table, naming the key in every error."""

    def __init__(self, path: str, table: dict, prefix: str):
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, what: str):
        raise ConfigError(f"{self.path}: {self.prefix}{key}: {what}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def string(self, key, default):
        v = self.table.get(key, default)
        if not isinstance(v, str) or (not v and default):
            self.fail(key, f"expected a non-empty string, got {v!r}")
        return v

    def strings(self, key) -> tuple[str, ...]:
        v = self.table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            self.fail(key, f"expected a list of strings, got {v!r}")
        return tuple(v)

    def boolean(self, key, default: bool) -> bool:
        v = self.table.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {v!r}")
        return v

    def integer(self, key, default, low):
        v = self.table.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            self.fail(key, f"expected an integer >= {low}, got {v!r}")
        return v

    def duration(self, key, default, zero_means: str = "") -> float:
        """A positive duration; 0 too when zero_means says what it means
        (e.g. "never")."""
        v = self.table.get(key)
        if v is None:
            return default
        if zero_means and (v == 0 or (isinstance(v, str) and _ZERO.match(v))):
            return 0.0
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
        try:
            return parse_duration(v if isinstance(v, str) else "")
        except ValueError:
            also = f", or 0s ({zero_means})" if zero_means else ""
            self.fail(key, f"expected a duration like 500ms, 5s, 10m, 24h, 7d{also}, got {v!r}")


def _policy(r: _Reader, base: VmPolicy) -> VmPolicy:
    r.check_keys({"full_interval", "log_interval", "disks", "quiesce", "quiesce_timeout", "prune_interval",
                  "defrag_interval", "apps", "continuous", "journal_fold", "keep_journal_within",
                  *_KEEP_COUNTS, "keep_within"})
    disks = base.disks
    if "disks" in r.table:
        v = r.table["disks"]
        if v == "all":
            disks = DiskChoice()
        elif isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
            disks = DiskChoice(targets=tuple(v))
        elif isinstance(v, dict) and set(v) == {"mountpoint"} and isinstance(v["mountpoint"], str) \
                and v["mountpoint"].startswith("/"):
            disks = DiskChoice(mountpoint=v["mountpoint"])
        else:
            r.fail("disks", f'expected "all", a list of targets, or {{ mountpoint = "/path" }}, got {v!r}')
    quiesce = base.quiesce
    if "quiesce" in r.table:
        v = r.table["quiesce"]
        if v == "none":
            quiesce = Quiesce(False, (), quiesce.timeout_s)
        elif v == "all":
            quiesce = Quiesce(True, (), quiesce.timeout_s)
        elif isinstance(v, list) and v and all(isinstance(x, str) and x.startswith("/") for x in v):
            quiesce = Quiesce(True, tuple(v), quiesce.timeout_s)
        else:
            r.fail("quiesce", f'expected "none", "all" or a list of guest mountpoints, got {v!r}')
    quiesce = Quiesce(quiesce.enabled, quiesce.mountpoints, r.duration("quiesce_timeout", quiesce.timeout_s))
    full = r.duration("full_interval", base.full_interval_s)
    log = r.duration("log_interval", base.log_interval_s)
    if log > full:
        r.fail("log_interval", f"is longer than full_interval ({log:g}s > {full:g}s)")
    base_keep = base.retention
    retention = Retention(**{field: r.integer(key, getattr(base_keep, field), 0) for key, field in _KEEP_COUNTS.items()},
                          within_s=r.duration("keep_within", base_keep.within_s) if "keep_within" in r.table
                          else base_keep.within_s)
    return VmPolicy(full, log, disks, quiesce, retention, r.duration("prune_interval", base.prune_interval_s),
                    r.duration("defrag_interval", base.defrag_interval_s, zero_means="never"),
                    continuous=r.boolean("continuous", base.continuous),
                    journal_fold_s=r.duration("journal_fold", base.journal_fold_s),
                    keep_journal_within_s=r.duration("keep_journal_within", base.keep_journal_within_s,
                                                     zero_means="fold and drop at once"))


_KEEP_COUNTS = {"keep_last": "last", "keep_hourly": "hourly", "keep_daily": "daily", "keep_weekly": "weekly",
                "keep_monthly": "monthly"}


def _apps(r: _Reader) -> tuple[AppConfig, ...]:
    table = r.table.get("apps", {})
    if not isinstance(table, dict):
        r.fail("apps", "expected a table of applications ([vm.NAME.apps.APP])")
    out = []
    for name, app in table.items():
        if not isinstance(app, dict):
            r.fail(f"apps.{name}", "expected a table")
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name) or name.startswith("."):
            r.fail(f"apps.{name}", "an app's name is 1-64 letters, digits, '_', '-' or '.'")
        a = _Reader(r.path, app, f"{r.prefix}apps.{name}.")
        a.check_keys({"kind", "path", "interval"})
        kind = a.string("kind", "sqlite")
        if kind not in _APP_KINDS:
            a.fail("kind", f"expected one of {', '.join(_APP_KINDS)}, got {kind!r}")
        path = a.string("path", "")
        if not path or not _GUEST_PATH.match(path) or "//" in path or "/../" in path + "/":
            a.fail("path", f"expected an absolute guest path of plain characters, got {path!r}")
        if kind == "sqlite" and any(c in path for c in "*?["):
            a.fail("path", "a sqlite app names one database, not a glob")
        if any(c in path.rpartition("/")[0] for c in "*?["):
            a.fail("path", "wildcards are allowed in the file name only")
        out.append(AppConfig(name, kind, path, a.duration("interval", 1.0)))
    return tuple(out)


def load(path: str) -> IngestConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (see systemd/rpofs.toml for an example)") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    top = _Reader(path, data, "")
    top.check_keys({"ingest", "defaults", "vm"})
    for key in ("ingest", "defaults", "vm"):
        if not isinstance(data.get(key, {}), dict):
            top.fail(key, "expected a table")
    ingest = _Reader(path, data.get("ingest", {}), "ingest.")
    ingest.check_keys({"uri", "repository", "max_jobs", "vms", "exclude", "metrics", "key_file", "verify_interval",
                       "verify_read_data_interval", "verify_read_mib", "max_agent_calls"})
    vms = ingest.table.get("vms", "running")
    if vms != "running" and not (isinstance(vms, list) and all(isinstance(x, str) and x for x in vms)):
        ingest.fail("vms", f'expected "running" or a list of VM names/UUIDs, got {vms!r}')
    metrics = ingest.string("metrics", "")
    if metrics:
        try:
            check_metrics_address(metrics)
        except ValueError as e:
            ingest.fail("metrics", str(e))
    defaults = _policy(_Reader(path, data.get("defaults", {}), "defaults."), VmPolicy())
    per_vm = {}
    for name, table in data.get("vm", {}).items():
        if not isinstance(table, dict):
            top.fail(f"vm.{name}", "expected a table")
        reader = _Reader(path, table, f"vm.{name}.")
        per_vm[name] = dataclasses.replace(_policy(reader, defaults), apps=_apps(reader))
    return IngestConfig(
        uri=ingest.string("uri", "qemu:///system"),
        repository=ingest.string("repository", ""),
        max_jobs=ingest.integer("max_jobs", 2, 1),
        vms=() if vms == "running" else tuple(vms),
        exclude=ingest.strings("exclude"),
        defaults=defaults, per_vm=per_vm, metrics=metrics, key_file=ingest.string("key_file", ""),
        verify_interval_s=ingest.duration("verify_interval", 3600.0, zero_means="never"),
        verify_read_data_interval_s=ingest.duration("verify_read_data_interval", 7 * 86400.0, zero_means="never"),
        verify_read_mib=ingest.integer("verify_read_mib", 4096, 1),
        max_agent_calls=ingest.integer("max_agent_calls", 8, 1))
