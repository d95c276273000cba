"""One job at a time per VM, across processes: the ingester, `rpofs backup`
and whatever later works on a VM's checkpoints take REPO/locks/<uuid>.lock.

Two backups of one VM at once break its chain: both build on the same
newest point, one fails in libvirt (its checkpoint is no longer the newest)
or becomes an unplanned full, chains come out of time order, and the
checkpoint libvirt keeps may not be the newest point's — so the next backup
is a full too (on a 1 TB VM, a full read each). flock(2) is released by the
kernel when its holder dies, so a killed backup never leaves the VM locked;
the file holds the holder's pid and job for the message the next one gives.
"""

import contextlib
import errno
import fcntl
import os
import time

from ..errors import RpofsError

LOCKS_DIR = "locks"
POLL_S = 0.1


class VmBusy(RpofsError):
    """Another job holds the VM."""


@contextlib.contextmanager
def vm_lock(repo_path: str, vm_uuid: str, vm_name: str, job: str, wait_s: float):
    """Hold the VM's lock for `job`, waiting up to wait_s for another
    holder; VmBusy names the holder when it does not let go in time."""
    folder = os.path.join(repo_path, LOCKS_DIR)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, f"{vm_uuid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise VmBusy(f"a {_holder(fd)} of {vm_name} is running; try again when it has ended")
            time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {job}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """"backup (pid 123)" from the lock file, as its holder wrote it."""
    try:
        pid, _, job = os.pread(fd, 200, 0).decode().strip().partition(" ")
        return f"{job or 'job'} (pid {int(pid)})"
    except (OSError, ValueError):
        return "job"
