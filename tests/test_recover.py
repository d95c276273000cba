"""Real level, a real guest: whole VMs back from a point.

The guest (tools/mkguest) writes a marker file, a point is taken with its
filesystems frozen, then the marker changes. `rpofs run` of that point boots
a copy whose files read as at the point while the original runs on
untouched; the copy is moved to local images while its workload writes, the
mount goes, and the copy runs on; after it stops its disks are clean and
hold its writes. `rpofs restore --vm` writes disks byte-exact against the
point, and the restored domain boots; `--replace` puts a shut-off VM back.
"""

import datetime
import json
import os
import subprocess
import time
import uuid
from xml.etree import ElementTree as ET

import libvirt
import pytest

from guestlab import Guest, agent, build_guest, guest_read, guest_run, guest_write, read_db, read_log, wait_agent
from vmlab import URI, mounted, points_json, run_rpofs, wait_for

pytestmark = pytest.mark.libvirt

BEFORE, AFTER = b"before the point\n", b"after the point\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The original guest running, with one frozen point P between the two
    markers; the repository; libvirt."""
    build_guest()
    tmp = tmp_path_factory.mktemp("recover")
    repo = tmp / "repo"
    run_rpofs("init", repo=repo)
    conn = libvirt.open(URI)
    with Guest(f"rpofs-rc-{uuid.uuid4().hex[:8]}", tmp / "guest") as g:
        wait_for(lambda: g.progress() >= 3, timeout=60, what="the workload")
        guest_write(g.dom, "/data/log/marker", BEFORE)
        run_rpofs("backup", g.name, "--quiesce", repo=repo)
        guest_write(g.dom, "/data/log/marker", AFTER)
        point = points_json(repo, g.name)[-1]
        assert point["consistency"] == "filesystems-frozen"
        yield {"tmp": tmp, "repo": repo, "guest": g, "point": point, "conn": conn}
    for dom in conn.listAllDomains(0):  # whatever a failed test left
        if dom.name().startswith("rpofs-rc-"):
            with _quiet():
                dom.destroy()
            with _quiet():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                  | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    conn.close()


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is libvirt.libvirtError


def at_point(lab) -> tuple[list, list]:
    """The guest's log and database as the point holds them (read through the mount)."""
    g, p = lab["guest"], lab["point"]
    with mounted(lab["repo"], lab["tmp"] / "mnt-read") as mnt:
        base = os.path.join(mnt, g.name, p["name"])
        return read_log(os.path.join(base, "vda.raw")), read_db(os.path.join(base, "vdb.raw"))


def copy_log(dom) -> list[tuple[int, float]]:
    """The guest's /data/log/seq.log as read_log gives it: (n, t) pairs."""
    return [(int(n), float(t)) for n, t in (line.split() for line in
                                            guest_read(dom, "/data/log/seq.log").decode().splitlines())]


def test_run_boots_the_point_then_moves_off_the_mount_under_load(lab):
    g, p, repo, conn, tmp = lab["guest"], lab["point"], lab["repo"], lab["conn"], lab["tmp"]
    log_at, db_at = at_point(lab)
    name = f"rpofs-rc-copy-{uuid.uuid4().hex[:6]}"
    with mounted(repo, tmp / "mnt"):  # run uses the mount that is there
        out = run_rpofs("run", f"{g.name}@{p['name']}", "--name", name, "--no-network", repo=repo)
        assert out.stdout.strip() == name
        copy = conn.lookupByName(name)
        assert copy.UUIDString() != g.dom.UUIDString()
        wait_agent(copy, 90)
        # the copy's files read as at the point; the original is untouched
        assert guest_read(copy, "/data/log/marker") == BEFORE
        assert guest_read(g.dom, "/data/log/marker") == AFTER
        lines = copy_log(copy)
        assert lines[:len(log_at)] == log_at
        assert len(lines) >= len(log_at)
        rows = int(guest_run(copy, "/usr/bin/sqlite3", "-cmd", ".timeout 10000", "/data/db/seq.db",
                             f"SELECT count(*) FROM seq WHERE n <= {len(db_at)}"))  # the workload writes meanwhile
        assert rows == len(db_at)
        listed = json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout)
        mine = [r for r in listed if r["name"] == name]
        assert mine and mine[0]["state"] == "running" and mine[0]["on_overlays"] and mine[0]["point"] == p["point"]

        # the point is held while the copy runs on it: prune keeps it
        run_rpofs("backup", g.name, repo=repo)
        run_rpofs("prune", g.name, "--keep-last", "1", repo=repo)
        assert p["point"] in [q["point"] for q in points_json(repo, g.name)]

        # moved while its workload writes, then the mount goes: it runs on
        moved_dir = tmp / "moved"
        moved_dir.mkdir()
        before_move = len(copy_log(copy))
        run_rpofs("run", "--move", name, "--dir", moved_dir, repo=repo)
        sources = [s for s in _disk_sources(copy)]
        assert sources == [str(moved_dir / f"{name}-vda.qcow2"), str(moved_dir / f"{name}-vdb.qcow2")]
        assert sorted(os.listdir(moved_dir)) == sorted(os.path.basename(s) for s in sources)
    assert name not in [r["name"] for r in json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout)]
    try:
        wait_for(lambda: len(copy_log(copy)) >= before_move + 5, timeout=60, what="the copy's workload after the move")
    except AssertionError as e:
        raise AssertionError(f"{e} ({before_move} lines before it, {len(copy_log(copy))} now)\n"
                             f"{live_console(name)}") from None
    # frozen, its filesystems are clean on disk and hold what it wrote; then off like a power cut
    written = copy_log(copy)
    agent(copy, "guest-fsfreeze-freeze", timeout=30)
    copy.destroy()
    for target, disk in (("vda", "log"), ("vdb", "db")):
        raw = tmp / f"moved-{target}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(moved_dir / f"{name}-{target}.qcow2"), str(raw)],
                       check=True)
        check = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        if disk == "log":
            on_disk = read_log(raw)
            assert on_disk[:len(written)] == written and len(on_disk) >= before_move + 5
    copy.undefineFlags(0)


def test_run_stop_removes_what_run_made_and_nothing_else(lab):
    g, repo, conn = lab["guest"], lab["repo"], lab["conn"]
    name = run_rpofs("run", f"{g.name}@latest", "--no-start", repo=repo).stdout.strip()
    hhmm = time.strftime("%H%M", time.gmtime(_epoch(points_json(repo, g.name)[-1]["time"])))
    assert name.startswith(f"{g.name}-{hhmm}")
    rec = json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout)[0]
    assert rec["state"] == "shut off" and all(os.path.exists(f) for f in rec["files"])
    assert os.listdir(repo / "holds")
    run_dir = repo / "run"
    assert _is_mounted(run_dir / "mnt")
    run_rpofs("run", "--stop", name, repo=repo)
    assert name not in [d.name() for d in conn.listAllDomains(0)]
    assert not any(os.path.exists(f) for f in rec["files"])
    assert not os.listdir(repo / "holds")
    assert not _is_mounted(run_dir / "mnt")
    assert sorted(os.listdir(run_dir)) == [".lock", "mnt"]
    assert g.dom.isActive()  # the original runs on


def live_console(name: str, lines: int = 30) -> str:
    """The tail of a running VM's console log, read through QEMU's open
    descriptor (a moved copy's log file was in the run's directory, removed
    when the move ended)."""
    try:
        with open(f"/run/libvirt/qemu/{name}.pid") as f:
            pid = int(f.read())
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if "console.log" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                with open(f"/proc/{pid}/fd/{fd}", errors="replace") as f:
                    return "--- console (tail) ---\n" + "\n".join(f.read().splitlines()[-lines:])
    except OSError as e:
        return f"(no console: {e})"
    return "(no console log open in QEMU)"


def _is_mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _epoch(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _disk_sources(dom) -> list[str]:
    return [d.find("source").get("file") for d in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk")]


def test_restore_vm_byte_exact_boots_and_replace(lab):
    g, p, repo, conn, tmp = lab["guest"], lab["point"], lab["repo"], lab["conn"], lab["tmp"]
    images = tmp / "images"
    images.mkdir()
    name = f"rpofs-rc-r-{uuid.uuid4().hex[:6]}"
    out = run_rpofs("restore", f"{g.name}@{p['name']}", "--vm", "--name", name, "--dir", images, repo=repo)
    assert name in out.stdout
    with mounted(repo, tmp / "mnt-r") as mnt:
        for target in ("vda", "vdb"):
            image = images / f"{name}-{target}.qcow2"
            same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
                                   os.path.join(mnt, g.name, p["name"], f"{target}.raw")],
                                  capture_output=True, text=True)
            assert same.returncode == 0, same.stdout + same.stderr
            info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                             capture_output=True, text=True, check=True).stdout)
            assert info["actual-size"] < info["virtual-size"] // 4  # sparse: the 32 MiB disks hold ~2 MiB
    dom = conn.lookupByName(name)
    assert dom.isPersistent() and dom.UUIDString() != g.dom.UUIDString()
    dom.create()
    wait_agent(dom, 90)
    assert guest_read(dom, "/data/log/marker") == BEFORE

    # --replace: a point of the restored VM, the VM changed and shut off, then put back
    run_rpofs("backup", name, "--quiesce", repo=repo)
    q = points_json(repo, name)[-1]
    guest_write(dom, "/data/log/marker", b"changed\n")
    refused = run_rpofs("restore", f"{name}@{q['name']}", "--vm", "--replace", "--force", repo=repo, check=False)
    assert refused.returncode == 1 and "is running" in refused.stderr
    dom.destroy()
    digest = _digest(images)
    refused = run_rpofs("restore", f"{name}@{q['name']}", "--vm", "--replace", repo=repo, check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert _digest(images) == digest
    run_rpofs("restore", f"{name}@{q['name']}", "--vm", "--replace", "--force", repo=repo)
    # nothing set aside or half written is left (the console log is the copy's own)
    assert sorted(os.listdir(images)) == [f"{name}-console.log", f"{name}-vda.qcow2", f"{name}-vdb.qcow2"]
    dom = conn.lookupByName(name)
    assert dom.UUIDString() == q["vm"]["uuid"] and not dom.listAllCheckpoints()
    dom.create()
    wait_agent(dom, 90)
    assert guest_read(dom, "/data/log/marker") == BEFORE
    # backed up like any other VM: a full, and why
    run_rpofs("backup", name, repo=repo)
    last = points_json(repo, name)[-1]
    assert last["kind"] == "full" and "checkpoint" in last["reason"]
    dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _digest(folder) -> dict:
    """The disk images' names and mtimes (not the console log, which
    virtlogd may still write to after the VM stopped)."""
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder))
            if not n.endswith(".log")}
