"""Real level (a VM without an OS): `rpofs run --move` killed at a random
moment leaves the VM running on a complete chain, and run again it
finishes; the moved disk is the point's, byte for byte, and sparse."""

import json
import os
import random
import signal
import subprocess
import time
import uuid

import libvirt
import pytest

from vmlab import RPOFS, URI, TestVM, make_qcow2, mounted, points_json, run_rpofs, seeded_content

pytestmark = pytest.mark.libvirt

MiB = 1 << 20


def test_an_interrupted_move_is_run_again(tmp_path):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    disk = str(tmp_path / "d.qcow2")
    make_qcow2(disk, bytes(seeded_content(192 * MiB, 11)))
    vm = TestVM(f"rpofs-mv-{uuid.uuid4().hex[:8]}", [(disk, "qcow2")])
    conn = libvirt.open(URI)
    name = f"{vm.name}-copy"
    try:
        run_rpofs("backup", vm.name, repo=repo)
        point = points_json(repo, vm.name)[-1]
        run_rpofs("run", f"{vm.name}@latest", "--name", name, repo=repo)
        copy = conn.lookupByName(name)
        dest = tmp_path / "moved"
        dest.mkdir()
        for attempt in range(3):  # killed at a few random moments, each left running
            mover = subprocess.Popen(RPOFS + ["--repo", str(repo), "run", "--move", name, "--dir", str(dest)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(random.uniform(0.05, 0.6))
            mover.send_signal(signal.SIGKILL if attempt % 2 else signal.SIGINT)
            mover.wait(timeout=60)
            assert copy.isActive()
            if mover.returncode == 0:
                break  # it finished before the signal
        moved = run_rpofs("run", "--move", name, "--dir", dest, repo=repo, check=False)
        listed = [r["name"] for r in json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout)]
        if moved.returncode != 0:  # only possible when an attempt above had finished the move
            assert "no VM named" in moved.stderr and name not in listed
        assert name not in listed
        image = dest / f"{name}-vda.qcow2"
        assert sorted(os.listdir(dest)) == [image.name]
        with mounted(repo, tmp_path / "mnt") as mnt:
            same = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(image),
                                   os.path.join(mnt, vm.name, point["name"], "vda.raw")],
                                  capture_output=True, text=True)
            assert same.returncode == 0, same.stdout + same.stderr
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["actual-size"] < 0.8 * info["virtual-size"]  # seeded_content is ~40 % zeros
        assert copy.isActive()
        assert not os.listdir(repo / "holds")
    finally:
        try:
            dom = conn.lookupByName(name)
            dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        run_rpofs("run", "--stop", name, repo=repo, check=False)
        conn.close()
        vm.destroy()
