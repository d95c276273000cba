"""The ingester's config: the documented example parses; every mistake is
refused naming the file and the key. Pure: no libvirt."""

import os
import subprocess

import pytest

from rpofs.ingest.config import ConfigError, load
from rpofs.store.prune import Retention
from rpofs.vmconfig import AppConfig

pytestmark = pytest.mark.pure
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_example_parses():
    cfg = load(os.path.join(ROOT, "systemd", "rpofs.toml"))
    assert cfg.vms == () and cfg.exclude == ("scratch-*",) and cfg.max_jobs == 2
    assert cfg.defaults.log_interval_s == 5 and cfg.defaults.full_interval_s == 24 * 3600
    db1 = cfg.policy("db1", "some-uuid")
    assert db1.log_interval_s == 2 and db1.full_interval_s == 24 * 3600
    assert db1.disks.mountpoint == "/var/lib/postgresql"
    assert db1.quiesce.enabled and db1.quiesce.mountpoints == ("/var/lib/postgresql",)
    assert cfg.policy("web1", "u") == cfg.defaults
    assert cfg.defaults.retention == Retention(within_s=2 * 86400, hourly=48, daily=30, weekly=8)
    assert db1.retention == Retention(within_s=7 * 86400, hourly=48, daily=30, weekly=8)  # the rest inherited
    assert cfg.defaults.prune_interval_s == 600 and cfg.defaults.defrag_interval_s == 600
    assert cfg.wants("web1", "u") and not cfg.wants("scratch-7", "u")
    assert (cfg.verify_interval_s, cfg.verify_read_data_interval_s, cfg.verify_read_mib) == (3600, 7 * 86400, 4096)


@pytest.mark.parametrize("text, where, what", [
    ('[defaults]\nlog_interval = "soon"', "defaults.log_interval", "expected a duration"),
    ('[defaults]\nlog_interval = "2h"\nfull_interval = "1h"', "defaults.log_interval", "longer than full_interval"),
    ('[ingest]\nmax_jobs = 0', "ingest.max_jobs", "integer >= 1"),
    ('[ingest]\nkey_file = 7', "ingest.key_file", "expected a non-empty string"),
    ('[ingest]\nvms = "all"', "ingest.vms", '"running" or a list'),
    ('[ingest]\nmetrics = "nowhere"', "ingest.metrics", "ADDRESS:PORT"),
    ('[ingest]\nmetrics = "127.0.0.1:99999"', "ingest.metrics", "port 99999 is not in 1-65535"),
    ('[ingest]\nmetrics = "127.0.0.1:0"', "ingest.metrics", "port 0 is not in 1-65535"),
    ('[ingest]\nmetrics = "::1:9101"', "ingest.metrics", "ADDRESS:PORT"),
    ('[ingest]\nrepo = "/x"', "ingest.repo", "unknown key"),
    ('[vm.db1]\nquiesce = "yes"', "vm.db1.quiesce", '"none", "all" or a list'),
    ('[vm.db1]\ndisks = { mountpoint = "relative" }', "vm.db1.disks", "mountpoint"),
    ('[vm.db1]\nlog_interval = -1', "vm.db1.log_interval", "expected a duration"),
    ('[defaults]\nkeep_daily = -1', "defaults.keep_daily", "integer >= 0"),
    ('[defaults]\nkeep_within = "forever"', "defaults.keep_within", "expected a duration"),
    ('[vm.db1]\nkeep = 3', "vm.db1.keep", "unknown key"),
    ('[vm.db1]\ndefrag_interval = "often"', "vm.db1.defrag_interval", "expected a duration"),
    ('[ingest]\nverify_interval = "daily"', "ingest.verify_interval", "expected a duration"),
    ('[ingest]\nverify_read_mib = 0', "ingest.verify_read_mib", "integer >= 1"),
    ('[vm.db1.apps.o]\nkind = "postgres"\npath = "/x"', "vm.db1.apps.o.kind", "expected one of sqlite, files"),
    ('[vm.db1.apps.o]\nkind = "sqlite"', "vm.db1.apps.o.path", "absolute guest path"),
    ('[vm.db1.apps.o]\npath = "/data/*.db"', "vm.db1.apps.o.path", "one database, not a glob"),
    ('[vm.db1.apps.o]\nkind = "files"\npath = "/logs/*/a.log"', "vm.db1.apps.o.path", "file name only"),
    ('[vm.db1.apps.o]\nkind = "files"\npath = "/logs/$(reboot)"', "vm.db1.apps.o.path", "plain characters"),
    ('[vm.db1.apps.o]\npath = "/x"\ninterval = "now"', "vm.db1.apps.o.interval", "expected a duration"),
    ('[vm.db1.apps.o]\npath = "/x"\ntable = "t"', "vm.db1.apps.o.table", "unknown key"),
    ('[vm.db1.apps."a b"]\npath = "/x"', "vm.db1.apps.a b", "an app's name"),
    ("[ingest\n", "", "not valid TOML"),
])
def test_mistakes_name_file_and_key(tmp_path, text, where, what):
    path = tmp_path / "rpofs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert str(e.value).startswith(f"{path}: {where}") and what in str(e.value)


def test_apps_are_read_per_vm(tmp_path):
    path = tmp_path / "rpofs.toml"
    path.write_text('[ingest]\nmax_agent_calls = 3\n[vm.db1.apps.orders]\npath = "/data/db.sqlite"\n'
                    '[vm.db1.apps.journal]\nkind = "files"\npath = "/logs/*.log"\ninterval = "2s"\n')
    cfg = load(str(path))
    assert cfg.max_agent_calls == 3 and cfg.defaults.apps == ()
    assert cfg.policy("db1", "").apps == (AppConfig("orders", "sqlite", "/data/db.sqlite", 1.0),
                                           AppConfig("journal", "files", "/logs/*.log", 2.0))


def test_cli_refuses_a_bad_config_in_one_line(tmp_path):
    path = tmp_path / "rpofs.toml"
    path.write_text('[defaults]\nlog_interval = "soon"\n')
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "rpofs"), "--repo", str(tmp_path / "r"), "ingest",
                        "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "defaults.log_interval" in r.stderr


@pytest.mark.parametrize("value, what", [("nonsense", "expected ADDRESS:PORT"),
                                         ("127.0.0.1:99999", "port 99999 is not in 1-65535")])
def test_cli_refuses_a_bad_metrics_address_in_one_line(tmp_path, value, what):
    """Before anything starts: no repository, no libvirt connection, no listener."""
    path = tmp_path / "rpofs.toml"
    path.write_text("[ingest]\n")
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "rpofs"), "--repo", str(tmp_path / "r"), "ingest",
                        "--config", str(path), "--metrics", value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("rpofs: --metrics: ") and what in r.stderr


def test_metrics_addresses_that_are_right():
    from rpofs.ingest.config import check_metrics_address
    assert check_metrics_address("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert check_metrics_address("[::1]:9101") == ("::1", 9101)
    assert check_metrics_address("localhost:65535") == ("localhost", 65535)
    assert check_metrics_address(":9101") == ("", 9101)


def test_systemd_units_verify():
    units = [os.path.join(ROOT, "systemd", u) for u in ("rpofs-ingest.service", "rpofs-mount.service")]
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_schedule_logs_on_the_interval_and_a_new_chain_when_the_full_is_old():
    from rpofs.ingest.config import VmPolicy
    from rpofs.ingest.daemon import _next_due
    from rpofs.store.schema import PointRecord
    policy = VmPolicy(full_interval_s=100.0, log_interval_s=5.0)

    def point(kind, t):
        return PointRecord(point=1, vm="u", vm_name="m", kind=kind, time_us=int(t * 1e6), chain=1, parent=None,
                           consistency="crash-consistent", disks=(), checkpoint="", domain_xml="")

    assert _next_due(50.0, None, None, policy) == (50.0, "")              # nothing yet: now, a full
    full = point("full", 1000.0)
    assert _next_due(1001.0, full, full, policy) == (1005.0, "")          # a log, 5 s after the last point
    log = point("log", 1097.0)
    due, reason = _next_due(1098.0, log, full, policy)                    # the full is 100 s old by then
    assert due == 1100.0 and "full interval elapsed" in reason


def test_defrag_interval_zero_means_never_and_other_intervals_refuse_zero(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[defaults]\ndefrag_interval = "0s"\n')
    assert load(str(path)).defaults.defrag_interval_s == 0
    path.write_text('[defaults]\nlog_interval = "0s"\n')
    with pytest.raises(ConfigError, match="log_interval"):
        load(str(path))


def test_key_file_is_read_for_an_encrypted_repository(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\nkey_file = "/etc/rpofs/key"\n')
    assert load(str(path)).key_file == "/etc/rpofs/key"
    path.write_text("[ingest]\n")
    assert load(str(path)).key_file == ""


def test_continuous_protection_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[defaults]\njournal_fold = "30s"\n[vm.db1]\ncontinuous = true\nkeep_journal_within = "2h"\n')
    cfg = load(str(path))
    db1, other = cfg.policy("db1", "u"), cfg.policy("web1", "u")
    assert (db1.continuous, db1.journal_fold_s, db1.keep_journal_within_s) == (True, 30.0, 7200.0)
    assert (other.continuous, other.journal_fold_s, other.keep_journal_within_s) == (False, 30.0, 3600.0)
    for text, what in (('continuous = "yes"', "vm.db1.continuous: expected true or false"),
                       ('journal_fold = "0s"', "vm.db1.journal_fold: expected a duration"),
                       ('keep_journal_within = "soon"', "vm.db1.keep_journal_within: expected a duration")):
        path.write_text(f"[vm.db1]\n{text}\n")
        with pytest.raises(ConfigError, match=what):
            load(str(path))
