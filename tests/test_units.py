"""The systemd units in systemd/: systemd's own checker (`systemd-analyze
verify`) passes them, and their order at boot is the one run VMs need —
the mounts their overlays read are served before libvirt starts them
(rpofs-run-mount.service for REPO/run/mnt, rpofs-mount.service for
/mnt/rpo), pulled in by libvirt itself; the ingester after libvirt. The
run mount unit's command parses and, with no run VM, is done at once.
(The unit serving a real mount before a real VM starts: test_recover_reboot.)"""

import configparser
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.pure

UNITS = pathlib.Path(__file__).resolve().parent.parent / "systemd"
LIBVIRT = ("libvirtd.service", "virtqemud.service", "libvirt-guests.service")


def unit(name: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str  # keys are case-sensitive
    parsed.read(UNITS / name)
    return parsed


def words(parsed, section: str, key: str) -> list[str]:
    return parsed[section].get(key, "").split()


def test_systemd_analyze_verify_passes_every_unit():
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: tools/setup installs systemd"
    units = sorted(str(p) for p in UNITS.glob("*.service"))
    assert len(units) == 3
    # it checks that ExecStart's program exists: tools/setup links /usr/local/bin/rpofs
    assert os.path.exists("/usr/local/bin/rpofs"), "run tools/setup: it links /usr/local/bin/rpofs"
    done = subprocess.run([tool, "verify", *units], capture_output=True, text=True, timeout=120, cwd=UNITS)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "rpofs" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_run_vms_mounts_come_before_libvirt():
    run = unit("rpofs-run-mount.service")
    assert set(LIBVIRT) <= set(words(run, "Unit", "Before"))
    assert {"libvirtd.service", "virtqemud.service", "multi-user.target"} <= set(words(run, "Install", "WantedBy"))
    assert run["Service"]["Type"] == "notify"
    env = dict(a.partition("=")[::2] for a in shlex.split(run["Service"]["Environment"]))
    repo = env["RPOFS_REPO"]
    assert words(run, "Unit", "RequiresMountsFor") == [repo]
    assert shlex.split(run["Service"]["ExecStart"]) == ["/usr/local/bin/rpofs", "run", "--serve-mount"]
    assert shlex.split(run["Service"]["ExecStop"].lstrip("-")) == ["/usr/local/bin/rpofs", "umount",
                                                                   f"{repo}/run/mnt"]
    mount = unit("rpofs-mount.service")
    assert set(LIBVIRT) <= set(words(mount, "Unit", "Before"))  # run VMs may read /mnt/rpo too
    ingest = unit("rpofs-ingest.service")
    assert "libvirtd.service" in words(ingest, "Unit", "After")


def test_the_run_mount_units_command_with_no_run_vm_is_done_at_once(tmp_path):
    """No repository, no libvirt needed to find there is nothing to serve
    (libvirtd waits for this unit: it must not ask libvirt anything)."""
    env = dict(os.environ, RPOFS_REPO=str(tmp_path), LIBVIRT_DEFAULT_URI="test:///nowhere")
    env.pop("NOTIFY_SOCKET", None)
    done = subprocess.run([sys.executable, "-m", "rpofs.cli", "run", "--serve-mount"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "", f"rpofs: no VM started by rpofs run reads {tmp_path}/run/mnt: nothing to serve\n")
