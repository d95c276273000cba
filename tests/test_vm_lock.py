"""Real level (a VM without an OS, real `rpofs` processes): backups of one
VM never run at once. Concurrent `rpofs backup` processes wait for each
other (or, told not to wait, say who runs); the ingester and backups by
hand share the VM too. Each time: one chain in time order, no unplanned
full, and libvirt keeps only the newest point's checkpoint."""

import os
import signal
import subprocess
import time
import uuid

import pytest

from rpofs.store.vmlock import vm_lock
from vmlab import RPOFS, TestVM, make_qcow2, point_count, points_json, run_rpofs, seeded_content, wait_for

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


@pytest.fixture
def vm(tmp_path):
    disk = str(tmp_path / "d.qcow2")
    make_qcow2(disk, bytes(seeded_content(128 * MiB, 21)))
    machine = TestVM(f"rpofs-lock-{uuid.uuid4().hex[:8]}", [(disk, "qcow2")])
    yield machine
    machine.destroy()


def one_chain_in_order(repo, vm) -> list[dict]:
    points = points_json(repo, vm.name)
    assert [p["kind"] for p in points] == ["full"] + ["log"] * (len(points) - 1), points
    assert [p["parent"] for p in points[1:]] == [p["point"] for p in points[:-1]]
    assert [p["time"] for p in points] == sorted(p["time"] for p in points)
    assert vm.checkpoints() == [points[-1]["checkpoint"]]
    return points


def backups(repo, vm, n, *extra):
    return [subprocess.Popen(RPOFS + ["--repo", str(repo), "backup", vm.name, *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def test_concurrent_backups_wait_for_each_other(tmp_path, vm):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    procs = backups(repo, vm, 3)
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    one_chain_in_order(repo, vm)
    run_rpofs("backup", vm.name, repo=repo)
    assert len(one_chain_in_order(repo, vm)) == 4  # the next plain backup is a log too


def test_a_backup_that_cannot_wait_says_who_runs(tmp_path, vm):
    """Another job holds the VM (here: this test process): a backup waits
    --wait seconds, then says who, and records nothing."""
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    run_rpofs("backup", vm.name, repo=repo)
    with vm_lock(str(repo), vm.uuid, vm.name, "backup", 0):
        started = time.monotonic()
        second = run_rpofs("backup", vm.name, "--wait", "1", repo=repo, check=False)
        assert time.monotonic() - started >= 1.0
    assert second.returncode == 1
    assert second.stderr.strip() == f"rpofs: a backup (pid {os.getpid()}) of {vm.name} is running; " \
                                    f"try again when it has ended"
    assert len(one_chain_in_order(repo, vm)) == 1
    run_rpofs("backup", vm.name, repo=repo)  # once it has ended
    assert len(one_chain_in_order(repo, vm)) == 2


def test_the_ingester_and_backups_by_hand_share_the_vm(tmp_path, vm):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    config = tmp_path / "rpofs.toml"
    config.write_text(f'[ingest]\nvms = ["{vm.name}"]\n[defaults]\nlog_interval = "1s"\n')
    log_path = tmp_path / "ingest.log"
    with open(log_path, "ab") as out:
        daemon = subprocess.Popen(RPOFS + ["--repo", str(repo), "ingest", "--config", str(config)],
                                  stdout=out, stderr=out)
    try:
        wait_for(lambda: point_count(repo, vm.name) >= 1, timeout=60, what="the daemon's first point")
        for i in range(4):
            vm.write(0, i * MiB, 65536, i + 1)
            procs = backups(repo, vm, 2)
            assert all(p.wait(timeout=120) == 0 for p in procs), [p.communicate() for p in procs]
            for p in procs:
                p.communicate()
        time.sleep(2)  # and the daemon's own next points
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log_path.read_text()
    text = log_path.read_text()
    assert "Traceback" not in text and "event=backup-failed" not in text, text
    assert len(one_chain_in_order(repo, vm)) >= 9
