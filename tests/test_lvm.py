"""LVM2 logical volumes under files/<disk>/<vg>-<lv>/.

Volume groups are written by hand (tests/lvmimage.py: the LVM2 on-disk format,
checked once against lvm2 itself), filesystems made on the host copied into
their extents.

Real level: a VM whose vda holds a GPT with an ext4 partition and two PVs of
one VG (an LV of three segments out of order and across both PVs, a FAT LV
with a hyphen in its name, a striped LV, an LV of a type not read), and whose
vdb is a whole-disk PV (metadata wrapped around the end of its area); backed
up; every file compared byte for byte through the mount and `rpofs cp`.
Damage: broken labels, headers and metadata, and a VG split over two disks,
leave the disks readable and their other volumes listed.

Pure level: LV maps read against the layout written, the newest of several
metadata copies, a PV without metadata, every kind of damaged metadata
(each logged with its reason), an ext journal replayed on top of an LV.
"""

import logging
import os
import random
import struct
import subprocess

import pytest

from lvmimage import VolumeGroup, lvm_crc, thin_pool, write_label
from rpofs.files import lvm
from rpofs.files.volumes import DiskFiles
from test_files import _sized, backed_up, ext4, fat, make_tree, same_tree
from vmlab import mounted, points_json, run_rpofs

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"


def gpt(path, sizes, types=None):
    """A GPT disk of partitions of `sizes`; their (offset, size) on the disk."""
    _sized(path, sum(sizes) + 4 * MiB)
    types = types or [None] * len(sizes)
    script = "label: gpt\n" + "".join(f"size={s // 512}" + (f", type={t}" if t else "") + "\n"
                                      for s, t in zip(sizes, types))
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    import json
    layout = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True).stdout
    return [(p["start"] * 512, p["size"] * 512) for p in json.loads(layout)["partitiontable"]["partitions"]]


def put(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def build_vda(path, work, src, plain):
    """p1 ext4; p2, p3: PVs of vg0. The LVs' filesystems, by LV name."""
    parts = gpt(path, [24 * MiB, 64 * MiB, 48 * MiB], [None, GPT_LVM, GPT_LVM])
    vg = VolumeGroup("vg0", seed=1)
    pv0, pv1 = vg.pv(*parts[1]), vg.pv(*parts[2])
    vg.linear("root", [(pv0, 8, 3), (pv0, 1, 2), (pv1, 0, 1)])  # out of order, across PVs
    vg.linear("my-fat", [(pv0, 3, 4)])
    vg.striped("stripes", [(pv0, 11), (pv1, 1)], 4, 64 * 1024)
    vg.other("broken", "error", 1)
    ext4(work / "p1.img", plain, 24 * MiB)
    put(path, parts[0][0], (work / "p1.img").read_bytes())
    images = {}
    for name, build, tree in (("root", ext4, src), ("my-fat", fat, plain), ("stripes", ext4, src)):
        images[name] = work / f"lv-{name}.img"
        build(images[name], tree, vg.size(name))
    with open(path, "r+b") as f:
        vg.write(f)
        for name, image in images.items():
            vg.put(f, name, image.read_bytes())
    return vg, parts


def build_vdb(path, work, src):
    """The whole disk a PV of vg-1 (its metadata wrapped around the end of its
    area): a linear LV, and a thin LV in a thin pool."""
    _sized(path, 64 * MiB)
    vg = VolumeGroup("vg-1", seed=2)
    pv = vg.pv(0, 64 * MiB, text_at=MiB - 4096 - 700)
    vg.linear("home", [(pv, 4, 2), (pv, 0, 4)])
    ext4(work / "lv-home.img", src, vg.size("home"))
    ext4(work / "lv-thin.img", src, 24 * MiB)
    _, put_pool = thin_pool(vg, "pool", [(pv, 14, 1)], [(pv, 10, 2), (pv, 7, 2)],
                            {"thin": (work / "lv-thin.img").read_bytes()})
    with open(path, "r+b") as f:
        vg.write(f)
        vg.put(f, "home", (work / "lv-home.img").read_bytes())
        put_pool(f)
    return vg


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lvm")
    src, plain = work / "src", work / "plain"
    make_tree(src, random.Random(4))
    make_tree(plain, random.Random(5), links=False)  # FAT keeps no links or owners
    build_vda(work / "vda.raw", work, src, plain)
    build_vdb(work / "vdb.raw", work, src)
    repo = work / "repo"
    with backed_up("rpofs-lvm", [work / "vda.raw", work / "vdb.raw"], repo) as vm:
        yield vm, repo, work, src, plain


LAYOUT = [("vda", "1", "ext4", "plain"), ("vda", "vg0-root", "ext4", "src"), ("vda", "vg0-my--fat", "fat", "plain"),
          ("vda", "vg0-stripes", "ext4", "src"), ("vdb", "vg--1-home", "ext4", "src"),
          ("vdb", "vg--1-thin", "ext4", "src")]


def test_logical_volumes_through_the_mount_and_cp(lab):
    vm, repo, work, src, plain = lab
    trees = {"src": src, "plain": plain}
    with mounted(repo, work / "mnt") as mnt:
        files = mnt / vm.name / "latest" / "files"
        assert sorted(os.listdir(files / "vda")) == ["1", "vg0-my--fat", "vg0-root", "vg0-stripes"]
        assert sorted(os.listdir(files / "vdb")) == ["vg--1-home", "vg--1-thin"]
        for disk, volume, fs, tree in LAYOUT:
            same_tree(trees[tree], files / disk / volume, fs)
            assert len(os.listdir(files / disk / volume / "many")) == 300
        root = files / "vda" / "vg0-root"
        assert os.stat(root / "big.bin").st_ino == os.stat(root / "big.hardlink").st_ino
        assert os.readlink(root / "lnk") == "etc/nginx/nginx.conf"
        # the disks themselves read as they were written
        for disk in ("vda", "vdb"):
            with open(mnt / vm.name / "latest" / f"{disk}.raw", "rb") as f, open(work / f"{disk}.raw", "rb") as g:
                assert f.read() == g.read()
    mount_log = (repo / "mount.log").read_text()
    assert "vg0-broken: cannot show files: segment type error is not read" in mount_log
    assert "vg--1-pool: cannot show files: a thin pool: its thin volumes are shown" in mount_log
    point = points_json(repo, vm.name)[-1]
    for disk, volume, fs, tree in LAYOUT:
        dest = work / f"cp-{disk}-{volume}"
        run_rpofs("cp", "-r", f"{vm.name}@{point['name']}:{disk}/{volume}/", dest, repo=repo)
        same_tree(trees[tree], dest, fs)
    run_rpofs("cp", f"{vm.name}@latest:vdb/vg--1-home/etc/nginx/nginx.conf", work, repo=repo)
    assert (work / "nginx.conf").read_text() == "worker_processes 2;\n"
    r = run_rpofs("cp", f"{vm.name}@latest:vda/vg0-broken/x", work / "x", repo=repo, check=False)
    assert r.returncode == 1 and "vg0-broken" in r.stderr


def test_damaged_lvm_leaves_the_disks_readable(tmp_path):
    """vda: an ext4 partition beside a PV whose metadata text fails its
    checksum and a PV whose label does; vdb: a whole-disk PV whose metadata
    area header is damaged; vdc and vdd: one VG over both disks (an LV on
    each, and one across them). Every disk reads; each shows what it can."""
    from rpofs.store.repo import Repository
    from synth import back_up

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    image = tmp_path / "fs.img"
    ext4(image, src, 8 * MiB)

    vda = tmp_path / "vda.raw"
    parts = gpt(vda, [8 * MiB, 16 * MiB, 16 * MiB])
    put(vda, parts[0][0], image.read_bytes())
    for n, (offset, size) in enumerate(parts[1:]):
        vg = VolumeGroup(f"bad{n}", seed=10 + n)
        vg.linear("lv", [(vg.pv(offset, size), 0, 2)])
        with open(vda, "r+b") as f:
            vg.write(f)
            vg.put(f, "lv", image.read_bytes())
    _flip(vda, parts[1][0] + 4096 + 512 + 100)   # in the metadata text
    _flip(vda, parts[2][0] + 512 + 100)          # in the label sector

    vdb = tmp_path / "vdb.raw"
    _sized(vdb, 16 * MiB)
    vg = VolumeGroup("bad2", seed=12)
    vg.linear("lv", [(vg.pv(0, 16 * MiB), 0, 2)])
    with open(vdb, "r+b") as f:
        vg.write(f)
        vg.put(f, "lv", image.read_bytes())
    _flip(vdb, 4096 + 30)  # in the metadata area header

    vdc, vdd = tmp_path / "vdc.raw", tmp_path / "vdd.raw"
    _sized(vdc, 24 * MiB)
    _sized(vdd, 24 * MiB)
    vg = VolumeGroup("split", seed=13)
    on_c, on_d = vg.pv(0, 24 * MiB), vg.pv(0, 24 * MiB)  # each at the start of its own disk
    vg.linear("on-c", [(on_c, 0, 2)])
    vg.linear("on-d", [(on_d, 0, 2)])
    vg.linear("across", [(on_c, 2, 1), (on_d, 2, 1)])
    text = vg.text().encode() + b"\0"
    for path, pv, lv in ((vdc, vg.pvs[0], "on-c"), (vdd, vg.pvs[1], "on-d")):
        with open(path, "r+b") as f:
            write_label(f, pv, text)  # each disk's PV with the metadata naming both
            vg.put(f, lv, image.read_bytes())

    disks = [bytearray(p.read_bytes()) for p in (vda, vdb, vdc, vdd)]
    repo = Repository.init(str(tmp_path / "repo"))
    back_up(repo, disks, [set()] * 4, "full", None, 10**15)
    repo.close()
    with mounted(tmp_path / "repo", tmp_path / "mnt") as mnt:
        files = mnt / "m" / "latest" / "files"
        assert os.listdir(files / "vda") == ["1"]
        assert (files / "vda" / "1" / "hello.txt").read_text() == "hello\n"
        assert os.listdir(files / "vdb") == []
        assert os.listdir(files / "vdc") == ["split-on--c"]
        assert os.listdir(files / "vdd") == ["split-on--d"]
        for disk in ("vdc", "vdd"):
            name = "split-on--" + disk[-1]
            assert (files / disk / name / "hello.txt").read_text() == "hello\n"
        for i, disk in enumerate(("vda", "vdb", "vdc", "vdd")):
            with open(mnt / "m" / "latest" / f"{disk}.raw", "rb") as f:
                assert f.read() == bytes(disks[i])
    mount_log = (tmp_path / "repo" / "mount.log").read_text()
    for reason in ("physical volume on partition 2 shows no logical volumes: metadata area at 4096: "
                   "metadata text checksum mismatch",
                   "partition 3: LVM physical volume cannot be read: LVM label in sector 1: checksum mismatch",
                   "physical volume on the whole disk shows no logical volumes: metadata area at 4096: "
                   "metadata area header checksum mismatch",
                   "volume split-across: cannot show files: physical volume"):
        assert reason in mount_log, reason
    assert mount_log.count("split-across") == 2  # once per disk that holds part of it


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


# -- pure level: in-memory disks --------------------------------------------------

class Memory:
    def __init__(self, data):
        self.data = bytes(data)

    def read(self, offset, length):
        return self.data[offset:offset + length]


def volumes_of(data) -> tuple[DiskFiles, list]:
    disk = Memory(data)
    files = DiskFiles(disk.read, len(disk.data), "test disk")
    return files, files.volumes()


@pytest.fixture
def disk(tmp_path):
    """A GPT disk of three partitions (4, 64 and 48 MiB) to lay PVs on."""
    path = tmp_path / "disk.raw"
    parts = gpt(path, [4 * MiB, 64 * MiB, 48 * MiB])
    return path, parts


def lay_out(vg, path, seed=1):
    """vg written, random bytes in each LV of linear or striped segments: {LV: bytes}."""
    rnd = random.Random(seed)
    contents = {}
    with open(path, "r+b") as f:
        vg.write(f)
        for lv in vg.lvs:
            if lv.segments[0]["type"] == "striped":
                contents[lv.name] = rnd.randbytes(vg.size(lv.name))
                vg.put(f, lv.name, contents[lv.name])
    return contents


def lvs_of(data) -> dict[str, lvm.LogicalVolume]:
    disk = Memory(data)
    size = len(disk.data)
    import dissect.volume.disk as dvd
    from rpofs.files.volumes import ReadStream, _length
    table = dvd.Disk(ReadStream(disk.read, size))
    pvs = [lvm.probe(disk.read, p.offset, _length(p, size), f"partition {p.number}") for p in table.partitions]
    return {lv.name: lv for lv in lvm.logical_volumes([p for p in pvs if p], disk.read, "test disk")}


def test_maps_read_what_was_laid_out(disk):
    path, parts = disk
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv0, pv1 = vg.pv(*parts[1]), vg.pv(*parts[2])
    vg.linear("a", [(pv0, 30, 5), (pv0, 2, 3), (pv1, 10, 1), (pv0, 12, 2)])
    vg.striped("s2", [(pv1, 20), (pv0, 40)], 6, 64 * 1024)
    vg.striped("s3", [(pv0, 50), (pv1, 0), (pv0, 56)], 6, 4096)
    want = lay_out(vg, path)
    got = lvs_of(path.read_bytes())
    rnd = random.Random(2)
    for name, data in want.items():
        lv = got[f"vg0-{name}"]
        assert lv.note == "" and lv.size == len(data)
        assert lv.read(0, lv.size) == data
        for _ in range(200):
            at = rnd.randrange(lv.size)
            n = rnd.choice([1, 511, 4096, 65536 + 3, 3 * MiB])
            assert lv.read(at, n) == data[at:at + n], (name, at, n)
        assert lv.read(lv.size - 10, 100) == data[-10:] and lv.read(lv.size, 10) == b""
    assert got["vg0-a"].offset == parts[1][0] + MiB + 30 * MiB  # its first byte on the disk


def test_newest_metadata_copy_and_a_pv_without_metadata(disk):
    """p2 holds seqno 3 of vg0's metadata, p3 seqno 4 (one LV more): the
    newer wins. Then p3 holds none (pvcreate --metadatacopies 0): p2's copy
    finds it, and its extents read."""
    path, parts = disk
    old = VolumeGroup("vg0", extent_size=MiB, seqno=3)
    pv0, pv1 = old.pv(*parts[1]), old.pv(*parts[2])
    old.linear("a", [(pv0, 0, 2)])
    old.linear("c", [(pv1, 5, 1), (pv0, 3, 1)])
    new = VolumeGroup("vg0", extent_size=MiB, seqno=4)
    new.id, new.pvs, new.lvs = old.id, old.pvs, list(old.lvs)
    new.linear("b", [(pv1, 1, 2), (pv0, 5, 1)])
    want = lay_out(new, path)
    with open(path, "r+b") as f:
        write_label(f, old.pvs[0], old.text().encode() + b"\0")
        write_label(f, old.pvs[1], new.text().encode() + b"\0")
    got = lvs_of(path.read_bytes())
    assert sorted(got) == ["vg0-a", "vg0-b", "vg0-c"]
    assert all(got[f"vg0-{n}"].read(0, len(want[n])) == want[n] for n in "abc")

    with open(path, "r+b") as f:
        write_label(f, old.pvs[1], None)
    got = lvs_of(path.read_bytes())
    assert sorted(got) == ["vg0-a", "vg0-c"] and got["vg0-c"].read(0, 2 * MiB) == want["c"]


def test_metadata_wrapped_around_its_area(disk):
    path, parts = disk
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv = vg.pv(*parts[1], text_at=MiB - 4096 - 500)
    vg.linear("a", [(pv, 3, 2)])
    want = lay_out(vg, path)
    text = vg.text().encode()
    assert len(text) > 500  # it does wrap
    assert lvs_of(path.read_bytes())["vg0-a"].read(0, 2 * MiB) == want["a"]


def test_thin_volumes_read_through_their_pool(disk):
    """Two thin LVs in one pool (its data LV of two segments out of order):
    mapped blocks from the pool's data, unmapped ones as zeros."""
    path, parts = disk
    rnd = random.Random(6)
    block = 64 * 1024
    contents = {}
    for name in ("t1", "t2"):
        data = bytearray(rnd.randbytes(6 * MiB))
        for v in rnd.sample(range(len(data) // block), 40):  # blocks never written: unmapped
            data[v * block:(v + 1) * block] = bytes(block)
        contents[name] = bytes(data)
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv0, pv1 = vg.pv(*parts[1]), vg.pv(*parts[2])
    maps, put_pool = thin_pool(vg, "pool", [(pv1, 0, 1)], [(pv0, 20, 10), (pv1, 5, 4), (pv0, 2, 3)], contents)
    assert len(maps["t1"]) == 96 - 40
    with open(path, "r+b") as f:
        vg.write(f)
        put_pool(f)
    with_pool = lvs_of(path.read_bytes())
    assert with_pool["vg0-pool"].note == "cannot show files: a thin pool: its thin volumes are shown"
    for name, data in contents.items():
        lv = with_pool[f"vg0-{name}"]
        assert lv.note == "" and lv.size == len(data) and lv.read(0, lv.size) == data
        for _ in range(100):
            at, n = rnd.randrange(lv.size), rnd.choice([1, 4096, block + 1, 2 * MiB])
            assert lv.read(at, n) == data[at:at + n]


def legs(vg, kind, name, pieces_per_leg, extents):
    """A raid1 or mirror LV over legs of linear pieces, as lvcreate -m1 lays them out."""
    names = []
    for i, pieces in enumerate(pieces_per_leg):
        image = f"{name}_{'rimage' if kind == 'raid1' else 'mimage'}_{i}"
        vg.linear(image, pieces)
        vg.hide(image)
        if kind == "raid1":
            meta = f"{name}_rmeta_{i}"
            vg.linear(meta, [(pieces[0][0], 60 - i, 1)])
            vg.hide(meta)
            names += [meta, image]
        else:
            names += [(image, 0)]
    if kind == "raid1":
        vg.other(name, "raid1", extents, device_count=len(pieces_per_leg), region_size=1024, raids=names)
    else:
        vg.other(name, "mirror", extents, mirror_count=len(pieces_per_leg), region_size=1024, mirrors=names)


@pytest.mark.parametrize("kind", ["raid1", "mirror"])
def test_mirrors_read_their_first_complete_leg(disk, kind):
    """Both legs hold the same bytes, each in its own order of extents. With
    the first leg's PV on another disk, the second is read."""
    path, parts = disk
    data = random.Random(7).randbytes(6 * MiB)
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv0, pv1 = vg.pv(*parts[1]), vg.pv(*parts[2])
    legs(vg, kind, "m", [[(pv0, 10, 4), (pv0, 2, 2)], [(pv1, 20, 1), (pv1, 3, 5)]], 6)
    with open(path, "r+b") as f:
        vg.write(f)
        for leg in (f"m_{'rimage' if kind == 'raid1' else 'mimage'}_{i}" for i in (0, 1)):
            vg.put(f, leg, data)
    got = lvs_of(path.read_bytes())
    assert sorted(got) == ["vg0-m"] and got["vg0-m"].read(0, len(data)) == data
    assert got["vg0-m"].offset == parts[1][0] + MiB + 10 * MiB  # the first leg's first byte

    # the first leg's PV elsewhere: p2 is no PV here any more, its metadata copy gone with it
    with open(path, "r+b") as f:
        f.seek(parts[1][0])
        f.write(bytes(MiB))
    [lv] = lvs_of(path.read_bytes()).values()
    assert lv.note == "" and lv.read(0, len(data)) == data and lv.offset == parts[2][0] + MiB + 20 * MiB


BAD = {  # name: (how the VG is written or damaged, the reason logged)
    "label checksum": ("flip", 512 + 200, "LVM label in sector 1: checksum mismatch"),
    "header checksum": ("flip", 4096 + 40, "metadata area header checksum mismatch"),
    "header magic": ("flip", 4096 + 6, "no LVM2 metadata area header"),
    "text checksum": ("flip", 4096 + 512 + 30, "metadata text checksum mismatch"),
    "text not parsed": ("text", "vg0 {\nid = \n", "metadata text cannot be parsed"),
    "extents past the PV": ("lv", [("pv0", 60, 10)], "lie outside physical volume pv0"),
    "unknown PV": ("lv", [("pv7", 0, 1)], "unknown physical volume 'pv7'"),
    "a gap in the segments": ("gap", None, "leave a gap or overlap at extent 1"),
    "a name LVM refuses": ("name", "bad/name", "logical volume name 'bad/name' is not valid"),
    "a thin pool of nothing": ("thin", None, "logical volume None is named but not described"),
    "an old-style snapshot": ("snapshot", None, "an old-style snapshot (its copy-on-write store) is not read"),
}


@pytest.mark.parametrize("case", BAD)
def test_damaged_metadata_is_logged_and_the_rest_shows(disk, case, caplog):
    """p1 holds ext4 throughout; vg0's good LV shows unless the whole VG is lost."""
    path, parts = disk
    kind, what, reason = BAD[case]
    src = path.parent / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    ext4(path.parent / "p1.img", src, 4 * MiB)
    put(path, parts[0][0], (path.parent / "p1.img").read_bytes())
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv0 = vg.pv(*parts[1])
    vg.linear("good", [(pv0, 0, 4)])
    if kind == "lv":
        vg.linear("bad", what)
    elif kind == "name":
        vg.linear(what, [(pv0, 5, 1)])
    elif kind == "gap":
        vg.linear("bad", [(pv0, 5, 1), (pv0, 7, 1)])
        vg.lvs[-1].segments[1]["start_extent"] = 2
    elif kind == "thin":
        vg.other("bad", "thin", 1)
    elif kind == "snapshot":  # lvcreate -s: the visible LV is the copy-on-write store
        vg.linear("bad", [(pv0, 5, 1)])
        vg.other("snapshot0", "snapshot", 4, visible=False, chunk_size=8, origin="good", cow_store="bad")
    with open(path, "r+b") as f:
        vg.write(f)
        vg.put(f, "good", (path.parent / "p1.img").read_bytes())
    if kind == "flip":
        _flip(path, parts[1][0] + what)
    elif kind == "text":
        text = what.encode() + b"\0"
        header = bytearray(path.read_bytes()[parts[1][0] + 4096:parts[1][0] + 4096 + 512])
        struct.pack_into("<QQII", header, 40, 512, len(text), lvm_crc(text), 0)
        struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
        put(path, parts[1][0] + 4096, bytes(header))
        put(path, parts[1][0] + 4096 + 512, text)
    with caplog.at_level(logging.INFO, logger="rpofs.files"):
        files, volumes = volumes_of(path.read_bytes())
    names = [v.name for v in volumes]
    whole_vg_lost = kind in ("flip", "text")
    assert names == (["1"] if whole_vg_lost else ["1", "vg0-good"])
    assert reason in caplog.text
    # logged once, however often the volumes are asked for
    files.volumes()
    files.volumes()
    assert caplog.text.count(reason) == 1
    if not whole_vg_lost:
        [bad] = [v for v in files.skipped if v.name.startswith("vg0-")]
        assert bad.note.startswith("cannot show files: ") and reason in bad.note
        with files.filesystem(volumes[1]).lock:
            assert files.filesystem(volumes[1]).root().is_dir


def test_journal_replayed_on_a_logical_volume(tmp_path, caplog):
    """An ext4 whose journal holds a committed transaction, in an LV of
    segments out of order: the file the transaction rewrote reads new."""
    from test_journal import Image, JournalWriter

    src = tmp_path / "src"
    src.mkdir()
    (src / "note.txt").write_text("old text\n")
    fs = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(src), str(fs), "16M"], check=True)
    out = subprocess.run(["debugfs", "-R", "bmap /note.txt 0", str(fs)], capture_output=True, text=True,
                         check=True).stdout
    block = int(out.split()[0])
    image = Image(fs)
    JournalWriter(image, "v3-64").write([([(block, b"new text\n".ljust(4096, b"\0"))], [], True)], 10, 5)

    path = tmp_path / "disk.raw"
    parts = gpt(path, [32 * MiB])
    vg = VolumeGroup("vg0", extent_size=MiB)
    pv = vg.pv(*parts[0])
    vg.linear("j", [(pv, 20, 6), (pv, 2, 10)])
    with open(path, "r+b") as f:
        vg.write(f)
        vg.put(f, "j", fs.read_bytes())
    with caplog.at_level(logging.INFO, logger="rpofs.files"):
        files, volumes = volumes_of(path.read_bytes())
    [volume] = volumes
    assert volume.name == "vg0-j" and volume.note.startswith("ext journal replayed in memory: 1 transactions")
    fsys = files.filesystem(volume)
    with fsys.lock:
        entry = next(e for e in fsys.children(fsys.root()) if e.name == "note.txt")
        assert fsys.open(entry).read() == b"new text\n"
