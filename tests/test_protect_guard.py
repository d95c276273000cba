"""Real level: a protected guest never waits on rpofs. The real test guest
(tools/mkguest) writes and fsyncs a line every 0.2 s while protected by
`rpofs protect` (no daemon); its journal server is then stopped with
SIGSTOP, alive and answering nothing. The guard must let the mirror go so
that the guest's writes go on within the documented bound (10 s), the
session ends with the guard's reason, and the repair backup afterwards
holds every line the guest had made durable."""

import json
import os
import signal
import time
import uuid

import pytest

from guestlab import Guest, read_log
from vmlab import run_rpofs, wait_for
from rpofs.protect.guard import GUARD_NOTE
from rpofs.store import protection
from rpofs.store.journal import journal_dir
from rpofs.store.repo import Repository

pytestmark = pytest.mark.libvirt

BOUND_S = 10.0   # docs/PROTECT.md: a guest write waits on rpofs at most this long


def test_a_stopped_journal_server_holds_the_guest_no_longer_than_the_bound(tmp_path):
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    with Guest(f"rpofs-guard-{uuid.uuid4().hex[:8]}", tmp_path / "guest") as g:
        run_rpofs("protect", g.name, repo=repo)
        with Repository.open(str(repo)) as r:
            session = protection.current(r, g.dom.UUIDString())
        directory = journal_dir(str(repo), session)
        start = g.progress()
        wait_for(lambda: g.progress() >= start + 5, timeout=30, what="the guest to write while protected")

        os.kill(session.server_pid, signal.SIGSTOP)
        stopped_at, at_stop = time.monotonic(), g.progress()
        longest_still, last, last_change = 0.0, at_stop, stopped_at
        while g.progress() < at_stop + 5:  # writes going on again, several of them
            now = time.monotonic()
            assert now - stopped_at < BOUND_S + 5, f"the guest is still held {now - stopped_at:.1f} s after the stop"
            if g.progress() != last:
                longest_still = max(longest_still, now - last_change)
                last, last_change = g.progress(), now
            time.sleep(0.05)
        longest_still = max(longest_still, time.monotonic() - last_change)
        print(f"the guest stood still {longest_still:.1f} s after its journal server was stopped")
        # it was held (the stop mattered), and no longer than the bound
        assert 2.0 < longest_still <= BOUND_S, longest_still

        with open(os.path.join(directory, GUARD_NOTE)) as f:
            let_go = json.load(f)
        assert "did not answer" in let_go["reason"]
        wait_for(lambda: not os.path.exists(f"/proc/{session.server_pid}")
                 or open(f"/proc/{session.server_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                 timeout=10, what="the stuck server killed")

        ended = json.loads(run_rpofs("unprotect", g.name, "--json", repo=repo).stdout)
        assert ended["state"] == "ended" and "did not answer" in ended["reason"], ended
        durable = g.progress()  # every line up to here is fsynced in the guest
        out = run_rpofs("backup", g.name, repo=repo).stdout
        assert ": log point " in out, out
        raw = tmp_path / "vda.raw"
        run_rpofs("restore", f"{g.name}@latest:vda", raw, repo=repo)
        lines = [n for n, _ in read_log(str(raw))]
        assert lines == list(range(1, len(lines) + 1)) and len(lines) >= durable, (len(lines), durable)
