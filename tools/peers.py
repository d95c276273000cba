"""The tools tools/bench measures rpofs against, each driven through its own command line
the way its documentation says, with its default settings unless said otherwise.

- restic: `backup` of the raw image file, `mount`, `restore`. It always encrypts (no
  option to turn it off); compression is its default (auto).
- borg: `create` of the raw image file, twice: the default chunker, and fixed 4 MiB
  chunks with `--sparse` (the setting borg's docs suggest for VM images). `--encryption
  none` like rpofs, which does not encrypt; compression is its default (lz4).
- virtnbdbackup: `-l full` / `-l inc` of a second libvirt VM made from the same image and
  given the same writes (both it and rpofs keep a chain of libvirt checkpoints on the VM
  they back up, so each gets a VM of its own); restored with virtnbdrestore (to qcow2, the
  VM's disk format). It has no FUSE mount.
- bindfs over the directory of the raw image: the cost of a C FUSE file system that only
  passes reads through.

Each peer's repository, cache and logs live in the bench's work dir, so one rmtree
removes them. A step that fails raises; the bench records it and goes on.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

from benchlib import ROOT, timed

# binary -> Debian 12 package
PACKAGES = {"restic": "restic", "borg": "borgbackup", "virtnbdbackup": "virtnbdbackup",
            "bindfs": "bindfs", "fio": "fio"}
# borg mount needs a FUSE binding for the system python; Debian only recommends it, so
# --no-install-recommends leaves it out
BORG_FUSE = "python3-pyfuse3"


def install_missing() -> str | None:
    """apt-get install what is missing; an error message if that failed (the bench then
    runs without the peers it could not get)."""
    missing = [pkg for binary, pkg in PACKAGES.items() if not shutil.which(binary)]
    if subprocess.run(["/usr/bin/python3", "-c", "import pyfuse3"], capture_output=True).returncode:
        missing.append(BORG_FUSE)
    if not missing:
        return None
    print(f"bench: installing {' '.join(missing)}", flush=True)
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], capture_output=True,
                       text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return None if r.returncode == 0 else f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-300:]}"


def versions() -> dict:
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "missing"
    return {"restic": first_line(["restic", "version"]), "borg": first_line(["borg", "--version"]),
            "virtnbdbackup": first_line(["virtnbdbackup", "--version"]),
            "bindfs": first_line(["bindfs", "--version"]), "fio": first_line(["fio", "--version"])}


def tree_allocated(path: str) -> int:
    """Bytes a directory tree takes on disk (du), logs left out: what a tool stored."""
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for f in files if not f.endswith(".log"))
    return total


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@contextlib.contextmanager
def fuse_mount(cmd: list[str], mp: str, log: str, env: dict | None = None, timeout: float = 60):
    """A FUSE mount served by a foreground process we start, so its pid (for its memory)
    is ours to read and to stop; yields the pid. Unmounted and reaped however the body
    ends; killed by pid if it does not leave after the unmount."""
    os.makedirs(mp, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    raise RuntimeError(f"{cmd[0]} mount did not come up: {f.read().strip()[-300:]}")
            time.sleep(0.05)
        os.listdir(mp)  # answered once the FUSE handshake is done
        yield proc.pid
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", mp], capture_output=True)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class Peer:
    """A backup tool: fresh() empties its repository, backup() takes one backup of the
    raw image (or its VM), restore() writes the latest disk into a directory and returns
    the file, mount() yields (path of the disk in the mount, mount command, env)."""
    name = ""
    can_mount = True

    def __init__(self, work: str, raw: str):
        self.work, self.raw = work, raw
        self.repo = os.path.join(work, f"repo-{self.name}")
        self.log = os.path.join(work, f"{self.name}.log")

    def stored(self) -> int:
        return tree_allocated(self.repo)

    def run(self, cmd, **kw) -> tuple[str, float, float]:
        return timed(cmd, env=self.env(), **kw)

    def env(self) -> dict:
        return dict(os.environ)


class Restic(Peer):
    name = "restic"

    def env(self):
        # restic mounts with `fusermount`, which Debian ships in `fuse` (libfuse 2), and
        # that conflicts with fuse3: a shim dir maps the name to fusermount3, same protocol
        shim = os.path.join(self.work, "shim")
        if not os.path.exists(os.path.join(shim, "fusermount")):
            os.makedirs(shim, exist_ok=True)
            os.symlink(shutil.which("fusermount3"), os.path.join(shim, "fusermount"))
        return {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": self.repo,
                "RESTIC_CACHE_DIR": os.path.join(self.work, "restic-cache"),
                "PATH": shim + ":" + os.environ["PATH"]}

    def fresh(self):
        shutil.rmtree(self.repo, ignore_errors=True)
        self.run(["restic", "init", "-q"])

    def backup(self, full: bool):
        return self.run(["restic", "backup", "-q", self.raw])

    def restore(self, dest: str) -> tuple[str, float]:
        wall = self.run(["restic", "restore", "latest", "--target", dest])[1]
        return dest + self.raw, wall

    def mount_cmd(self, mp):
        return ["restic", "mount", mp], os.path.join(mp, "snapshots", "latest") + self.raw


class Borg(Peer):
    name = "borg"
    create_args: list[str] = []

    def __init__(self, work, raw):
        super().__init__(work, raw)
        self.archives = 0

    def env(self):
        return {**os.environ, "BORG_PASSPHRASE": "", "BORG_BASE_DIR": os.path.join(self.work, "borg-home"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_FUSE_IMPL": "pyfuse3"}

    def fresh(self):
        shutil.rmtree(self.repo, ignore_errors=True)
        self.archives = 0
        self.run(["borg", "init", "--encryption", "none", self.repo])

    def backup(self, full: bool):
        self.archives += 1
        return self.run(["borg", "create", *self.create_args, f"{self.repo}::a{self.archives}", self.raw])

    def restore(self, dest: str) -> tuple[str, float]:
        os.makedirs(dest, exist_ok=True)
        wall = timed(["borg", "extract", "--sparse", f"{self.repo}::a{self.archives}"], env=self.env(),
                     cwd=dest)[1]
        return dest + self.raw, wall

    def mount_cmd(self, mp):
        return (["borg", "mount", "-f", f"{self.repo}::a{self.archives}", mp], mp + self.raw)


class BorgFixed(Borg):
    name = "borg-fixed"
    create_args = ["--chunker-params", "fixed,4194304", "--sparse"]


class VirtNbd(Peer):
    name = "virtnbdbackup"
    can_mount = False

    def __init__(self, work, raw, vm: str, disk: str):
        super().__init__(work, raw)
        self.vm, self.disk = vm, disk

    def fresh(self):
        shutil.rmtree(self.repo, ignore_errors=True)

    def backup(self, full: bool):
        return self.run(["virtnbdbackup", "-d", self.vm, "-l", "full" if full else "inc", "-o", self.repo, "-n"])

    def restore(self, dest: str) -> tuple[str, float]:
        wall = self.run(["virtnbdrestore", "-i", self.repo, "-o", dest, "-n",
                         "-L", os.path.join(self.work, "virtnbdrestore.log")])[1]
        return os.path.join(dest, os.path.basename(self.disk)), wall


class Bindfs(Peer):
    """Not a backup tool: only mount()."""
    name = "bindfs"

    def mount_cmd(self, mp):
        return ["bindfs", "-f", "-o", "ro", os.path.dirname(self.raw), mp], os.path.join(mp, os.path.basename(self.raw))


def fio(path: str, direct: bool, seconds: float) -> dict:
    """4 KiB random reads, one at a time, for `seconds`: IOPS and p99 latency. Buffered
    runs keep the page cache (--invalidate=0): they measure reads from a warm cache."""
    out = subprocess.run(["fio", "--name=rand", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
                          "--ioengine=psync", f"--direct={int(direct)}", "--invalidate=0", "--time_based",
                          f"--runtime={seconds}", "--output-format=json"],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"fio {path}: {(out.stderr or out.stdout).strip()[-300:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    return {"iops": job["iops"], "p99_us": job["clat_ns"]["percentile"]["99.000000"] / 1000}
