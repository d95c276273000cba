"""Real level: continuous protection (rpofs.protect, docs/PROTECT.md) of
VMs without an OS, written through QEMU's device (HMP qemu-io: the write
goes through the mirror as a guest's does). A write's issue and its
acknowledgement are timed on the host around the monitor call, so an
instant T must show exactly the first k writes with every write acked
before T in and none issued after T out."""

import json
import os
import random
import subprocess
import threading
import time

import libvirt
import pytest

from vmlab import TestVM, WriteLog, make_qcow2, mounted, points_json, run_rpofs, seeded_content, wait_for

from rpofs.store.repo import Repository
from rpofs.store.materialize import DiskReader
from rpofs.timefmt import format_time

pytestmark = pytest.mark.libvirt

SIZES = (8 << 20, 3 << 20)


def _vm(tmp_path, name, persistent=False):
    contents = [seeded_content(size, seed) for seed, size in enumerate(SIZES)]
    disks = []
    for i, content in enumerate(contents):
        path = str(tmp_path / f"disk{i}.qcow2")
        make_qcow2(path, bytes(content))
        disks.append((path, "qcow2"))
    return TestVM(name, disks, persistent=persistent), contents


def _writes(log: WriteLog, vms, rnd: random.Random, n: int, pause_s: float = 0.0) -> None:
    for i in range(n):
        disk = rnd.randrange(len(SIZES))
        length = rnd.choice((512, 4096, 65536, 65536 + 512, 200 * 1024))
        offset = rnd.randrange(0, SIZES[disk] - length) // 512 * 512
        log.write(vms, 0, disk, offset, length, None if rnd.random() < 0.1 else rnd.randrange(1, 256))
        if pause_s:
            time.sleep(pause_s)


def _read_disks(root, names) -> list[bytes]:
    out = []
    for target in ("vda", "vdb"):
        with open(os.path.join(root, f"{target}.raw"), "rb") as f:
            out.append(f.read())
    return out


def _k_of(log: WriteLog, disks: list[bytes], ks: range) -> int | None:
    """The k in ks whose state the disks hold, or None."""
    for k in ks:
        if [bytes(d) for d in log.state(0, k)] == disks:
            return k
    return None


def test_every_instant_holds_exactly_the_writes_acknowledged_before_it(tmp_path):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    vm, contents = _vm(tmp_path, f"rpofs-pt-{os.getpid()}")
    log = WriteLog([contents])
    rnd = random.Random(12)
    try:
        out = json.loads(run_rpofs("protect", vm.name, "--json", repo=repo).stdout)
        assert out["state"] == "protected" and out["ready_us"] > 0
        _writes(log, [vm], rnd, 40, pause_s=0.003)
        run_rpofs("protect", vm.name, repo=repo)       # folds what the journal holds
        _writes(log, [vm], rnd, 40, pause_s=0.003)
        points = points_json(repo, vm.name)
        assert [p["kind"] for p in points] == ["full", "log"] and {p["origin"] for p in points} == {"journal"}
        with mounted(repo, tmp_path / "mnt") as mnt:
            vmdir = mnt / vm.name
            # the full is the disks as the mirror's first pass left them: before any write
            assert _read_disks(vmdir / points[0]["name"], None) == [bytes(c) for c in contents]
            # instants between the writes, around them, and at each write's own ack
            times = [w[5] for w in log.writes] + [w[6] for w in log.writes]
            times += [rnd.uniform(log.writes[0][5], log.writes[-1][6]) for _ in range(20)]
            checked = set()
            for t in sorted(times):
                text = format_time(int(t * 1e6), 6)
                link = os.readlink(vmdir / "at" / text)
                ks = log.candidates(int(t * 1e6) / 1e6, 0.0)
                k = _k_of(log, _read_disks(vmdir / "at" / text, None), ks)
                assert k is not None, f"at/{text} -> {link}: not the state after any of writes {ks}"
                checked.add(link)
            assert len(checked) > 20
            listed = [n for n in os.listdir(vmdir) if n.endswith("Z") and len(n) == 27]
            assert listed, "no journal instant is listed"
            meta = json.loads((vmdir / listed[0] / "point.json").read_text())
            assert meta["kind"] == "journal" and meta["base"]["name"] in {p["name"] for p in points}
            # newest: everything
            latest = os.readlink(vmdir / "latest")
            assert _read_disks(vmdir / latest, None) == [bytes(d) for d in log.state(0, len(log.writes))]
        ended = json.loads(run_rpofs("unprotect", vm.name, "--json", repo=repo).stdout)
        assert ended["state"] == "ended" and ended["last_us"] >= int(log.writes[-1][5] * 1e6)
        # the last fold holds every write; a backup after extends it from its checkpoint
        _writes(log, [vm], rnd, 5)
        run_rpofs("backup", vm.name, repo=repo)
        points = points_json(repo, vm.name)
        assert points[-1]["kind"] == "log" and points[-1]["origin"] == "backup"
        r = Repository.open(str(repo))
        try:
            last = r.points(vm.uuid)[-1]
            got = [bytes(DiskReader(r, last, t).read(0, s)) for t, s in zip(("vda", "vdb"), SIZES)]
        finally:
            r.close()
        assert got == [bytes(d) for d in log.state(0, len(log.writes))]
    finally:
        vm.destroy()
