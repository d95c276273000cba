"""Real level: the small Linux guest of tools/mkguest boots under libvirt (TCG),
its agent answers and freezes both data filesystems, and after a power-off its
disks hold one consecutive sequence in the log and in the database."""

import os
import subprocess
import time
import uuid

import pytest

from guestlab import MKGUEST, Guest, build_guest, read_db, read_log

pytestmark = pytest.mark.libvirt

ARTIFACTS = ("vmlinuz", "initrd", "log_img", "db_img")


def wait_progress(guest, at_least, timeout=30.0):
    deadline = time.monotonic() + timeout
    while guest.progress() < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"workload not at {at_least} after {timeout} s\n{guest.console_tail()}")
        time.sleep(0.2)
    return guest.progress()


def test_build_is_cached():
    m = build_guest()
    assert m["kernel_version"].endswith("-cloud-amd64")
    stamps = {k: os.stat(m[k]).st_mtime_ns for k in ARTIFACTS}
    out = subprocess.run([str(MKGUEST)], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == os.path.join(os.path.dirname(m["vmlinuz"]), "guest.json")
    assert {k: os.stat(m[k]).st_mtime_ns for k in ARTIFACTS} == stamps  # nothing rebuilt


def test_boot_agent_freeze_and_consistent_sequence(tmp_path):
    m = build_guest()
    with Guest(f"rpofs-guest-{uuid.uuid4().hex[:8]}", tmp_path) as g:
        assert g.agent("guest-ping") == {}
        mounts = {fs["mountpoint"]: fs["type"] for fs in g.agent("guest-get-fsinfo")}
        assert mounts == {"/data/log": "ext4", "/data/db": "ext4"}

        wait_progress(g, 5)
        assert g.dom.fsFreeze() == 2
        try:
            # frozen: writes block, so at most the row already past its writes gets printed
            frozen = g.progress()
            time.sleep(1.5)
            assert g.progress() <= frozen + 1, g.console_tail()
        finally:
            assert g.dom.fsThaw() == 2
        wait_progress(g, frozen + 3)
        done = g.progress()  # printed only after its row was committed
    # destroyed (power cut); now read what the disks hold
    raws = {}
    for disk in ("log", "db"):
        raws[disk] = str(tmp_path / f"{disk}.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / f"{disk}.qcow2"), raws[disk]],
                       check=True)
    log, db = read_log(raws["log"]), read_db(raws["db"])
    L, M = len(log), len(db)
    assert [n for n, _ in log] == list(range(1, L + 1))
    assert [n for n, _ in db] == list(range(1, M + 1))
    assert L - M in (0, 1), (L, M)  # the log line is made durable before the row
    assert M >= done
    assert log[:M] == db  # same t for the same n
    assert all(a[1] <= b[1] for a, b in zip(log, log[1:]))
    # the bases were never written
    assert read_log(m["log_img"]) == [] and read_db(m["db_img"]) == []
