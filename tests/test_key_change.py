"""`rpofs key change`, on a real LMDB and real pack files: the master key is
wrapped under the new passphrase and nothing else is rewritten (every other
catalog entry and every pack byte stays as it was, the fingerprint too);
afterwards the old passphrase fails and the new one reads every point
byte-exact; a wrong old passphrase changes nothing; a change that dies
before its commit — an exception inside the transaction, or the process
killed there — leaves the old passphrase working and the new one refused."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap

import lmdb
import pytest

from rpofs.errors import RpofsError, WrongKey
from rpofs.store import crypto, schema
from rpofs.store.repo import Repository
from rpofs.store.schema import CHUNK_SIZE
from test_encryption import NAME, PASS, XML, enc_init, enc_open, history, read_disk
from vmlab import RPOFS, run_rpofs

pytestmark = pytest.mark.lmdb

NEW = "a new passphrase, 2026 edition"


@pytest.fixture(autouse=True)
def no_keys_in_environment(monkeypatch):
    for var in ("RPOFS_PASSPHRASE", "RPOFS_KEY_FILE", "RPOFS_REPO"):
        monkeypatch.delenv(var, raising=False)


def filled(path):
    """An encrypted repository with two chains of points: (points, truth)."""
    repo = enc_init(path)
    try:
        return history(repo, random.Random(11), 2 * CHUNK_SIZE + 777, 6)
    finally:
        repo.close()


def catalog_dump(path) -> dict:
    """Every entry of every sub-database, as stored (sealed values included)."""
    env = lmdb.open(str(path / "catalog"), max_dbs=len(schema.DATABASES), readonly=True, lock=False)
    try:
        out = {}
        with env.begin() as txn:
            for name in schema.DATABASES:
                db = env.open_db(name.encode(), txn=txn, create=False)
                out[name] = dict(txn.cursor(db=db))
        return out
    finally:
        env.close()


def packs(path) -> dict:
    return {n: (path / "chunks" / n).read_bytes() for n in sorted(os.listdir(path / "chunks"))}


def key_files(tmp_path):
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_text(PASS + "\n")
    new.write_text(NEW + "\n")
    return old, new


def reads_every_point(path, passphrase, points, truth) -> None:
    repo = enc_open(path, passphrase)
    try:
        assert [p.point for p in repo.points(points[0].vm)] == [p.point for p in points]
        assert repo.find_vm(NAME)[1] == NAME
        for point in points:
            assert read_disk(repo, point) == truth[point.point]
            assert repo.read_chunk(bytes.fromhex(point.domain_xml)) == XML
    finally:
        repo.close()


def test_change_rewraps_the_master_key_and_nothing_else(tmp_path):
    path = tmp_path / "r"
    points, truth = filled(path)
    old_key, new_key = key_files(tmp_path)
    before, packs_before = catalog_dump(path), packs(path)
    with enc_open(path) as repo:
        fingerprint = repo.keys.fingerprint

    done = run_rpofs("--key-file", old_key, "key", "change", "--new-key-file", new_key, repo=path)
    assert done.stdout == (f"changed the passphrase of repository {path} (key fingerprint {fingerprint}, "
                           f"unchanged); the old one no longer opens it\n")

    after = catalog_dump(path)
    old_record, new_record = before["meta"].pop(schema.META_ENCRYPTION), after["meta"].pop(schema.META_ENCRYPTION)
    assert after == before and packs(path) == packs_before  # nothing else rewritten
    old_fields, new_fields = crypto._read_record(old_record, ""), crypto._read_record(new_record, "")
    assert new_fields["salt"] != old_fields["salt"] and new_fields["wrapped"] != old_fields["wrapped"]
    assert {k: new_fields[k] for k in ("repository", "fingerprint", "n", "r", "p")} == \
        {k: old_fields[k] for k in ("repository", "fingerprint", "n", "r", "p")}
    assert (new_fields["n"], new_fields["r"], new_fields["p"]) == (crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P)

    with pytest.raises(WrongKey, match=f"^wrong passphrase for repository {path}$"):
        enc_open(path, PASS)
    reads_every_point(path, NEW, points, truth)
    with enc_open(path, NEW) as repo:
        assert repo.keys.fingerprint == fingerprint
    wrong = run_rpofs("--key-file", old_key, "points", NAME, repo=path, check=False)
    assert (wrong.returncode, wrong.stderr) == (1, f"rpofs: wrong passphrase for repository {path}\n")
    assert " full " in run_rpofs("--key-file", new_key, "points", NAME, repo=path).stdout

    # and back, the old passphrase from $RPOFS_PASSPHRASE (taken out of the environment at start)
    # and the new from a file
    env = dict(os.environ, RPOFS_PASSPHRASE=NEW)
    back = subprocess.run(RPOFS + ["--repo", str(path), "key", "change", "--new-key-file", str(old_key)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert back.returncode == 0, back.stderr
    reads_every_point(path, PASS, points, truth)


def test_a_wrong_old_passphrase_or_no_new_one_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "r"
    filled(path)
    old_key, new_key = key_files(tmp_path)
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text("not it\n")
    record = catalog_dump(path)["meta"][schema.META_ENCRYPTION]

    wrong = run_rpofs("--key-file", wrong_key, "key", "change", "--new-key-file", new_key, repo=path, check=False)
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (1, "", f"rpofs: wrong passphrase for repository {path}\n")
    monkeypatch.setenv("RPOFS_KEY_FILE", str(wrong_key))
    wrong = run_rpofs("key", "change", "--new-key-file", new_key, repo=path, check=False)
    assert wrong.stderr == f"rpofs: wrong passphrase for repository {path}\n"
    monkeypatch.setenv("RPOFS_KEY_FILE", str(old_key))
    none = run_rpofs("key", "change", repo=path, check=False)  # no terminal to ask on
    assert (none.returncode, none.stderr) == (
        1, "rpofs: key change: give the new passphrase with --new-key-file (or run it on a terminal)\n")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert run_rpofs("key", "change", "--new-key-file", empty, repo=path, check=False).stderr == (
        f"rpofs: key file {empty}: its first line is empty\n")
    monkeypatch.delenv("RPOFS_KEY_FILE")
    missing = run_rpofs("key", "change", "--new-key-file", new_key, repo=path, check=False)
    assert missing.stderr == (f"rpofs: repository {path} is encrypted: give the passphrase with --key-file, "
                              f"$RPOFS_KEY_FILE or $RPOFS_PASSPHRASE\n")
    assert catalog_dump(path)["meta"][schema.META_ENCRYPTION] == record
    with enc_open(path, PASS):
        pass

    plain = tmp_path / "plain"
    Repository.init(str(plain)).close()
    r = run_rpofs("key", "change", "--new-key-file", new_key, repo=plain, check=False)
    assert (r.returncode, r.stderr) == (1, f"rpofs: repository {plain} is not encrypted: it has no passphrase "
                                           f"to change\n")


@contextlib.contextmanager
def failing_before_commit(monkeypatch):
    """Repository.write_txn whose transaction raises after its body ran (the
    new record put), before LMDB commits it."""
    real = Repository.write_txn

    @contextlib.contextmanager
    def write_txn(self):
        with real(self) as txn:
            yield txn
            assert txn.get(schema.META_ENCRYPTION, db=self.db["meta"]) != self.key_record  # the put was made
            raise OSError(5, "injected failure before the commit")

    monkeypatch.setattr(Repository, "write_txn", write_txn)
    yield
    monkeypatch.setattr(Repository, "write_txn", real)


def test_a_failure_before_the_commit_leaves_the_old_passphrase(tmp_path, monkeypatch):
    path = tmp_path / "r"
    points, truth = filled(path)
    record = catalog_dump(path)["meta"][schema.META_ENCRYPTION]
    repo = enc_open(path)
    try:
        with failing_before_commit(monkeypatch), pytest.raises(OSError, match="injected failure"):
            repo.change_passphrase(NEW)
        assert repo.key_record == record
        # a record replaced behind this process's back is not overwritten
        with repo.env.begin(write=True) as txn:
            txn.put(schema.META_ENCRYPTION, crypto.rewrap(record, repo.keys, "someone else's", str(path)),
                    db=repo.db["meta"])
        with pytest.raises(RpofsError, match="its passphrase was changed meanwhile; nothing changed"):
            repo.change_passphrase(NEW)
        with repo.env.begin(write=True) as txn:
            txn.put(schema.META_ENCRYPTION, record, db=repo.db["meta"])
    finally:
        repo.close()
    assert catalog_dump(path)["meta"][schema.META_ENCRYPTION] == record
    with pytest.raises(WrongKey):
        enc_open(path, NEW)
    reads_every_point(path, PASS, points, truth)


# A child that changes the passphrase and stops inside the write transaction,
# the new record put and not committed, until it is killed.
STALLING_CHILD = textwrap.dedent("""
    import contextlib, sys, time
    from rpofs.store import crypto, schema
    from rpofs.store.repo import Repository
    real = Repository.write_txn

    @contextlib.contextmanager
    def write_txn(self):
        with real(self) as txn:
            yield txn
            print("put, not committed", flush=True)
            time.sleep(3600)

    Repository.write_txn = write_txn
    repo = Repository.open(sys.argv[1], keys=crypto.Passphrase(lambda: sys.argv[2]))
    repo.change_passphrase(sys.argv[3])
""")


def test_a_change_killed_before_its_commit_leaves_the_old_passphrase(tmp_path):
    path = tmp_path / "r"
    points, truth = filled(path)
    record = catalog_dump(path)["meta"][schema.META_ENCRYPTION]
    child = subprocess.Popen([sys.executable, "-c", STALLING_CHILD, str(path), PASS, NEW], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline() == "put, not committed\n"  # it is inside the transaction now
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert catalog_dump(path)["meta"][schema.META_ENCRYPTION] == record
    with pytest.raises(WrongKey):
        enc_open(path, NEW)
    reads_every_point(path, PASS, points, truth)
    # the dead writer's lock is no obstacle: the change goes through now
    with enc_open(path) as repo:
        repo.change_passphrase(NEW)
    reads_every_point(path, NEW, points, truth)


def on_a_terminal(argv: list[str], answers: list[str], env: dict) -> tuple[int, str]:
    """Run argv with a terminal of its own (pty.fork: its controlling tty, so
    getpass asks there); each prompt ending in ": " gets the next answer.
    (exit status, everything shown on the terminal)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # the child: nothing but exec (never back into pytest)
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    import select
    import time
    shown, pending = b"", list(answers)
    deadline = time.monotonic() + 60
    try:
        while True:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)  # a prompt never came, or an answer was never taken
                raise AssertionError(f"{argv} on a terminal: stuck after {shown!r}")
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            shown += data
            if pending and shown.endswith(b": "):
                os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_passphrases_asked_on_a_terminal(tmp_path):
    path = tmp_path / "r"
    points, truth = filled(path)
    env = {k: v for k, v in os.environ.items() if k not in ("RPOFS_PASSPHRASE", "RPOFS_KEY_FILE", "RPOFS_REPO")}
    argv = RPOFS + ["--repo", str(path), "key", "change"]
    status, shown = on_a_terminal(argv, [PASS, NEW, NEW + "x"], env)
    assert status == 1 and "key change: the two passphrases differ: nothing changed" in shown, shown
    status, shown = on_a_terminal(argv, ["not it"], env)
    assert status == 1 and f"wrong passphrase for repository {path}" in shown and "new passphrase" not in shown
    reads_every_point(path, PASS, points, truth)
    status, shown = on_a_terminal(argv, [PASS, NEW, NEW], env)
    assert status == 0 and f"passphrase for {path}: " in shown and f"new passphrase for {path}: " in shown \
        and "the same again: " in shown and "changed the passphrase" in shown, shown
    reads_every_point(path, NEW, points, truth)
