"""`rpofs restore`: whole disks out of the repository without a mount (a
real LMDB and pack files; a real loop device for the block-device case)."""

import os
import random
import subprocess

import pytest

from rpofs.store import schema
from rpofs.store.repo import Repository
from rpofs.store.schema import BLOCK_SIZE, CHUNK_SIZE, ChunkLocation
from rpofs.timefmt import US, point_names
from synth import back_up, three_points, write
from vmlab import RPOFS, run_rpofs

pytestmark = pytest.mark.lmdb


def test_every_point_restores_exactly_and_sparse(tmp_path):
    repo, disk, points = three_points(tmp_path / "r", random.Random(4))
    states = [_read(repo, p, 0, len(disk)) for p in points]  # as the mount tests check them
    repo.close()
    names = point_names([p.time_us for p in points])
    for name, state in zip(names, states):
        out = tmp_path / f"{name}.raw"
        r = run_rpofs("--repo", tmp_path / "r", "restore", f"m@{name}:vda", out)
        assert out.read_bytes() == state, name
        assert r.stdout.strip() == f"{out}: {len(state)} bytes, {2 * CHUNK_SIZE} written"
        assert os.stat(out).st_blocks * 512 < len(state)  # the zero half-chunk is a hole
    assert (tmp_path / f"{names[-1]}.raw").read_bytes() == bytes(disk)
    assert not list(tmp_path.glob("*.part"))


def _read(repo, point, offset, length):
    from rpofs.store.materialize import DiskReader
    return bytes(DiskReader(repo, point, "vda").read(offset, length))


def test_restore_refuses_and_leaves_nothing_half_written(tmp_path):
    repo, disk, points = three_points(tmp_path / "r", random.Random(5))
    with repo.env.begin() as txn:  # damage the full's second chunk
        key = txn.get(schema.full_key(points[0].chain, 0, 1), db=repo.db["full_index"])
        loc = ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))
    repo.close()
    with open(tmp_path / "r" / "chunks" / schema.pack_name(loc.pack), "r+b") as f:
        f.seek(loc.offset + 10)
        f.write(b"\x00\xff" * 8)
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"keep me")
    for args, says in [(["m@latest:vda", exists], "exists (--force"),
                       (["m@latest", tmp_path / "x"], "expected VM@TIME:DISK"),
                       (["m@latest:vdz", tmp_path / "x"], "no disk vdz"),
                       (["nosuch@latest:vda", tmp_path / "x"], "no VM 'nosuch'"),
                       (["m@2000-01-01T00:00:00Z:vda", tmp_path / "x"], "no point at or before"),
                       (["m@latest:vda", tmp_path / "bad.raw"], "does not match its key")]:
        r = run_rpofs("--repo", tmp_path / "r", "restore", *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and says in r.stderr, (args, r.stderr)
    assert exists.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.raw", "r"]


def test_restore_onto_a_block_device(tmp_path):
    repo, disk, points = three_points(tmp_path / "r", random.Random(6))
    repo.close()
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\xee" * (len(disk) + 4096))  # old data where the disk has zeros
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    dev = dev.stdout.strip()
    try:
        run_rpofs("--repo", tmp_path / "r", "restore", "m@latest:vda", dev)
        with open(dev, "rb") as f:
            assert f.read(len(disk)) == bytes(disk)
            assert f.read() == b"\xee" * 4096  # nothing past the disk touched
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_restore_names_a_missing_directory_and_refuses_a_directory(tmp_path):
    repo, disk, points = three_points(tmp_path / "r", random.Random(7))
    repo.close()
    for dest, says in [(tmp_path / "nodir" / "x.raw", f"rpofs: {tmp_path / 'nodir'}: no such directory\n"),
                       (tmp_path, f"rpofs: {tmp_path} is a directory: name the file to write\n")]:
        r = run_rpofs("--repo", tmp_path / "r", "restore", "m@latest:vda", dest, check=False)
        assert r.returncode == 1 and r.stderr == says, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def on_a_terminal(*args) -> tuple[subprocess.CompletedProcess, str]:
    """The command with its stderr on a pseudo-terminal: what it drew there."""
    master, slave = os.openpty()
    try:
        r = subprocess.run(RPOFS + [str(a) for a in args], stdout=subprocess.PIPE, stderr=slave, text=True,
                           timeout=120)
    finally:
        os.close(slave)
    drawn = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: nothing more, the other side is closed
            break
        if not data:
            break
        drawn += data
    os.close(master)
    return r, drawn.decode()


def test_progress_on_a_terminal_for_restore_prune_and_defrag(tmp_path):
    from test_prune import three_logs
    repo, disk, points = three_points(tmp_path / "r", random.Random(8))
    repo.close()
    r, drawn = on_a_terminal("--repo", tmp_path / "r", "restore", "m@latest:vda", tmp_path / "out.raw")
    assert r.returncode == 0 and (tmp_path / "out.raw").read_bytes() == bytes(disk)
    assert drawn.startswith("\rrestore vda: ") and "100.0% 2.5 MiB of 2.5 MiB" in drawn, drawn
    quiet = run_rpofs("--repo", tmp_path / "r", "restore", "m@latest:vda", tmp_path / "out.raw", "--force")
    assert quiet.stderr == ""  # not a terminal: nothing drawn

    repo = Repository.init(str(tmp_path / "p"))
    three_logs(repo, random.Random(5))  # pruned to the last: two packs compacted
    repo.close()
    r, drawn = on_a_terminal("--repo", tmp_path / "p", "prune", "m", "--keep-last", "1")
    assert r.returncode == 0 and "2 compacted" in r.stdout, r.stdout
    assert drawn.startswith("\rprune m: compacting: ") and "100.0%" in drawn, drawn

    repo = Repository.init(str(tmp_path / "d"))
    chain = bytearray(random.Random(8).randbytes(8 * CHUNK_SIZE))
    newest = back_up(repo, [chain], [set()], "full", None, US)
    rnd = random.Random(9)
    for i, block in enumerate(rnd.sample(range(128), 100)):
        write(chain, dirty := set(), block * BLOCK_SIZE, rnd.randbytes(BLOCK_SIZE))
        newest = back_up(repo, [chain], [dirty], "log", newest, (2 + i) * US)
    repo.close()
    r, drawn = on_a_terminal("--repo", tmp_path / "d", "defrag", "m")
    assert r.returncode == 0 and "100 log blocks moved" in r.stdout, r.stdout
    assert drawn.startswith("\rdefrag m: ") and "100.0% 8.0 MiB of 8.0 MiB" in drawn  # with the fills, drawn


def test_cp_refuses_to_overwrite_unless_force_as_restore_does(tmp_path):
    """An ext4 filesystem on the whole disk (volume 0), made on the host."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("new\n")
    (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    image = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "8M"], check=True)
    repo = Repository.init(str(tmp_path / "r"))
    back_up(repo, [bytearray(image.read_bytes())], [set()], "full", None, US)
    repo.close()
    out = tmp_path / "out"
    out.mkdir()
    (out / "motd").write_text("old\n")

    def cp(*args):
        return run_rpofs("--repo", tmp_path / "r", "cp", *args, check=False)

    for args in (["m@latest:vda/0/etc/motd", out / "motd"], ["m@latest:vda/0/etc/motd", out]):
        r = cp(*args)
        assert r.returncode == 1 and r.stderr == f"rpofs: {out / 'motd'} exists (--force to replace it)\n"
    r = cp("m@latest:vda/0/etc/motd", tmp_path / "nodir" / "motd")
    assert r.returncode == 1 and r.stderr == f"rpofs: {tmp_path / 'nodir'}: no such directory\n"
    (out / "etc").mkdir()
    r = cp("-r", "m@latest:vda/0/etc", out)
    assert r.returncode == 1 and f"{out / 'etc'} exists (--force" in r.stderr
    assert (out / "motd").read_text() == "old\n" and os.listdir(out / "etc") == []
    os.symlink("/etc/hostname", out / "etc" / "hosts")  # replaced, never written through
    cp("m@latest:vda/0/etc/motd", out, "--force").check_returncode()
    cp("-r", "m@latest:vda/0/etc", out, "--force").check_returncode()
    assert (out / "motd").read_text() == "new\n" and (out / "etc" / "motd").read_text() == "new\n"
    assert not os.path.islink(out / "etc" / "hosts") and (out / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"
