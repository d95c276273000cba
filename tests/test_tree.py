"""The mount's tree without FUSE (rpofs.mount.tree): names, as-of, new
points appearing, and what listing a point reads; on a real repository
filled without libvirt."""

import dataclasses
import json
import random

import pytest

from rpofs.mount.nodes import NoSuchEntry, NotADirectory
from rpofs.mount.tree import ROOT_INO, Tree
from rpofs.store import schema
from rpofs.timefmt import US
from synth import T0, VM, back_up, three_points, write

pytestmark = pytest.mark.lmdb


def test_tree_names_as_of_and_new_points(tmp_path):
    repo, disk, (full, log1, log2) = three_points(tmp_path / "r", random.Random(1))
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    names = [n for n, _ in tree.readdir(vm.ino)]
    # the second point in a second gets the fewest digits that make its name new
    assert names == ["at", "latest", "2026-11-24T18:59:30Z", "2026-11-24T18:59:40Z", "2026-11-24T18:59:40.7Z"]
    assert tree.readlink(tree.lookup(vm.ino, "latest").ino) == "2026-11-24T18:59:40.7Z"
    at = tree.lookup(vm.ino, "at")
    assert tree.readdir(at.ino) == []
    for text, expected in [("2026-11-24T18:59:40.2Z", "2026-11-24T18:59:40Z"),  # as of 40.2xxxxx: log1
                           ("2026-11-24T18:59:40Z", "2026-11-24T18:59:40Z"),  # a point's name: that point
                           ("2026-11-24T18:59:40.9Z", "2026-11-24T18:59:40.7Z"),
                           ("2026-11-24T19:59:35+01:00", "2026-11-24T18:59:30Z"),
                           (str(T0 // US + 5), "2026-11-24T18:59:30Z")]:
        assert tree.readlink(tree.lookup(at.ino, text).ino) == "../" + expected, text
    for bad in ("2026-11-24T18:59:29Z", "2026-11-24T18:59:35", "soon"):
        with pytest.raises(NoSuchEntry):
            tree.lookup(at.ino, bad)
    by_uuid = tree.lookup(ROOT_INO, ".by-uuid")  # a path to the VM that no name clash changes
    assert [n for n, _ in tree.readdir(by_uuid.ino)] == [VM]
    assert tree.readlink(tree.lookup(by_uuid.ino, VM).ino) == "../m"
    with pytest.raises(NoSuchEntry):
        tree.lookup(by_uuid.ino, "00000000-0000-0000-0000-000000000000")
    point = tree.lookup(vm.ino, "2026-11-24T18:59:40Z")
    assert [n for n, _ in tree.readdir(point.ino)] == ["vda.raw", "point.json", "domain.xml", "files"]
    raw = tree.lookup(point.ino, "vda.raw")
    assert raw.size == len(disk)
    with pytest.raises(NotADirectory):
        tree.lookup(raw.ino, "x")
    # a point committed later appears, appended: earlier offsets stay valid
    write(disk, dirty := set(), 0, b"\x03")
    back_up(repo, [disk], [dirty], "log", log2, T0 + 20 * US)
    assert [n for n, _ in tree.readdir(vm.ino)][:5] == names
    assert tree.readlink(tree.lookup(vm.ino, "latest").ino) == "2026-11-24T18:59:50Z"
    newest = tree.lookup(tree.lookup(vm.ino, "2026-11-24T18:59:50Z").ino, "vda.raw")
    assert tree.open(newest.ino).read(0, 10) == bytes(disk[:10])
    # another point in that same second: the name printed before keeps naming its point
    p4 = repo.points(VM)[-1]
    write(disk, dirty := set(), 1, b"\x04")
    back_up(repo, [disk], [dirty], "log", p4, T0 + 20 * US + 500_000)
    assert [n for n, _ in tree.readdir(vm.ino)][5:] == ["2026-11-24T18:59:50Z", "2026-11-24T18:59:50.5Z"]
    assert tree.readlink(tree.lookup(at.ino, "2026-11-24T18:59:50Z").ino) == "../2026-11-24T18:59:50Z"
    assert repo.point_at("m", "2026-11-24T18:59:50Z").point == p4.point
    p = tree.lookup(tree.lookup(vm.ino, "2026-11-24T18:59:50.5Z").ino, "vda.raw")
    assert tree.open(p.ino).read(0, 3) == bytes(disk[:3])
    repo.close()


def test_points_from_before_names_were_stored_keep_their_names(tmp_path):
    """Unnamed records (an older repository) are named as they were; the
    next point in their second, or a prune there, stores those names."""
    repo, disk, (full, log1, log2) = three_points(tmp_path / "r", random.Random(1))
    with repo.write_txn() as txn:
        for p in repo.points(VM):
            txn.put(schema.point_key(p.point), dataclasses.replace(p, name="").encode(), db=repo.db["points"])
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    old = ["2026-11-24T18:59:30Z", "2026-11-24T18:59:40.2Z", "2026-11-24T18:59:40.7Z"]
    assert [n for n, _ in tree.readdir(vm.ino)][2:] == old
    write(disk, dirty := set(), 0, b"\x05")
    new = back_up(repo, [disk], [dirty], "log", log2, T0 + 10 * US + 900_000)
    # the names of that second are stored now; the other second's point keeps its unstored name
    assert [p.name for p in repo.points(VM)] == [""] + old[1:] + [new.name] and new.name not in old
    assert [n for n, _ in tree.readdir(vm.ino)][2:] == old + [new.name]
    assert repo.point_at("m", "2026-11-24T18:59:40.2Z").point == log1.point


def test_listing_a_point_opens_no_guest_filesystem(tmp_path, monkeypatch):
    """ls -l of a point directory must not parse its disks' volumes: point.json
    is listed unsized (ttl 0, read to its end with direct I/O) until read."""
    repo, disk, (full, log1, log2) = three_points(tmp_path / "r", random.Random(1))
    tree = Tree(repo, refresh_s=0)
    vm = tree.lookup(ROOT_INO, "m")
    point = tree.lookup(vm.ino, "2026-11-24T18:59:40Z")
    parsed = []
    real_notes = tree.guest.notes
    monkeypatch.setattr(tree.guest, "notes", lambda p: parsed.append(p.point) or real_notes(p))
    monkeypatch.setattr(tree.guest, "disk", lambda *a: parsed.append("disk") or pytest.fail("a disk was parsed"))
    listed = dict(tree.readdir(point.ino))
    for name in listed:
        tree.lookup(point.ino, name)
    assert parsed == [] and listed["point.json"].unsized and listed["point.json"].ttl == 0
    monkeypatch.undo()
    content = tree.open(listed["point.json"].ino)
    body = content.read(0, 1 << 20)
    assert content.direct_io and json.loads(body)["kind"] == "log"
    after = tree.getattr(listed["point.json"].ino)  # worked out once read: its own size from then on
    assert not after.unsized and after.size == len(body)
    repo.close()


def test_commands_resolve_a_time_as_at_does_and_say_which_point(tmp_path):
    """rpofs.mount.tree.resolve is what cp, restore and run take TIME by:
    the same name at/ links to; a time that is not a point's own name says
    which point it was taken as; a disk with no filesystem is one line."""
    from rpofs.mount.tree import resolve
    from vmlab import run_rpofs
    repo, disk, (full, log1, log2) = three_points(tmp_path / "r", random.Random(3))
    tree = Tree(repo, refresh_s=0)
    uuid = repo.find_vm("m")[0]
    for text in ("2026-11-24T18:59:40.2Z", "2026-11-24T18:59:35Z", "2030-01-01T00:00:00Z", "latest",
                 "2026-11-24T18:59:40.7Z"):
        moment = resolve(repo, "m", text)
        assert moment.name == tree.as_of(uuid, text) and moment.kind == "point"
        assert (moment.note() == "") == (text in ("latest", "2026-11-24T18:59:40.7Z")), text
    assert resolve(repo, "m", "2030-01-01T00:00:00Z").note() == (
        "2030-01-01T00:00:00Z is the point 2026-11-24T18:59:40.7Z, the newest at or before it")
    repo.close()
    out = run_rpofs("cp", "m@latest:vda/0/etc/hosts", tmp_path / "x", repo=tmp_path / "r", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "WARNING" not in out.stderr, out.stderr
    assert out.stderr.startswith("rpofs: disk vda has no volume 0: no partition table or filesystem found")
