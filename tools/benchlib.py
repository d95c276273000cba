"""What tools/bench and tools/bench-rpo share: the seeded test disk, the VMs without an
OS that run it, guest writes, the rpofs command line, and the record of what the figures
were measured on. One copy, so both benchmarks measure the same disks and VMs the same way.

Import it before libvirt: a script run by a python without libvirt's bindings is run again
by the project's virtualenv from here.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import libvirt
    import libvirt_qemu
except ImportError:  # run by a python without the bindings: run the script by the project's virtualenv
    VENV, VENV_PYTHON = os.path.join(ROOT, ".venv"), os.path.join(ROOT, ".venv", "bin", "python")
    if os.path.abspath(sys.prefix) == VENV or not os.path.exists(VENV_PYTHON):
        raise
    os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(sys.argv[0])] + sys.argv[1:])

import argparse
import contextlib
import platform
import random
import resource
import subprocess
import time

URI = "qemu:///system"
KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB   # the largest guest write either benchmark makes
SEED = 20240601
GUEST_DISK = "/machine/peripheral/virtio-disk0/virtio-backend"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed too


def parse_size(text: str) -> int:
    """'2G', '512M', '64MiB' or plain bytes; a multiple of 64 KiB so every guest write is whole."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    size = int(float(t.rstrip("KMGT")) * mult)
    if size <= 0 or size % BLOCK:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 64 KiB, not {text}")
    return size


def make_disk(raw: str, qcow2: str, size: int, rnd: random.Random) -> dict:
    """A disk that looks like a used one, so a full backup pays realistic compression and
    dedup costs: incompressible data, zeros, and copies of earlier data at 4 KiB alignment
    (what files copied inside a filesystem look like), in pieces of 64 KiB-4 MiB. Zeros are
    written, not left as holes, so reading the file costs what reading data costs. `raw` is
    the byte-exact reference, `qcow2` the same disk for a VM. Returns the bytes of each kind."""
    kinds = {"random": 0, "zero": 0, "copy": 0}
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pos = 0
        while pos < size:
            n = min(rnd.randrange(16, 1025) * 4 * KiB, size - pos)
            r = rnd.random()
            if r < 0.4 or (r >= 0.8 and pos < n):  # random, also when there is nothing to copy yet
                data, kind = rnd.randbytes(n), "random"
            elif r < 0.8:
                data, kind = bytes(n), "zero"
            else:
                src = rnd.randrange(0, (pos - n) // (4 * KiB) + 1) * 4 * KiB
                data, kind = os.pread(fd, n, src), "copy"
            os.pwrite(fd, data, pos)
            kinds[kind] += n
            pos += n
    finally:
        os.close(fd)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    return kinds


def domain_type() -> str:
    """KVM when /dev/kvm opens read-write, else TCG: a VM without an OS needs nothing more."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return "kvm"
    except OSError:
        return "qemu"


def connect(wait_s: float = 60):
    """A libvirt connection, waiting while libvirtd is away: another test on this machine
    may restart it, and connections made before a restart are dead after it. So each
    phase makes its own and finds the VMs again by name."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return libvirt.open(URI)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@contextlib.contextmanager
def transient_vms(names: list[str], disks: list[str]):
    """One transient VM without an OS per name, its qcow2 disk as vda; yields the domains.
    All are destroyed whatever happens, found again by name on a fresh connection (libvirtd
    may have restarted meanwhile, and a create that failed half-way may have made one):
    checkpoint metadata first, or libvirt would keep it, and any job aborted."""
    conn = connect()
    try:
        doms = []
        for name, disk in zip(names, disks):
            doms.append(conn.createXML(
                f"<domain type='{domain_type()}'><name>{name}</name>"
                f"<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>"
                f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>", 0))
        yield doms
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        conn = connect()
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue  # never made
            for step in (lambda: [cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                                  for cp in dom.listAllCheckpoints()], dom.abortJob, dom.destroy):
                with contextlib.suppress(libvirt.libvirtError):  # abortJob with no job is one too
                    step()
            # a job cut off by a libvirtd restart leaves its NBD socket (rpofs.ingest.backup.SOCKET_DIR)
            with contextlib.suppress(OSError, libvirt.libvirtError):
                os.remove(f"/run/rpofs/{dom.UUIDString()}.sock")
        conn.close()


def hmp_io(dom, op: str) -> None:
    """One qemu-io command on the guest's disk through QEMU's block layer, as a guest
    write would go, so the dirty bitmap sees it. HMP takes one command per call."""
    out = libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {GUEST_DISK} "{op}"',
                                          libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        raise RuntimeError(f"{dom.name()}: qemu-io {op!r}: {out.strip()}")


def guest_write(dom, offset: int, data: bytes, source: str) -> None:
    """A guest write of exactly these bytes: qemu-io reads them from the file `source`."""
    with open(source, "wb") as f:
        f.write(data)
    hmp_io(dom, f"write -s {source} {offset} {len(data)}")


def rpofs(repo: str, *args: str) -> list[str]:
    """The rpofs command line of this working tree (run it with cwd at the repository root)."""
    return [sys.executable, "-m", "rpofs.cli", "--repo", repo, *args]


def timed(cmd: list[str], stdout=subprocess.PIPE, timeout: float | None = None, env: dict | None = None,
          cwd: str = ROOT) -> tuple[str, float, float]:
    """Run a command (from the repository root unless told) to completion: (stdout, wall
    seconds, CPU seconds). CPU is from RUSAGE_CHILDREN deltas, so it counts the child and
    whatever it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return r.stdout, wall, cpu


def drop_caches() -> bool:
    """Empty the page cache so a 'first read' comes from the disk; False where not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    """What the figures were measured on, so two result files can be compared fairly."""
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    return {"nproc": os.cpu_count(), "memory_bytes": mem_kib * KiB, "cpu": cpu, "kernel": platform.release(),
            "domain_type": domain_type()}


def versions() -> dict:
    """Which code produced the figures (a dirty tree is marked: it is not the commit)."""
    def text(cmd):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    def dotted(v):
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    dirty = " (dirty)" if text(["git", "status", "--porcelain"]) else ""
    conn = connect()
    qemu, libvirtd = dotted(conn.getVersion()), dotted(conn.getLibVersion())
    conn.close()
    return {"rpofs_commit": text(["git", "rev-parse", "HEAD"]) + dirty, "qemu": qemu,
            "qemu_img": text(["qemu-img", "--version"]).splitlines()[0], "libvirtd": libvirtd,
            "libvirt_python": dotted(libvirt.getVersion()), "python": platform.python_version()}
