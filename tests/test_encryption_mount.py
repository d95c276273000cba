"""A FUSE mount of an encrypted repository: `rpofs mount` unlocks it and hands
the key to its daemon through a pipe; the disks read byte-exact."""

import os
import random
import subprocess

import pytest

from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE
from rpofs.timefmt import US
from synth import back_up, write
from vmlab import mounted, run_rpofs

pytestmark = pytest.mark.fuse

PASS = "a mount's passphrase"


@pytest.mark.parametrize("given_as", ["key file", "passphrase"])
def test_mount_of_an_encrypted_repository_reads_byte_exact(tmp_path, monkeypatch, given_as):
    for var in ("RPOFS_PASSPHRASE", "RPOFS_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    rnd = random.Random(23)
    path = tmp_path / "r"
    repo = Repository.init(str(path), PASS)
    disk = bytearray(rnd.randbytes(3 * CHUNK_SIZE + 4096))
    disk[CHUNK_SIZE:CHUNK_SIZE + 200_000] = bytes(200_000)
    full = back_up(repo, [disk], [set()], "full", None, US)
    dirty = set()
    for _ in range(20):
        write(disk, dirty, rnd.randrange(len(disk) - BLOCK_SIZE), rnd.randbytes(rnd.choice([100, BLOCK_SIZE])))
    back_up(repo, [disk], [dirty], "log", full, 2 * US)
    repo.close()
    mnt = tmp_path / "mnt"
    os.makedirs(mnt)
    refused = run_rpofs("mount", mnt, repo=path, check=False)
    assert (refused.returncode, refused.stderr) == (1, f"rpofs: repository {path} is encrypted: give the passphrase "
                                                       "with --key-file, $RPOFS_KEY_FILE or $RPOFS_PASSPHRASE\n")
    if given_as == "key file":
        key_file = tmp_path / "key"
        key_file.write_text(PASS + "\n")
        monkeypatch.setenv("RPOFS_KEY_FILE", str(key_file))
    else:
        monkeypatch.setenv("RPOFS_PASSPHRASE", PASS)
    with mounted(path, mnt):
        with open(mnt / "m" / "latest" / "vda.raw", "rb") as f:
            assert f.read() == bytes(disk)
            for _ in range(50):
                at = rnd.randrange(len(disk))
                assert os.pread(f.fileno(), 4096, at) == bytes(disk[at:at + 4096])
        # the daemon got the key through its pipe, not its arguments or environment
        daemon = subprocess.run(["pgrep", "-f", f"rpofs.cli --repo {path} mount"], capture_output=True, text=True)
        assert daemon.stdout.split()
        for pid in daemon.stdout.split():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"--key-fd" in f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            assert PASS.encode() not in environ
