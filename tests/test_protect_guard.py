"""Real level: a protected guest never waits on rpofs. The real test guest
(tools/mkguest) writes and fsyncs a line every 0.2 s while protected by
`rpofs protect` (no daemon). Then its journal server stops answering:

* stopped with SIGSTOP: alive, answering nothing;
* its journal's disk hung: an fdatasync that does not return (injected into
  the test's rpofs processes only, by a sitecustomize module on their
  PYTHONPATH: this container has no device-mapper to hang a real disk).

Either way the guest's writes must go on within the documented bound
(10 s), the session end with the reason, and the repair backup afterwards
hold every line the guest had made durable."""

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from guestlab import Guest, read_log
from vmlab import RPOFS, run_rpofs, wait_for
from rpofs.protect.guard import GUARD_NOTE
from rpofs.store import protection
from rpofs.store.journal import journal_dir
from rpofs.store.repo import Repository

pytestmark = pytest.mark.libvirt

BOUND_S = 10.0   # docs/PROTECT.md: a guest write waits on rpofs at most this long

HANG = """
import os, time
_flag = os.environ.get("RPOFS_TEST_HANG_FLAG")
if _flag:
    _fdatasync = os.fdatasync
    def fdatasync(fd):
        while os.path.exists(_flag):   # a disk that does not answer, until the test lets it
            time.sleep(0.05)
        return _fdatasync(fd)
    os.fdatasync = fdatasync
"""


def _gone(pid: int) -> bool:
    """The process has ended (a zombie left for its parent counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("fault", ["sigstop", "hung disk"])
def test_a_journal_server_that_stops_answering_holds_the_guest_no_longer_than_the_bound(tmp_path, fault):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    flag = tmp_path / "hang"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG)
    env = dict(os.environ, RPOFS_TEST_HANG_FLAG=str(flag),
               PYTHONPATH=os.pathsep.join([str(hook)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with Guest(f"rpofs-guard-{uuid.uuid4().hex[:8]}", tmp_path / "guest") as g:
        started = subprocess.run(RPOFS + ["--repo", str(repo), "protect", g.name], capture_output=True, text=True,
                                 env=env, timeout=300, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started.stderr
        with Repository.open(str(repo)) as r:
            session = protection.current(r, g.dom.UUIDString())
        directory = journal_dir(str(repo), session)
        start = g.progress()
        wait_for(lambda: g.progress() >= start + 5, timeout=30, what="the guest to write while protected")

        stopped_at, at_stop = time.monotonic(), g.progress()
        if fault == "sigstop":
            os.kill(session.server_pid, signal.SIGSTOP)
        else:
            flag.touch()   # the server's next fdatasync does not return
        longest_still, last, last_change = 0.0, at_stop, stopped_at
        try:
            while g.progress() < at_stop + 5:  # writes going on again, several of them
                now = time.monotonic()
                assert now - stopped_at < BOUND_S + 5, f"the guest is still held {now - stopped_at:.1f} s after"
                if g.progress() != last:
                    longest_still = max(longest_still, now - last_change)
                    last, last_change = g.progress(), now
                time.sleep(0.05)
        finally:
            with_flag = flag.exists()
            flag.unlink(missing_ok=True)
        longest_still = max(longest_still, time.monotonic() - last_change)
        print(f"{fault}: the guest stood still {longest_still:.1f} s")
        # it was held (the fault mattered), and no longer than the bound
        assert 2.0 < longest_still <= BOUND_S, longest_still
        assert with_flag or fault == "sigstop"

        # the guard lets go after 6 s of silence; with a hung commit the server's own watchdog (8 s) may be
        # first: then the server ended, and the session's reason says so
        let_go = os.path.join(directory, GUARD_NOTE)
        if fault == "sigstop" or os.path.exists(let_go):
            with open(let_go) as f:
                assert "did not answer" in json.load(f)["reason"]
        wait_for(lambda: _gone(session.server_pid), timeout=10, what="the stuck server killed")

        ended = json.loads(run_rpofs("unprotect", g.name, "--json", repo=repo).stdout)
        assert ended["state"] == "ended" and ("did not answer" in ended["reason"] or (
            fault == "hung disk" and "journal server is not running" in ended["reason"])), ended
        durable = g.progress()  # every line up to here is fsynced in the guest
        out = run_rpofs("backup", g.name, repo=repo).stdout
        assert ": log point " in out, out
        raw = tmp_path / "vda.raw"
        run_rpofs("restore", f"{g.name}@latest:vda", raw, repo=repo)
        lines = [n for n, _ in read_log(str(raw))]
        assert lines == list(range(1, len(lines) + 1)) and len(lines) >= durable, (len(lines), durable)
