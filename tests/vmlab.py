"""Real parts for the tests: libvirt VMs without an OS, guest writes through
QEMU's qemu-io, a model of every write (the truth to compare with), the rpofs
command line, and mounts."""

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import sys
import time
import uuid

import libvirt
import libvirt_qemu

URI = "qemu:///system"
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
RPOFS = [sys.executable, "-m", "rpofs.cli"]


class WriteLog:
    """Guest writes with when they were made, so that a point taken while
    writes run can be checked: it must hold exactly the first k writes for a
    k the timing allows."""

    def __init__(self, base: list[list[bytes]]):
        self.base = [[bytes(d) for d in disks] for disks in base]  # per VM, per disk
        self.writes = []  # (vm index, disk, offset, length, pattern, t_start, t_end)
        self._lock = threading.Lock()

    def write(self, vms: list, vm: int, disk: int, offset: int, length: int, pattern: int) -> None:
        t0 = time.time()
        vms[vm].write(disk, offset, length, pattern)
        with self._lock:
            self.writes.append((vm, disk, offset, length, pattern, t0, time.time()))

    def state(self, vm: int, k: int) -> list[bytearray]:
        """VM vm's disks after the first k writes (of all VMs)."""
        disks = [bytearray(d) for d in self.base[vm]]
        for w in self.writes[:k]:
            if w[0] == vm:
                disks[w[1]][w[2]:w[2] + w[3]] = bytes([w[4] or 0]) * w[3]  # None: zeroed
        return disks

    def candidates(self, time_s: float, slack_s: float) -> range:
        """k values possible for a point captured at time_s."""
        with self._lock:
            writes = list(self.writes)
        k_hi = sum(1 for w in writes if w[5] < time_s)
        k_lo = sum(1 for w in writes if w[6] < time_s - slack_s)
        return range(k_lo, k_hi + 1)


def run_rpofs(*args, repo=None, check=True, timeout=300):
    cmd = RPOFS + (["--repo", str(repo)] if repo else []) + [str(a) for a in args]
    # no terminal: rpofs never waits on a passphrase prompt here
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
    return result


def seeded_content(size: int, seed: int) -> bytearray:
    """Random data, repeats of earlier data and zeros, in 64 KiB-ish pieces of odd sizes."""
    rnd = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(4096, 300_000), size - pos)
        kind = rnd.random()
        if kind < 0.4:
            data[pos:pos + n] = rnd.randbytes(n)
        elif kind < 0.6 and pos > n:
            src = rnd.randrange(0, pos - n)
            data[pos:pos + n] = data[src:src + n]
        pos += n  # else: zeros
    return data


def make_qcow2(path: str, content: bytes) -> None:
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.write(content)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    os.unlink(raw)


def make_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _domain_type() -> str:
    """KVM when /dev/kvm is usable, TCG otherwise (a VM without an OS needs nothing more)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        return "kvm"
    except OSError:
        return "qemu"


class TestVM:
    """A transient libvirt domain with the given disks (path, format) as vda, vdb, ..."""

    __test__ = False

    def __init__(self, name: str, disks: list[tuple[str, str]], persistent: bool = False):
        self.name = name
        self.persistent = persistent
        self.conn = libvirt.open(URI)
        self.disks = disks
        devices = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
            for i, (path, fmt) in enumerate(disks))
        kinds = [_domain_type(), "qemu"]
        for kind in dict.fromkeys(kinds):
            xml = (f"<domain type='{kind}'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
                   f"<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                   f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>")
            try:
                if persistent:
                    self.dom = self.conn.defineXML(xml)
                    self.dom.create()
                else:
                    self.dom = self.conn.createXML(xml, 0)
                break
            except libvirt.libvirtError:
                if persistent:
                    with contextlib.suppress(libvirt.libvirtError):
                        self.conn.lookupByName(name).undefine()
                if kind == kinds[-1]:
                    raise
        self.uuid = self.dom.UUIDString()

    def write(self, disk: int, offset: int, length: int, pattern: int | None) -> None:
        """A guest write: `pattern` bytes, or zeros when pattern is None."""
        op = f"write -z {offset} {length}" if pattern is None else f"write -P {pattern} {offset} {length}"
        cmd = f'qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend "{op}"'
        out = libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        assert "error" not in out.lower() and "fail" not in out.lower(), out

    def checkpoints(self) -> list[str]:
        return [c.getName() for c in self.dom.listAllCheckpoints()]

    def destroy(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            for cp in self.dom.listAllCheckpoints():
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.abortJob()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        if self.persistent:
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.close()

    def flush(self, disk: int) -> None:
        libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend "flush"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def kill_qemu(self) -> None:
        """SIGKILL QEMU, as a host crash of the VM would; wait until libvirt sees it."""
        with open(f"/run/libvirt/qemu/{self.name}.pid") as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.dom.isActive(), timeout=15, what=f"{self.name} to stop")


class Model:
    """What each disk holds now, write by write."""

    def __init__(self, vm: TestVM, contents: list[bytearray]):
        self.vm = vm
        self.disks = contents

    def write(self, disk: int, offset: int, length: int, pattern: int | None) -> None:
        self.vm.write(disk, offset, length, pattern)
        self.disks[disk][offset:offset + length] = bytes([pattern or 0]) * length

    def snapshot(self) -> list[bytes]:
        return [bytes(d) for d in self.disks]


@contextlib.contextmanager
def mounted(repo, mountpoint):
    os.makedirs(mountpoint, exist_ok=True)
    run_rpofs("mount", mountpoint, repo=repo, timeout=60)
    try:
        yield mountpoint
    finally:
        result = run_rpofs("umount", mountpoint, check=False, timeout=60)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
            raise AssertionError(f"rpofs umount failed: {result.stderr}")


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def points_json(repo, vm) -> list[dict]:
    return json.loads(run_rpofs("points", vm, "--json", repo=repo).stdout)


def point_count(repo, vm) -> int:
    """How many points the VM has; 0 before its first."""
    r = run_rpofs("points", vm, "--json", repo=repo, check=False)
    return len(json.loads(r.stdout)) if r.returncode == 0 else 0
