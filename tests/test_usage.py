"""The lines a user meets first, each at the lowest level that shows it (pure:
no repository, no FUSE, no libvirt): the command line's help and exit
statuses, a --repo that is a file, a mountpoint that is not empty, status
never showing a next run in the past, the metrics' exposition, point.json
notes on one line, progress on a terminal only."""

import io
import os
import subprocess
import sys

import pytest

from rpofs.errors import MountError
from rpofs.files.volumes import DiskFiles, one_line
from rpofs.ingest import metrics, status
from rpofs.ingest.config import app_stale
from rpofs.ingest.daemon import AppStatus, VmStatus
from rpofs.mount.daemon import check_mountpoint
from rpofs.progress import Progress

pytestmark = pytest.mark.pure

RPOFS = [sys.executable, "-m", "rpofs.cli"]


def rpofs(*args, env=None):
    return subprocess.run(RPOFS + [str(a) for a in args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_no_arguments_print_the_help_and_usage_errors_exit_2():
    r = rpofs()
    assert r.returncode == 2 and r.stdout.startswith("usage: rpofs") and "forget" in r.stdout and not r.stderr
    for args in (["bogus"], ["prune", "--keep-last", "x"], ["backup"]):
        r = rpofs(*args)
        assert r.returncode == 2 and "usage: rpofs" in r.stderr, (args, r)


def test_repo_naming_a_file_says_so_in_one_line(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a repository\n")
    for args in (["init"], ["points", "x"], ["status"], ["forget", "x"]):
        r = rpofs("--repo", path, *args)
        assert r.returncode == 1, (args, r)
        assert r.stderr == f"rpofs: {path} is a file, not a repository directory\n", (args, r.stderr)
    r = rpofs("status", env={"RPOFS_REPO": str(path)})
    assert r.returncode == 1 and "is a file, not a repository directory" in r.stderr
    assert path.read_text() == "not a repository\n"


def test_a_mountpoint_that_is_not_empty_is_refused(tmp_path):
    check_mountpoint(str(tmp_path))  # empty: fine
    (tmp_path / "hidden").write_text("x")
    with pytest.raises(MountError, match="is not empty: the mount would hide its files"):
        check_mountpoint(str(tmp_path))
    (tmp_path / "hidden").unlink()
    (tmp_path / ".dot").mkdir()
    with pytest.raises(MountError, match="is not empty"):
        check_mountpoint(str(tmp_path))
    r = rpofs("--repo", tmp_path / "nothing", "mount", tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is not empty" in r.stderr


def test_status_never_shows_a_next_run_in_the_past():
    US = 1_000_000
    now = 1_000 * US
    assert status.next_run_state(None, "waiting", now) is None
    assert status.next_run_state(now + 1, "waiting", now) == "scheduled"
    assert status.next_run_state(now - 1 * US, "waiting", now) == "due"
    assert status.next_run_state(now - 60 * US, "waiting", now) == "overdue"
    assert status.next_run_state(now - 600 * US, "backing up", now) == "due"  # its job runs
    vm = {"name": "db1", "rpo_seconds": 3.0, "points": 2, "last_full": "T0", "last_log": "T1", "last_error": None,
          "next_run": "2026-11-30T10:00:00.000Z"}
    report = {"ingester": {"running": True, "pid": 1}, "vms": [vm]}
    lines = {}
    for state, daemon_state in (("scheduled", "waiting"), ("due", "waiting"), ("due", "backing up"),
                                ("overdue", "failing")):
        vm.update(next_run_state=state, state=daemon_state)
        lines[state, daemon_state] = status.render(report).splitlines()[1]
    assert lines["scheduled", "waiting"].endswith(", waiting, next 2026-11-30T10:00:00.000Z")
    assert lines["due", "waiting"].endswith(", waiting, due now")
    assert lines["due", "backing up"].endswith(", backing up")
    assert lines["overdue", "failing"].endswith(", failing, overdue since 2026-11-30T10:00:00.000Z")


def test_status_shows_each_vms_last_verify():
    vm = {"name": "db1", "rpo_seconds": 1.0, "points": 2, "last_full": "T0", "last_log": "T1", "state": "waiting",
          "next_run_state": None, "last_error": None, "verify": None}
    report = {"ingester": {"running": False, "pid": None}, "vms": [vm]}
    assert status.render(report).splitlines()[1].endswith(", waiting, never verified")
    vm["verify"] = {"at": "T2", "read_data": True, "ok": True, "points_damaged": 0}
    assert status.render(report).splitlines()[1].endswith(", verified T2 (data read): ok")
    vm["verify"] = {"at": "T3", "read_data": False, "ok": False, "points_damaged": 4}
    assert status.render(report).splitlines()[1].endswith(", verified T3 (catalog): DAMAGED, 4 points read EIO")


def test_metrics_have_help_and_type_and_escape_labels():
    web = VmStatus("u1", 'we"b\\1')
    web.newest_point_us, web.last_success_us, web.last_job_s, web.points = 4 * 10**6, 5 * 10**6, 0.25, 3
    web.state = "backing up"
    web.job_bytes_done, web.job_bytes_total = 10, 40
    idle = VmStatus("u2", "idle")  # nothing taken yet: no age, no last success
    verified = {"vms": {"u1": {"time_us": 3 * 10**6, "read_data": True, "ok": False, "points_damaged": 2}},
                "repository": {"garbage_bytes": 77}}
    text = metrics.render([web, idle], 12345, 6 * 10**6, verified)
    lines = text.splitlines()
    for name, (kind, _) in metrics.METRICS.items():
        at = lines.index(f"# TYPE {name} {kind}")
        assert lines[at - 1].startswith(f"# HELP {name} ")
    label = '{vm="we\\"b\\\\1",uuid="u1"}'
    for sample in (f'rpofs_build_info{{version="{metrics.version()}"}} 1', "rpofs_repository_bytes 12345",
                   f"rpofs_rpo_age_seconds{label} 2.000", f"rpofs_last_success_timestamp_seconds{label} 5.000",
                   f"rpofs_last_job_duration_seconds{label} 0.250", f"rpofs_points_total{label} 3",
                   f"rpofs_job_bytes_done{label} 10", f"rpofs_job_bytes_total{label} 40",
                   'rpofs_points_total{vm="idle",uuid="u2"} 0', f"rpofs_verify_timestamp_seconds{label} 3.000",
                   f"rpofs_verify_damaged_points{label} 2", "rpofs_verify_garbage_bytes 77"):
        assert sample in lines, sample
    assert not any(line.startswith(("rpofs_rpo_age_seconds{vm=\"idle\"", "rpofs_job_bytes_done{vm=\"idle\"",
                                    "rpofs_verify_timestamp_seconds{vm=\"idle\""))
                   for line in lines)
    unknown = metrics.render([], None, 0).splitlines()  # the size not known this time: left out
    assert not any(line.startswith("rpofs_repository_bytes ") for line in unknown)


def test_an_app_behind_its_interval_is_stale_in_status_and_metrics():
    """An app whose streams stall (a shipper that keeps finding nothing new)
    makes no app points: its newest readable one ages past what its interval
    allows, and status and the metrics say so."""
    assert not app_stale(2.5, 1.0) and app_stale(11.5, 1.0) and app_stale(None, 1.0)
    assert not app_stale(170.0, 60.0) and app_stale(181.0, 60.0)
    vm = VmStatus("u1", "db1")
    vm.apps = {"orders": AppStatus("orders", "sqlite", interval_s=1.0, readable_us=40 * 10**6),
               "fresh": AppStatus("fresh", "sqlite", interval_s=1.0, readable_us=59 * 10**6)}
    lines = metrics.render([vm], None, 60 * 10**6).splitlines()
    assert 'rpofs_app_stale{vm="db1",uuid="u1",app="orders"} 1' in lines
    assert 'rpofs_app_stale{vm="db1",uuid="u1",app="fresh"} 0' in lines
    assert 'rpofs_app_readable_age_seconds{vm="db1",uuid="u1",app="orders"} 20.000' in lines
    app = {"name": "orders", "kind": "sqlite", "path": "/db", "newest_readable": "T", "age_seconds": 20.0,
           "interval_seconds": 1.0, "stale": True, "state": "shipping", "waiting": None, "last_error": None}
    vm_row = {"name": "db1", "rpo_seconds": 1.0, "points": 2, "last_full": "T0", "last_log": "T1", "state": "waiting",
              "next_run_state": None, "last_error": None, "apps": [app]}
    shown = status.render({"ingester": {"running": True, "pid": 1}, "vms": [vm_row]})
    assert "app orders (sqlite /db): newest readable app point T (20.0s ago), shipping, STALE: older than its 1s " \
           "interval allows" in shown


def test_an_ended_sessions_span_never_ends_before_it_starts(capsys):
    """unprotect printed "reads from 16:20:05.075121Z to 16:20:05.027038Z":
    the last record older than the ready instant (nothing written after it).
    The span said is where instants can be read, or that there are none."""
    from rpofs.cli.protect import _print_session
    from rpofs.protect.protector import readable_span
    from rpofs.store.schema import ProtectionSession
    quiet = ProtectionSession("u1", 10, (), "ended", ready_us=5_075_121, last_us=5_027_038, reason="asked")
    busy = ProtectionSession("u1", 10, (), "ended", ready_us=5_000_000, last_us=9_000_000, reason="asked",
                             journal_from_us=6_000_000)
    assert readable_span(quiet) is None and readable_span(busy) == (6_000_000, 9_000_000)
    _print_session("db1", quiet, False)
    _print_session("db1", busy, False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "db1: protection ended (asked); its journal holds no write after protection began"
    assert lines[1] == ("db1: protection ended (asked); its journal reads from 1970-01-01T00:00:06.000000Z "
                        "to 1970-01-01T00:00:09.000000Z")


def test_notes_are_one_line_each_said_once():
    message = ("Unable to detect a valid partition scheme:\n- Invalid MBR boot signature. Expected 0xaa55, got 0x0.\n"
               "- Invalid MBR boot signature. Expected 0xaa55, got 0x0.\n- Invalid APM signature.")
    assert one_line(message) == ("Unable to detect a valid partition scheme: Invalid MBR boot signature. "
                                 "Expected 0xaa55, got 0x0; Invalid APM signature")
    zeros = bytes(4 << 20)  # no table, no filesystem: dissect's multi-line message
    disk = DiskFiles(lambda offset, length: zeros[offset:offset + length], len(zeros), "test disk")
    assert disk.volumes() == []
    assert len(disk.notes) == 1 and "\n" not in disk.notes[0]
    assert disk.notes[0].count("Invalid MBR boot signature") == 1


def test_progress_draws_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    shown = Tty()
    with Progress("restore vda", 0, stream=shown) as p:
        p.set(0, 4 << 20)
        p.add(4 << 20)
    assert shown.getvalue().startswith("\rrestore vda:") and "100.0% 4.0 MiB of 4.0 MiB" in shown.getvalue()
    assert shown.getvalue().endswith("\n") and "\n" not in shown.getvalue()[:-1]
    quiet = io.StringIO()
    with Progress("restore vda", 4 << 20, stream=quiet) as p:
        p.add(4 << 20)
    assert quiet.getvalue() == ""
