"""Real level: guest filesystems (ext4, XFS, Btrfs, FAT, NTFS) built on the
host, laid on a VM's disks in GPT and MBR partitions and on a whole disk,
backed up; every file compared byte for byte through <point>/files/ and
through `rpofs cp`; a log that changes one file and deletes another."""

import contextlib
import json
import os
import random
import shutil
import stat
import subprocess
import uuid

import libvirt_qemu
import pytest

from vmlab import TestVM, mounted, points_json, run_rpofs, wait_for

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PART = {"ext4": 24 * MiB, "btrfs": 128 * MiB, "fat": 24 * MiB, "xfs": 300 * MiB, "ntfs": 24 * MiB}


def make_tree(root, rnd, links=True):
    """A small guest tree: text, a big random file, an empty file, a deep path,
    a private file of another owner, a symlink and a hard link."""
    os.makedirs(root / "etc" / "nginx")
    (root / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 2;\n")
    (root / "big.bin").write_bytes(rnd.randbytes(5 * MiB + 123))
    (root / "empty").write_bytes(b"")
    (root / "many").mkdir()
    for i in range(300):
        (root / "many" / f"f{i:04d}.txt").write_text(f"file {i}\n" * (i % 7))
    if links:
        secret = root / "etc" / "secret"
        secret.write_text("s3cret\n")
        os.chmod(secret, 0o600)
        os.chown(secret, 1234, 55)
        os.symlink("etc/nginx/nginx.conf", root / "lnk")
        os.link(root / "big.bin", root / "big.hardlink")


def ext4(img, src, size):
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), f"{size // 1024}k"], check=True)


def btrfs(img, src, size):
    _sized(img, size)
    subprocess.run(["mkfs.btrfs", "-q", "--rootdir", str(src), str(img)], check=True, capture_output=True)


def fat(img, src, size):
    _sized(img, size)
    subprocess.run(["mkfs.vfat", str(img)], check=True, capture_output=True)
    for child in sorted(os.listdir(src)):
        subprocess.run(["mcopy", "-s", "-p", "-m", "-i", str(img), str(src / child), "::/"], check=True)


def xfs(img, src, size):
    _sized(img, size)
    proto = img.with_suffix(".proto")
    lines = ["/unused", "0 0", "d--755 0 0"]

    def walk(d):
        for name in sorted(os.listdir(d)):
            p = d / name
            st = os.lstat(p)
            perm = f"{stat.S_IMODE(st.st_mode):03o}"
            if stat.S_ISLNK(st.st_mode):
                lines.append(f"{name} l--{perm} {st.st_uid} {st.st_gid} {os.readlink(p)}")
            elif stat.S_ISDIR(st.st_mode):
                lines.append(f"{name} d--{perm} {st.st_uid} {st.st_gid}")
                walk(p)
                lines.append("$")
            else:
                lines.append(f"{name} ---{perm} {st.st_uid} {st.st_gid} {p}")
    walk(src)
    proto.write_text("\n".join(lines + ["$", ""]))
    subprocess.run(["mkfs.xfs", "-q", "-f", "-p", str(proto), str(img)], check=True)


def ntfs(img, src, size):
    """ntfscp writes into an unmounted volume but cannot make directories:
    NTFS gets the root's files."""
    _sized(img, size)
    subprocess.run(["mkntfs", "-F", "-Q", "-q", str(img)], check=True, capture_output=True)
    for name in sorted(os.listdir(src)):
        if (src / name).is_file() and not (src / name).is_symlink():
            subprocess.run(["ntfscp", "-q", str(img), str(src / name), name], check=True)


def _sized(img, size):
    with open(img, "wb") as f:
        f.truncate(size)


def disk_with(path, parts, table, work):
    """A raw disk holding `parts` [(fs name, image)] in a GPT or MBR table."""
    size = sum(PART[name] for name, _ in parts) + 4 * MiB
    _sized(path, size)
    script = ("label: gpt\n" if table == "gpt" else "label: dos\n") + "".join(
        f"size={PART[name] // 512}\n" for name, _ in parts)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    layout = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True).stdout
    import json
    starts = [p["start"] * 512 for p in json.loads(layout)["partitiontable"]["partitions"]]
    with open(path, "r+b") as out:
        for start, (_, image) in zip(starts, parts):
            with open(image, "rb") as f:
                out.seek(start)
                shutil.copyfileobj(f, out, 4 * MiB)


def qcow2(raw):
    out = str(raw) + ".qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), out], check=True)
    return out


@contextlib.contextmanager
def backed_up(prefix: str, raws: list, repo):
    """A VM with these raw images as qcow2 disks, and a repository holding one
    full backup of it; the VM is destroyed afterwards."""
    vm = TestVM(f"{prefix}-{uuid.uuid4().hex[:8]}", [(qcow2(raw), "qcow2") for raw in raws])
    try:
        run_rpofs("init", repo=repo)
        run_rpofs("backup", vm.name, repo=repo)
        yield vm
    finally:
        vm.destroy()


def same_tree(src, got, fs):
    """Every file of src is in got with the same bytes; modes, owners, links
    where the filesystem keeps them."""
    posix = fs in ("ext4", "xfs", "btrfs")
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            a, b = os.path.join(dirpath, name), os.path.join(got, rel, name)
            if os.path.islink(a):
                if posix:
                    assert os.readlink(b) == os.readlink(a), b
                continue
            if fs == "ntfs" and rel != ".":
                continue
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read(), b
            if posix:
                sa, sb = os.lstat(a), os.lstat(b)
                assert (stat.S_IMODE(sb.st_mode), sb.st_uid, sb.st_gid) == \
                    (stat.S_IMODE(sa.st_mode), sa.st_uid, sa.st_gid), b
                assert abs(sb.st_mtime - sa.st_mtime) < 2, b


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("files")
    rnd = random.Random(4)
    src, plain = work / "src", work / "plain"
    make_tree(src, rnd)
    make_tree(plain, random.Random(5), links=False)  # FAT and NTFS keep no links or owners
    images = {}
    for name, build in (("ext4", ext4), ("btrfs", btrfs), ("fat", fat), ("xfs", xfs), ("ntfs", ntfs)):
        images[name] = work / f"{name}.img"
        build(images[name], plain if name in ("fat", "ntfs") else src, PART[name])
    disk_with(work / "vda.raw", [("ext4", images["ext4"]), ("btrfs", images["btrfs"]), ("fat", images["fat"])],
              "gpt", work)
    disk_with(work / "vdb.raw", [("xfs", images["xfs"]), ("ntfs", images["ntfs"])], "dos", work)
    whole = work / "vdc.raw"  # a filesystem on the whole disk
    ext4(whole, src, PART["ext4"])
    repo = work / "repo"
    with backed_up("rpofs-files", [work / "vda.raw", work / "vdb.raw", whole], repo) as vm:
        yield vm, repo, work, src, plain


LAYOUT = [("vda", "1", "ext4"), ("vda", "2", "btrfs"), ("vda", "3", "fat"), ("vdb", "1", "xfs"),
          ("vdb", "2", "ntfs"), ("vdc", "0", "ext4")]


def test_every_filesystem_through_the_mount_and_cp(lab):
    vm, repo, work, src, plain = lab
    with mounted(repo, work / "mnt") as mnt:
        files = mnt / vm.name / "latest" / "files"
        assert sorted(os.listdir(files)) == ["vda", "vdb", "vdc"]
        assert sorted(os.listdir(files / "vda")) == ["1", "2", "3"] and os.listdir(files / "vdc") == ["0"]
        for disk, volume, fs in LAYOUT:
            tree = src if fs in ("ext4", "btrfs", "xfs") else plain
            same_tree(tree, files / disk / volume, fs)
            if fs in ("ext4", "btrfs"):  # (an XFS protofile cannot make hard links)
                a, b = os.stat(files / disk / volume / "big.bin"), os.stat(files / disk / volume / "big.hardlink")
                assert a.st_ino == b.st_ino and a.st_nlink == 2
            if fs != "ntfs":
                assert len(os.listdir(files / disk / volume / "many")) == 300
        # point.json says what files/ shows; the point was taken without freezing
        shown = json.loads((mnt / vm.name / "latest" / "point.json").read_text())["files"]
        assert {(d, v["volume"]) for d, x in shown.items() for v in x["volumes"] if v["shown"]} == \
            {(d, v) for d, v, _ in LAYOUT}
        assert shown["vdb"]["volumes"][0]["note"].startswith("XFS log not replayed")
        assert all(not x["notes"] for x in shown.values())
    point = points_json(repo, vm.name)[-1]
    for disk, volume, fs in LAYOUT:
        dest = work / f"cp-{disk}-{volume}"
        run_rpofs("cp", "-r", f"{vm.name}@{point['name']}:{disk}/{volume}/", dest, repo=repo)
        same_tree(src if fs in ("ext4", "btrfs", "xfs") else plain, dest, fs)
    run_rpofs("cp", f"{vm.name}@latest:vda/1/etc/nginx/nginx.conf", work, repo=repo)
    assert (work / "nginx.conf").read_text() == "worker_processes 2;\n"


def test_cp_bad_input(lab):
    vm, repo, work, *_ = lab
    for source, what in [(f"{vm.name}@latest:vda/1/nope", "no 'nope'"),
                         (f"{vm.name}@latest:vda/1/etc", "is a directory"),
                         (f"{vm.name}@2000-01-01T00:00:00Z:vda/1/etc", "no point at or before"),
                         (f"{vm.name}@latest:vdz/1/x", "no disk vdz"),
                         ("nosuchvm@latest:vda/1/x", "no VM 'nosuchvm'"),
                         (f"{vm.name}:vda/1/x", "expected VM@TIME")]:
        r = run_rpofs("cp", source, work / "out", repo=repo, check=False)
        assert r.returncode == 1 and what in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_log_that_changes_and_deletes_files(lab):
    """vdc's filesystem is rewritten under the running VM (as a guest would
    change it) with one file changed and one deleted; a log backup; the new
    point shows the new state, the older point the old."""
    vm, repo, work, src, _ = lab
    before = points_json(repo, vm.name)[-1]
    changed = work / "src2"
    shutil.copytree(src, changed, symlinks=True)
    (changed / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 8;\n")
    (changed / "empty").unlink()
    image = work / "vdc-new.img"
    ext4(image, changed, PART["ext4"])
    out = libvirt_qemu.qemuMonitorCommand(
        vm.dom, f'qemu-io -d /machine/peripheral/virtio-disk2/virtio-backend "write -s {image} 0 {PART["ext4"]}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    assert "error" not in out.lower(), out
    run_rpofs("backup", vm.name, repo=repo)
    after = points_json(repo, vm.name)[-1]
    assert after["kind"] == "log"
    with mounted(repo, work / "mnt") as mnt:
        new, old = mnt / vm.name / after["name"] / "files/vdc/0", mnt / vm.name / before["name"] / "files/vdc/0"
        assert (new / "etc/nginx/nginx.conf").read_text() == "worker_processes 8;\n"
        assert not (new / "empty").exists()
        assert (old / "etc/nginx/nginx.conf").read_text() == "worker_processes 2;\n"
        assert (old / "empty").exists()
        same_tree(changed, new, "ext4")


def test_damage_fails_only_what_it_touches(tmp_path):
    """A corrupt chunk under one guest file: that file gives EIO, its
    neighbours and the listing still read. A damaged partition table: no
    volumes, the disk itself still reads."""
    import errno

    from rpofs.store import schema
    from rpofs.store.repo import Repository
    from rpofs.store.schema import CHUNK_SIZE, ChunkLocation
    from synth import back_up

    rnd = random.Random(8)
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.bin").write_bytes(rnd.randbytes(3 * MiB))
    two = rnd.randbytes(3 * MiB)
    (src / "two.bin").write_bytes(two)
    image = tmp_path / "fs.img"
    ext4(image, src, PART["ext4"])
    disk_with(tmp_path / "good.raw", [("ext4", image)], "gpt", tmp_path)
    good = bytearray((tmp_path / "good.raw").read_bytes())
    bad_table = bytearray(good)
    bad_table[0:34 * 512] = rnd.randbytes(34 * 512)  # MBR, GPT header and entries
    repo = Repository.init(str(tmp_path / "repo"))
    point = back_up(repo, [good, bad_table], [set(), set()], "full", None, 10**15)
    middle = good.find(two[:4096]) + 3 * MiB // 2  # a chunk holding nothing but two.bin
    with repo.env.begin() as txn:
        key = txn.get(schema.full_key(point.chain, 0, middle // CHUNK_SIZE), db=repo.db["full_index"])
        loc = ChunkLocation.decode(txn.get(key, db=repo.db["chunks"]))
    repo.close()
    with open(tmp_path / "repo" / "chunks" / f"pack-{loc.pack:08d}", "r+b") as f:
        f.seek(loc.offset + 100)
        f.write(b"\xff" * 16)
    with mounted(tmp_path / "repo", tmp_path / "mnt") as mnt:
        files = mnt / "m" / "latest" / "files"
        assert sorted(os.listdir(files / "vda" / "1")) == ["lost+found", "one.bin", "two.bin"]
        assert (files / "vda" / "1" / "one.bin").read_bytes() == (src / "one.bin").read_bytes()
        with pytest.raises(OSError) as e:
            (files / "vda" / "1" / "two.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert os.listdir(files / "vdb") == []
        shown = json.loads((mnt / "m" / "latest" / "point.json").read_text())["files"]
        assert shown["vdb"]["volumes"] == [] and len(shown["vdb"]["notes"]) == 1
        assert [v["volume"] for v in shown["vda"]["volumes"]] == ["1"] and not shown["vda"]["notes"]
        with open(mnt / "m" / "latest" / "vdb.raw", "rb") as f:  # (it shares the bad chunk: dedup)
            assert f.read(CHUNK_SIZE) == bytes(bad_table[:CHUNK_SIZE])


def test_readers_while_backups_add_points(lab):
    """Copies out of several points through the mount while backups keep
    adding points: every copy right, nothing hangs, the new points appear."""
    import threading

    vm, repo, work, src, plain = lab
    want = (src / "big.bin").read_bytes()
    vdb_size = PART["xfs"] + PART["ntfs"] + 4 * MiB
    errors, done = [], threading.Event()

    def back_up_repeatedly():
        rnd = random.Random(11)
        try:
            while not done.is_set():
                offset = vdb_size - rnd.randrange(1, 32) * 64 * 1024  # past the partitions
                vm.write(1, offset, 64 * 1024, rnd.randrange(1, 255))
                run_rpofs("backup", vm.name, repo=repo)
        except Exception as e:  # reported below
            errors.append(e)

    with mounted(repo, work / "mnt") as mnt:
        first = points_json(repo, vm.name)[0]["name"]
        writer = threading.Thread(target=back_up_repeatedly)
        writer.start()

        def read(n):
            try:
                for i in range(4):
                    point = first if (n + i) % 2 else "latest"
                    got = (mnt / vm.name / point / "files/vda/1/big.bin").read_bytes()
                    assert got == want, f"reader {n} pass {i}"
            except Exception as e:
                errors.append(e)

        readers = [threading.Thread(target=read, args=(n,)) for n in range(3)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout=120)
        done.set()
        writer.join(timeout=120)
        assert not any(t.is_alive() for t in readers + [writer]), "a reader or the backups hung"
        assert errors == []
        newest = points_json(repo, vm.name)[-1]["name"]
        wait_for(lambda: os.path.exists(mnt / vm.name / newest), timeout=5, what="the newest point")


def test_a_directory_of_100000_entries(tmp_path):
    """Listed through the mount, read lazily: only that directory's blocks.
    (Btrfs: mkfs.ext4 -d takes minutes to fill such a directory.)"""
    from rpofs.store.repo import Repository
    from synth import back_up

    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(100_000):
        (src / "big" / f"entry-{i:06d}").touch()
    image = tmp_path / "fs.img"
    btrfs(image, src, 512 * MiB)
    shutil.rmtree(src)
    repo = Repository.init(str(tmp_path / "repo"))
    back_up(repo, [bytearray(image.read_bytes())], [set()], "full", None, 10**15)
    repo.close()
    big = tmp_path / "mnt" / "m" / "latest" / "files" / "vda" / "0" / "big"
    with mounted(tmp_path / "repo", tmp_path / "mnt"):
        names = os.listdir(big)
        assert len(names) == 100_000 and len(set(names)) == 100_000
        assert os.stat(big / "entry-099999").st_size == 0


def big_tree(root, n, links=True):
    """Two directories of n entries each: files of many sizes, modes, owners
    and times, subdirectories, symlinks; with `links`, FIFOs and hard links
    (within big/, and from big2/ into big/)."""
    rnd = random.Random(21)
    modes = (0o644, 0o600, 0o755, 0o4755 if links else 0o700, 0o640)
    for d in ("big", "big2"):
        (root / d).mkdir(parents=True)
        for i in range(n):
            p = root / d / f"e{i:05d}"
            if i % 50 == 0:
                p.mkdir()
                os.chmod(p, 0o750)
            elif i % 50 == 1:
                os.symlink("t" * (1 + i % 40), p)
            elif i % 50 == 2 and links:
                os.mkfifo(p)
            else:
                p.write_bytes(rnd.randbytes(i % 3000))
                os.chown(p, i % 3 * 1000, i % 4 * 100)
                os.chmod(p, modes[i % 5])
            os.utime(p, (1_600_000_000 + i * 7, 1_500_000_000 + i * 13), follow_symlinks=False)
    if links:
        for i in range(5, n, 20):
            os.link(root / "big" / f"e{i:05d}", root / "big" / f"hl{i:05d}")
            os.link(root / "big" / f"e{i:05d}", root / "big2" / f"xl{i:05d}")


def listed_then_stated(directory, interleaved):
    """{name: (d_type kind, d_ino, lstat)}: os.scandir, then a stat of each
    entry; or (interleaved) each stat right after its entry is read, as ls -l
    does."""
    def kind(e):
        return "dir" if e.is_dir(follow_symlinks=False) else "link" if e.is_symlink() else \
            "file" if e.is_file(follow_symlinks=False) else "other"
    if interleaved:
        return {e.name: (kind(e), e.inode(), os.lstat(e.path)) for e in os.scandir(directory)}
    listed = [(e.name, kind(e), e.inode(), e.path) for e in os.scandir(directory)]
    return {name: (k, ino, os.lstat(path)) for name, k, ino, path in listed}


def same_listing(src, got, times, nlink=True):
    """Every entry of src is in got with its type (from the listing alone),
    mode, owner, size, link count and times, and names share an inode in got
    exactly where they do in src."""
    want = {e.name: os.lstat(e.path) for e in os.scandir(src)}
    assert sorted(got) == sorted(want)
    for name, (kind, d_ino, st) in got.items():
        sa = want[name]
        kinds = {stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFREG: "file"}
        assert kind == kinds.get(stat.S_IFMT(sa.st_mode), "other"), name
        assert d_ino == st.st_ino, name
        assert (st.st_mode, st.st_uid, st.st_gid) == (sa.st_mode, sa.st_uid, sa.st_gid), name
        if not stat.S_ISDIR(sa.st_mode):  # (a directory's size and links are the filesystem's own)
            assert (st.st_size, st.st_nlink if nlink else 0) == (sa.st_size, sa.st_nlink if nlink else 0), name
        if times:  # (the source's atimes moved when the images were made)
            assert int(st.st_mtime) == int(sa.st_mtime), name

    def groups(stats):
        by_ino = {}
        for name, sa in stats.items():
            by_ino.setdefault(sa.st_ino, set()).add(name)
        return sorted(sorted(g) for g in by_ino.values())
    assert groups({n: st for n, (_, _, st) in got.items()}) == groups(want)


def test_a_big_directory_listed_then_stated(tmp_path):
    """A listing reads only the directory (names, inode numbers, types); each
    entry's attributes, read when it is stat'ed, are exact: ext4 and Btrfs
    with hard links and FIFOs, XFS without (a protofile makes neither); every
    entry listed first then stat'ed, and stat'ed as it is listed (then the
    listing sends the rest whole); a file open through one name keeps its
    size and bytes while its other names are listed; cp -a copies it all."""
    from rpofs.store.repo import Repository
    from synth import back_up

    n = 3000
    src, plain = tmp_path / "src", tmp_path / "plain"
    big_tree(src, n)
    big_tree(plain, n, links=False)
    images = []
    for name, build, tree, size in (("ext4", ext4, src, 64 * MiB), ("btrfs", btrfs, src, 160 * MiB),
                                    ("xfs", xfs, plain, 300 * MiB)):
        images.append(tmp_path / f"{name}.img")
        build(images[-1], tree, size)
    repo = Repository.init(str(tmp_path / "repo"))
    back_up(repo, [bytearray(i.read_bytes()) for i in images], [set()] * 3, "full", None, 10**15)
    repo.close()
    with mounted(tmp_path / "repo", tmp_path / "mnt") as mnt:
        files = mnt / "m" / "latest" / "files"
        for disk, tree, posix_times in (("vda", src, True), ("vdb", src, True), ("vdc", plain, False)):
            root = files / disk / "0"
            for d, interleaved in (("big", False), ("big2", True), ("big", False), ("big2", False)):
                same_listing(tree / d, listed_then_stated(root / d, interleaved), posix_times)
            if tree is src:
                big = (src / "big" / "e02005").read_bytes()
                with open(root / "big2" / "xl02005", "rb") as f:
                    for _ in range(3):
                        list(os.scandir(root / "big"))
                        assert os.fstat(f.fileno()).st_size == len(big) == os.stat(root / "big" / "hl02005").st_size
                        f.seek(0)
                        assert f.read() == big
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(files / "vda" / "0" / "big"), str(copy)], check=True)
        same_listing(src / "big", listed_then_stated(copy, False), True, nlink=False)  # (big2/ not copied)


@pytest.mark.parametrize("options", [[], ["-I", "128"], ["-O", "^filetype"], ["-O", "64bit"]])
def test_ext_read_as_dissect_reads_it(tmp_path, options):
    """ext's fast paths (directory entries and inodes unpacked with struct)
    give what dissect's own parse gives, for every entry of a tree of many
    kinds: 128- and 256-byte inodes, with and without file types in
    directory entries, 64-bit group descriptors, owners past 16 bits, a size
    past 32 bits, times with nanoseconds and epoch bits."""
    from rpofs.files.filesystems import ExtFilesystem, _InodeFilesystem

    src = tmp_path / "src"
    big_tree(src, 400)
    make_tree(src / "t", random.Random(3))
    with open(src / "sparse", "wb") as f:
        f.truncate(5 << 30)
    (src / "ids").write_text("x")
    os.chown(src / "ids", 100_000, 70_000)
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", *options, "-d", str(src), str(img), "48M"], check=True)
    if options != ["-I", "128"]:
        for field, value in (("mtime_extra", 0x1234567B), ("ctime_extra", 0x00000002), ("atime_extra", 0xFFFFFFFC)):
            subprocess.run(["debugfs", "-w", "-R", f"sif /ids {field} {value:#x}", str(img)], check=True,
                           capture_output=True)
    with open(img, "rb") as f:
        fs = ExtFilesystem(f)
        todo, seen = [fs.root()], 0
        while todo:
            directory = todo.pop()
            fast = list(fs.children(directory))
            slow = [(n.filename, n.inum, n.filetype) for n in fs.node(directory).iterdir()
                    if n.filename not in (".", "..")]
            assert [(e.name, e.ino, e.type) for e in fast] == slow
            for e in fast:
                node = fs.node(e)
                assert fs._attrs(node) == _InodeFilesystem._attrs(fs, node), e.name
                assert e.attrs == fs._attrs(node)
                seen += 1
                if e.is_dir:
                    todo.append(e)
        ids = next(e for e in fs.children(fs.root()) if e.name == "ids")
        assert (ids.uid, ids.gid) == (100_000, 70_000)
        assert next(e for e in fs.children(fs.root()) if e.name == "sparse").size == 5 << 30
        if options != ["-I", "128"]:
            assert ids.mtime_ns % 10**9 == 0x1234567B >> 2 and ids.mtime_ns // 10**9 >= 1 << 32
    assert seen > 1000
