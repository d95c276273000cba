"""Real level: a libvirtd VM with two qcow2 disks, guest writes between backups,
one full and several log backups through `rpofs backup`, a real FUSE mount,
and every disk at every point compared byte for byte with a model of the writes."""

import errno
import os
import uuid

import pytest

from vmlab import Model, TestVM, make_qcow2, mounted, points_json, run_rpofs, seeded_content, wait_for

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
# sizes not multiples of the 64 KiB block nor of the 1 MiB chunk
SIZES = (24 * MiB + 1536, 9 * MiB + 512)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("lab")
    contents = [seeded_content(size, seed) for seed, size in enumerate(SIZES)]
    paths = []
    for i, content in enumerate(contents):
        path = str(d / f"disk{i}.qcow2")
        make_qcow2(path, bytes(content))
        paths.append((path, "qcow2"))
    vm = TestVM(f"rpofs-e2e-{uuid.uuid4().hex[:8]}", paths)
    repo = d / "repo"
    run_rpofs("init", repo=repo)
    yield vm, Model(vm, contents), repo, d
    vm.destroy()


# (disk, offset, length, pattern or None for zeros): aligned, unaligned,
# across chunk boundaries, zeroing, and the short last block.
ROUNDS = [
    [(0, 1 * MiB, 64 << 10, 0xab), (1, 3000, 5000, 0x11), (0, 5 * MiB - 512, 1024, 0x22)],
    [(0, 2 * MiB, 3 * MiB, None), (1, 9 * MiB - 4096, 4096 + 512, 0x33), (0, 1 * MiB + 512, 512, 0x44)],
    [(0, SIZES[0] - 1536, 1536, 0x55), (1, 0, 2 * MiB + 512, 0x66)],
]


def test_backup_mount_and_read_every_point(lab):
    vm, model, repo, d = lab
    truth = {}  # point number -> disks as they were

    out = run_rpofs("backup", vm.name, repo=repo).stdout
    assert ": full point " in out, out
    truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()

    for writes in ROUNDS:
        for w in writes:
            model.write(*w)
        out = run_rpofs("backup", vm.name, repo=repo).stdout
        assert ": log point " in out, out
        truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()

    # a second chain on request, then a log onto it
    run_rpofs("backup", vm.name, "--full", repo=repo)
    truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()
    model.write(0, 7 * MiB + 100 * 512, 70_000 - 70_000 % 512, 0x77)
    run_rpofs("backup", vm.name, repo=repo)
    truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()

    points = points_json(repo, vm.name)
    assert [p["kind"] for p in points] == ["full", "log", "log", "log", "full", "log"]
    assert points[1]["chain"] == points[0]["point"] and points[5]["chain"] == points[4]["point"]
    assert points[4]["reason"] == "asked for a full backup"
    # a log stores about what changed, not the disk
    assert points[2]["stats"]["logical_bytes"] <= 6 * MiB
    # only the newest checkpoint stays in libvirt
    assert vm.checkpoints() == [points[-1]["checkpoint"]]

    with mounted(repo, d / "mnt") as mnt:
        vmdir = mnt / vm.name
        assert os.readlink(vmdir / "latest") == points[-1]["name"]
        for p in points:
            pdir = vmdir / p["name"]
            assert sorted(os.listdir(pdir)) == ["domain.xml", "files", "point.json", "vda.raw", "vdb.raw"]
            for i, expected in enumerate(truth[p["point"]]):
                disk = pdir / f"vd{chr(97 + i)}.raw"
                assert disk.stat().st_size == SIZES[i]
                with open(disk, "rb") as f:
                    got = f.read()
                assert got == expected, f"{p['name']} vd{chr(97 + i)} differs at " \
                    f"{next(k for k in range(len(got)) if got[k] != expected[k])}"
            assert (pdir / "point.json").read_bytes() and f"<name>{vm.name}</name>" in (pdir / "domain.xml").read_text()

        # as-of: a point's own name, a time between points, long after, before all, nonsense
        second = points[1]
        assert os.readlink(vmdir / "at" / second["name"]) == "../" + second["name"]
        assert os.readlink(vmdir / "at" / "2999-01-01T00:00:00Z") == "../" + points[-1]["name"]
        with open(vmdir / "at" / second["name"] / "vdb.raw", "rb") as f:
            assert f.read() == truth[second["point"]][1]
        assert os.listdir(vmdir / "at") == []
        for bad in ("2000-01-01T00:00:00Z", "yesterday", "2026-11-24T10:00:00"):
            with pytest.raises(FileNotFoundError):
                os.stat(vmdir / "at" / bad)

        # read-only
        with pytest.raises(OSError) as e:
            open(vmdir / "latest" / "vda.raw", "r+b")
        assert e.value.errno == errno.EROFS

        # a point taken while mounted shows up without remounting
        model.write(1, 4 * MiB, 64 << 10, 0x88)
        run_rpofs("backup", vm.name, repo=repo)
        newest = points_json(repo, vm.name)[-1]
        wait_for(lambda: os.path.exists(vmdir / newest["name"]), timeout=5, what="the new point in the mount")
        with open(vmdir / newest["name"] / "vdb.raw", "rb") as f:
            assert f.read() == model.snapshot()[1]


def test_failed_backup_leaves_nothing_and_the_next_log_is_right(lab):
    """A backup that fails after libvirt made its checkpoint: no point, the
    checkpoint deleted (its bitmap folded into its parent's), the job ended —
    and the next log still carries the writes the failed one would have."""
    vm, model, repo, d = lab
    before = points_json(repo, vm.name)
    model.write(0, 3 * MiB + 4096, 8192, 0x99)
    os.rename(repo / "chunks", repo / "chunks.away")
    try:
        r = run_rpofs("backup", vm.name, repo=repo, check=False)
    finally:
        os.rename(repo / "chunks.away", repo / "chunks")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert points_json(repo, vm.name) == before
    assert vm.checkpoints() == [before[-1]["checkpoint"]]
    assert vm.dom.jobInfo()[0] == 0

    model.write(1, 5 * MiB, 4096, 0xAA)
    out = run_rpofs("backup", vm.name, repo=repo).stdout
    assert ": log point " in out
    latest = points_json(repo, vm.name)[-1]
    with mounted(repo, d / "mnt") as mnt:
        for i, expected in enumerate(model.snapshot()):
            with open(mnt / vm.name / latest["name"] / f"vd{chr(97 + i)}.raw", "rb") as f:
                assert f.read() == expected


def test_encrypted_repository_backs_up_and_mounts_byte_exact(lab, monkeypatch):
    """The same VM into an encrypted repository (last in this module: a second
    repository of one VM takes over its checkpoint): `rpofs backup` and the
    mount with the key from $RPOFS_KEY_FILE, nothing of the VM's name or XML
    in the repository's files."""
    vm, model, _, d = lab
    repo = d / "encrypted"
    key_file = d / "key"
    key_file.write_text("e2e passphrase\n")
    monkeypatch.delenv("RPOFS_PASSPHRASE", raising=False)
    monkeypatch.setenv("RPOFS_KEY_FILE", str(key_file))
    run_rpofs("init", "--encrypt", repo=repo)
    truth = {}
    assert ": full point " in run_rpofs("backup", vm.name, repo=repo).stdout
    truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()
    model.write(0, 1 * MiB + 512, 70_000 - 70_000 % 512, 0xE1)
    assert ": log point " in run_rpofs("backup", vm.name, repo=repo).stdout
    truth[points_json(repo, vm.name)[-1]["point"]] = model.snapshot()
    monkeypatch.delenv("RPOFS_KEY_FILE")
    refused = run_rpofs("points", vm.name, repo=repo, check=False)
    assert refused.returncode == 1 and "is encrypted: give the passphrase" in refused.stderr
    monkeypatch.setenv("RPOFS_KEY_FILE", str(key_file))
    with mounted(repo, d / "mnt-encrypted") as mnt:
        for p in points_json(repo, vm.name):
            for i, expected in enumerate(truth[p["point"]]):
                with open(mnt / vm.name / p["name"] / f"vd{chr(97 + i)}.raw", "rb") as f:
                    assert f.read() == expected
    files = [repo / "catalog" / "data.mdb"] + sorted((repo / "chunks").iterdir())
    assert not any(vm.name.encode() in f.read_bytes() for f in files)
