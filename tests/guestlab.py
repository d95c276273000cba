"""A small real Linux guest for the tests (built by tools/mkguest): a transient
libvirt domain whose init appends n = 1, 2, 3, ... to /seq.log on its log disk
(vda) and to table seq of /seq.db on its db disk (vdb), with qemu-ga answering.
Also readers of that state from a raw disk image, without mounting it.

What the workload guarantees (see tools/mkguest): the log holds 1..L, the
database 1..M, with L == M or L == M + 1 (the log line is fsynced before the
row is inserted), and both hold the same t for the same n. A connection to
/seq.db stays open for the guest's life, so its WAL (/seq.db-wal) persists
and grows a frame per row until SQLite's auto-checkpoint or a
Guest.wal_checkpoint() restarts it, as under a real database application."""

import base64
import contextlib
import functools
import json
import os
import sqlite3
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

URI = "qemu:///system"
MKGUEST = Path(__file__).resolve().parent.parent / "tools" / "mkguest"
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed


@functools.cache
def build_guest() -> dict:
    """Build the guest's kernel, initrd and base disks once (tools/mkguest caches
    them across runs too) and return its manifest."""
    result = subprocess.run([str(MKGUEST)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"tools/mkguest failed ({result.returncode}):\n{result.stderr}")
    with open(result.stdout.strip().splitlines()[-1]) as f:
        return json.load(f)


class Guest:
    """The test guest as a transient domain `name`, its disks qcow2 overlays in
    `workdir` (log.qcow2 = vda, db.qcow2 = vdb) over the read-only base images,
    its serial console in workdir/console.log. Entering waits for the agent.
    reboot() power-cycles it on the same overlays (a guest reboot after a
    power cut: the workload carries on from its disks); wal_checkpoint()
    checkpoints its database from a second connection, as an admin would."""

    __test__ = False

    def __init__(self, name: str, workdir, interval: float = 0.2, memory_mib: int = 256,
                 boot_timeout: float = 60.0):
        self.name = name
        self.workdir = Path(workdir)
        self.interval = interval
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.log_disk = self.workdir / "log.qcow2"
        self.db_disk = self.workdir / "db.qcow2"
        self.console = self.workdir / "console.log"
        self.conn = self.dom = None
        self.reboots = 0

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.destroy()

    def xml(self) -> str:
        m = build_guest()
        cmdline = f"{m['cmdline']} seq.interval={self.interval}"
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={quoteattr(str(path))}/><target dev='{dev}' bus='virtio'/></disk>"
            for dev, path in (("vda", self.log_disk), ("vdb", self.db_disk)))
        # TCG with qemu64: this machine's /dev/kvm (nested) cannot boot Debian's kernel.
        # ACPI for its PM timer: against it the kernel calibrates the TSC, and the
        # guest's clock keeps to the host's; without, it counts timer ticks, which
        # TCG on a busy host loses (seconds behind within a minute of booting).
        return f"""<domain type='qemu'>
  <name>{escape(self.name)}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{self.memory_mib}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type>
    <kernel>{escape(m['vmlinuz'])}</kernel><initrd>{escape(m['initrd'])}</initrd>
    <cmdline>{escape(cmdline)}</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>{disks}
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path={quoteattr(str(self.console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""

    def start(self) -> None:
        m = build_guest()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for base, overlay in ((m["log_img"], self.log_disk), (m["db_img"], self.db_disk)):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base,
                            str(overlay)], check=True)
        self.conn = libvirt.open(URI)
        self.started_xml = self.xml()
        self.dom = self.conn.createXML(self.started_xml, 0)
        self.booted_in = self.wait_agent(self.boot_timeout)

    def reboot(self) -> None:
        """Power off at once (like pulling the plug) and boot again on the same
        overlays, from the same XML; waits for the agent (booted_in is this
        boot's). The workload first completes the row the power cut may have
        left out of the database, then carries on after the log's last entry.
        console.log is this boot's (progress() is 0 until its first row); the
        previous boots' are kept as console-1.log, console-2.log, ... (virtlogd,
        which writes console.log, deletes console.log.N when it opens it)."""
        self.dom.destroy()
        self.reboots += 1
        with contextlib.suppress(FileNotFoundError):
            self.console.replace(self.workdir / f"console-{self.reboots}.log")
        self.dom = self.conn.createXML(self.started_xml, 0)
        self.booted_in = self.wait_agent(self.boot_timeout)

    def wal_checkpoint(self, mode: str = "RESTART") -> str:
        """`PRAGMA wal_checkpoint(mode)` on the guest's /data/db/seq.db, run
        through the agent by sqlite3 in the guest: a second connection beside
        the workload's, as an admin would (it waits up to 10 s for a lock).
        Its output, "busy|log|checkpointed" (frames): "0|n|n" when the whole
        WAL went into the database; after RESTART (or TRUNCATE) the next
        row then starts the WAL afresh, with new salts."""
        if mode.upper() not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"no such checkpoint mode: {mode!r}")
        return guest_run(self.dom, "/usr/bin/sqlite3", "-cmd", ".timeout 10000", "/data/db/seq.db",
                         f"PRAGMA wal_checkpoint({mode.upper()})").strip()

    def agent(self, command: str, arguments: dict | None = None, timeout: int = 5):
        """One guest agent command; its "return" value."""
        return agent(self.dom, command, arguments, timeout)

    def wait_agent(self, timeout: float) -> float:
        """Seconds until the agent answers guest-ping; AssertionError after `timeout`."""
        start = time.monotonic()
        error = None
        while time.monotonic() - start < timeout:
            if not self.dom.isActive():
                raise AssertionError(f"guest {self.name} stopped while booting\n{self.console_tail()}")
            try:
                self.agent("guest-ping", timeout=2)
                return time.monotonic() - start
            except libvirt.libvirtError as e:
                error = e  # not connected yet, or no answer yet
            time.sleep(0.2)
        raise AssertionError(f"guest {self.name}: no agent after {timeout} s ({error})\n"
                             f"{self.console_tail()}")

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError as e:
            return f"(no console log: {e})"
        return "--- console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def progress(self) -> int:
        """The last n the guest printed to its console (0 before the first)."""
        with contextlib.suppress(OSError):
            for line in reversed(self.console.read_text(errors="replace").splitlines()):
                if line.startswith("seq "):
                    return int(line.split()[1])
        return 0

    def destroy(self) -> None:
        """Power off at once (like pulling the plug); the overlays stay."""
        if self.dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.destroy()
            self.dom = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _run_checked(cmd, what):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{what}: {' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def _replayed(image_path):
    """A private copy of the ext4 image with its journal replayed, as a mount
    would do; nothing else is repaired, so real damage still shows. The image
    itself is never written (it may be read-only, e.g. in an rpofs mount)."""
    with tempfile.TemporaryDirectory(prefix="guestlab-") as tmp:
        copy = os.path.join(tmp, "disk.img")
        _run_checked(["cp", "--sparse=always", str(image_path), copy], "copy")
        result = subprocess.run(["e2fsck", "-y", "-E", "journal_only", copy], capture_output=True, text=True)
        if result.returncode >= 4:  # 0: clean, 1: journal replayed
            raise AssertionError(f"e2fsck journal replay of {image_path} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        yield copy, tmp


def _debugfs(image, request, what):
    result = _run_checked(["debugfs", "-R", request, image], what)
    # debugfs exits 0 even when a request fails; its only expected stderr line is the banner
    errors = [line for line in result.stderr.splitlines() if not line.startswith("debugfs ")]
    if errors:
        raise AssertionError(f"{what}: debugfs -R {request!r}: {' '.join(errors)}")
    return result.stdout


def read_log(image_path) -> list[tuple[int, float]]:
    """The (n, t) lines of /seq.log in a raw ext4 image of the guest's log disk."""
    with _replayed(image_path) as (copy, _):
        text = _debugfs(copy, "cat /seq.log", f"read /seq.log of {image_path}")
    entries = []
    for line in text.split("\n")[:-1]:  # each line ends with \n
        n, t = line.split(" ")  # strict: a torn or garbled line raises
        entries.append((int(n), float(t)))
    if text and not text.endswith("\n"):
        raise AssertionError(f"{image_path}: /seq.log ends in a partial line: {text[-80:]!r}")
    return entries


def read_db(image_path) -> list[tuple[int, float]]:
    """The rows (n, t) of table seq in /seq.db of a raw ext4 image of the guest's
    db disk. Its -wal (or -journal) is dumped too, so SQLite recovers the
    database as it would after a crash; integrity_check must pass."""
    with _replayed(image_path) as (copy, tmp):
        listing = _debugfs(copy, "ls -p /", f"list / of {image_path}")
        names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
        dumps = os.path.join(tmp, "files")
        os.mkdir(dumps)
        for name in ("seq.db", "seq.db-wal", "seq.db-journal"):
            if name in names or name == "seq.db":
                _debugfs(copy, f"dump /{name} {dumps}/{name}", f"dump /{name} of {image_path}")
        db = sqlite3.connect(os.path.join(dumps, "seq.db"))
        try:
            check = db.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                raise AssertionError(f"{image_path}: seq.db integrity_check: {check}")
            return db.execute("SELECT n, t FROM seq ORDER BY n").fetchall()
        finally:
            db.close()


# -- the guest agent of any domain (a recovered copy of the guest too) --------

def agent(dom, command: str, arguments: dict | None = None, timeout: int = 5):
    """One guest agent command to libvirt domain `dom`; its "return" value."""
    msg = {"execute": command} | ({"arguments": arguments} if arguments else {})
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), timeout, 0))["return"]


def wait_agent(dom, timeout: float) -> float:
    """Seconds until dom's agent answers guest-ping."""
    start = time.monotonic()
    while True:
        try:
            agent(dom, "guest-ping", timeout=2)
            return time.monotonic() - start
        except libvirt.libvirtError as e:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"no guest agent in {dom.name()} after {timeout} s ({e})") from None
        time.sleep(0.1)


def guest_read(dom, path: str) -> bytes:
    """A file of the guest, whole (small files: one read of up to 8 MiB)."""
    handle = agent(dom, "guest-file-open", {"path": path, "mode": "r"})
    try:
        reply = agent(dom, "guest-file-read", {"handle": handle, "count": 8 << 20})
    finally:
        agent(dom, "guest-file-close", {"handle": handle})
    return base64.b64decode(reply["buf-b64"])


def guest_write(dom, path: str, data: bytes) -> None:
    """Write a file in the guest and make it durable (the guest's sync)."""
    handle = agent(dom, "guest-file-open", {"path": path, "mode": "w"})
    try:
        agent(dom, "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
        agent(dom, "guest-file-flush", {"handle": handle})
    finally:
        agent(dom, "guest-file-close", {"handle": handle})
    guest_run(dom, "/bin/busybox", "sync")


def guest_run(dom, path: str, *args: str, timeout: float = 30) -> str:
    """Run a program in the guest; its stdout (AssertionError if it fails)."""
    pid = agent(dom, "guest-exec", {"path": path, "arg": list(args), "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = agent(dom, "guest-exec-status", {"pid": pid})
        if status["exited"]:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} {args} still running in {dom.name()} after {timeout} s")
        time.sleep(0.1)
    out = base64.b64decode(status.get("out-data", "")).decode()
    if status.get("exitcode") != 0:
        err = base64.b64decode(status.get("err-data", "")).decode()
        raise AssertionError(f"{path} {args} in {dom.name()} exited {status.get('exitcode')}: {err}")
    return out
