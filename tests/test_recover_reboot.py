"""`rpofs run` VMs across a host reboot, simulated: the VM destroyed and its
mount daemon killed (as a reboot or a crash of the daemon leaves them).
Then the VM cannot start; `run --list` says what to do in one line; `run
--resume` mounts again and starts it, and it reads its disk byte-exact. And
in the systemd units' order: the ExecStart of systemd/rpofs-run-mount.service
serves REPO/run/mnt (READY=1 on $NOTIFY_SOCKET) before libvirt starts the VM
itself. Real libvirtd (a VM without an OS: its disk read through QEMU's
qemu-io), real mounts."""

import configparser
import contextlib
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import uuid

import libvirt
import libvirt_qemu
import pytest

from vmlab import RPOFS, URI, TestVM, make_qcow2, run_rpofs, seeded_content, wait_for

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 8 * MiB
PATTERN, AT, LENGTH = 0x5A, 2 * MiB, MiB  # a stretch of the disk the guest checks byte for byte
UNIT = pathlib.Path(__file__).resolve().parent.parent / "systemd" / "rpofs-run-mount.service"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A VM without an OS, backed up once; its disk's bytes."""
    tmp = tmp_path_factory.mktemp("recover-reboot")
    repo = tmp / "repo"
    run_rpofs("init", repo=repo)
    content = seeded_content(SIZE, 7)
    content[AT:AT + LENGTH] = bytes([PATTERN]) * LENGTH
    disk = str(tmp / "d.qcow2")
    make_qcow2(disk, bytes(content))
    vm = TestVM(f"rpofs-rr-{uuid.uuid4().hex[:8]}", [(disk, "qcow2")])
    run_rpofs("backup", vm.name, repo=repo)
    point = tmp / "point.raw"
    run_rpofs("restore", f"{vm.name}@latest:vda", point, repo=repo)
    assert point.read_bytes() == bytes(content)
    conn = libvirt.open(URI)
    yield {"tmp": tmp, "repo": repo, "vm": vm, "conn": conn, "point": point}
    conn.close()
    vm.destroy()


def guest_reads(dom, offset: int, length: int, pattern: int | None = None) -> None:
    """A read by the running VM's own disk device (through QEMU's namespace and
    the mount in it): every byte `pattern` when one is given, else just no error.
    qemu-io answers on QEMU's stdout, which libvirt keeps in the domain's log:
    its answer is the next one there."""
    log = pathlib.Path(f"/var/log/libvirt/qemu/{dom.name()}.log")
    start = log.stat().st_size
    op = f"read -P {pattern} {offset} {length}" if pattern is not None else f"read {offset} {length}"
    libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{op}"',
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    ok = f"read {length}/{length} bytes at offset {offset}"

    def answer() -> str:
        with open(log, errors="replace") as f:
            f.seek(start)
            return f.read()
    wait_for(lambda: ok in answer() or "fail" in answer().lower(), timeout=30, what=f"qemu-io's answer to {op}")
    assert ok in answer() and "fail" not in answer().lower(), answer()


def mount_daemons(mountpoint) -> list[int]:
    """The pids of the rpofs mount daemons serving `mountpoint` (found by
    their command line: `… mount MOUNTPOINT --foreground …`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "rpofs.cli" in argv and "mount" in argv and str(mountpoint) in argv and "--foreground" in argv:
            pids.append(int(entry))
    return pids


def in_mount_table(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def reboot(dom, mountpoint, leave_table: bool) -> None:
    """What a reboot leaves of a run VM: QEMU gone, its mount's daemon gone
    (SIGKILL: no unmount of its own). leave_table: the dead mount stays in the
    mount table (a daemon that crashed); else it is taken away too, as after a
    real reboot."""
    dom.destroy()
    pids = mount_daemons(mountpoint)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pids[0]}"), timeout=30, what="the mount daemon to die")
    if not leave_table:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert in_mount_table(mountpoint) == leave_table


def listed(repo, name) -> tuple[str, dict]:
    text = [line for line in run_rpofs("run", "--list", repo=repo).stdout.splitlines() if line.startswith(name)]
    rows = [r for r in json.loads(run_rpofs("run", "--list", "--json", repo=repo).stdout) if r["name"] == name]
    assert len(text) == len(rows) == 1, (text, rows)
    return text[0], rows[0]


def reads_the_point(lab, dom, overlay) -> None:
    """The VM reads its disk; the overlay's whole view (what the VM sees: the
    point through the mount under its own writes, of which a VM without an OS
    makes none) is the point's disk byte for byte."""
    guest_reads(dom, AT, LENGTH, PATTERN)
    guest_reads(dom, 0, SIZE)
    view = lab["tmp"] / "view.raw"
    with contextlib.suppress(FileNotFoundError):
        view.unlink()
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", overlay, str(view)], check=True)
    assert view.read_bytes() == lab["point"].read_bytes()
    view.unlink()


def unit_command(repo) -> tuple[list[str], dict]:
    """systemd/rpofs-run-mount.service's ExecStart and Environment, for this
    repository and this checkout's rpofs."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/usr/local/bin/rpofs"
    env = dict(os.environ)
    for assignment in shlex.split(service["Environment"]):
        key, _, value = assignment.partition("=")
        env[key] = value
    assert env["RPOFS_REPO"] == "/var/lib/rpofs"
    env["RPOFS_REPO"] = str(repo)
    return RPOFS + argv[1:], env


@contextlib.contextmanager
def notify_socket(tmp):
    """A $NOTIFY_SOCKET as systemd gives a Type=notify service."""
    path = str(tmp / f"notify-{uuid.uuid4().hex[:8]}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(60)
        try:
            yield path, s
        finally:
            os.unlink(path)


def test_run_vm_comes_back_after_a_reboot(lab):
    repo, vm, conn = lab["repo"], lab["vm"], lab["conn"]
    mnt = repo / "run" / "mnt"
    name = f"rpofs-rr-run-{uuid.uuid4().hex[:6]}"
    assert run_rpofs("run", f"{vm.name}@latest", "--name", name, "--no-network", repo=repo).stdout.strip() == name
    dom = conn.lookupByName(name)
    overlay = next(f for f in listed(repo, name)[1]["files"] if f.endswith(".qcow2"))
    try:
        reads_the_point(lab, dom, overlay)
        assert listed(repo, name)[1]["todo"] is None

        # the mount daemon dies with the VM (a crash: its dead mount stays in the table)
        reboot(dom, mnt, leave_table=True)
        with pytest.raises(libvirt.libvirtError):
            dom.create()  # QEMU cannot open the overlay's backing file
        line, row = listed(repo, name)
        assert " shut off " in line
        assert line.endswith(f"mount missing ({mnt}): rpofs run --resume {name}"), line
        assert (row["state"], row["mounted"], row["todo"]) == (
            "shut off", False, f"mount missing ({mnt}): rpofs run --resume {name}")

        resumed = run_rpofs("run", "--resume", repo=repo)
        assert resumed.stdout == f"{name}: started (its mount at {mnt} made again)\n", resumed.stdout
        assert dom.isActive()
        reads_the_point(lab, dom, overlay)
        assert listed(repo, name)[1]["todo"] is None
        again = run_rpofs("run", "--resume", name, repo=repo)  # nothing left to do: says so, changes nothing
        assert again.stdout == f"{name}: running\n"

        # a real reboot's order: no mount in the table; the unit's command serves REPO/run/mnt
        # (READY=1), then libvirt starts the VM itself
        reboot(dom, mnt, leave_table=False)
        line, row = listed(repo, name)
        assert line.endswith(f"mount missing ({mnt}): rpofs run --resume {name}") and not row["mounted"]
        argv, env = unit_command(repo)
        with notify_socket(lab["tmp"]) as (path, sock):
            env["NOTIFY_SOCKET"] = path
            serving = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            try:
                assert sock.recv(4096).decode().startswith("READY=1")
                assert in_mount_table(mnt) and serving.poll() is None
                dom.create()  # as libvirt-guests or autostart would, after the unit
                reads_the_point(lab, dom, overlay)
                assert listed(repo, name)[1]["todo"] is None
                # the last run --stop unmounts REPO/run/mnt: the service ends with it, successfully
                run_rpofs("run", "--stop", name, repo=repo)
                out, err = serving.communicate(timeout=60)
                assert serving.returncode == 0, err
            finally:
                if serving.poll() is None:
                    serving.kill()
                    serving.wait()
        assert not in_mount_table(mnt) and not mount_daemons(mnt)

        # no run VM reads REPO/run/mnt: the unit says so, tells systemd it is done, exits 0
        with notify_socket(lab["tmp"]) as (path, sock):
            env["NOTIFY_SOCKET"] = path
            idle = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            assert sock.recv(4096).decode().startswith("READY=1")
        assert (idle.returncode, idle.stderr) == (
            0, f"rpofs: no VM started by rpofs run reads {mnt}: nothing to serve\n")
        assert not in_mount_table(mnt)
        nothing = run_rpofs("run", "--resume", repo=repo, check=False)
        assert (nothing.returncode, nothing.stderr) == (
            1, f"rpofs: no VM was started by rpofs run from {repo}: nothing to resume\n")
    finally:
        if name in [d.name() for d in conn.listAllDomains(0)]:
            run_rpofs("run", "--stop", name, repo=repo, check=False)
        for pid in mount_daemons(mnt):
            os.kill(pid, signal.SIGTERM)
        if in_mount_table(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
