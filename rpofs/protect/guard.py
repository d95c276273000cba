"""The guard: a protected guest never waits on rpofs for more than a bound.

A write-blocking mirror completes a guest's write only once the journal
server answered it, and QEMU 7.2's NBD client has no I/O timeout: a server
that neither dies nor answers (stopped by SIGSTOP, its event loop stuck in
an fdatasync on a hung disk) held the guest's next write and flush for as
long as it was stuck (> 120 s measured). The server's own watchdog cannot
help when the whole process is stuck, so the guard is a process of its own,
started with the mirrors (rpofs.protect.protector) and needing no daemon:

every PROBE_S it connects to the server's socket and waits ANSWER_S for
the NBD greeting the server's event loop sends at once to every client
(a probe chooses no export: the server counts it as no mirror). After
MISSES probes in a row unanswered (6 s of silence), it cuts QEMU's NBD
connections to that socket (QMP `yank`, Domain.let_go_of_nbd): the writes
in flight fail at the mirror, QEMU completes them for the guest (they are
in its disk) and fails the mirror job, and the guest runs on; the stuck
server is killed. Measured on the test guest: its writes stopped at the
SIGSTOP and went on 0.2 s after the yank; they stood still 5 s in all with
2 s probes, 6.8-7.5 s with the 3 s probes kept (fewer false alarms when an
fdatasync on a loaded disk holds the server's loop a while). The note
it leaves in the session's directory (GUARD_NOTE) is the reason the
session ends with; the repair backup from the confirmed checkpoint then
takes what the journal missed, as after any lost mirror (docs/PROTECT.md).

It exits when the VM stops, no disk is mirrored into the socket any more
(protection ended) or the server is gone (QEMU saw its connection close:
nothing waits), and tries libvirt again when its connection drops (a
libvirtd restart); while libvirt is down it cannot cut anything, and says so.

    python -m rpofs.protect.guard URI VM_UUID SOCKET SESSION_DIR SERVER_PID vda [vdb ...]
"""

import contextlib
import json
import logging
import os
import signal
import socket as socketlib
import sys
import time

from ..durable import write_file
from ..errors import RpofsError
from ..timefmt import now_us

log = logging.getLogger("rpofs.protect.guard")

PROBE_S = 1.0        # between probes
ANSWER_S = 3.0       # a probe unanswered for this long is a miss (an fdatasync on the loop may take a while)
MISSES = 2           # misses in a row before the mirror is let go: a bound of ~PROBE_S + MISSES * ANSWER_S
GUARD_NOTE = "guard.json"


def answers(path: str, timeout_s: float = ANSWER_S) -> bool:
    """Whether the server at `path` greets a new client within timeout_s."""
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        got = b""
        deadline = time.monotonic() + timeout_s
        while len(got) < 8 and time.monotonic() < deadline:
            chunk = s.recv(8 - len(got))
            if not chunk:
                return False
            got += chunk
        return got == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


def note(directory: str) -> str:
    """The reason the guard let the mirrors go, or "" if it did not."""
    try:
        with open(os.path.join(directory, GUARD_NOTE)) as f:
            return str(json.load(f)["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def guard(uri: str, vm: str, socket: str, directory: str, server_pid: int, targets: list[str]) -> None:
    from ..virt.client import Connection
    conn = dom = None
    misses, first_miss = 0, 0.0
    while True:
        try:
            if conn is None or not conn.alive():
                conn = Connection(uri)
                dom = conn.domain(vm)
            if not dom.is_running() or all(dom.mirror_socket(t) != socket for t in targets):
                log.info("guard of %s: protection ended: exiting", vm)
                return
        except RpofsError as e:
            log.warning("guard of %s: libvirt cannot be asked (%s): the mirror cannot be let go meanwhile", vm, e)
            conn = None
        started = time.monotonic()
        if answers(socket):
            misses = 0
        elif not _alive(server_pid, directory):
            log.info("guard of %s: the server is gone (QEMU sees its connection closed): exiting", vm)
            return
        else:
            misses, first_miss = misses + 1, first_miss if misses else started
            if misses >= MISSES and dom is not None:
                stuck = time.monotonic() - first_miss
                reason = (f"the journal server did not answer for {stuck:.1f} s: the guard let the mirror go "
                          f"so that the guest would not wait on it")
                try:
                    released = dom.let_go_of_nbd(socket)
                except RpofsError as e:
                    log.error("guard of %s: cannot let the mirror go: %s", vm, e)
                    conn = None
                    continue
                write_file(os.path.join(directory, GUARD_NOTE),
                           json.dumps({"at_us": now_us(), "reason": reason, "nodes": released}).encode())
                log.error("guard of %s: %s (%s)", vm, reason, ", ".join(released) or "no NBD node found")
                _kill(server_pid, directory)
                return
        time.sleep(max(0.0, PROBE_S - (time.monotonic() - started)))


def _alive(pid: int, directory: str) -> bool:
    """Whether `pid` is this session's server, not dead nor a zombie (a
    stopped one is alive: that is what the guard is for)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = directory.encode() in f.read()
        with open(f"/proc/{pid}/stat") as f:
            return ours and f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _kill(pid: int, directory: str) -> None:
    """The stuck server, if it is still this session's."""
    if _alive(pid, directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uri, vm, socket, directory, pid, *targets = argv
    guard(uri, vm, socket, directory, int(pid), targets)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
