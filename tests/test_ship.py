"""What a shipping round reads of a file and what it means for the stream
(rpofs.apps.ship): real SQLite WALs and real files on this host, read through
a stand-in for the guest agent's file calls (the agent itself is tested
against a real guest in test_apps.py). The database rebuilt from a base copy
and the shipped bytes must be what SQLite sees."""

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from rpofs.apps import wal
from rpofs.apps.ship import file_round, wal_round

pytestmark = pytest.mark.pure


class LocalFile:
    """AgentFile's read over a host file."""

    def __init__(self, path):
        self.path = path

    def read(self, offset, length):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def connect(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


class Shipped:
    """The stream as the repository would hold it: pieces per generation."""

    def __init__(self):
        self.state, self.lineage, self.pieces, self.restarts = None, 1, [], []

    def round(self, path):
        got = wal_round(LocalFile(path), path, self.state, self.lineage)
        self.pieces += got.pieces
        if got.restart:
            self.restarts.append(got.restart)
        if got.state is not None:
            self.state = got.state
            self.lineage = max(self.lineage, got.state.lineage + 1)
        return got

    def generations(self, lineage):
        """{generation: bytes from offset 0}, in shipping order."""
        out = {}
        for p in self.pieces:
            if p.file.lineage != lineage:
                continue
            data = out.setdefault(p.file.generation, bytearray())
            assert p.file.offset == len(data), "pieces of a generation are contiguous"
            data += p.data
        return out


def rebuilt_rows(base_db: bytes, generations: dict, tmp_path) -> list:
    batches = []
    for data in generations.values():
        header, found = wal.scan_wal(bytes(data))
        batches.append(wal.FrameBatch(header, found.frames, lambda o, n, d=bytes(data): d[o:o + n]))
    image = wal.DatabaseImage(lambda o, n: base_db[o:o + n], len(base_db), batches)
    out = tmp_path / "rebuilt.db"
    out.write_bytes(image.read(0, image.size))
    db = sqlite3.connect(f"file:{out}?immutable=1", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return [r[0] for r in db.execute("SELECT n FROM t ORDER BY n")]
    finally:
        db.close()


def test_committed_frames_ship_once_and_rebuild_the_database(tmp_path):
    path = str(tmp_path / "a.db")
    db = connect(path)
    db.execute("CREATE TABLE t(n INTEGER PRIMARY KEY, pad BLOB)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    base = (tmp_path / "a.db").read_bytes()  # the block point: everything checkpointed, WAL empty
    ship = Shipped()
    assert ship.round(path + "-wal").pieces == []  # empty WAL: nothing to ship yet
    n = 0
    for batch in range(5):
        for _ in range(7):
            n += 1
            db.execute("INSERT INTO t VALUES (?, randomblob(300))", (n,))
        got = ship.round(path + "-wal")
        assert got.pieces and sum(len(p.data) for p in got.pieces) > 0
        assert ship.round(path + "-wal").pieces == []  # nothing new: nothing shipped again
        assert rebuilt_rows(base, ship.generations(1), tmp_path) == list(range(1, n + 1))
    # an open transaction's spilled frames are not shipped
    db.execute("PRAGMA cache_size=2")
    db.execute("BEGIN")
    for _ in range(200):
        n += 1
        db.execute("INSERT INTO t VALUES (?, randomblob(3000))", (n,))
    assert os.path.getsize(path + "-wal") > ship.state.offset  # frames were written, uncommitted
    assert ship.round(path + "-wal").pieces == []
    db.execute("ROLLBACK")
    db.close()


def test_sqlite_restarting_the_wal_continues_the_lineage(tmp_path):
    path = str(tmp_path / "a.db")
    db = connect(path)
    db.execute("CREATE TABLE t(n INTEGER PRIMARY KEY, pad BLOB)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    base = (tmp_path / "a.db").read_bytes()
    ship = Shipped()
    n = 0
    for rounds in range(4):
        for _ in range(5):
            n += 1
            db.execute("INSERT INTO t VALUES (?, randomblob(500))", (n,))
        ship.round(path + "-wal")
        for _ in range(3):  # committed after the round: the old generation's tail, shipped at the restart
            n += 1
            db.execute("INSERT INTO t VALUES (?, randomblob(500))", (n,))
        assert db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
        n += 1
        db.execute("INSERT INTO t VALUES (?, 1)", (n,))  # the first write restarts the WAL
        got = ship.round(path + "-wal")
        assert not got.restart, got.restart
        assert rebuilt_rows(base, ship.generations(1), tmp_path) == list(range(1, n + 1))
    assert len(ship.generations(1)) == 5 and ship.lineage == 2 and not ship.restarts[1:]


def test_a_wal_made_anew_or_overwritten_starts_a_lineage(tmp_path):
    path = str(tmp_path / "a.db")
    db = connect(path)
    db.execute("CREATE TABLE t(n INTEGER PRIMARY KEY, pad BLOB)")
    ship = Shipped()
    db.execute("INSERT INTO t VALUES (1, randomblob(100))")
    ship.round(path + "-wal")
    db.close()  # the last connection: SQLite checkpoints and deletes the WAL
    assert not os.path.exists(path + "-wal")
    base = (tmp_path / "a.db").read_bytes()
    db = connect(path)
    db.execute("INSERT INTO t VALUES (2, randomblob(100))")
    got = ship.round(path + "-wal")
    assert got.state.lineage == 2 and "anew" in got.restart
    assert rebuilt_rows(base, ship.generations(2), tmp_path) == [1, 2]
    # the restarted WAL grows past frames not shipped before the round sees it
    for n in range(3, 8):
        db.execute("INSERT INTO t VALUES (?, randomblob(100))", (n,))
    ship.round(path + "-wal")
    for n in range(8, 10):
        db.execute("INSERT INTO t VALUES (?, randomblob(100))", (n,))
    db.execute("PRAGMA wal_checkpoint(RESTART)")
    for n in range(10, 30):
        db.execute("INSERT INTO t VALUES (?, randomblob(100))", (n,))
    got = ship.round(path + "-wal")
    assert got.state.lineage == 3 and "overwrote" in got.restart
    db.close()


WRITER = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("CREATE TABLE IF NOT EXISTS t(n INTEGER PRIMARY KEY, pad BLOB)")
for n in range(int(sys.argv[2]), int(sys.argv[3])):
    db.execute("INSERT INTO t VALUES (?, randomblob(200))", (n,))
os._exit(0)  # no close: no checkpoint, the WAL stays as a running application leaves it
"""


def write_rows(path, first, end):
    subprocess.run([sys.executable, "-c", WRITER, path, str(first), str(end)], check=True)


@pytest.mark.parametrize("rows_after", [3, 60])
def test_a_restored_wal_with_the_same_salts_starts_a_lineage(tmp_path, rows_after):
    """A VM restored to an earlier point holds an older copy of the WAL with
    the same salts, and SQLite goes on writing it from that copy's end:
    shorter than what was shipped (3 rows) or, soon, longer again with other
    frames (60 rows). Either way the stream is not the one shipped from:
    a new lineage ships the restored WAL whole, and it rebuilds exactly the
    rows the restored database has."""
    path = str(tmp_path / "a.db")
    write_rows(path, 1, 6)
    ship = Shipped()
    ship.round(path + "-wal")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("a.db", "a.db-wal"):  # the earlier point, as the restore writes it back
        shutil.copy(tmp_path / name, snapshot / name)
    write_rows(path, 6, 30)
    ship.round(path + "-wal")
    assert not ship.restarts and ship.state.lineage == 1
    shipped_to = ship.state.offset
    for name in ("a.db", "a.db-wal"):
        shutil.copy(snapshot / name, tmp_path / name)
    base = (tmp_path / "a.db").read_bytes()
    write_rows(path, 100, 100 + rows_after)
    assert (os.path.getsize(path + "-wal") > shipped_to) == (rows_after == 60)
    got = ship.round(path + "-wal")
    assert got.state.lineage == 2 and "restored or replaced" in got.restart, got.restart
    assert rebuilt_rows(base, ship.generations(2), tmp_path) == list(range(1, 6)) + list(range(100, 100 + rows_after))
    write_rows(path, 200, 203)  # and the new lineage goes on as any stream does
    got = ship.round(path + "-wal")
    assert not got.restart and got.state.lineage == 2
    assert rebuilt_rows(base, ship.generations(2), tmp_path)[-3:] == [200, 201, 202]


def test_append_only_files_rotation_and_truncation(tmp_path):
    path = str(tmp_path / "app.log")
    state, shipped = None, {}

    def round_():
        nonlocal state
        got = file_round(LocalFile(path), path, state, 1)
        for p in got.pieces:
            data = shipped.setdefault(p.file.generation, bytearray())
            assert p.file.offset == len(data)
            data += p.data
        state = got.state
        return got

    with open(path, "ab") as f:
        f.write(b"one\n")
    assert round_().restart == ""  # the first shipment starts the stream: nothing started again
    with open(path, "ab") as f:
        f.write(b"two\n")
    assert not round_().restart and bytes(shipped["1"]) == b"one\ntwo\n"
    assert round_().pieces == []
    os.rename(path, path + ".1")  # rotated: a new file as long as the old one
    with open(path, "wb") as f:
        f.write(b"ONE\nTWO\nthree\n")
    got = round_()
    assert "rotated" in got.restart and bytes(shipped["2"]) == b"ONE\nTWO\nthree\n"
    with open(path, "wb") as f:
        f.write(b"x\n")
    got = round_()
    assert "shorter" in got.restart and bytes(shipped["3"]) == b"x\n"
