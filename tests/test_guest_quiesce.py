"""Real level, the real guest: a point is "filesystems-frozen" only when
every filesystem asked for froze. A mountpoint the guest does not have
fails `rpofs backup --quiesce` (nothing recorded); asked by the ingester's
config, the point is taken crash-consistent with a warning naming it."""

import uuid

import pytest

from guestlab import Guest, build_guest
from rpofs.ingest.backup import BackupRequest, back_up
from rpofs.ingest.config import Quiesce
from rpofs.store.repo import Repository
from rpofs.virt.client import Connection
from test_bad_input import fails
from vmlab import URI, point_count, points_json, run_rpofs

pytestmark = pytest.mark.libvirt


def test_only_a_complete_freeze_is_called_frozen(tmp_path):
    build_guest()
    repo = tmp_path / "repo"
    run_rpofs("init", repo=repo)
    with Guest(f"rpofs-qz-{uuid.uuid4().hex[:8]}", tmp_path / "guest") as g:
        fails(run_rpofs("backup", g.name, "--quiesce", "/nonexistent", repo=repo, check=False),
              f"{g.name} has no filesystem mounted at /nonexistent")
        assert point_count(repo, g.name) == 0

        # as the ingester asks (its config): taken, but crash-consistent, and said why
        r, conn = Repository.open(str(repo)), Connection(URI)
        try:
            point = back_up(r, conn, BackupRequest(g.name, quiesce=Quiesce(True, ("/data/db", "/nonexistent"))))
        finally:
            conn.close()
            r.close()
        assert point.consistency == "crash-consistent"
        assert any("/nonexistent" in w and "crash-consistent" in w for w in point.warnings), point.warnings

        out = run_rpofs("backup", g.name, "--quiesce", "/data/db", "/data/log", repo=repo)
        assert "warning" not in out.stderr
        last = points_json(repo, g.name)[-1]
        assert last["consistency"] == "filesystems-frozen" and not last["warnings"]
        g.agent("guest-ping")  # thawed: the guest answers and writes on
